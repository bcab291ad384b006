#!/usr/bin/env bash
# icd beside mamba_ssm on the GPU machine, in one run (issue 16, part 1; Mamba-2:
# issue 17). Each family of ICD_FAMILIES goes through the same stages, one family
# after the other within a stage; "$family" below is mamba1 (mamba-$shape dirs,
# icd models bf16-$shape) or mamba2 (mamba2-$shape dirs, icd models bf16-m2-$shape).
#   build   icd-server + icdctl + icd_core_testing + cuda_test (deploy/build-gpu.sh,
#           ICD_TARGETS),
#           the peer's forward-only extensions (build_peer.py, two processes), and
#           icd_profile (bench/peer/icd_profile) -- all in parallel; the random
#           mamba-130m / mamba-2.8b (mamba2-130m / mamba2-2.7b) checkpoints
#           (bench/make_random_mamba.py --family) and their mamba_ssm layout
#           (mamba_ssm_layout.py) meanwhile
#   cuda_test  icd's GPU tests (tests/unit/cuda_test; CUDA_TEST_FILTER, default all)
#   latency icd through icd-server's MeasureLatency (icdctl latency; decode as CUDA
#           graphs and --eager), then mamba_ssm
#           (peer_bench.py: prefill, decode with and without CUDA graphs, and its
#           torch.profiler tables), then icd again (drift check); bf16, batch 1;
#           the icd models of other families are unloaded first
#   ratio   permuted / identity (issue 16): a second copy of each bf16 model, every group
#           applied (--random 7) with an explicit --tolerance 10 that the rows record with
#           the check's rel L2 and top-1 (these random models are chaotic in bf16: the
#           default 2e-2 refuses them), then MeasureLatency of the copy against the
#           original, prefill and decode; a row whose copy is not at a later version
#           than the original says "permuted": false
#   logits  float32 and bf16 logits on 64 fixed tokens: icd (icdctl evaluate
#           --logits) against mamba_ssm and HF (130m)
#   profile icd_profile (LibTorch's Kineto profiler around icd::Forward) on each
#           shape's prefill, decode step and graphed decode step -> trace_table.py
#   goldens issue 19's golden fixtures (transformers' and mamba_ssm's hybrids) into
#           OUT_DIR/goldens; not a default step
#   pack    side-by-side.jsonl (a family on each row) and the tables into OUT_DIR
#           (few files, for $OUT)
#
# Usage (repo root on the GPU machine, .debs and peers/ carried; see README.md):
#   bench/peer/run_h200.sh OUT_DIR
# Env: PEER_STEPS (default "build cuda_test latency ratio logits profile pack"), PEER_DEADLINE
# (epoch seconds: stages that would not fit are skipped, pack always runs),
# ICD_COMMIT, ICD_BUILD_DIR (/tmp/build-gpu), ICD_MODELS_DIR (/tmp/icd-models),
# PEER_BUILD_PEERS (1; 0 skips the peer's extensions in the build stage),
# PEER_WORK (/tmp/peerwork: logs, traces, logits; kept between calls on a warm
# machine), ICD_FAMILIES ("mamba1"; "mamba1 mamba2" for both), ICD_SHAPES ("130m 2.8b": mamba1's),
# ICD_MAMBA2_SHAPES ("130m 2.7b").
# Every stage skips what already exists, per family (a warm machine's second call resumes).
set -uo pipefail
out=${1:?usage: bench/peer/run_h200.sh OUT_DIR}
mkdir -p "$out"; out=$(cd "$out" && pwd)
repo=$(cd "$(dirname "$0")/../.." && pwd); cd "$repo"
work=${PEER_WORK:-/tmp/peerwork}; mkdir -p "$work/logs" "$work/icd-logits" "$work/traces"
build=${ICD_BUILD_DIR:-/tmp/build-gpu}
models=${ICD_MODELS_DIR:-/tmp/icd-models}
shapes=${ICD_SHAPES:-130m 2.8b}
m2shapes=${ICD_MAMBA2_SHAPES:-130m 2.7b}
families=${ICD_FAMILIES:-mamba1}
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

# Per family: its shapes, its checkpoint dir under $models, its icd model names
# (PREFIX-SHAPE for mamba1 as before, PREFIX-m2-SHAPE for mamba2), the tag that
# names its files (icd logits, traces, profiles) and the suffix of its logs.
family_shapes() { [[ $1 == mamba2 ]] && echo "$m2shapes" || echo "$shapes"; }
model_dir() { [[ $1 == mamba2 ]] && echo "mamba2-$2" || echo "mamba-$2"; }  # FAMILY SHAPE
icd_name() { [[ $2 == mamba2 ]] && echo "$1-m2-$3" || echo "$1-$3"; }  # PREFIX FAMILY SHAPE
tag() { [[ $1 == mamba2 ]] && echo "mamba2-$2" || echo "$2"; }  # FAMILY SHAPE
log_suffix() { [[ $1 == mamba1 ]] || echo "-$1"; }
touch "$results" "$work/peer.jsonl"
# has_rows BENCH FAMILY: that stage's rows for that family exist (icd's in $results,
# peer_bench.py's in peer.jsonl). The second grep reads all its input: no SIGPIPE
# under pipefail.
has_rows() { grep -h "\"bench\": \"$1\"" "$results" "$work/peer.jsonl" | grep "\"family\": \"$2\"" > /dev/null; }

if [[ ! -f "$work/provenance.txt" ]]; then
  {
    echo "commit: $commit"
    # The device's copy may keep the .git the session began with: a tree that
    # differs from it shows here (pass ICD_COMMIT then).
    echo "working tree: $(git status --porcelain --untracked-files=no 2>/dev/null | wc -l) tracked paths differ from git's HEAD ($(git rev-parse --short HEAD 2>/dev/null))"
    echo "date: $(date -u +%FT%TZ)"
    echo "command: bench/peer/run_h200.sh $* (PEER_STEPS=${PEER_STEPS:-default})"
    echo "families: $families (mamba1 shapes: $shapes; mamba2 shapes: $m2shapes)"
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
  # PEER_BUILD_PEERS=0: icd's side only (an A/B of icd's own settings).
  for ext in $( [[ ${PEER_BUILD_PEERS:-1} == 1 ]] && echo selective_scan causal_conv1d ); do
    so=peers/build/${ext}_cuda.so
    [[ -f $so ]] && { log "peer $ext: $so present (carried or built earlier)"; continue; }
    log "peer: build_peer.py --only $ext"
    ( MAX_JOBS=${MAX_JOBS:-16} timeout $budget python3 bench/peer/build_peer.py --only $ext --out peers/build \
        > "$work/logs/peer-build-$ext.log" 2>&1; echo "exit $?" >> "$work/logs/peer-build-$ext.log"
      grep '^{' "$work/logs/peer-build-$ext.log" >> "$results" ) & pids+=($!)
  done
  ( for family in $families; do
      for shape in $(family_shapes $family); do
        d="$models/$(model_dir $family $shape)"
        [[ -f $d/config.json ]] || python3 bench/make_random_mamba.py --family $family --shape "$shape" --out "$d" >> "$results" 2>> "$work/logs/models.log"
        [[ -f $d/mamba_ssm/pytorch_model.bin ]] || python3 bench/peer/mamba_ssm_layout.py --hf "$d" --out "$d/mamba_ssm" >> "$results" 2>> "$work/logs/models.log"
      done
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
unload() { icdctl unload "$1" >> "$work/logs/icdctl.log" 2>&1; loaded=${loaded/ $1 / }; }  # NAME
unload_all() { local name; for name in $loaded; do unload "$name"; done; }
icd_latency() {  # FAMILY ROUND
  local family=$1 round=$2 shape name dir run mode flag iters
  for shape in $(family_shapes $family); do
    name=$(icd_name bf16 $family $shape); dir="$(model_dir $family $shape)/mamba_ssm"
    ensure_loaded "$name" "$dir" bfloat16 || { log "load $name failed"; continue; }
    # decode: replayed as CUDA graphs (the default), then eager
    for run in prefill decode decode:--eager; do
      mode=${run%%:*}; flag=${run#$mode}; flag=${flag#:}
      iters=30; [[ $mode == decode ]] && iters=200
      icdctl --json latency "$name" --mode $mode --batch 1 --seq-len 2048 --warmup 5 --iters $iters $flag |
        python3 -c "import json,sys; r=json.load(sys.stdin); r.update(bench='icd_latency', impl='icd', family='$family', shape='$shape', mode='$mode', seq_len=2048, batch=1, dtype='bfloat16', round='$round', commit='$commit', checkpoint='$dir'); print(json.dumps(r))" \
        >> "$results" 2>> "$work/logs/icdctl.log" || log "icd latency $family $shape $run failed"
    done
  done
}

# ---------------------------------------------------------------- latency
if want latency; then
  for family in $families; do
    if has_rows peer_latency $family || ! fits 240 "latency $family"; then continue; fi
    start_server || break
    # only this family's icd models on the GPU while it and its peer are timed
    # (they come back through ensure_loaded in later stages)
    unload_all
    log "icd latency $family, round A"; icd_latency $family A
    log "mamba_ssm $family latency and profile (peer_bench.py --family $family)"
    peer_log="logs/peer-latency$(log_suffix $family).log"
    timeout $(cap 420) python3 bench/peer/peer_bench.py --family $family --models "$models" \
      --shapes $(family_shapes $family) --out "$work" --commit "$commit" > "$work/$peer_log" 2>&1 ||
      log "peer_bench $family (latency) failed: $peer_log"
    log "icd latency $family, round B"; icd_latency $family B
  done
fi

# ---------------------------------------------------------------- ratio
if want ratio; then
  for family in $families; do
    if has_rows icd_ratio $family || ! fits 120 "ratio $family"; then continue; fi
    start_server || break
    for shape in $(family_shapes $family); do
      base=$(icd_name bf16 $family $shape); perm=$(icd_name perm $family $shape)
      dir="$(model_dir $family $shape)/mamba_ssm"; applied="$work/apply-$(tag $family $shape).json"
      ensure_loaded "$base" "$dir" bfloat16 && ensure_loaded "$perm" "$dir" bfloat16 ||
        { log "load for ratio $family $shape failed"; continue; }
      log "ratio $family $shape: apply --random 7 --tolerance 10 to $perm"
      icdctl --json apply "$perm" --random 7 --tolerance 10 > "$applied" 2>> "$work/logs/icdctl.log" ||
        log "apply $perm failed (logs/icdctl.log)"
      for mode in prefill decode; do
        iters=30; [[ $mode == decode ]] && iters=200
        icdctl --json latency "$perm" --compare "$base" --mode $mode --batch 1 --seq-len 2048 \
            --warmup 5 --iters $iters |
          python3 -c "
import json, sys
r = json.load(sys.stdin)
try:
    applied = json.load(open('$applied'))
except Exception:
    applied = None
permuted = bool(applied) and int(r.get('version', 0)) > int(r.get('compare', {}).get('version', 0))
r.update(bench='icd_ratio', impl='icd', family='$family', shape='$shape', mode='$mode', seq_len=2048, batch=1,
         dtype='bfloat16', commit='$commit', permuted=permuted, apply=applied,
         checkpoint='$dir', permutation='--random 7, every group', tolerance=10)
print(json.dumps(r))" >> "$results" 2>> "$work/logs/icdctl.log" || log "ratio $family $shape $mode failed"
      done
      unload "$perm"
    done
  done
fi

# ---------------------------------------------------------------- logits
logit_families=""
for family in $families; do has_rows logits_compare $family || logit_families+="$family "; done
if want logits && [[ -n "$logit_families" ]] && fits 150 logits; then
  start_server && {
    ids=$(python3 -c "import json; print(','.join(map(str, json.load(open('$work/ids.json')))))")
    for family in $logit_families; do
      for shape in $(family_shapes $family); do
        for dtype in float32 bfloat16; do
          name=$(icd_name $([[ $dtype == float32 ]] && echo f32 || echo bf16) $family $shape)
          ensure_loaded "$name" "$(model_dir $family $shape)/mamba_ssm" $dtype || { log "load $name failed"; continue; }
          icdctl --json evaluate "$name" --ids "$ids" --logits > "$work/icd-logits/icd-$(tag $family $shape)-$dtype.json" \
            2>> "$work/logs/icdctl.log" || log "icd evaluate $name failed"
          [[ $dtype == float32 ]] && unload "$name"
        done
      done
    done
    stop_server
    for family in $logit_families; do
      log "logits $family: peer_bench.py --family $family --ids"
      peer_log="logs/peer-logits$(log_suffix $family).log"
      timeout $(cap 300) python3 bench/peer/peer_bench.py --family $family --models "$models" \
        --shapes $(family_shapes $family) --out "$work" --commit "$commit" --ids "$work/ids.json" \
        --icd-logits "$work/icd-logits" --skip-timing --hf-shapes 130m > "$work/$peer_log" 2>&1 ||
        log "peer_bench $family (logits) failed: $peer_log"
    done
  }
fi
stop_server

# ---------------------------------------------------------------- profile
# icd_profile reads any checkpoint icd reads, so Mamba-2 goes through it as is;
# a shape whose prefill table exists was profiled by an earlier call
if want profile && [[ -x /tmp/icd_profile/icd_profile ]]; then
  for family in $families; do
    for shape in $(family_shapes $family); do
      label=$(tag $family $shape)
      [[ -f "$work/profile-icd-$label-prefill.json" ]] && continue
      fits 100 "profile $label" || continue
      profile_icd "$label" "$models/$(model_dir $family $shape)/mamba_ssm" 30 "$(cap 200)" || continue
    done
  done
fi

# ---------------------------------------------------------------- goldens
# Issue 19's golden fixtures: transformers' hybrids (make_hybrid_goldens.py, CPU
# float32) and mamba_ssm's MLP and attention hybrids (make_mamba_ssm_goldens.py,
# which needs the peer's extensions from the build stage), into OUT_DIR/goldens
# for the repo's tests/fixtures/golden. Not in the default steps.
if want goldens && fits 120 goldens; then
  mkdir -p "$out/goldens"
  log "goldens: transformers' hybrids"
  timeout $(cap 300) python3 tests/fixtures/golden/make_hybrid_goldens.py --out "$out/goldens" \
    --force > "$work/logs/goldens-hf.log" 2>&1 || log "make_hybrid_goldens failed (logs/goldens-hf.log)"
  log "goldens: mamba_ssm hybrids"
  timeout $(cap 300) python3 tests/fixtures/golden/make_mamba_ssm_goldens.py --out "$out/goldens" \
    --only mamba_ssm-mamba2-mlp mamba_ssm-hybrid-attention --force \
    > "$work/logs/goldens-mamba_ssm.log" 2>&1 || log "make_mamba_ssm_goldens failed (logs/goldens-mamba_ssm.log)"
  cp "$work"/logs/goldens-*.log "$out/goldens/" 2>/dev/null
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
        rows.append({"impl": "icd", "family": r.get("family", "mamba1"), "shape": r["shape"], "mode": r["mode"],
                     "cuda_graphs": r.get("execution") == "cuda_graph",
                     "median_ms": r["median_ms"], "p10_ms": r["p10_ms"],
                     "p90_ms": r["p90_ms"], "ci95_ms": [r["ci95_low_ms"], r["ci95_high_ms"]],
                     "samples": int(r["samples"]), "commit": r["commit"], "dtype": "bfloat16", "batch": 1,
                     "seq_len": 2048, "version": r.get("version"),
                     "method": "icd-server MeasureLatency (icdctl latency), " + r["method"] +
                               ", " + r.get("execution", "eager")})
    elif r.get("bench") == "peer_latency":
        rows.append({"impl": "mamba_ssm", "family": r.get("family", "mamba1"), "shape": r["shape"], "mode": r["mode"],
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
    print(f"ratio {r.get('family', 'mamba1'):6} {r['shape']:5} {r['mode']:7} permuted={r['permuted']} versions {r.get('version')}/{r.get('compare', {}).get('version')} "
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
    print(f"{r['impl']:9} {r['family']:6} {r['shape']:5} {r['mode']:7} cg={str(r['cuda_graphs']):5} median {r['median_ms']:9.3f} ms  "
          f"p10 {r['p10_ms']:9.3f}  p90 {r['p90_ms']:9.3f}  ci95 [{r['ci95_ms'][0]:.3f}, {r['ci95_ms'][1]:.3f}]")
PY
fi
