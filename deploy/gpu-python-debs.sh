#!/usr/bin/env bash
# Python gRPC for the GPU machine (Ubuntu 24.04, Python 3.12, no network, no
# gRPC): downloads Ubuntu noble's python3-grpcio and python3-protobuf and the
# libraries they link into .pydebs/ (git-ignored), on a machine with network.
# bench/soak_h200.sh unpacks them there into a prefix (no root needed).
#   deploy/gpu-python-debs.sh [DIR]     (default: <repo>/.pydebs)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$repo/.pydebs}
mirror=${UBUNTU_MIRROR:-http://archive.ubuntu.com/ubuntu}
packages="python3-grpcio python3-protobuf libabsl20220623t64 libcares2 libre2-10 libprotobuf32t64"
mkdir -p "$dir"
index=$(mktemp)
trap 'rm -f "$index"' EXIT
for component in main universe; do
  curl -fsS "$mirror/dists/noble/$component/binary-amd64/Packages.gz" | gzip -dc >> "$index"
done
for package in $packages; do
  file=$(awk -v p="$package" '$0 == "Package: " p {found = 1} found && /^Filename:/ {print $2; exit}' "$index")
  [[ -n "$file" ]] || { echo "not in noble: $package" >&2; exit 1; }
  curl -fsS -o "$dir/$(basename "$file")" "$mirror/$file"
  echo "$dir/$(basename "$file")"
done
