# Sourced by bench/peer/run_h200.sh, bench/prefill/run_h200.sh and
# bench/counters_h200.sh (icd_env only): what they
# run on the GPU machine. The caller defines `log`, `$deb` (the unpacked .debs)
# and `$work` (its output tree).

icd_env() {  # the run-time environment of deploy/build-gpu.sh (its notes say why)
  LD_LIBRARY_PATH="$deb/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  LD_PRELOAD="$(g++ -print-file-name=libstdc++.so.6)" "$@"
}

# profile_icd SHAPE MODEL_DIR DECODE_STEPS TIMEOUT_S: icd's prefill (2048
# tokens) and decode steps under LibTorch's profiler (bench/peer/icd_profile),
# tabled into $work/profile-icd.md and $work/profile-icd-SHAPE-*.json.
profile_icd() {
  local shape=$1 model=$2 steps=$3 limit=$4
  log "icd_profile $shape"
  icd_env timeout "$limit" /tmp/icd_profile/icd_profile --model "$model" --dtype bfloat16 \
    --seq-len 2048 --prefill-iters 5 --decode-steps "$steps" --out "$work/traces/icd-$shape" \
    > "$work/logs/icd_profile-$shape.log" 2>&1 || { log "icd_profile $shape failed"; return 1; }
  cat "$work/logs/icd_profile-$shape.log" >&2
  python3 bench/peer/trace_table.py "$work/traces/icd-$shape-prefill.json" --region icd_prefill \
    --label "icd $shape prefill 2048 tokens (bf16)" --json "$work/profile-icd-$shape-prefill.json" \
    --md "$work/profile-icd.md" > /dev/null || log "trace_table prefill $shape failed"
  python3 bench/peer/trace_table.py "$work/traces/icd-$shape-decode.json" --region icd_decode_step \
    --label "icd $shape decode step (bf16)" --json "$work/profile-icd-$shape-decode.json" \
    --md "$work/profile-icd.md" > /dev/null || log "trace_table decode $shape failed"
  python3 bench/peer/trace_table.py "$work/traces/icd-$shape-decode-graph.json" --region icd_decode_graph_step \
    --label "icd $shape decode step as its CUDA graph (bf16)" --json "$work/profile-icd-$shape-decode-graph.json" \
    --md "$work/profile-icd.md" > /dev/null || log "trace_table decode-graph $shape failed"
}
