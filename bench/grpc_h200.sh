#!/usr/bin/env bash
# Small unary calls on the GPU machine (issue 20, item 4): icd-server and
# grpc_bench built there (deploy/build-gpu.sh, ICD_TARGETS), three servers in
# turn on loopback with the golden fixtures as model root and one model
# loaded on cuda, grpc_bench's health and ListModels round trips per server.
#   bench/grpc_h200.sh OUT_FILE [CALLS]
set -uo pipefail
out=${1:?usage: bench/grpc_h200.sh OUT_FILE [CALLS]}
calls=${2:-3000}
repo=$(cd "$(dirname "$0")/.." && pwd); cd "$repo"
build=${ICD_BUILD_DIR:-/tmp/build-gpu}
deb=${ICD_DEB_PREFIX:-/tmp/deb}
if [[ ! -x "$build/bench/grpc_bench" || ! -x "$build/client/cpp/icdctl" ]]; then
  ICD_TARGETS="icd-server icdctl grpc_bench" deploy/build-gpu.sh "$build" > /tmp/grpc_h200-build.log 2>&1 ||
    { echo "build failed: $(tail -5 /tmp/grpc_h200-build.log)" >&2; exit 1; }
fi
run() {
  LD_LIBRARY_PATH="$deb/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  LD_PRELOAD="$(g++ -print-file-name=libstdc++.so.6)" "$@"
}
{ echo "commit: ${ICD_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"; echo "date: $(date -u +%FT%TZ)";
  echo "machine: $(uname -srm); $(nproc) cores"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } >> "$out"
for round in 1 2 3; do
  log=$(mktemp)
  run "$build/server/icd-server" --listen 127.0.0.1:0 --model-root tests/fixtures/golden \
    --export-root /tmp --device cuda --quiet > "$log" 2>&1 &
  pid=$!
  for _ in $(seq 150); do grep -q "listening on" "$log" && break; sleep 0.2; done
  address=$(sed -n 's/^listening on //p' "$log" | head -1)
  run "$build/client/cpp/icdctl" --server "$address" load m mamba1-small/hf > /dev/null 2>&1 || true
  echo "round $round" >> "$out"
  run "$build/bench/grpc_bench" --server "$address" --calls "$calls" --evaluate-calls 0 --bare-peer >> "$out" 2>&1
  kill "$pid"; wait "$pid" 2>/dev/null
done
cat "$out"
