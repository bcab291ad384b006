#!/usr/bin/env bash
# Nsight Compute's view of a decode step's kernels, one at a time (issues 16
# and 17: where the projections lose bandwidth against the HBM's peak), on
# the GPU machine after a build with counters_check (bench/soak_h200.sh or
# bench/peer/run_h200.sh) and random checkpoints (bench/make_random_mamba.py):
#   bench/ncu_decode_h200.sh OUT_DIR MODEL_DIR...
# Per model: ncu-decode-NAME.csv (every metric of the sections below, per
# launch) and a table in ncu-decode.md (duration, DRAM bytes and throughput,
# achieved occupancy, the leading warp stall). The step is counters_check's
# eager in-place step after a 2048-token prefill, the kernels a decode graph
# replays. Clocks free (as in a real run); caches flushed before each kernel
# (ncu's default), so every weight comes from DRAM, as it does in a step.
# Env: NCU_SKIP (launches of the step skipped first: 2, the embedding's),
# NCU_COUNT (launches profiled: 12, about two layers), NCU_TIMEOUT_S (300).
set -uo pipefail
out=${1:?usage: bench/ncu_decode_h200.sh OUT_DIR MODEL_DIR...}; shift
mkdir -p "$out"; out=$(cd "$out" && pwd)
repo=$(cd "$(dirname "$0")/.." && pwd); cd "$repo"
build=${ICD_BUILD_DIR:-/tmp/build-gpu}
deb=${ICD_DEB_PREFIX:-/tmp/deb}
log() { echo "[ncu_decode $(date -u +%T)] $*" | tee -a "$out/steps.log" >&2; }
source bench/peer/icd_env.sh
{
  echo "commit: ${ICD_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  echo "date: $(date -u +%FT%TZ)"
  echo "command: bench/ncu_decode_h200.sh $* (NCU_SKIP=${NCU_SKIP:-2} NCU_COUNT=${NCU_COUNT:-12})"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | sed 's/^/gpu: /'
  echo "ncu: $(ncu --version 2>/dev/null | tail -1)"
} >> "$out/provenance.txt" 2>&1
for model in "$@"; do
  name=$(basename "$(dirname "$model/.")")
  [[ $name == . || $name == mamba_ssm ]] && name=$(basename "$(dirname "$(dirname "$model/.")")")
  log "$name: ncu over launches ${NCU_SKIP:-2}..+${NCU_COUNT:-12} of one decode step"
  icd_env timeout -k 5 "${NCU_TIMEOUT_S:-300}" ncu --profile-from-start off --clock-control none \
    --launch-skip "${NCU_SKIP:-2}" --launch-count "${NCU_COUNT:-12}" \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
    --section LaunchStats --section WarpStateStats --csv --page details --print-units base \
    "$build/bench/counters_check" --model "$model" --mode decode --seq-len 2048 --ncu \
    > "$out/ncu-decode-$name.csv" 2> "$out/ncu-decode-$name.err" ||
    { log "$name: ncu failed (exit $?): $(tail -2 "$out/ncu-decode-$name.err")"; continue; }
  python3 bench/ncu_table.py "$out/ncu-decode-$name.csv" --title "$name decode step" >> "$out/ncu-decode.md" ||
    log "$name: ncu_table failed"
done
log done
