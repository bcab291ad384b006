#!/usr/bin/env bash
# A/B of a run-time knob on icd's decode step, in one build on the GPU machine:
# icd_profile's unprofiled CUDA-graph decode step (median of STEPS) for each
# model under each setting of one environment variable, interleaved in
# ROUNDS so that drift touches both alike. After bench/peer/run_h200.sh's
# build stage (icd_profile and the random checkpoints in $ICD_MODELS_DIR).
#   bench/peer/decode_ab.sh OUT_FILE VAR "VALUE_A VALUE_B" MODEL_DIR...
# A value "-" leaves VAR unset. Env: STEPS (100), ROUNDS (2). The few-rows
# linear's settings, ICD_EARLY_OPERANDS and ICD_EARLY_DEPENDENTS (ICD_FEW_ROWS_*, which fused::ReloadLaunchSettings
# re-reads) run in one process per model (icd_profile --ab: one load, a
# graph captured per setting); any other VAR in a process per setting.
set -uo pipefail
out=${1:?usage: decode_ab.sh OUT_FILE VAR "VALUES" MODEL_DIR...}
var=${2:?}; values=${3:?}; shift 3
deb=${ICD_DEB_PREFIX:-/tmp/deb}
log() { echo "[decode_ab] $*" >&2; }
source "$(dirname "$0")/icd_env.sh"
if [[ $var == ICD_FEW_ROWS_* || $var == ICD_EARLY_OPERANDS || $var == ICD_EARLY_DEPENDENTS ]]; then
  for model in "$@"; do
    name=$(basename "$(dirname "$model")")
    icd_env /tmp/icd_profile/icd_profile --model "$model" --prefill-iters 1 \
      --decode-steps "${STEPS:-100}" --ab "$var" --values "$values" --rounds "${ROUNDS:-2}" \
      > "/tmp/decode_ab-$name.log" 2>&1
    status=$?
    grep "decode step (.*), no profiler" "/tmp/decode_ab-$name.log" |
      sed "s/: decode step/ $name: decode step/" | tee -a "$out"
    (( status == 0 )) || echo "$var $name: failed (exit $status): $(tail -1 "/tmp/decode_ab-$name.log")" | tee -a "$out"
  done
  exit 0
fi
for round in $(seq "${ROUNDS:-2}"); do
  for model in "$@"; do
    for value in $values; do
      if [[ $value == - ]]; then setting=(env -u "$var"); else setting=(env "$var=$value"); fi
      line=$(icd_env "${setting[@]}" /tmp/icd_profile/icd_profile --model "$model" \
        --prefill-iters 1 --decode-steps "${STEPS:-100}" --out "/tmp/decode_ab" 2>&1 |
        grep "decode step (cuda_graph), no profiler")
      echo "$var=$value round $round $(basename "$(dirname "$model")"): ${line:-failed}" | tee -a "$out"
    done
  done
done
