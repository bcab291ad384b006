#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan, UBSan) and runs each for a
# bounded time on the checked-in seed corpus.
#
#   tests/fuzz/run.sh [SECONDS_PER_TARGET=30] [BUILD_DIR=build-fuzz]
#
# ICD_FUZZ_SEED (default 1) fixes libFuzzer's random seed, so that `make
# test` replays the same sequence of inputs on every run (a slower machine
# stops earlier in it) and CI does not fail on what a new random walk finds.
# To explore, pass other seeds: ICD_FUZZ_SEED=0 picks one at random; keep
# what a crash leaves as a regression input in tests/fuzz/corpus/<target>/.
#
# New interesting inputs go to BUILD_DIR/corpus/<target>; the checked-in
# seeds (tests/fuzz/corpus/<target>) are only read. To keep what a long run
# found: tests/fuzz/run.sh 600 && cp build-fuzz/corpus/<t>/* tests/fuzz/corpus/<t>/
# (libFuzzer's -merge=1 keeps the set small). A crash leaves its input as
# BUILD_DIR/crash-* and makes this script fail.
#
# ICD_FUZZ_STEPS ("build run" by default): "build" only configures and
# builds (make test does it beside ctest), "run" only runs what is built.
set -euo pipefail
seconds=${1:-30}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
build=${2:-$repo/build-fuzz}
steps=" ${ICD_FUZZ_STEPS:-build run} "
mkdir -p "$build"
if [[ "$steps" == *" build "* ]]; then
  generator=()  # Ninja for a new tree, where installed
  [[ ! -f "$build/CMakeCache.txt" ]] && command -v ninja > /dev/null && generator=(-G Ninja)
  cmake -S "$here" -B "$build" "${generator[@]}" -DCMAKE_CXX_COMPILER=clang++ \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo > "$build/configure.log" 2>&1 ||
    { cat "$build/configure.log"; exit 1; }
  cmake --build "$build" -j"${ICD_JOBS:-2}"
fi
[[ "$steps" == *" run "* ]] || exit 0
# The targets run ICD_JOBS at a time (each libFuzzer process is one thread),
# so every target still has a core to itself for its whole time.
run_target() {
  local target=$1
  mkdir -p "$build/corpus/$target"
  # -rss_limit_mb: the readers allocate what a header promises only after
  # checking it against the file; a huge allocation is a finding.
  (cd "$build" && ASAN_OPTIONS=detect_leaks=0 "./${target}_fuzz" -max_total_time="$seconds" \
      -seed="${ICD_FUZZ_SEED:-1}" -timeout=10 -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
      "corpus/$target" "$here/corpus/$target" > "$build/${target}_fuzz.log" 2>&1)
}
status=0
pids=()
targets=(safetensors torch_bin config)
for target in "${targets[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "${ICD_JOBS:-2}" ]; do wait -n || true; done
  echo "== ${target}_fuzz for ${seconds} s"
  run_target "$target" &
  pids+=($!)
done
for i in "${!targets[@]}"; do
  wait "${pids[$i]}" || status=1
  echo "== ${targets[$i]}_fuzz:"; tail -12 "$build/${targets[$i]}_fuzz.log"
done
exit $status
