// The channel graph a statistic defines, and the scores of a partition.
#ifndef ICD_CORE_SRC_TRACES_GRAPH_H_
#define ICD_CORE_SRC_TRACES_GRAPH_H_

#include "torch_api.h"

#include <cstdint>
#include <string>
#include <vector>

#include "traces/stats.h"

namespace icd::traces {

enum class Statistic { kCorrelation, kCoactivation, kPmi };

// Dense symmetric [C, C] float64 weights on the statistics' device, zero
// diagonal, non-negative:
//   correlation  |Pearson r| (a channel with no variance has no edges)
//   coactivation P(both active)
//   pmi          max(0, log P(both) / (P(i) P(j))), 0 where never together
// `null`: the same statistic on the per-channel shuffled rows.
torch::Tensor BuildGraph(const TraceStats& stats, Statistic statistic, bool null);

// Newman's modularity with resolution γ, as igraph computes it for an
// undirected weighted graph: Q = 1/2m Σ_ij (W_ij − γ k_i k_j / 2m) δ(c_i, c_j).
// 0 for a graph without edges.
double Modularity(const torch::Tensor& weights, const std::vector<int64_t>& membership,
                  double resolution);

// Hubert and Arabie's adjusted Rand index of two labelings of the same items.
double AdjustedRandIndex(const std::vector<int64_t>& a, const std::vector<int64_t>& b);

}  // namespace icd::traces

#endif  // ICD_CORE_SRC_TRACES_GRAPH_H_
