#!/usr/bin/env bash
# Modularity solver benchmark: icd's Leiden (bench/cluster_bench) against
# igraph's Leiden (python3-igraph) on the same dense graphs, and its time.
#
#   bench/solver_bench.sh BUILD_DIR OUT_FILE [SIZES...] 
#
# Env: ICD_DEVICE (cpu | cuda, default cpu), ICD_IGRAPH=0 to skip igraph
# (GPU nodes have none). Writes provenance and one JSON line per run.
set -euo pipefail
build=${1:?build dir}
out=${2:?output file}
shift 2
sizes=("${@:-1024 4096 8192}")
[[ $# -eq 0 ]] && sizes=(1024 4096 8192)
device=${ICD_DEVICE:-cpu}
python=${ICD_PYTHON:-/usr/bin/python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
here=$(cd "$(dirname "$0")/.." && pwd)

{
  echo "# icd solver benchmark"
  echo "# commit: $(git -C "$here" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$here" diff --quiet 2>/dev/null || echo ' (modified)')"
  echo "# date: $(date -u +%FT%TZ)"
  echo "# machine: $(uname -srm); $(nproc) cores; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  command -v nvidia-smi >/dev/null && echo "# gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
  echo "# command: bench/solver_bench.sh $build $out ${sizes[*]} (ICD_DEVICE=$device)"
  echo "# igraph: $([[ ${ICD_IGRAPH:-1} == 1 ]] && $python -c 'import igraph; print(igraph.__version__)' || echo skipped)"
} > "$out"

# Each graph is solved with seeds 1..3 by icd and (sizes up to
# ICD_IGRAPH_MAX_NODES, default 4096: igraph takes minutes beyond) by igraph.
for nodes in "${sizes[@]}"; do
  for graph in planted noise; do
    "$build/bench/cluster_bench" --nodes "$nodes" --graph "$graph" --seed 1 \
      --device "$device" --save "$tmp/g.npy" | tee -a "$out"
    for seed in 2 3; do
      "$build/bench/cluster_bench" --load "$tmp/g.npy" --seed "$seed" --device "$device" \
        | sed "s|\"graph\": \"[^\"]*\"|\"graph\": \"$graph\"|" | tee -a "$out"
    done
    if [[ ${ICD_IGRAPH:-1} == 1 && $nodes -le ${ICD_IGRAPH_MAX_NODES:-4096} ]]; then
      $python - "$tmp/g.npy" "$graph" <<'PY' | tee -a "$out"
import json, random, sys, time
import igraph, numpy as np
matrix = np.load(sys.argv[1])
n = matrix.shape[0]
rows, cols = np.triu_indices(n, 1)
weights = matrix[rows, cols]
graph = igraph.Graph(n=n, edges=np.column_stack([rows, cols]))
graph.es["weight"] = weights
del matrix, rows, cols
for seed in (1, 2, 3):
    random.seed(seed)
    start = time.perf_counter()
    part = graph.community_leiden(objective_function="modularity", weights="weight",
                                  resolution_parameter=1.0, n_iterations=-1)
    seconds = time.perf_counter() - start
    print(json.dumps({"nodes": n, "graph": sys.argv[2], "solver": "igraph-leiden", "seed": seed,
                      "seconds": round(seconds, 4),
                      "modularity": graph.modularity(part.membership, weights="weight"),
                      "clusters": len(set(part.membership))}), flush=True)
PY
    fi
  done
done
