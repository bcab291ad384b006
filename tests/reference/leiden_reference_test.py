"""icd's modularity clustering against igraph's Leiden on the same graphs.

Usage: leiden_reference_test.py PATH/TO/cluster_bench

For planted and unstructured dense graphs, icd's mean modularity over three
seeds must reach at least 0.99x igraph's mean over three seeds (igraph's
community_leiden, modularity objective, iterated until stable). igraph is a
test-only reference (Debian's python3-igraph).
"""
import json
import os
import random
import subprocess
import sys
import tempfile
import unittest

import igraph
import numpy as np

BENCH = None
SEEDS = (1, 2, 3)


def icd_modularity(args):
    out = subprocess.run([BENCH, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def to_igraph(matrix):
    n = matrix.shape[0]
    rows, cols = np.triu_indices(n, 1)
    weights = matrix[rows, cols]
    keep = weights > 0
    graph = igraph.Graph(n=n, edges=np.column_stack([rows[keep], cols[keep]]).tolist())
    graph.es["weight"] = weights[keep].tolist()
    return graph


def igraph_modularity(graph, seed):
    random.seed(seed)  # python-igraph draws from Python's random module
    partition = graph.community_leiden(objective_function="modularity", weights="weight",
                                       resolution_parameter=1.0, n_iterations=-1)
    return graph.modularity(partition.membership, weights="weight")


class LeidenReferenceTest(unittest.TestCase):
    def compare(self, kind, nodes):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "graph.npy")
            labels = os.path.join(tmp, "labels.txt")
            ours, theirs = [], []
            for seed in SEEDS:
                report = icd_modularity(["--nodes", str(nodes), "--graph", kind, "--seed",
                                         str(seed), "--save", path, "--save-labels", labels])
                graph = to_igraph(np.load(path))
                # icd's Q of its own partition is igraph's Q of that partition.
                membership = [int(line) for line in open(labels)]
                self.assertAlmostEqual(report["modularity"],
                                       graph.modularity(membership, weights="weight"), places=10)
                ours.append(report["modularity"])
                theirs.append(igraph_modularity(graph, seed))
        ratio = np.mean(ours) / np.mean(theirs)
        print(f"{kind:8s} n={nodes:5d} icd {np.round(ours, 6)} igraph {np.round(theirs, 6)} "
              f"ratio {ratio:.4f}", flush=True)
        self.assertGreaterEqual(ratio, 0.99)

    def test_planted_256(self):
        self.compare("planted", 256)

    def test_planted_768(self):
        self.compare("planted", 768)

    def test_noise_256(self):
        self.compare("noise", 256)

    def test_noise_512(self):
        self.compare("noise", 512)

    def test_noise_1024(self):
        self.compare("noise", 1024)


if __name__ == "__main__":
    BENCH = sys.argv.pop(1)
    unittest.main(verbosity=2)
