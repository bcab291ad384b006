#!/usr/bin/env bash
# icd's Mamba-1 prefill on the GPU machine, in one call (issue 16, part 3):
#   build    icd-server, icdctl, icd_core_testing, cuda_test (deploy/build-gpu.sh,
#            ICD_TARGETS), the random mamba-130m / mamba-2.8b checkpoints
#            (bench/make_random_mamba.py, bf16, seed 0) meanwhile, then icd_profile
#            (bench/peer/icd_profile)
#   test     cuda_test (every case; its [cuda] lines give the kernels' errors) and
#            model_test's forward tests (the CPU path against the goldens)
#   latency  icd-server's MeasureLatency (icdctl latency): prefill 2048 tokens
#            (30 samples) and decode (200), bf16, batch 1, both shapes
#   profile  icd_profile (Kineto) on the prefill of both shapes -> trace_table.py
#   base     when BASE_TREE names a source tree of an earlier commit (BASE_COMMIT):
#            its icd-server + icdctl built beside the first build, and the same
#            latency figures from it after everything else (before/after, one machine)
# Usage (repo root on the GPU machine, .debs carried): bench/prefill/run_h200.sh OUT_DIR
# Env: STEPS ("build test latency profile"), DEADLINE (epoch seconds: later stages
# that would not fit are skipped), ICD_COMMIT, ICD_BUILD_DIR (/tmp/build-gpu),
# ICD_MODELS_DIR (/tmp/icd-models), WORK (/tmp/prefillwork), ICD_SHAPES ("130m 2.8b"),
# BASE_TREE, BASE_COMMIT.
set -uo pipefail
out=${1:?usage: bench/prefill/run_h200.sh OUT_DIR}
mkdir -p "$out"; out=$(cd "$out" && pwd)
repo=$(cd "$(dirname "$0")/../.." && pwd); cd "$repo"
work=${WORK:-/tmp/prefillwork}; mkdir -p "$work/logs" "$work/traces"
build=${ICD_BUILD_DIR:-/tmp/build-gpu}
models=${ICD_MODELS_DIR:-/tmp/icd-models}
shapes=${ICD_SHAPES:-130m 2.8b}
steps=" ${STEPS:-build test latency profile} "
deadline=${DEADLINE:-$(( $(date +%s) + 100000 ))}
commit=${ICD_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
results="$work/results.jsonl"
want() { [[ "$steps" == *" $1 "* ]]; }
log() { echo "[prefill $(date -u +%T)] $*" | tee -a "$work/logs/steps.log" >&2; }
fits() { (( $(date +%s) + $1 < deadline )) || { log "skipped $2: under $1 s left before the deadline"; return 1; }; }
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
torch_prefix=$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')
deb=${ICD_DEB_PREFIX:-/tmp/deb}
source bench/peer/icd_env.sh  # icd_env, profile_icd

[[ -f "$work/provenance.txt" ]] || {
  echo "commit: $commit"; echo "date: $(date -u +%FT%TZ)"
  echo "command: bench/prefill/run_h200.sh $* (STEPS=${STEPS:-default})"
  echo "machine: $(uname -srm); $(nproc) cores; $(grep MemTotal /proc/meminfo)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.mem,power.limit --format=csv 2>&1 | sed 's/^/gpu: /'
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -1)"
  python3 -c 'import torch; print("torch:", torch.__version__, "cuda", torch.version.cuda)' 2>&1
  echo "cmake: $(cmake --version | head -1)"; echo "g++: $(g++ --version | head -1)"
  echo "TORCH_CUDA_ARCH_LIST: $TORCH_CUDA_ARCH_LIST"
} > "$work/provenance.txt" 2>&1

if want build; then
  t0=$(date +%s)
  ( ICD_TARGETS="icd-server icdctl icd_core_testing cuda_test model_test" ICD_LOG_DIR="$work/logs/icd-build" \
      bash deploy/build-gpu.sh "$build" > "$work/logs/icd-build.log" 2>&1
    echo "exit $?" >> "$work/logs/icd-build.log" ) & build_pid=$!
  if [[ -n "${BASE_TREE:-}" ]]; then
    ( ICD_TARGETS="icd-server icdctl" ICD_DEB_PREFIX=/tmp/deb-base ICD_DEBS_DIR="${ICD_DEBS_DIR:-$repo/.debs}" \
        bash "$BASE_TREE/deploy/build-gpu.sh" /tmp/build-base > "$work/logs/base-build.log" 2>&1
      echo "exit $?" >> "$work/logs/base-build.log" ) & base_pid=$!
  fi
  ( for shape in $shapes; do
      d="$models/mamba-$shape"
      [[ -f $d/config.json ]] || python3 bench/make_random_mamba.py --shape "$shape" --out "$d" >> "$results" 2>> "$work/logs/models.log"
    done ) & models_pid=$!
  wait $build_pid; log "icd build: $(tail -1 "$work/logs/icd-build.log") in $(( $(date +%s) - t0 )) s"
  grep -E "error|Error" "$work/logs/icd-build.log" | head -40 >&2
  if [[ -f "$build/server/core/libicd_core_testing.a" ]] && want profile; then
    ( cmake -S bench/peer/icd_profile -B /tmp/icd_profile -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DCMAKE_POLICY_VERSION_MINIMUM=3.5 -DICD_REPO="$repo" -DICD_BUILD="$build" \
        -DCMAKE_PREFIX_PATH="$torch_prefix;$deb/usr/lib/x86_64-linux-gnu/cmake;$deb/usr" &&
      cmake --build /tmp/icd_profile -j"$(nproc)" ) > "$work/logs/icd_profile-build.log" 2>&1 &
    profile_build_pid=$!
  fi
fi

if want test && [[ -x "$build/tests/unit/cuda_test" ]] && fits 60 test; then
  log "cuda_test"
  icd_env timeout $(( deadline - $(date +%s) - 30 )) "$build/tests/unit/cuda_test" > "$out/cuda_test.txt" 2>&1
  log "cuda_test exit $?: $(grep -E '^\[  (PASSED|FAILED) ' "$out/cuda_test.txt" | tr '\n' ' ')"
  grep -E "^\[cuda\]|FAILED|Failure|error" "$out/cuda_test.txt" >&2
  icd_env timeout 120 "$build/tests/unit/model_test" --gtest_brief=1 --gtest_filter="*Forward*:*Golden*:*Decode*:*Capture*" > "$work/logs/forward_test.txt" 2>&1
  log "forward_test exit $?: $(grep -E '^\[  (PASSED|FAILED) ' "$work/logs/forward_test.txt" | tr '\n' ' ')"
fi
# Every build done before any timing: a compiling CPU would be timed too.
want build && wait ${models_pid:-} ${profile_build_pid:-} ${base_pid:-} 2>/dev/null
[[ -n "${BASE_TREE:-}" ]] && log "base build: $(tail -1 "$work/logs/base-build.log")"

server_pid=""
stop_server() { [[ -n "$server_pid" ]] && { kill "$server_pid"; wait "$server_pid" 2>/dev/null; server_pid=""; }; }
trap stop_server EXIT
# icd_latency BUILD_DIR COMMIT TREE: MeasureLatency through that build's server.
icd_latency() {
  local dir=$1 tree_commit=$2 tree=$3
  icd_env "$dir/server/icd-server" --listen 127.0.0.1:0 --model-root "$models" --export-root /tmp \
    --device cuda > "$work/logs/server-$tree.stdout" 2>> "$work/logs/server-$tree.log" & server_pid=$!
  for _ in $(seq 150); do grep -q "listening on" "$work/logs/server-$tree.stdout" 2>/dev/null && break; sleep 0.2; done
  local address; address=$(sed -n 's/^listening on //p' "$work/logs/server-$tree.stdout" | head -1)
  icdctl() { icd_env timeout 200 "$dir/client/cpp/icdctl" --server "$address" "$@"; }
  for shape in $shapes; do
    fits 40 "latency $tree $shape" || break
    icdctl load "bf16-$shape" "mamba-$shape" --device cuda --dtype bfloat16 >> "$work/logs/icdctl.log" 2>&1 ||
      { log "load bf16-$shape ($tree) failed"; continue; }
    for mode in prefill decode; do
      iters=30; [[ $mode == decode ]] && iters=200
      icdctl --json latency "bf16-$shape" --mode $mode --batch 1 --seq-len 2048 --warmup 5 --iters $iters |
        python3 -c "import json,sys; r=json.load(sys.stdin); r.update(bench='icd_latency', impl='icd', family='mamba1', shape='$shape', mode='$mode', seq_len=2048, batch=1, dtype='bfloat16', commit='$tree_commit', tree='$tree', checkpoint='mamba-$shape (HF layout)'); print(json.dumps(r))" \
        >> "$results" 2>> "$work/logs/icdctl.log" || log "icd latency $tree $shape $mode failed"
      tail -1 "$results" >&2
    done
    icdctl unload "bf16-$shape" >> "$work/logs/icdctl.log" 2>&1
  done
  stop_server
}
if want latency && fits 90 latency; then
  icd_latency "$build" "$commit" prefill
fi

if want profile && [[ -x /tmp/icd_profile/icd_profile ]]; then
  for shape in $shapes; do
    fits 60 "profile $shape" || break
    profile_icd "$shape" "$models/mamba-$shape" 10 150 || continue
  done
fi

if [[ -n "${BASE_TREE:-}" ]] && fits 60 "base latency"; then
  [[ -x /tmp/build-base/server/icd-server ]] && icd_latency /tmp/build-base "${BASE_COMMIT:-unknown}" base
fi

cp "$results" "$out/results.jsonl" 2>/dev/null
cp "$work/provenance.txt" "$out/" 2>/dev/null
cp "$work/profile-icd.md" "$out/profile.md" 2>/dev/null
( cd "$work" && tar -czf "$out/logs.tar.gz" logs profile-*.json 2>/dev/null )
log "packed: $(ls "$out" | tr '\n' ' ')"
