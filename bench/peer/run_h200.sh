#!/usr/bin/env bash
# icd beside mamba_ssm on the GPU machine, in one run (issue 16, part 1):
#   build   icd-server + icdctl + icd_core_testing + cuda_test (deploy/build-gpu.sh,
#           ICD_TARGETS),
#           the peer's forward-only extensions (build_peer.py, two processes), and
#           icd_profile (bench/peer/icd_profile) -- all in parallel; the random
#           mamba-130m / mamba-2.8b checkpoints (bench/make_random_mamba.py) and
#           their mamba_ssm layout (mamba_ssm_layout.py) meanwhile
#   cuda_test  icd's GPU tests (tests/unit/cuda_test; CUDA_TEST_FILTER, default all)
#   latency icd through icd-server's MeasureLatency (icdctl latency; decode as CUDA
#           graphs and --eager), then mamba_ssm
#           (peer_bench.py: prefill, decode with and without CUDA graphs, and its
#           torch.profiler tables), then icd again (drift check); bf16, batch 1
#   ratio   permuted / identity (issue 16): a second copy of each bf16 model, every group
#           applied (--random 7) with an explicit --tolerance 10 that the rows record with
#           the check's rel L2 and top-1 (these random models are chaotic in bf16: the
#           default 2e-2 refuses them), then MeasureLatency of the copy against the
#           original, prefill and decode; a row whose copy is not at a later version
#           than the original says "permuted": false
#   logits  float32 and bf16 logits on 64 fixed tokens: icd (icdctl evaluate
#           --logits) against mamba_ssm and HF (130m)
#   profile icd_profile (LibTorch's Kineto profiler around icd::Forward) on the
#           2.8b prefill and decode step and the 130m decode step -> trace_table.py
#   pack    side-by-side.jsonl and the tables into OUT_DIR (few files, for $OUT)
#
# Usage (repo root on the GPU machine, .debs and peers/ carried; see README.md):
#   bench/peer/run_h200.sh OUT_DIR
# Env: PEER_STEPS (default "build cuda_test latency ratio logits profile pack"), PEER_DEADLINE
# (epoch seconds: stages that would not fit are skipped, pack always runs),
# ICD_COMMIT, ICD_BUILD_DIR (/tmp/build-gpu), ICD_MODELS_DIR (/tmp/icd-models),
# PEER_WORK (/tmp/peerwork: logs, traces, logits; kept between calls on a warm
# machine), ICD_SHAPES ("130m 2.8b").
# Every stage skips what already exists (a warm machine's second call resumes).
set -uo pipefail
out=${1:?usage: bench/peer/run_h200.sh OUT_DIR}
mkdir -p "$out"; out=$(cd "$out" && pwd)
repo=$(cd "$(dirname "$0")/../.." && pwd); cd "$repo"
work=${PEER_WORK:-/tmp/peerwork}; mkdir -p "$work/logs" "$work/icd-logits" "$work/traces"
build=${ICD_BUILD_DIR:-/tmp/build-gpu}
models=${ICD_MODELS_DIR:-/tmp/icd-models}
shapes=${ICD_SHAPES:-130m 2.8b}
steps=" ${PEER_STEPS:-build cuda_test latency ratio logits profile pack} "
deadline=${PEER_DEADLINE:-$(( $(date +%s) + 100000 ))}
commit=${ICD_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
results="$work/results.jsonl"
want() { [[ "$steps" == *" $1 "* ]]; }
log() { echo "[run_h200 $(date -u +%T)] $*" | tee -a "$work/logs/steps.log" >&2; }
cap() { local left=$(( deadline - $(date +%s) - 45 )); (( left < 10 )) && left=10; (( $1 < left )) && echo "$1" || echo "$left"; }
fits() { (( $(date +%s) + $1 < deadline )) || { log "skipped $2: under $1 s left before the deadline"; return 1; }; }
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
torch_prefix=$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')
deb=${ICD_DEB_PREFIX:-/tmp/deb}
source bench/peer/icd_env.sh  # icd_env, profile_icd

if [[ ! -f "$work/provenance.txt" ]]; then
  {
    echo "commit: $commit"
    echo "date: $(date -u +%FT%TZ)"
    echo "command: bench/peer/run_h200.sh $* (PEER_STEPS=${PEER_STEPS:-default})"
    echo "machine: $(uname -srm); $(nproc) cores; $(grep MemTotal /proc/meminfo)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm,clocks.mem,power.limit --format=csv 2>&1 | sed 's/^/gpu: /'
    echo "nvcc: $(nvcc --version 2>/dev/null | tail -1)"
    python3 -c 'import torch, triton, transformers; print("torch:", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version()); print("triton:", triton.__version__); print("transformers:", transformers.__version__)' 2>&1
    python3 -c 'import einops; print("einops:", einops.__version__)' 2>&1 | tail -1
    echo "cmake: $(cmake --version | head -1)"; echo "g++: $(g++ --version | head -1)"
    for p in mamba causal-conv1d; do echo "peer $p: $(cat peers/$p/.source 2>/dev/null || echo 'see bench/peer/README.md')"; done
    command -v ncu > /dev/null && echo "ncu: $(ncu --version | tail -1)" || echo "ncu: not on PATH"
  } > "$work/provenance.txt" 2>&1
fi

[[ -f "$work/ids.json" ]] ||  # the 64 token ids of the logits comparison
  python3 -c 'import json,random; r=random.Random(16); print(json.dumps([r.randrange(50280) for _ in range(64)]))' > "$work/ids.json"

# ---------------------------------------------------------------- build
if want build; then
  t0=$(date +%s); pids=()
  budget=$(( deadline - t0 - 90 )); (( budget > 600 )) && budget=600
  (( budget < 30 )) && budget=30  # builds are cut here; ninja/make resume on a warm machine
  targets=${ICD_TARGETS:-icd-server icdctl icd_core_testing cuda_test}
  if [[ ! -x "$build/server/icd-server" || ! -x "$build/client/cpp/icdctl" || ! -f "$build/server/core/libicd_core_testing.a" ||
        ( "$targets" == *cuda_test* && ! -x "$build/tests/unit/cuda_test" ) ]]; then
    log "icd: deploy/build-gpu.sh ($targets)"
    ( ICD_TARGETS="$targets" ICD_LOG_DIR="$work/logs/icd-build" \
        timeout $budget bash deploy/build-gpu.sh "$build" > "$work/logs/icd-build.log" 2>&1
      echo "exit $?" >> "$work/logs/icd-build.log" ) & pids+=($!)
  fi
  for ext in selective_scan causal_conv1d; do
    so=peers/build/${ext}_cuda.so
    [[ -f $so ]] && { log "peer $ext: $so present (carried or built earlier)"; continue; }
    log "peer: build_peer.py --only $ext"
    ( MAX_JOBS=${MAX_JOBS:-16} timeout $budget python3 bench/peer/build_peer.py --only $ext --out peers/build \
        > "$work/logs/peer-build-$ext.log" 2>&1; echo "exit $?" >> "$work/logs/peer-build-$ext.log"
      grep '^{' "$work/logs/peer-build-$ext.log" >> "$results" ) & pids+=($!)
  done
  ( for shape in $shapes; do
      d="$models/mamba-$shape"
      [[ -f $d/config.json ]] || python3 bench/make_random_mamba.py --shape "$shape" --out "$d" >> "$results" 2>> "$work/logs/models.log"
      [[ -f $d/mamba_ssm/pytorch_model.bin ]] || python3 bench/peer/mamba_ssm_layout.py --hf "$d" --out "$d/mamba_ssm" >> "$results" 2>> "$work/logs/models.log"
    done ) & pids+=($!)
  wait "${pids[@]}"
  log "builds and models done in $(( $(date +%s) - t0 )) s; icd: $(tail -1 "$work/logs/icd-build.log" 2>/dev/null)"
  if [[ ! -x /tmp/icd_profile/icd_profile && -f "$build/server/core/libicd_core_testing.a" ]]; then
    log "icd_profile: configure and build"
    { cmake -S bench/peer/icd_profile -B /tmp/icd_profile -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DCMAKE_POLICY_VERSION_MINIMUM=3.5 -DICD_REPO="$repo" -DICD_BUILD="$build" \
        -DCMAKE_PREFIX_PATH="$torch_prefix;$deb/usr/lib/x86_64-linux-gnu/cmake;$deb/usr" &&
      timeout $(cap 240) cmake --build /tmp/icd_profile -j"$(nproc)"; } > "$work/logs/icd_profile-build.log" 2>&1 ||
      log "icd_profile failed to build (logs/icd_profile-build.log)"
  fi
  ls -la peers/build "$build/server/icd-server" "$build/client/cpp/icdctl" /tmp/icd_profile/icd_profile >> "$work/logs/steps.log" 2>&1
fi

# ---------------------------------------------------------------- cuda_test
if want cuda_test && [[ -x "$build/tests/unit/cuda_test" && ! -f "$work/logs/cuda_test.log" ]] && fits 60 cuda_test; then
  log "cuda_test --gtest_filter=${CUDA_TEST_FILTER:-*}"
  icd_env timeout $(cap 300) "$build/tests/unit/cuda_test" --gtest_filter="${CUDA_TEST_FILTER:-*}" \
    > "$work/logs/cuda_test.log" 2>&1 || log "cuda_test failed (logs/cuda_test.log)"
  grep -E '^\[  (PASSED|FAILED|  SKIPPED) |^\[decode\]' "$work/logs/cuda_test.log" >&2
fi

# ---------------------------------------------------------------- server
server_pid=""
start_server() {
  [[ -n "$server_pid" ]] && return 0
  LD_LIBRARY_PATH="$deb/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  LD_PRELOAD="$(g++ -print-file-name=libstdc++.so.6)" \
    "$build/server/icd-server" --listen 127.0.0.1:0 --model-root "$models" --export-root /tmp \
    --device cuda > "$work/logs/server.stdout" 2>> "$work/logs/server.log" &
  server_pid=$!
  for _ in $(seq 150); do grep -q "listening on" "$work/logs/server.stdout" 2>/dev/null && break; sleep 0.2; done
  address=$(sed -n 's/^listening on //p' "$work/logs/server.stdout" | head -1)
  [[ -n "$address" ]] || { log "icd-server did not start (logs/server.log)"; return 1; }
}
stop_server() { [[ -n "$server_pid" ]] && { kill "$server_pid"; wait "$server_pid" 2>/dev/null; server_pid=""; }; }
trap stop_server EXIT
icdctl() { icd_env timeout $(cap 300) "$build/client/cpp/icdctl" --server "$address" "$@"; }
loaded=" "
ensure_loaded() {  # NAME PATH DTYPE
  [[ "$loaded" == *" $1 "* ]] && return 0
  icdctl load "$1" "$2" --device cuda --dtype "$3" >> "$work/logs/icdctl.log" 2>&1 && loaded+="$1 "
}
icd_latency() {  # ROUND
  for shape in $shapes; do
    ensure_loaded "bf16-$shape" "mamba-$shape/mamba_ssm" bfloat16 || { log "load bf16-$shape failed"; continue; }
    # decode: replayed as CUDA graphs (the default), then eager
    for run in prefill decode decode:--eager; do
      mode=${run%%:*}; flag=${run#$mode}; flag=${flag#:}
      iters=30; [[ $mode == decode ]] && iters=200
      icdctl --json latency "bf16-$shape" --mode $mode --batch 1 --seq-len 2048 --warmup 5 --iters $iters $flag |
        python3 -c "import json,sys; r=json.load(sys.stdin); r.update(bench='icd_latency', impl='icd', family='mamba1', shape='$shape', mode='$mode', seq_len=2048, batch=1, dtype='bfloat16', round='$1', commit='$commit', checkpoint='mamba-$shape/mamba_ssm'); print(json.dumps(r))" \
        >> "$results" 2>> "$work/logs/icdctl.log" || log "icd latency $shape $run failed"
    done
  done
}

# ---------------------------------------------------------------- latency
if want latency && ! grep -q '"bench": "peer_latency"' "$results" 2>/dev/null && fits 240 latency; then
  start_server && {
    log "icd latency, round A"; icd_latency A
    log "mamba_ssm latency and profile (peer_bench.py)"
    timeout $(cap 420) python3 bench/peer/peer_bench.py --models "$models" --shapes $shapes --out "$work" \
      --commit "$commit" > "$work/logs/peer-latency.log" 2>&1 || log "peer_bench (latency) failed: logs/peer-latency.log"
    log "icd latency, round B"; icd_latency B
  }
fi

# ---------------------------------------------------------------- ratio
if want ratio && ! grep -q '"bench": "icd_ratio"' "$results" 2>/dev/null && fits 120 ratio; then
  start_server && for shape in $shapes; do
    ensure_loaded "bf16-$shape" "mamba-$shape/mamba_ssm" bfloat16 &&
      ensure_loaded "perm-$shape" "mamba-$shape/mamba_ssm" bfloat16 || { log "load for ratio $shape failed"; continue; }
    log "ratio $shape: apply --random 7 --tolerance 10 to perm-$shape"
    icdctl --json apply "perm-$shape" --random 7 --tolerance 10 > "$work/apply-$shape.json" 2>> "$work/logs/icdctl.log" ||
      log "apply perm-$shape failed (logs/icdctl.log)"
    for mode in prefill decode; do
      iters=30; [[ $mode == decode ]] && iters=200
      icdctl --json latency "perm-$shape" --compare "bf16-$shape" --mode $mode --batch 1 --seq-len 2048 \
          --warmup 5 --iters $iters |
        python3 -c "
import json, sys
r = json.load(sys.stdin)
try:
    applied = json.load(open('$work/apply-$shape.json'))
except Exception:
    applied = None
permuted = bool(applied) and int(r.get('version', 0)) > int(r.get('compare', {}).get('version', 0))
r.update(bench='icd_ratio', impl='icd', family='mamba1', shape='$shape', mode='$mode', seq_len=2048, batch=1,
         dtype='bfloat16', commit='$commit', permuted=permuted, apply=applied,
         checkpoint='mamba-$shape/mamba_ssm', permutation='--random 7, every group', tolerance=10)
print(json.dumps(r))" >> "$results" 2>> "$work/logs/icdctl.log" || log "ratio $shape $mode failed"
    done
    icdctl unload "perm-$shape" >> "$work/logs/icdctl.log" 2>&1; loaded=${loaded/ perm-$shape / }
  done
fi

# ---------------------------------------------------------------- logits
if want logits && ! grep -q '"bench": "logits_compare"' "$results" 2>/dev/null && fits 150 logits; then
  start_server && {
    ids=$(python3 -c "import json; print(','.join(map(str, json.load(open('$work/ids.json')))))")
    for shape in $shapes; do
      for dtype in float32 bfloat16; do
        name=$([[ $dtype == float32 ]] && echo "f32-$shape" || echo "bf16-$shape")
        ensure_loaded "$name" "mamba-$shape/mamba_ssm" $dtype || { log "load $name failed"; continue; }
        icdctl --json evaluate "$name" --ids "$ids" --logits > "$work/icd-logits/icd-$shape-$dtype.json" 2>> "$work/logs/icdctl.log" ||
          log "icd evaluate $name failed"
        [[ $dtype == float32 ]] && { icdctl unload "$name" >> "$work/logs/icdctl.log" 2>&1; loaded=${loaded/ $name / }; }
      done
    done
    stop_server
    log "logits: peer_bench.py --ids"
    timeout $(cap 300) python3 bench/peer/peer_bench.py --models "$models" --shapes $shapes --out "$work" \
      --commit "$commit" --ids "$work/ids.json" --icd-logits "$work/icd-logits" --skip-timing --hf-shapes 130m \
      > "$work/logs/peer-logits.log" 2>&1 || log "peer_bench (logits) failed: logs/peer-logits.log"
  }
fi
stop_server

# ---------------------------------------------------------------- profile
if want profile && [[ -x /tmp/icd_profile/icd_profile ]] && [[ ! -f "$work/profile-icd.md" ]] && fits 100 profile; then
  for shape in $shapes; do
    profile_icd "$shape" "$models/mamba-$shape/mamba_ssm" 30 "$(cap 200)" || continue
  done
fi

# ---------------------------------------------------------------- pack
if want pack; then
  touch "$work/peer.jsonl"
  python3 - "$results" "$work/peer.jsonl" "$out/side-by-side.jsonl" <<'PY'
import json, sys
rows = []
for line in open(sys.argv[1]).readlines() + open(sys.argv[2]).readlines():
    line = line.strip()
    if not line.startswith("{"):
        continue
    r = json.loads(line)
    if r.get("bench") == "icd_latency" and r.get("round") == "A":
        rows.append({"impl": "icd", "family": "mamba1", "shape": r["shape"], "mode": r["mode"],
                     "cuda_graphs": r.get("execution") == "cuda_graph",
                     "median_ms": r["median_ms"], "p10_ms": r["p10_ms"],
                     "p90_ms": r["p90_ms"], "ci95_ms": [r["ci95_low_ms"], r["ci95_high_ms"]],
                     "samples": int(r["samples"]), "commit": r["commit"], "dtype": "bfloat16", "batch": 1,
                     "seq_len": 2048, "version": r.get("version"),
                     "method": "icd-server MeasureLatency (icdctl latency), " + r["method"] +
                               ", " + r.get("execution", "eager")})
    elif r.get("bench") == "peer_latency":
        rows.append({"impl": "mamba_ssm", "family": "mamba1", "shape": r["shape"], "mode": r["mode"],
                     "cuda_graphs": r["cuda_graphs"], "median_ms": r["median_ms"], "p10_ms": r["p10_ms"],
                     "p90_ms": r["p90_ms"], "ci95_ms": r["ci95_ms"], "samples": r["samples"],
                     "commit": r["commit"], "dtype": "bfloat16", "batch": 1, "seq_len": r["seq_len"],
                     "method": "peer_bench.py, " + r.get("method_detail", "forward over [1, seq_len]")})
with open(sys.argv[3], "w") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
print(f"{len(rows)} side-by-side rows", file=sys.stderr)
PY
  cat "$results" "$work/peer.jsonl" > "$out/results.jsonl" 2>/dev/null  # icd's lines, then peer_bench.py's
  grep '"bench": "icd_ratio"' "$results" > "$out/ratio.jsonl" 2>/dev/null
  python3 - "$out/ratio.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    check = (r.get("apply") or {}).get("correctness", {})
    print(f"ratio {r['shape']:5} {r['mode']:7} permuted={r['permuted']} versions {r.get('version')}/{r.get('compare', {}).get('version')} "
          f"ratio {r.get('ratio', 0):.4f} [{r.get('ratio_ci95_low', 0):.4f}, {r.get('ratio_ci95_high', 0):.4f}] "
          f"{r.get('execution')}; apply check rel_l2 {check.get('rel_l2')} top1 {check.get('top1_agreement')}")
PY
  cp "$work/provenance.txt" "$out/" 2>/dev/null
  cp "$work/logs/cuda_test.log" "$out/" 2>/dev/null
  cat "$work/profile-icd.md" "$work/profile-mamba_ssm.md" > "$out/profile.md" 2>/dev/null
  ( cd "$work" && tar -czf "$out/logs.tar.gz" logs profile-*.json 2>/dev/null )
  ( cd peers && tar -czf "$out/peer-so.tar.gz" build/*.so 2>/dev/null ) &&
    [[ $(stat -c %s "$out/peer-so.tar.gz") -gt 15000000 ]] &&
    ( cd "$out" && split -b 15000000 -d peer-so.tar.gz peer-so.tar.gz.part && rm peer-so.tar.gz )
  log "packed: $(ls "$out" | tr '\n' ' ')"
  python3 - "$out/side-by-side.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['impl']:9} {r['shape']:5} {r['mode']:7} cg={str(r['cuda_graphs']):5} median {r['median_ms']:9.3f} ms  "
          f"p10 {r['p10_ms']:9.3f}  p90 {r['p90_ms']:9.3f}  ci95 [{r['ci95_ms'][0]:.3f}, {r['ci95_ms'][1]:.3f}]")
PY
fi
