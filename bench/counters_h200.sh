#!/usr/bin/env bash
# Memory traffic from the hardware counters on the GPU machine (issue 21),
# after bench/soak_h200.sh's build (or with SOAK_TARGETS naming
# counters_check, icd-server and icdctl; the co-design step builds
# icd_python_stubs into the same build when they are missing):
#   1. icd's CUPTI counters against Nsight Compute's on the same sample
#      (bench/counters_check: --cupti, then --ncu under ncu with the same
#      metrics), prefill and decode of random mamba-130m (and COUNTERS_SHAPES),
#      each replay beside its match: icd's user replay (the service's) beside
#      ncu's application replay without cache control, icd's kernel replay
#      beside ncu's kernel replay with caches flushed;
#   2. identity against permuted through the service: a bf16 copy with every
#      group applied (--random 7 --tolerance 10, recorded) timed against the
#      original with `icdctl latency --counters 3`, prefill 2048 and decode;
#      and the control, a second unpermuted copy against the original;
#   bench/counters_h200.sh OUT_DIR
# Env: COUNTERS_SHAPES (130m), NCU_SHAPES (the first shape; empty: no ncu),
# COUNTERS_CHECK (1: counters_check's CUPTI runs), COUNTERS_MODES ("prefill
# decode": of those runs, the service's and ncu's), COUNTERS_REPLAYS ("user
# kernel": counters_check's), NCU_RUNS ("application:none kernel:all": ncu's
# --replay-mode:--cache-control runs), COUNTERS_REPEATS (3), COUNTERS_CODESIGN (1),
# COUNTERS_WRITES (0; 1: the DRAM-write experiment below), COUNTERS_PASS_COST
# (0; 1: what a pass costs against CUPTI's ranges per pass), COUNTERS_SERVICE
# (1; 0: no identity-vs-permuted service runs),
# COUNTERS_READ_SIZES (empty; "16 64 256 1024": the sum's writes against its size),
# COUNTERS_READ_SLICES (empty; "1 64 256": 1,024 MB read in that many launches),
# NCU_CHECK_FLAGS (counters_check's flags under ncu, e.g. "--scrub": L2 refilled
# with clean lines before the sample, as icd's flush leaves it),
# COUNTERS_STEP_TIMEOUT_S (300: each step's limit, so that one slow step
# leaves the others' results and a log line naming it).
set -uo pipefail
out=${1:?usage: bench/counters_h200.sh OUT_DIR}
mkdir -p "$out"; out=$(cd "$out" && pwd)
repo=$(cd "$(dirname "$0")/.." && pwd); cd "$repo"
build=${ICD_BUILD_DIR:-/tmp/build-gpu}
deb=${ICD_DEB_PREFIX:-/tmp/deb}
models=${ICD_MODELS_DIR:-/tmp/icd-models}
shapes=${COUNTERS_SHAPES:-130m}
metrics=dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sectors.sum,lts__t_sector_hit_rate.pct,gpu__time_duration.sum
log() { echo "[counters_h200 $(date -u +%T)] $*" | tee -a "$out/steps.log" >&2; }
limit=${COUNTERS_STEP_TIMEOUT_S:-300}
source bench/peer/icd_env.sh  # icd_env: the GPU build's run-time environment
{
  echo "commit: ${ICD_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  echo "date: $(date -u +%FT%TZ)"
  echo "command: bench/counters_h200.sh $*"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | sed 's/^/gpu: /'
  echo "ncu: $(ncu --version 2>/dev/null | tail -1)"
  echo "metrics: $metrics"
} >> "$out/provenance.txt" 2>&1

for shape in $shapes; do
  dir="$models/mamba-$shape"
  [[ -f "$dir/config.json" ]] || python3 bench/make_random_mamba.py --shape "$shape" --out "$dir" \
    > "$out/make-$shape.log" 2>&1 || { log "make_random_mamba $shape failed"; continue; }
  [[ ${COUNTERS_CHECK:-1} == 1 ]] || continue
  for mode in ${COUNTERS_MODES:-prefill decode}; do
    for replay in ${COUNTERS_REPLAYS:-user kernel}; do
      # Kernel replay only for the cross-check, once: it takes 30-40 s a decode step.
      repeats=3; [[ $replay == kernel ]] && repeats=1
      log "cupti $shape $mode (replay $replay)"
      icd_env timeout -k 5 "$limit" "$build/bench/counters_check" --model "$dir" --mode $mode --seq-len 2048 \
        --cupti --replay $replay --repeats $repeats > "$out/cupti-$shape-$mode-$replay.jsonl" 2> "$out/cupti-$shape-$mode-$replay.err" ||
        log "cupti $shape $mode $replay failed (exit $?; 124: the step limit): $(tail -2 "$out/cupti-$shape-$mode-$replay.err")"
    done
  done
done

# Where a kernel's counted DRAM writes come from (more than it writes:
# deploy/results/h200-gpu-2026-12-03d/): a sum over 256 MB and the decode step,
# each as it runs, after 100 ms of idle device, and after a read of twice the
# L2; the sum under ncu's application replay too, and both samples under
# ncu's range replays (the range between cudaProfilerStart and Stop counted
# as one, as a range profiler counts: does ncu then count icd's writes?).
# COUNTERS_WRITES=1; COUNTERS_WRITES_CUPTI=0 leaves out icd's own runs.
if [[ ${COUNTERS_WRITES:-0} == 1 ]]; then
  for variant in "plain:" "settle:--settle-ms 100" "scrub:--scrub"; do
    [[ ${COUNTERS_WRITES_CUPTI:-1} == 1 ]] || break
    name=${variant%%:*} flags=${variant#*:}
    for sample in "read:--mode read" "decode:--model $models/mamba-${shapes%% *} --mode decode --seq-len 2048"; do
      what=${sample%%:*}
      log "writes: $what, $name (user replay)"
      icd_env timeout -k 5 "$limit" "$build/bench/counters_check" ${sample#*:} --cupti --replay user --repeats 2 $flags \
        > "$out/writes-$what-$name.jsonl" 2> "$out/writes-$what-$name.err" || log "writes $what $name failed (exit $?)"
    done
  done
  # ncu locks the clocks to base by default and icd does not: the third run
  # leaves them free, as icd's do.
  for variant in "plain::" "settle:--settle-ms 100:" "clocks-free::--clock-control none"; do
    name=${variant%%:*} rest=${variant#*:} flags=${rest%%:*} ncu_flags=${rest#*:}
    log "writes: read under ncu (application replay, no cache control), $name"
    icd_env timeout -k 5 "$limit" ncu --profile-from-start off --replay-mode application --cache-control none $ncu_flags \
      --metrics "$metrics" --csv --page raw --print-units base "$build/bench/counters_check" --mode read --ncu $flags \
      > "$out/ncu-writes-read-$name.csv" 2> "$out/ncu-writes-read-$name.err" || log "ncu writes $name failed (exit $?)"
  done
  # (the prefill too: a whole range is what icd's ranges of a prefill sum to,
  # less what is written back between them: 1.066x ncu's kernel count with
  # the flush, h200-gpu-2026-12-04a)
  for replay in range app-range; do
    for sample in "read:--mode read" "decode:--model $models/mamba-${shapes%% *} --mode decode --seq-len 2048" \
                  "prefill:--model $models/mamba-${shapes%% *} --mode prefill --seq-len 2048"; do
      what=${sample%%:*}
      log "writes: $what under ncu, --replay-mode $replay, no cache control"
      # (no --profile-from-start: range replay takes its ranges from
      # cudaProfilerStart/Stop and refuses the option)
      icd_env timeout -k 5 "$limit" ncu --replay-mode $replay --cache-control none \
        --metrics "$metrics" --csv --page raw --print-units base "$build/bench/counters_check" ${sample#*:} --ncu ${NCU_CHECK_FLAGS:-} \
        > "$out/ncu-writes-$what-$replay.csv" 2> "$out/ncu-writes-$what-$replay.err" || log "ncu writes $what $replay failed (exit $?)"
    done
  done
fi

# The sum's counted DRAM writes against its size: under icd with the L2
# flush (the service's default) and without it, under ncu as the program
# leaves L2 and after a clean refill of it (--scrub). Without the flush icd's
# count stopped growing at about 21 MB past 256 MB (h200-gpu-2026-12-04a):
# lines dirtied before the range, written back by the sum's misses.
# COUNTERS_READ_SIZES="16 64 256 1024" (MB).
for mb in ${COUNTERS_READ_SIZES:-}; do
  for variant in "flush:" "no-flush:--no-flush"; do
    name=${variant%%:*} flags=${variant#*:}
    log "writes: a sum over $mb MB, user replay, room for 16 launches, $name"
    icd_env timeout -k 5 "$limit" "$build/bench/counters_check" --mode read --read-mb "$mb" --cupti \
      --replay user --repeats 2 --max-launches 16 $flags > "$out/writes-read-$mb-mb-$name.jsonl" \
      2> "$out/writes-read-$mb-mb-$name.err" || log "writes read $mb MB $name failed (exit $?)"
  done
  for variant in "plain:" "scrub:--scrub"; do
    name=${variant%%:*} flags=${variant#*:}
    log "writes: a sum over $mb MB under ncu (application replay, no cache control), $name"
    icd_env timeout -k 5 "$limit" ncu --profile-from-start off --replay-mode application --cache-control none \
      --metrics "$metrics" --csv --page raw --print-units base "$build/bench/counters_check" --mode read \
      --read-mb "$mb" --ncu $flags > "$out/ncu-writes-read-$mb-mb-$name.csv" 2> "$out/ncu-writes-read-$mb-mb-$name.err" ||
      log "ncu writes read $mb MB $name failed (exit $?)"
  done
done

# The same 1,024 MB read in N launches (COUNTERS_READ_SLICES="1 64 256"),
# icd with the flush and ncu: writes that grow with the launches come with
# each range (the profiler's own records, written back by later misses), not
# with the bytes. The prefill's writes are 1.066x ncu's with the flush
# (h200-gpu-2026-12-04a); its 293 launches are where such a cost would show.
for slices in ${COUNTERS_READ_SLICES:-}; do
  log "writes: 1024 MB in $slices launches, user replay, flush"
  icd_env timeout -k 5 "$limit" "$build/bench/counters_check" --mode read --read-mb 1024 \
    --read-slices "$slices" --cupti --replay user --repeats 2 --max-launches $(( slices + 16 )) \
    > "$out/writes-slices-$slices.jsonl" 2> "$out/writes-slices-$slices.err" || log "writes slices $slices failed (exit $?)"
  log "writes: 1024 MB in $slices launches under ncu (application replay, no cache control)"
  icd_env timeout -k 5 "$limit" ncu --profile-from-start off --replay-mode application --cache-control none \
    --metrics "$metrics" --csv --page raw --print-units base "$build/bench/counters_check" --mode read \
    --read-mb 1024 --read-slices "$slices" --ncu --scrub > "$out/ncu-writes-slices-$slices.csv" \
    2> "$out/ncu-writes-slices-$slices.err" || log "ncu writes slices $slices failed (exit $?)"
done

# What a collection's passes cost (seconds each, whatever the work:
# deploy/results/h200-gpu-2026-12-03e/): the 256 MB sum with CUPTI's ranges
# per pass sized 16, 1024 and 8192 (the default), phases timed
# (ICD_COUNTERS_TRACE). COUNTERS_PASS_COST=1.
if [[ ${COUNTERS_PASS_COST:-0} == 1 ]]; then
  for ranges in 16 1024 8192; do
    log "pass cost: read, --max-launches $ranges"
    ICD_COUNTERS_TRACE=1 icd_env timeout -k 5 "$limit" "$build/bench/counters_check" --mode read --cupti \
      --replay user --repeats 2 --max-launches $ranges > "$out/pass-cost-$ranges.jsonl" 2> "$out/pass-cost-$ranges.err" ||
      log "pass cost $ranges failed (exit $?)"
    grep "icd counters:" "$out/pass-cost-$ranges.err" | sed "s/^/max-launches $ranges: /" >> "$out/pass-cost.txt"
  done
fi

# Identity against permuted through the service.
if [[ ${COUNTERS_SERVICE:-1} == 1 ]]; then
log "service: identity vs permuted"
server_log="$out/server.log"
icd_env "$build/server/icd-server" --listen 127.0.0.1:0 --model-root "$models" --export-root /tmp \
  --device cuda > "$server_log" 2>&1 &
server=$!
for _ in $(seq 300); do grep -q "listening on" "$server_log" && break; sleep 0.2; done
address=$(sed -n 's/^listening on //p' "$server_log" | head -1)
icdctl() { icd_env timeout -k 5 "$limit" "$build/client/cpp/icdctl" --server "$address" --timeout 900 "$@"; }
for shape in $shapes; do
  # copy-$shape: a second unpermuted load, the control. Counts can move with
  # where the allocator put the weights (which L2 partition is near their
  # memory), so identity against an identical copy says how much of a
  # permuted/identity difference is placement.
  icdctl load "id-$shape" "mamba-$shape" --dtype bfloat16 > /dev/null &&
    icdctl load "copy-$shape" "mamba-$shape" --dtype bfloat16 > /dev/null &&
    icdctl load "perm-$shape" "mamba-$shape" --dtype bfloat16 > /dev/null || { log "load $shape failed"; continue; }
  icdctl --json apply "perm-$shape" --random 7 --tolerance 10 > "$out/apply-$shape.json" 2>&1 ||
    log "apply perm-$shape failed: $(tail -1 "$out/apply-$shape.json")"
  for mode in ${COUNTERS_MODES:-prefill decode}; do
    iters=20; [[ $mode == decode ]] && iters=100
    log "service $shape $mode"
    icdctl --json latency "perm-$shape" --compare "id-$shape" --mode $mode --seq-len 2048 \
      --iters $iters --counters ${COUNTERS_REPEATS:-3} > "$out/service-$shape-$mode.json" 2>&1 || log "latency json $shape $mode failed (exit $?)"
    icdctl --json latency "copy-$shape" --compare "id-$shape" --mode $mode --seq-len 2048 \
      --iters $iters --counters ${COUNTERS_REPEATS:-3} > "$out/control-$shape-$mode.json" 2>&1 || log "control json $shape $mode failed (exit $?)"
  done
done
# On the CPU the same call is refused, never zeros.
icdctl load cpu-model "mamba-${shapes%% *}" --device cpu --dtype float32 > /dev/null 2>&1 &&
  icdctl latency cpu-model --seq-len 8 --iters 1 --counters 1 > "$out/service-cpu.txt" 2>&1
echo "exit $?" >> "$out/service-cpu.txt"
kill $server; wait $server 2>/dev/null
fi

# The co-design example's variants against dense, with their counters, on the
# trained reference model (models/, float32 as stored).
if [[ ${COUNTERS_CODESIGN:-1} == 1 ]]; then
log "codesign_loop --counters 3"
# The Python client's generated stubs, from the GPU build (built here if that
# build's targets left them out: the last run's did).
[[ -f "$build/client/python/gen/icd/v1/permutation_pb2.py" ]] ||
  ICD_TARGETS=icd_python_stubs ICD_LOG_DIR="$out/stubs-build" deploy/build-gpu.sh "$build" > "$out/stubs-build.log" 2>&1 ||
  log "icd_python_stubs failed to build: $(tail -2 "$out/stubs-build.log")"
pydeb=${ICD_PYDEB_PREFIX:-/tmp/pydeb}
mkdir -p "$pydeb"; for f in .pydebs/*.deb; do dpkg-deb -x "$f" "$pydeb"; done
codesign_log="$out/codesign-server.log"
icd_env "$build/server/icd-server" --listen 127.0.0.1:0 --model-root models --export-root /tmp \
  --device cuda > "$codesign_log" 2>&1 &
server=$!
for _ in $(seq 300); do grep -q "listening on" "$codesign_log" && break; sleep 0.2; done
address=$(sed -n 's/^listening on //p' "$codesign_log" | head -1)
timeout -k 5 "$limit" env "PYTHONPATH=$pydeb/usr/lib/python3/dist-packages" "LD_LIBRARY_PATH=$pydeb/usr/lib/x86_64-linux-gnu" \
  "ICD_PYTHON_STUBS=$build/client/python/gen" python3 client/python/examples/codesign_loop.py --build "$build" --address "$address" \
  --device cuda --counters 3 --json "$out/codesign-mamba1-pydoc.json" > "$out/codesign.txt" 2>&1 ||
  log "codesign_loop failed: $(tail -3 "$out/codesign.txt")"
kill $server; wait $server 2>/dev/null
fi

# Nsight Compute on the same samples (last: the slowest part).
for shape in ${NCU_SHAPES-${shapes%% *}}; do
  dir="$models/mamba-$shape"
  for mode in ${COUNTERS_MODES:-prefill decode}; do
    for run in ${NCU_RUNS:-application:none kernel:all}; do
      replay=${run%%:*} cache=${run#*:}; [[ $run == *:* ]] || cache=all
      log "ncu $shape $mode (replay-mode $replay, cache-control $cache)"
      icd_env timeout -k 5 "$limit" ncu --profile-from-start off --replay-mode $replay --cache-control $cache \
        --metrics "$metrics" --csv --page raw --print-units base \
        "$build/bench/counters_check" --model "$dir" --mode $mode --seq-len 2048 --ncu ${NCU_CHECK_FLAGS:-} \
        > "$out/ncu-$shape-$mode-$replay-$cache.csv" 2> "$out/ncu-$shape-$mode-$replay-$cache.err" ||
        log "ncu $shape $mode $replay failed (exit $?): $(tail -2 "$out/ncu-$shape-$mode-$replay-$cache.err")"
      # icd's user replay beside ncu's application replay, kernel beside kernel.
      ours=user; [[ $replay == kernel ]] && ours=kernel
      python3 bench/counters_compare.py "$out/cupti-$shape-$mode-$ours.jsonl" "$out/ncu-$shape-$mode-$replay-$cache.csv" \
        >> "$out/compare.txt" 2>&1 || log "compare $shape $mode $replay failed"
    done
  done
done
log "done"
