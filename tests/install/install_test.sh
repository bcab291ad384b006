#!/usr/bin/env bash
# What a user of the C++ client does (issue 22): `cmake --install` of the
# build tree into a fresh prefix, then a project outside the tree
# (tests/install/consumer) that finds it with find_package(icd), links
# icd::client, and runs against the installed icd-server on loopback; the
# installed icdctl lists the model it loaded.
#   install_test.sh BUILD_DIR FIXTURES_DIR CONSUMER_SOURCE_DIR
set -euo pipefail
build=${1:?usage: install_test.sh BUILD_DIR FIXTURES_DIR CONSUMER_SOURCE_DIR}
fixtures=${2:?}
consumer=${3:?}
prefix=$(mktemp -d)
server_pid=""
cleanup() {
  [[ -n "$server_pid" ]] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$prefix"
}
trap cleanup EXIT

cmake --install "$build" --prefix "$prefix/usr" > "$prefix/install.log"
for file in bin/icd-server bin/icdctl lib/cmake/icd/icdConfig.cmake include/icd/client/client.h \
            include/icd/v1/permutation.pb.h share/icd/proto/icd/v1/permutation.proto; do
  [[ -e "$prefix/usr/$file" ]] || { echo "not installed: $file"; exit 1; }
done

cmake -S "$consumer" -B "$prefix/consumer" -DCMAKE_PREFIX_PATH="$prefix/usr" \
  -DCMAKE_BUILD_TYPE=Release > "$prefix/consumer-configure.log" 2>&1 ||
  { cat "$prefix/consumer-configure.log"; exit 1; }
cmake --build "$prefix/consumer" -j 2 > "$prefix/consumer-build.log" 2>&1 ||
  { tail -30 "$prefix/consumer-build.log"; exit 1; }

# The installed server, found by its run path (no LD_LIBRARY_PATH).
"$prefix/usr/bin/icd-server" --listen 127.0.0.1:0 --model-root "$fixtures/golden" \
  --export-root "$prefix" > "$prefix/server.out" 2> "$prefix/server.err" &
server_pid=$!
for _ in $(seq 100); do grep -q "listening on" "$prefix/server.out" 2>/dev/null && break; sleep 0.1; done
address=$(sed -n 's/^listening on //p' "$prefix/server.out")
[[ -n "$address" ]] || { echo "installed icd-server did not start:"; cat "$prefix/server.err"; exit 1; }

"$prefix/consumer/consumer" "$address" mamba1-small/hf
"$prefix/usr/bin/icdctl" --server "$address" models | grep -q consumer ||
  { echo "installed icdctl does not list the consumer's model"; exit 1; }
echo "install_test: installed to $prefix/usr, consumer built with find_package(icd) and run"
