#!/usr/bin/env bash
# Before spending device time: the C++ that only a CUDA build compiles (the
# ICD_HAVE_CUDA* and ICD_HAVE_CUPTI branches, tests/unit/cuda_*.cc), checked
# for syntax and warnings here, against Debian's LibTorch headers (their
# ATen/cuda and c10/cuda) and the CUDA toolkit's. LibTorch 1.13's, not the
# GPU image's 2.11: the TORCH_VERSION_MAJOR >= 2 branches are not seen, and
# an API that differs between the two can still fail there. The .cu kernels
# are nvcc's: bench/linear_bench.sh and the build compile those.
#   deploy/check-cuda-syntax.sh [FILE...]   (default: every such file)
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd); cd "$repo"
cuda=${CUDA_HOME:-/usr/local/cuda}
[[ -d $cuda/include ]] || { echo "no CUDA toolkit headers under $cuda" >&2; exit 2; }
# Debian's LibTorch lacks the header its CMake would generate for c10/cuda.
shim=$(mktemp -d); trap 'rm -rf "$shim"' EXIT
mkdir -p "$shim/c10/cuda/impl" && echo '#pragma once' > "$shim/c10/cuda/impl/cuda_cmake_macros.h"
files=("$@")
if [[ ${#files[@]} -eq 0 ]]; then
  mapfile -t files < <(grep -rlE 'ICD_HAVE_(CUDA|CUPTI)' server/core/src --include=*.cc | sort)
  files+=(tests/unit/cuda_engine_test.cc tests/unit/cuda_placement_test.cc tests/unit/cuda_counters_test.cc)
fi
status=0
for f in "${files[@]}"; do
  out=$(g++ -std=c++17 -fsyntax-only -DICD_HAVE_CUDA -DICD_HAVE_CUDA_SCAN -DICD_HAVE_CUDA_FUSED \
    -DICD_HAVE_CUDA_GATHER -DICD_HAVE_CUPTI -DICD_FIXTURES_DIR='"x"' -DICD_SYSTEM_PYTHON='"x"' \
    -I "$shim" -I server/core/include -I server/core/src -I common/include -I tests/unit \
    -isystem /usr/include/torch/csrc/api/include -isystem "$cuda/include" -isystem "$cuda/extras/CUPTI/include" \
    -Wall -Wextra -Wpedantic -Wshadow -Wconversion -Wno-sign-conversion "$f" 2>&1 | grep -E 'error|warning')
  if [[ -n $out ]]; then echo "== $f"; echo "$out" | head -20; status=1; fi
done
[[ $status == 0 ]] && echo "${#files[@]} files: no error or warning"
exit $status
