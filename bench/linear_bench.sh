#!/usr/bin/env bash
# Builds bench/linear_bench.cu once per tuning of the few-rows linear kernel
# (ICD_FEW_ROWS_LINEAR_WARPS x ICD_FEW_ROWS_LINEAR_UNROLL), in parallel, then
# runs them one after another (never two on the GPU at once).
#   bench/linear_bench.sh OUT_JSONL [VARIANTS]   VARIANTS: "WARPSxUNROLL ..." or
#                                                "WARPSxUNROLLxBLOCKS_PER_SM ..."
#                                                (default: the kernel's own)
set -uo pipefail
out=${1:?usage: bench/linear_bench.sh OUT_JSONL [VARIANTS]}
variants=${2:-default}
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${LINEAR_BENCH_DIR:-/tmp/linear_bench}; mkdir -p "$bin"
for v in $variants; do
  flags=()
  if [[ $v != default ]]; then
    IFS=x read -r warps unroll blocks <<< "$v"
    flags=(-DICD_FEW_ROWS_LINEAR_WARPS="$warps" -DICD_FEW_ROWS_LINEAR_UNROLL="$unroll")
    [[ -n $blocks ]] && flags+=(-DICD_FEW_ROWS_LINEAR_BLOCKS_PER_SM="$blocks")
  fi
  nvcc -std=c++17 -O3 -arch=sm_90 -I"$repo/server/core/src" "${flags[@]}" \
    -Xcompiler=-Wall,-Wextra,-Wshadow -Werror all-warnings \
    "$repo/bench/linear_bench.cu" "$repo/server/core/src/fused/few_rows_linear.cu" -lcublas \
    -o "$bin/linear_bench-$v" > "$bin/build-$v.log" 2>&1 &
done
wait
for v in $variants; do
  if [[ -x "$bin/linear_bench-$v" ]]; then
    "$bin/linear_bench-$v" --variant "$v" >> "$out" 2> "$bin/run-$v.log"
    echo "linear_bench $v: exit $? ($(tail -1 "$bin/run-$v.log"))" >&2
  else
    echo "linear_bench $v: build failed: $(tail -3 "$bin/build-$v.log")" >&2
  fi
done
