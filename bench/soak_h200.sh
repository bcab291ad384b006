#!/usr/bin/env bash
# A GPU node under load and faults (issue 20), on the GPU machine in one call:
#   build   icd-server, icdctl, grpc_bench, cuda_test, cuda_counters_test,
#           counters_check and the Python stubs
#           (deploy/build-gpu.sh, ICD_TARGETS) into ICD_BUILD_DIR
#   cuda_test  the whole GPU test (CUDA_TEST_FILTER to narrow it), then
#           cuda_counters_test (CUPTI in a process of its own)
#   soak    bench/soak.py on cuda: SOAK_CLIENTS clients for SOAK_SECONDS over
#           the two reference models beside its faults, the stall measurement
#           first and grpc_bench after
#   grpc    bench/grpc_h200.sh: three servers, health and ListModels round trips
# The GPU image has no Python gRPC: Ubuntu 24.04's python3-grpcio and
# python3-protobuf (and the libraries they link) are unpacked from .pydebs/,
# which deploy/gpu-python-debs.sh fills on a machine with network; carry it.
#   bench/soak_h200.sh OUT_DIR        (SOAK_STEPS="build cuda_test soak grpc")
# Env: SOAK_SECONDS (180), SOAK_CLIENTS (8), SOAK_STALL_SEQ_LEN (1024),
# SOAK_SERVER_ARGS (one more icd-server flag: --model-streams), SOAK_TARGETS,
# CUDA_TEST_FILTER.
set -uo pipefail
out=${1:?usage: bench/soak_h200.sh OUT_DIR}
mkdir -p "$out"; out=$(cd "$out" && pwd)
repo=$(cd "$(dirname "$0")/.." && pwd); cd "$repo"
build=${ICD_BUILD_DIR:-/tmp/build-gpu}
deb=${ICD_DEB_PREFIX:-/tmp/deb}
pydeb=${ICD_PYDEB_PREFIX:-/tmp/pydeb}
steps=" ${SOAK_STEPS:-build cuda_test soak grpc} "
want() { [[ "$steps" == *" $1 "* ]]; }
log() { echo "[soak_h200 $(date -u +%T)] $*" | tee -a "$out/steps.log" >&2; }

{
  echo "commit: ${ICD_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  echo "date: $(date -u +%FT%TZ)"
  echo "command: bench/soak_h200.sh $* (SOAK_STEPS=${SOAK_STEPS:-default})"
  echo "machine: $(uname -srm); $(nproc) cores; $(grep MemTotal /proc/meminfo)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /'
  python3 -c 'import sys, torch; print("python:", sys.version.split()[0]); print("torch:", torch.__version__, "cuda", torch.version.cuda)'
} >> "$out/provenance.txt" 2>&1

# Binaries built against Debian's gRPC in $deb run with its libraries; a
# wrapper each, so that the Python client (Ubuntu's gRPC) never sees them.
wrap() {  # NAME BINARY
  cat > "/tmp/$1" <<EOF
#!/bin/sh
LD_LIBRARY_PATH="$deb/usr/lib/x86_64-linux-gnu" LD_PRELOAD="$(g++ -print-file-name=libstdc++.so.6)" exec "$2" "\$@"
EOF
  chmod +x "/tmp/$1"
}

if want build; then
  log "build"
  ICD_TARGETS="${SOAK_TARGETS:-icd-server icdctl grpc_bench cuda_test cuda_counters_test counters_check icd_python_stubs}" ICD_LOG_DIR="$out/build" \
    deploy/build-gpu.sh "$build" > "$out/build.log" 2>&1 || log "build failed: $(tail -3 "$out/build.log")"
fi
wrap icd-server-gpu "$build/server/icd-server"
wrap grpc-bench-gpu "$build/bench/grpc_bench"

if want cuda_test; then
  log "cuda_test ${CUDA_TEST_FILTER:-(all)}"
  # Line-buffered, every test named (a crash keeps what ran before it), and
  # under gdb where there is one (a crash leaves its backtrace).
  debugger=(); command -v gdb > /dev/null && debugger=(gdb -batch -ex run -ex bt --args)
  # libtorch's own copies of std::filesystem crash the tests' TempDir unless
  # the system libstdc++ comes first (deploy/build-gpu.sh does the same).
  preload=$(g++ -print-file-name=libstdc++.so.6)
  LD_LIBRARY_PATH="$deb/usr/lib/x86_64-linux-gnu" LD_PRELOAD="$preload" ICD_REQUIRE_CUDA=1 stdbuf -oL -eL \
    "${debugger[@]}" "$build/tests/unit/cuda_test" ${CUDA_TEST_FILTER:+--gtest_filter=$CUDA_TEST_FILTER} \
    > "$out/cuda_test.log" 2>&1
  log "cuda_test exit $?: $(grep -E '^\[  (PASSED|FAILED)' "$out/cuda_test.log" | tr '\n' ' ')"
  if [[ -x "$build/tests/unit/cuda_counters_test" ]]; then
    LD_LIBRARY_PATH="$deb/usr/lib/x86_64-linux-gnu" LD_PRELOAD="$preload" ICD_REQUIRE_CUDA=1 stdbuf -oL -eL \
      "${debugger[@]}" "$build/tests/unit/cuda_counters_test" > "$out/cuda_counters_test.log" 2>&1
    log "cuda_counters_test exit $?: $(grep -E '^\[  (PASSED|FAILED)' "$out/cuda_counters_test.log" | tr '\n' ' ')"
  fi
fi

if want soak; then
  mkdir -p "$pydeb"
  for f in .pydebs/*.deb; do dpkg-deb -x "$f" "$pydeb"; done
  py_env=(env "PYTHONPATH=$pydeb/usr/lib/python3/dist-packages"
          "LD_LIBRARY_PATH=$pydeb/usr/lib/x86_64-linux-gnu")
  "${py_env[@]}" python3 -c 'import grpc, google.protobuf as p; print("grpc", grpc.__version__, "protobuf", p.__version__)' \
    >> "$out/provenance.txt" 2>&1 || log "python grpc does not import: $(tail -2 "$out/provenance.txt")"
  log "soak: ${SOAK_CLIENTS:-8} clients, ${SOAK_SECONDS:-180} s"
  "${py_env[@]}" python3 bench/soak.py --server-binary /tmp/icd-server-gpu --model-root models \
    --models mamba1-pydoc/hf mamba2-pydoc/hf --device cuda --clients "${SOAK_CLIENTS:-8}" \
    --seconds "${SOAK_SECONDS:-180}" --stall-seq-len "${SOAK_STALL_SEQ_LEN:-1024}" \
    --grpc-bench /tmp/grpc-bench-gpu --stubs "$build/client/python/gen" \
    ${SOAK_SERVER_ARGS:+--server-arg=$SOAK_SERVER_ARGS} \
    --label h200 --out "$out/soak.jsonl" > "$out/soak.txt" 2>&1
  log "soak exit $?"
  cp /tmp/icd-server-*.log "$out/" 2>/dev/null  # LocalServer's logs: a server that died says why
fi

if want grpc; then
  log "grpc_h200"
  ICD_BUILD_DIR="$build" bash bench/grpc_h200.sh "$out/grpc.txt" 3000 > /dev/null 2>&1
  log "grpc exit $?"
fi
log "done"
