#!/usr/bin/env bash
# Issue 5's GPU figures in one run on the H200 (the device tool's calls last
# at most 10 minutes and a fresh machine is bare): build and test with
# deploy/build-gpu.sh, write randomly initialised mamba-130m and mamba-2.8b
# shaped checkpoints, then
#   1. the scan kernel alone against copy bandwidth     (scan_bench)
#   2. applying every group of the 2.8b model (bf16) against one device copy
#      of all weights                                    (apply_bench)
#   3. icd's forward latency through the real service: prefill and decode,
#      identity against permuted in interleaved rounds  (icdctl latency)
#   4. HuggingFace's PyTorch path on the same checkpoints and tokens
#                                                        (hf_latency.py)
#   5. the gRPC hop: small unary calls and Evaluate     (grpc_bench)
#   6. Leiden on CUDA graphs of 1024..8192 nodes        (solver_bench.sh)
#   7. trace ingestion with the statistics on the GPU  (trace_ingest_bench)
#
# Usage (repo root, on the GPU machine, .debs carried as for build-gpu.sh):
#   bench/gpu_bench.sh OUT_DIR
# Env: ICD_BUILD_DIR (build-gpu), ICD_MODELS_DIR (/tmp/icd-models),
#      ICD_COMMIT (recorded; git metadata of a copied tree may be stale),
#      ICD_STEPS (default "build scan models apply icd grpc hf solver ingest": any subset,
#      so a second call on a warm machine can finish what a first did not),
#      ICD_SHAPES ("130m 2.8b").
# Every step is bounded by `timeout` and a failed step does not stop the
# others; results are JSON lines in OUT_DIR/gpu-bench.jsonl, logs beside it.
set -uo pipefail
out=${1:?usage: bench/gpu_bench.sh OUT_DIR}
mkdir -p "$out/logs"
out=$(cd "$out" && pwd)
here=$(cd "$(dirname "$0")/.." && pwd)
build=${ICD_BUILD_DIR:-$here/build-gpu}
models=${ICD_MODELS_DIR:-/tmp/icd-models}
shapes=${ICD_SHAPES:-130m 2.8b}
results="$out/gpu-bench.jsonl"
python=${ICD_PYTHON:-python3}
steps=" ${ICD_STEPS:-build scan models apply icd grpc hf solver ingest} "
want() { [[ "$steps" == *" $1 "* ]]; }
step() { echo "[gpu_bench $(date -u +%T)] $*" | tee -a "$out/logs/steps.log" >&2; }
cd "$here"

{
  echo "commit: ${ICD_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  echo "date: $(date -u +%FT%TZ)"
  echo "command: bench/gpu_bench.sh $*"
  echo "machine: $(uname -srm); $(nproc) cores"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -1)"
  $python -c 'import torch, transformers; print("torch:", torch.__version__, "cuda", torch.version.cuda); print("transformers:", transformers.__version__)' 2>&1
  $python -c 'import mamba_ssm' >/dev/null 2>&1 && echo "mamba_ssm: installed" || echo "mamba_ssm: not installed (its kernels were not measured)"
} > "$out/provenance.txt"
cat "$out/provenance.txt" >&2

if want build; then
  step "build and unit/GPU tests (deploy/build-gpu.sh)"
  ICD_LOG_DIR="$out/logs" timeout 420 bash deploy/build-gpu.sh "$build" || step "build-gpu.sh failed: see logs/"
fi
# The run-time environment build-gpu.sh uses (its notes say why).
prefix=${ICD_DEB_PREFIX:-/tmp/deb}
export LD_LIBRARY_PATH="$prefix/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LIBRARY_PATH="$prefix/usr/lib/x86_64-linux-gnu${LIBRARY_PATH:+:$LIBRARY_PATH}"  # -lre2
export LD_PRELOAD="$(g++ -print-file-name=libstdc++.so.6)"
export PATH="$prefix/usr/bin:$PATH"
want build && { timeout 120 "$build/tests/unit/cuda_test" > "$out/logs/cuda_test-after-build.log" 2>&1 &&
  step "cuda_test: $(grep -E '^\[  PASSED' "$out/logs/cuda_test-after-build.log")" || step "cuda_test failed"; }
cmake --build "$build" -j"$(nproc)" --target icdctl grpc_bench apply_bench > "$out/logs/build-extra.log" 2>&1 ||
  step "icdctl/grpc_bench/apply_bench failed to build"

if want scan; then
  step "scan kernel"
  [[ -x "$build/bench/scan_bench" ]] && timeout 120 "$build/bench/scan_bench" >> "$results" 2> "$out/logs/scan_bench.log" ||
    step "scan_bench missing or failed"
fi

mkdir -p "$models"
want models && for shape in $shapes; do
  [[ -f "$models/mamba-$shape/config.json" ]] && continue
  step "random mamba-$shape checkpoint"
  timeout 240 $python bench/make_random_mamba.py --shape "$shape" --out "$models/mamba-$shape" \
    >> "$results" 2> "$out/logs/make-$shape.log" || step "make_random_mamba $shape failed"
done

want hf && for shape in $shapes; do
  [[ -f "$models/mamba-$shape/config.json" ]] || continue
  step "HuggingFace latency, mamba-$shape"
  iters=2; [[ $shape == 130m ]] && iters=5
  timeout 240 $python bench/hf_latency.py --model "$models/mamba-$shape" --dtype bfloat16 \
    --seq-len 2048 --iters $iters --warmup 1 --decode-steps 16 >> "$results" 2> "$out/logs/hf-$shape.log" ||
    step "hf_latency $shape failed (see logs/hf-$shape.log)"
done

# Every group of a model in a dtype (ICD_APPLY_CASES, "shape:dtype ..."):
# the float32/float64 checks show the permutations are exact; bf16's is
# bounded by the model's own rounding noise (hf_precision.py measures HF's
# bf16 against its float32; ICD_HF_PRECISION=0 skips it).
if want apply; then
  for case in ${ICD_APPLY_CASES:-130m:bfloat16 130m:float32 2.8b:bfloat16 2.8b:float32}; do
    shape=${case%%:*} dtype=${case#*:}
    [[ -f "$models/mamba-$shape/config.json" ]] || continue
    step "apply every group of mamba-$shape ($dtype) vs one device copy"
    timeout 240 "$build/bench/apply_bench" --model "$models/mamba-$shape" --device cuda \
      --dtype $dtype --repeats 5 >> "$results" 2>> "$out/logs/apply_bench.log" ||
      step "apply_bench $shape $dtype: failed or check refused (see the JSON line)"
  done
  [[ "${ICD_HF_PRECISION:-1}" == 1 ]] && for shape in $shapes; do
    timeout 120 $python bench/hf_precision.py --model "$models/mamba-$shape" >> "$results" \
      2>> "$out/logs/hf_precision.log" || step "hf_precision $shape failed"
  done
fi

if want icd || want grpc; then
step "icd-server on loopback"
"$build/server/icd-server" --listen 127.0.0.1:0 --model-root "$models" --export-root /tmp \
  --device cuda > "$out/logs/server.stdout" 2> "$out/logs/server.log" &
server_pid=$!
trap 'kill $server_pid 2>/dev/null' EXIT
for _ in $(seq 100); do grep -q "listening on" "$out/logs/server.stdout" 2>/dev/null && break; sleep 0.2; done
address=$(sed -n 's/^listening on //p' "$out/logs/server.stdout" | head -1)
icdctl() { timeout "${ICDCTL_TIMEOUT:-300}" "$build/client/cpp/icdctl" --server "$address" "$@"; }
if [[ -z "$address" ]]; then
  step "the server did not start: see logs/server.log"
else
  for shape in $shapes; do
    [[ -f "$models/mamba-$shape/config.json" ]] || continue
    if [[ $shape == 130m ]] || want icd; then
    icdctl load "id-$shape" "mamba-$shape" --device cuda --dtype bfloat16 > /dev/null &&
      icdctl load "perm-$shape" "mamba-$shape" --device cuda --dtype bfloat16 > /dev/null &&
      icdctl apply "perm-$shape" --random 7 > "$out/logs/apply-$shape.txt" || step "load/apply $shape failed"
    want icd && for mode in prefill decode; do
      iters=20; [[ $mode == decode ]] && iters=200
      icdctl --json latency "id-$shape" --compare "perm-$shape" --mode $mode --batch 1 \
        --seq-len 2048 --warmup 3 --iters $iters |
        $python -c "import json,sys; r=json.load(sys.stdin); r.update(bench='icd_latency', shape='$shape', mode='$mode', seq_len=2048, batch=1); print(json.dumps(r))" \
        >> "$results" 2>> "$out/logs/latency.log" || step "icd latency $shape $mode failed"
    done
    [[ $shape == 130m ]] && want grpc && {
      step "gRPC overhead (mamba-130m loaded)"
      timeout 120 "$build/bench/grpc_bench" --server "$address" --model "id-$shape" --calls 2000 \
        --evaluate-calls 50 --tokens 128 >> "$results" 2> "$out/logs/grpc_bench.log" || step "grpc_bench failed"
      icdctl --json latency "id-$shape" --mode prefill --batch 1 --seq-len 128 --warmup 5 --iters 50 |
        $python -c "import json,sys; r=json.load(sys.stdin); r.update(bench='icd_latency', shape='130m', mode='prefill', seq_len=128, batch=1); print(json.dumps(r))" \
        >> "$results" 2>> "$out/logs/latency.log"
    }
    icdctl unload "id-$shape" > /dev/null; icdctl unload "perm-$shape" > /dev/null
    fi
  done
  kill "$server_pid"; wait "$server_pid" 2>/dev/null
fi
fi

if want solver; then
  step "Leiden on CUDA graphs (solver_bench.sh; igraph is not on this machine)"
  ICD_DEVICE=cuda ICD_IGRAPH=0 timeout 200 bash bench/solver_bench.sh "$build" "$out/solver-cuda.txt" \
    ${ICD_SOLVER_SIZES:-1024 4096 5120 8192} > "$out/logs/solver.log" 2>&1 || step "solver_bench failed or timed out"
fi
if want ingest; then
  for channels in 1024 5120; do
    step "trace ingestion, $channels channels, statistics on cuda"
    timeout 150 "$build/bench/trace_ingest_bench" --device cuda --channels "$channels" \
      --skip-accumulate --echo-repeat 5 --repeat 2 >> "$results" 2>> "$out/logs/ingest.log" ||
      step "trace_ingest_bench $channels failed"
  done
fi

step "done: $results"
tar -C "$out" -czf "$out/logs.tar.gz" logs && rm -rf "$out/logs"  # one file comes back
