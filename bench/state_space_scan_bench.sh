#!/usr/bin/env bash
# Mamba-2's scan kernel, tile by tile, on the GPU machine (issue 17): builds
# bench/state_space_scan_bench.cu with nvcc (seconds), then for each tile of
# ICD_STATE_SPACE_TILE times it on the mamba2-130m and -2.7b layer shapes and,
# with NCU=1, reads one 2.7b launch under Nsight Compute (shared-memory
# wavefronts, instructions, issue stalls). With CUDA_TEST=PATH (a built
# tests/unit/cuda_test), first runs the scan's and Mamba-2's cuda_test cases
# under each tile: a tile is timed only where its tests pass.
#   bench/state_space_scan_bench.sh OUT_DIR [TILES]   TILES: default "16 32 8x2"
set -uo pipefail
out=${1:?usage: bench/state_space_scan_bench.sh OUT_DIR [TILES]}
tiles=${2:-16 32 8x2}
mkdir -p "$out"
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${SCAN_BENCH_DIR:-/tmp/state_space_scan_bench}; mkdir -p "$bin"
nvcc -std=c++17 -O3 -arch=sm_90 -I"$repo/server/core/src" \
  -Xcompiler=-Wall,-Wextra,-Wshadow -Werror all-warnings \
  "$repo/bench/state_space_scan_bench.cu" "$repo/server/core/src/scan/state_space_scan.cu" \
  "$repo/server/core/src/scan/state_space_chunked.cu" "$repo/server/core/src/scan/state_space_step.cu" \
  -o "$bin/state_space_scan_bench" > "$out/scan-bench-build.log" 2>&1 ||
  { echo "build failed: $(tail -3 "$out/scan-bench-build.log")" >&2; exit 1; }
filter='StateSpaceKernelTest.*:FusedForwardTest.Mamba2*:DecodeSessionTest.*'
for tile in $tiles; do
  if [[ -n "${CUDA_TEST:-}" ]]; then
    ICD_STATE_SPACE_TILE=$tile "$CUDA_TEST" --gtest_filter="$filter" > "$out/cuda_test-tile-$tile.log" 2>&1
    status=$?
    echo "cuda_test under tile $tile: exit $status ($(grep -E '^\[  (PASSED|FAILED)' "$out/cuda_test-tile-$tile.log" | tr '\n' ' '))" >&2
    (( status == 0 )) || continue
  fi
  ICD_STATE_SPACE_TILE=$tile "$bin/state_space_scan_bench" --label "${ICD_COMMIT:-unknown}" \
    >> "$out/scan-bench.jsonl" 2>> "$out/scan-bench.log" || echo "tile $tile: bench failed" >&2
  if [[ "${NCU:-0}" == 1 ]]; then
    # The 2.7b shape's first timed launch (the 130m shape's 35 launches come first).
    ICD_STATE_SPACE_TILE=$tile ncu --kernel-name regex:StateSpaceScanKernel --launch-skip 40 \
      --launch-count 1 --section SpeedOfLight --section SchedulerStats --section WarpStateStats \
      --section InstructionStats --section MemoryWorkloadAnalysis_Tables \
      --metrics l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,smsp__inst_executed.sum,gpu__time_duration.sum \
      "$bin/state_space_scan_bench" --label ncu > "$out/ncu-tile-$tile.txt" 2>&1 ||
      echo "tile $tile: ncu failed (ncu-tile-$tile.txt)" >&2
  fi
done
cat "$out/scan-bench.jsonl" >&2
