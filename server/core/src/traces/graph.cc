#include "traces/graph.h"

#include <map>
#include <utility>

namespace icd::traces {

torch::Tensor BuildGraph(const TraceStats& stats, Statistic statistic, bool null) {
  const double rows = static_cast<double>(std::max<int64_t>(stats.rows(), 1));
  torch::Tensor graph;
  if (statistic == Statistic::kCorrelation) {
    const torch::Tensor mean = stats.sum() / rows;
    torch::Tensor cov = (null ? stats.null_outer() : stats.outer()) / rows -
                        mean.unsqueeze(1) * mean.unsqueeze(0);
    torch::Tensor spread = cov.diagonal().clamp_min(0).sqrt();
    // A constant channel correlates with nothing (and would divide by 0).
    const torch::Tensor live = spread > 1e-12 * spread.max().clamp_min(1e-300);
    spread = torch::where(live, spread, torch::ones_like(spread));
    graph = (cov / (spread.unsqueeze(1) * spread.unsqueeze(0))).abs().clamp_max(1.0);
    graph = graph * (live.unsqueeze(1) & live.unsqueeze(0)).to(graph.dtype());
  } else {
    const torch::Tensor joint = (null ? stats.null_coactive() : stats.coactive()) / rows;
    if (statistic == Statistic::kCoactivation) {
      graph = joint.clone();
    } else {
      const torch::Tensor rate = stats.active_count() / rows;
      const torch::Tensor expected = rate.unsqueeze(1) * rate.unsqueeze(0);
      const torch::Tensor together = joint > 0;
      graph = torch::where(together, (joint / expected.clamp_min(1e-300)).log(),
                           torch::zeros_like(joint))
                  .clamp_min(0);
    }
  }
  graph.fill_diagonal_(0);
  return graph;
}

double Modularity(const torch::Tensor& weights, const std::vector<int64_t>& membership,
                  double resolution) {
  const torch::Tensor graph = weights.to(torch::kCPU, torch::kFloat64);
  const double total = graph.sum().item<double>();  // 2m
  if (total <= 0) return 0;
  // Community indicator S [n, K]: Q = (tr(S^T W S) − γ |S^T k|^2 / 2m) / 2m.
  int64_t communities = 0;
  for (int64_t label : membership) communities = std::max(communities, label + 1);
  const torch::Tensor labels = torch::tensor(membership, torch::kInt64);
  const torch::Tensor inside =
      torch::zeros({communities, graph.size(1)}, torch::kFloat64).index_add_(0, labels, graph);
  const torch::Tensor within =
      torch::zeros({communities, communities}, torch::kFloat64).index_add_(1, labels, inside);
  const torch::Tensor degree_sum =
      torch::zeros({communities}, torch::kFloat64).index_add_(0, labels, graph.sum(1));
  const double internal = within.diagonal().sum().item<double>();
  const double expected = degree_sum.square().sum().item<double>() / total;
  return (internal - resolution * expected) / total;
}

double AdjustedRandIndex(const std::vector<int64_t>& a, const std::vector<int64_t>& b) {
  std::map<std::pair<int64_t, int64_t>, double> joint;
  std::map<int64_t, double> rows, cols;
  for (size_t i = 0; i < a.size(); ++i) {
    joint[{a[i], b[i]}] += 1;
    rows[a[i]] += 1;
    cols[b[i]] += 1;
  }
  auto pairs = [](double n) { return n * (n - 1) / 2; };
  double index = 0, row_pairs = 0, col_pairs = 0;
  for (const auto& [key, n] : joint) index += pairs(n);
  for (const auto& [key, n] : rows) row_pairs += pairs(n);
  for (const auto& [key, n] : cols) col_pairs += pairs(n);
  const double all = pairs(static_cast<double>(a.size()));
  if (all <= 0) return 1;
  const double expected = row_pairs * col_pairs / all;
  const double best = (row_pairs + col_pairs) / 2;
  if (best == expected) return 1;  // both labelings trivial (one cluster, or all singletons)
  return (index - expected) / (best - expected);
}

}  // namespace icd::traces
