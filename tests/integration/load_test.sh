#!/usr/bin/env bash
# A short bounded load run against the real icd-server on loopback: 4 clients
# for 3 s mixing Verify, Evaluate and ApplyPermutation on a golden model.
# Passes when no call failed, the server is still healthy, and it exits 0 on
# SIGTERM.
#   load_test.sh ICD_SERVER LOAD_BENCH ICDCTL FIXTURES_DIR
set -euo pipefail
server=$1 load_bench=$2 icdctl=$3 fixtures=$4
tmp=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$tmp"' EXIT
mkdir -p "$tmp/models" "$tmp/exports"
cp -r "$fixtures/golden/mamba1-small" "$tmp/models/"
"$server" --listen 127.0.0.1:0 --model-root "$tmp/models" --export-root "$tmp/exports" \
  --quiet > "$tmp/out" 2> "$tmp/err" &
pid=$!
for _ in $(seq 600); do grep -q "^listening on" "$tmp/out" 2>/dev/null && break; sleep 0.1; done
address=$(sed -n 's/^listening on //p' "$tmp/out")
[[ -n "$address" ]] || { cat "$tmp/err"; exit 1; }
"$load_bench" --server "$address" --model m --load mamba1-small/hf --clients 4 --seconds 3 \
  --server-pid "$pid" | tee "$tmp/result.json"
grep -q '"calls_failed": 0,' "$tmp/result.json"
"$icdctl" --server "$address" --timeout 5 health
kill -TERM "$pid"
wait "$pid"
