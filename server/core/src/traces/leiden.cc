#include "traces/leiden.h"

#include <algorithm>
#include <cmath>
#include <chrono>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "splitmix64.h"

namespace icd::traces {
namespace {

// A dense level graph on the CPU: row-major weights, self-loops on the
// diagonal (aggregated communities), weighted degrees.
struct LevelGraph {
  int64_t nodes = 0;
  torch::Tensor weights;  // [nodes, nodes] float64, CPU, contiguous
  std::vector<double> degree;
  double total = 0;  // 2m: the sum of all entries
  // The same matrix on the graph's device when the O(n^2) passes run as
  // tensor GEMMs there (base level only; aggregated levels are small).
  torch::Tensor device_weights;

  const double* Row(int64_t node) const {
    return weights.data_ptr<double>() + node * nodes;
  }
};

LevelGraph MakeLevel(torch::Tensor weights) {
  LevelGraph graph;
  graph.nodes = weights.size(0);
  graph.weights = weights.contiguous();
  const torch::Tensor degree = graph.weights.sum(1);
  graph.degree.assign(degree.data_ptr<double>(), degree.data_ptr<double>() + graph.nodes);
  graph.total = degree.sum().item<double>();
  return graph;
}

// The [n, columns] label indicator S on `like`'s device and dtype.
torch::Tensor Indicator(const std::vector<int64_t>& labels, int64_t columns,
                        const torch::Tensor& like) {
  const torch::Tensor index =
      torch::tensor(labels, torch::kInt64).to(like.device()).unsqueeze(1);
  return torch::zeros({static_cast<int64_t>(labels.size()), columns}, like.options())
      .scatter_(1, index, 1.0);
}

// Sums W's columns by label: out[v][labels[u]] += W[v][u], [n, columns].
// On the device, W S as one GEMM: cuBLAS sums in a fixed order, where
// index_add_'s atomics would make the partition vary from run to run. On the
// CPU a plain row loop: O(n^2) reads, where index_add_ over dim 1 of a big
// matrix is many times slower and a GEMM does K times the work.
torch::Tensor SumColumns(const LevelGraph& graph, const std::vector<int64_t>& labels,
                         int64_t columns) {
  if (graph.device_weights.defined()) {
    return graph.device_weights.mm(Indicator(labels, columns, graph.device_weights))
        .to(torch::kCPU)
        .contiguous();
  }
  torch::Tensor out = torch::zeros({graph.nodes, columns}, torch::kFloat64);
  double* sums = out.data_ptr<double>();
  for (int64_t v = 0; v < graph.nodes; ++v) {
    const double* row = graph.Row(v);
    double* target = sums + v * columns;
    for (int64_t u = 0; u < graph.nodes; ++u) target[labels[static_cast<size_t>(u)]] += row[u];
  }
  return out;
}

// The aggregated graph S^T W S for S the [n, groups] label indicator, in
// one pass over W.
torch::Tensor Aggregate(const LevelGraph& graph, const std::vector<int64_t>& labels,
                        int64_t groups) {
  if (graph.device_weights.defined()) {
    const torch::Tensor indicator = Indicator(labels, groups, graph.device_weights);
    return indicator.t().mm(graph.device_weights.mm(indicator)).to(torch::kCPU).contiguous();
  }
  torch::Tensor out = torch::zeros({groups, groups}, torch::kFloat64);
  double* sums = out.data_ptr<double>();
  for (int64_t v = 0; v < graph.nodes; ++v) {
    const double* row = graph.Row(v);
    double* target = sums + labels[static_cast<size_t>(v)] * groups;
    for (int64_t u = 0; u < graph.nodes; ++u) target[labels[static_cast<size_t>(u)]] += row[u];
  }
  return out;
}

absl::Status Poll(const CallContext& ctx) { return CheckCall(ctx, "clustering"); }

// Relative slack so that rounding never counts as an improvement (and the
// sweeps terminate).
constexpr double kSlack = 1e-12;
// θ of Leiden's randomised refinement (the paper's and igraph's default).
constexpr double kRandomness = 0.01;

// Labels renumbered 0..K-1 in order of first appearance; returns K.
int64_t Compact(std::vector<int64_t>& labels) {
  int64_t largest = 0;
  for (int64_t label : labels) largest = std::max(largest, label);
  std::vector<int64_t> renamed(static_cast<size_t>(largest) + 1, -1);
  int64_t next = 0;
  for (int64_t& label : labels) {
    auto& slot = renamed[static_cast<size_t>(label)];
    if (slot < 0) slot = next++;
    label = slot;
  }
  return next;
}

// The state of Louvain's local moves shared by both sweep kinds below:
// per-community weighted degree and size, and a stack of empty labels.
struct MoveState {
  std::vector<double> total;
  std::vector<int64_t> size;
  std::vector<int64_t> empty;

  MoveState(const LevelGraph& graph, const std::vector<int64_t>& community)
      : total(static_cast<size_t>(graph.nodes), 0), size(static_cast<size_t>(graph.nodes), 0) {
    for (int64_t i = 0; i < graph.nodes; ++i) {
      const auto c = static_cast<size_t>(community[static_cast<size_t>(i)]);
      total[c] += graph.degree[static_cast<size_t>(i)];
      ++size[c];
    }
    for (int64_t c = graph.nodes - 1; c >= 0; --c) {
      if (size[static_cast<size_t>(c)] == 0) empty.push_back(c);
    }
  }
  void Leave(int64_t community, double degree) {
    total[static_cast<size_t>(community)] -= degree;
    if (--size[static_cast<size_t>(community)] == 0) empty.push_back(community);
  }
  void Join(int64_t community, double degree) {
    if (size[static_cast<size_t>(community)] == 0 && !empty.empty() && empty.back() == community) {
      empty.pop_back();
    }
    total[static_cast<size_t>(community)] += degree;
    ++size[static_cast<size_t>(community)];
  }
};

// One node's link weight to each community it touches, in the order first
// touched (RowSweep and Refine gather it from a dense row); Clear costs
// O(touched), not O(n).
class TouchedLinks {
 public:
  explicit TouchedLinks(int64_t n)
      : link_(static_cast<size_t>(n), 0), seen_(static_cast<size_t>(n), 0) {}
  void Add(int64_t community, double weight) {
    const auto c = static_cast<size_t>(community);
    if (!seen_[c]) {
      seen_[c] = 1;
      touched_.push_back(community);
    }
    link_[c] += weight;
  }
  double link(int64_t community) const { return link_[static_cast<size_t>(community)]; }
  const std::vector<int64_t>& touched() const { return touched_; }
  void Clear() {
    for (int64_t c : touched_) {
      link_[static_cast<size_t>(c)] = 0;
      seen_[static_cast<size_t>(c)] = 0;
    }
    touched_.clear();
  }

 private:
  std::vector<double> link_;
  std::vector<char> seen_;
  std::vector<int64_t> touched_;
};

// The best community for a node that has left `current`, given its link
// weight to each candidate: the largest ΔQ ∝ link − γ·degree·total/2m, ties
// keeping `current`; an empty community when every choice loses.
template <typename Candidates>
int64_t BestCommunity(const MoveState& state, int64_t current, double current_link,
                      double degree, double scale, Candidates&& candidates) {
  int64_t best = current;
  double best_gain = current_link - scale * degree * state.total[static_cast<size_t>(current)];
  const double slack = kSlack * (std::abs(best_gain) + degree);
  candidates([&](int64_t c, double link) {
    const double gain = link - scale * degree * state.total[static_cast<size_t>(c)];
    if (gain > best_gain + slack) {
      best = c;
      best_gain = gain;
    }
  });
  if (best_gain < -slack) best = state.empty.back();  // alone is better
  return best;
}

// One sweep scanning each node's dense row: O(n^2), used while there are
// many communities (the first sweep from singletons).
int64_t RowSweep(const LevelGraph& graph, double scale, const std::vector<int64_t>& order,
                 MoveState& state, std::vector<int64_t>& community) {
  const int64_t n = graph.nodes;
  TouchedLinks links(n);
  int64_t moved = 0;
  for (int64_t node : order) {
    const auto u = static_cast<size_t>(node);
    const int64_t current = community[u];
    const double* row = graph.Row(node);
    for (int64_t j = 0; j < n; ++j) {
      if (j != node && row[j] != 0) links.Add(community[static_cast<size_t>(j)], row[j]);
    }
    const double degree = graph.degree[u];
    state.Leave(current, degree);
    const int64_t best = BestCommunity(state, current, links.link(current), degree, scale,
                                       [&](auto&& visit) {
                                         for (int64_t c : links.touched()) visit(c, links.link(c));
                                       });
    state.Join(best, degree);
    community[u] = best;
    moved += best != current;
    links.Clear();
  }
  return moved;
}

// Node-to-community link weights, links[v][c] = Σ_{u in c} w(v, u), kept up
// to date as nodes move: a visit reads K entries instead of a row of n, and
// a move updates two columns. Once communities are few this makes the many
// late sweeps (few moves each) nearly free. Labels are compacted to columns,
// with spare columns for nodes that leave to a community of their own.
class LinkMatrix {
 public:
  LinkMatrix(const LevelGraph& graph, std::vector<int64_t>& community, int64_t communities)
      : graph_(graph), columns_(communities + std::max<int64_t>(16, communities)) {
    links_ = SumColumns(graph, community, columns_);  // W S, S the community indicator
  }
  int64_t columns() const { return columns_; }
  const double* Row(int64_t node) const { return links_.data_ptr<double>() + node * columns_; }
  void Move(int64_t node, int64_t from, int64_t to) {
    double* links = links_.data_ptr<double>();
    const double* row = graph_.Row(node);  // symmetric: W[:, node] = W[node, :]
    for (int64_t v = 0; v < graph_.nodes; ++v) {
      links[v * columns_ + from] -= row[v];
      links[v * columns_ + to] += row[v];
    }
  }
  void Clear(int64_t column) {  // an emptied community: drop rounding residue
    double* links = links_.data_ptr<double>();
    for (int64_t v = 0; v < graph_.nodes; ++v) links[v * columns_ + column] = 0;
  }

 private:
  const LevelGraph& graph_;
  int64_t columns_;
  torch::Tensor links_;  // [n, columns] float64, row-major
};

// Louvain's local moves: each node, in random order, goes to the community
// (or an empty one) that raises modularity most, until a sweep moves none.
absl::Status MoveNodes(const LevelGraph& graph, double resolution, SplitMix64& rng,
                       std::vector<int64_t>& community, const CallContext& ctx) {
  const int64_t n = graph.nodes;
  const double scale = resolution / graph.total;
  const std::vector<int64_t> order = rng.Order(n);
  // Row sweeps while communities are many (the link matrix would be as big
  // as W); then compact the labels and switch to the link matrix.
  constexpr int kMaxSweeps = 1000;
  int sweep = 0;
  while (sweep < kMaxSweeps) {
    std::vector<int64_t> labels = community;
    if (Compact(labels) * 4 <= n) break;
    MoveState state(graph, community);
    const int64_t moved = RowSweep(graph, scale, order, state, community);
    ++sweep;
    if (moved == 0) return absl::OkStatus();
    if (absl::Status status = Poll(ctx); !status.ok()) return status;
  }
  if (sweep == kMaxSweeps) return absl::OkStatus();
  const int64_t communities = Compact(community);
  LinkMatrix links(graph, community, communities);
  // Columns are the labels now; the spare ones start empty.
  std::vector<int64_t> padded = community;
  MoveState state(graph, padded);
  state.total.resize(static_cast<size_t>(links.columns()), 0);
  state.size.resize(static_cast<size_t>(links.columns()), 0);
  state.empty.clear();
  for (int64_t c = links.columns() - 1; c >= communities; --c) state.empty.push_back(c);
  for (; sweep < kMaxSweeps; ++sweep) {
    int64_t moved = 0;
    for (int64_t node : order) {
      const auto u = static_cast<size_t>(node);
      const int64_t current = community[u];
      const double* link = links.Row(node);
      const double self = graph.Row(node)[node];  // aggregated levels carry self-loops
      const double degree = graph.degree[u];
      state.Leave(current, degree);
      if (state.empty.empty()) {  // every spare column taken: keep the node where it is
        state.Join(current, degree);
        continue;
      }
      const int64_t best = BestCommunity(state, current, link[current] - self, degree, scale,
                                         [&](auto&& visit) {
                                           for (int64_t c = 0; c < links.columns(); ++c) {
                                             if (c != current && link[c] != 0) visit(c, link[c]);
                                           }
                                         });
      state.Join(best, degree);
      if (best == current) continue;
      community[u] = best;
      ++moved;
      links.Move(node, current, best);
      if (state.size[static_cast<size_t>(current)] == 0) links.Clear(current);
    }
    if (moved == 0) break;
    if (absl::Status status = Poll(ctx); !status.ok()) return status;
  }
  return absl::OkStatus();
}

// Leiden's refinement: inside each community, start from singletons and merge
// a node (still alone, well connected to its community) into the
// well-connected sub-community that raises modularity most (greedy, θ → 0).
// Sub-communities are therefore connected, which Louvain does not guarantee.
std::vector<int64_t> Refine(const LevelGraph& graph, double resolution, SplitMix64& rng,
                            const std::vector<int64_t>& community) {
  const int64_t n = graph.nodes;
  const double scale = resolution / graph.total;
  std::vector<int64_t> refined(static_cast<size_t>(n));
  std::vector<double> sub_total(static_cast<size_t>(n)), sub_external(static_cast<size_t>(n)),
      community_total(static_cast<size_t>(n), 0), node_external(static_cast<size_t>(n), 0);
  std::vector<int64_t> sub_size(static_cast<size_t>(n), 1);
  std::vector<std::vector<int64_t>> members(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    refined[static_cast<size_t>(i)] = i;
    sub_total[static_cast<size_t>(i)] = graph.degree[static_cast<size_t>(i)];
    community_total[static_cast<size_t>(community[static_cast<size_t>(i)])] +=
        graph.degree[static_cast<size_t>(i)];
  }
  for (int64_t i : rng.Order(n)) members[static_cast<size_t>(community[static_cast<size_t>(i)])].push_back(i);
  TouchedLinks links(n);  // to each sub-community
  std::vector<int64_t> candidates;
  std::vector<double> weights_of;
  for (const std::vector<int64_t>& nodes : members) {
    if (nodes.size() < 2) continue;
    const double whole = community_total[static_cast<size_t>(community[static_cast<size_t>(nodes[0])])];
    for (int64_t v : nodes) {
      double external = 0;
      const double* row = graph.Row(v);
      for (int64_t u : nodes) {
        if (u != v) external += row[u];
      }
      node_external[static_cast<size_t>(v)] = external;
      sub_external[static_cast<size_t>(v)] = external;
    }
    for (int64_t v : nodes) {
      const auto vi = static_cast<size_t>(v);
      const double degree = graph.degree[vi];
      if (sub_size[static_cast<size_t>(refined[vi])] != 1) continue;
      if (node_external[vi] < scale * degree * (whole - degree)) continue;
      const double* row = graph.Row(v);
      for (int64_t u : nodes) {
        if (u != v && row[u] != 0) links.Add(refined[static_cast<size_t>(u)], row[u]);
      }
      // Leiden's randomised choice: among the well-connected sub-communities
      // that do not lower Q, pick one with probability ∝ exp(ΔQ / θ), θ = 0.01.
      // ΔQ is tiny on a big graph, so this explores far more than greedy.
      int64_t best = refined[vi];
      candidates.clear();
      weights_of.clear();
      double top = 0;
      for (int64_t s : links.touched()) {
        const auto si = static_cast<size_t>(s);
        const bool well_connected =
            sub_external[si] >= scale * sub_total[si] * (whole - sub_total[si]);
        if (!well_connected) continue;
        const double gain = links.link(s) - scale * degree * sub_total[si];
        if (gain < 0) continue;
        candidates.push_back(s);
        weights_of.push_back(2 * gain / graph.total / kRandomness);
        top = std::max(top, weights_of.back());
      }
      if (!candidates.empty()) {
        double sum = 0;
        for (double& w : weights_of) sum += (w = std::exp(w - top));
        double pick = static_cast<double>(rng.Next() >> 11) * 0x1.0p-53 * sum;
        best = candidates.back();
        for (size_t k = 0; k < candidates.size(); ++k) {
          if ((pick -= weights_of[k]) < 0) {
            best = candidates[k];
            break;
          }
        }
      }
      if (best != refined[vi]) {
        const auto bi = static_cast<size_t>(best);
        sub_external[bi] += node_external[vi] - 2 * links.link(best);
        sub_total[bi] += degree;
        ++sub_size[bi];
        sub_size[static_cast<size_t>(refined[vi])] = 0;
        refined[vi] = best;
      }
      links.Clear();
    }
  }
  return refined;
}

double LevelModularity(const LevelGraph& graph, const std::vector<int64_t>& community,
                       double resolution) {
  if (graph.device_weights.defined()) {
    // The weight inside communities, Σ_ij W_ij δ(c_i, c_j) = Σ (W S) ∘ S: one
    // GEMM on the device.
    std::vector<int64_t> labels = community;
    const int64_t groups = Compact(labels);
    const torch::Tensor indicator = Indicator(labels, groups, graph.device_weights);
    const double internal =
        (graph.device_weights.mm(indicator) * indicator).sum().item<double>();
    std::vector<double> total(static_cast<size_t>(groups), 0);
    for (int64_t i = 0; i < graph.nodes; ++i) {
      total[static_cast<size_t>(labels[static_cast<size_t>(i)])] += graph.degree[static_cast<size_t>(i)];
    }
    double expected = 0;
    for (double t : total) expected += t * t;
    return (internal - resolution * expected / graph.total) / graph.total;
  }
  const int64_t n = graph.nodes;
  std::vector<double> total(static_cast<size_t>(n), 0);
  double internal = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double* row = graph.Row(i);
    const int64_t ci = community[static_cast<size_t>(i)];
    total[static_cast<size_t>(ci)] += graph.degree[static_cast<size_t>(i)];
    for (int64_t j = 0; j < n; ++j) {
      if (community[static_cast<size_t>(j)] == ci) internal += row[j];
    }
  }
  double expected = 0;
  for (double t : total) expected += t * t;
  return (internal - resolution * expected / graph.total) / graph.total;
}

// One Leiden pass from `membership` (labels of the original nodes).
absl::Status LeidenPass(const LevelGraph& base, double resolution, SplitMix64& rng,
                        std::vector<int64_t>& membership, const CallContext& ctx) {
  const int64_t n = base.nodes;
  std::vector<int64_t> node_of(static_cast<size_t>(n));  // original node -> level node
  for (int64_t i = 0; i < n; ++i) node_of[static_cast<size_t>(i)] = i;
  LevelGraph graph = base;
  std::vector<int64_t> community = membership;
  while (true) {
    if (absl::Status status = MoveNodes(graph, resolution, rng, community, ctx); !status.ok()) {
      return status;
    }
    std::vector<int64_t> partition = community;
    if (Compact(partition) == graph.nodes) break;  // every node alone: converged
    std::vector<int64_t> refined = Refine(graph, resolution, rng, community);
    int64_t level_nodes = Compact(refined);
    if (level_nodes == graph.nodes) {
      // No merge survived refinement: aggregate by the communities so the
      // next level is smaller (plain Louvain step).
      refined = partition;
      level_nodes = Compact(refined);
    }
    // Aggregate: W' = S^T W S with S the refined indicator.
    LevelGraph next = MakeLevel(Aggregate(graph, refined, level_nodes));
    std::vector<int64_t> next_community(static_cast<size_t>(level_nodes));
    for (int64_t v = 0; v < graph.nodes; ++v) {
      next_community[static_cast<size_t>(refined[static_cast<size_t>(v)])] =
          community[static_cast<size_t>(v)];
    }
    Compact(next_community);  // labels index per-level arrays: keep them < level_nodes
    for (int64_t& node : node_of) node = refined[static_cast<size_t>(node)];
    graph = std::move(next);
    community = std::move(next_community);
  }
  for (int64_t i = 0; i < n; ++i) {
    membership[static_cast<size_t>(i)] = community[static_cast<size_t>(node_of[static_cast<size_t>(i)])];
  }
  Compact(membership);
  return absl::OkStatus();
}

// Merges whole communities while a merge raises Q (greedy, best pair
// first): ΔQ(a, b) = 2 (w_ab − γ tot_a tot_b / 2m) / 2m. Local moves cannot
// always reach such a merge, as moving the parts one by one may lower Q.
void MergeCommunities(const LevelGraph& graph, double resolution,
                      std::vector<int64_t>& membership) {
  int64_t communities = Compact(membership);
  if (communities < 2) return;
  torch::Tensor between = Aggregate(graph, membership, communities).contiguous();
  std::vector<double> total(static_cast<size_t>(communities), 0);
  for (int64_t i = 0; i < graph.nodes; ++i) {
    total[static_cast<size_t>(membership[static_cast<size_t>(i)])] += graph.degree[static_cast<size_t>(i)];
  }
  double* w = between.data_ptr<double>();
  std::vector<int64_t> merged_into(static_cast<size_t>(communities));
  for (int64_t c = 0; c < communities; ++c) merged_into[static_cast<size_t>(c)] = c;
  std::vector<char> alive(static_cast<size_t>(communities), 1);
  const double scale = resolution / graph.total;
  while (true) {
    double best = 0;
    int64_t best_a = -1, best_b = -1;
    for (int64_t a = 0; a < communities; ++a) {
      if (!alive[static_cast<size_t>(a)]) continue;
      for (int64_t b = a + 1; b < communities; ++b) {
        if (!alive[static_cast<size_t>(b)]) continue;
        const double gain = w[a * communities + b] -
                            scale * total[static_cast<size_t>(a)] * total[static_cast<size_t>(b)];
        if (gain > best + kSlack * std::abs(w[a * communities + b])) {
          best = gain;
          best_a = a;
          best_b = b;
        }
      }
    }
    if (best_a < 0) break;
    // b joins a: fold b's row and column into a's.
    for (int64_t c = 0; c < communities; ++c) {
      w[best_a * communities + c] += w[best_b * communities + c];
      w[c * communities + best_a] += w[c * communities + best_b];
    }
    total[static_cast<size_t>(best_a)] += total[static_cast<size_t>(best_b)];
    alive[static_cast<size_t>(best_b)] = 0;
    for (int64_t& target : merged_into) {
      if (target == best_b) target = best_a;
    }
  }
  for (int64_t& label : membership) label = merged_into[static_cast<size_t>(label)];
  Compact(membership);
}

}  // namespace

absl::StatusOr<std::vector<int64_t>> LeidenCluster(const torch::Tensor& weights,
                                                   const LeidenOptions& options,
                                                   const CallContext& ctx) {
  if (weights.dim() != 2 || weights.size(0) != weights.size(1)) {
    return absl::InvalidArgumentError("clustering needs a square weight matrix");
  }
  const int64_t n = weights.size(0);
  std::vector<int64_t> singletons(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) singletons[static_cast<size_t>(i)] = i;
  // The levels only read the base matrix: use the caller's when it already
  // is a CPU float64 matrix without self-loops (a copy of a large graph costs
  // more than a whole run on a small machine).
  torch::Tensor dense = weights.to(torch::kCPU, torch::kFloat64).contiguous();
  if (dense.diagonal().count_nonzero().item<int64_t>() != 0) {
    if (dense.data_ptr() == weights.data_ptr()) dense = dense.clone();  // never write the caller's
    dense.fill_diagonal_(0);
  }
  LevelGraph base = MakeLevel(dense);
  if (n == 0 || base.total <= 0) return singletons;  // no edges: all singletons
  if (!weights.device().is_cpu()) {
    torch::Tensor on_device = weights.to(torch::kFloat64).contiguous();
    if (on_device.data_ptr() == weights.data_ptr()) on_device = on_device.clone();
    base.device_weights = on_device.fill_diagonal_(0);
  } else if (options.tensor_dense_passes) {
    base.device_weights = dense;
  }

  std::vector<int64_t> best = singletons;
  double best_quality = LevelModularity(base, best, options.resolution);
  for (int run = 0; run < std::max(1, options.restarts); ++run) {
    // Run 0 draws from the seed itself; the others from hashed seeds (a
    // shifted splitmix64 state would only replay run 0's stream one draw on).
    SplitMix64 rng(run == 0 ? options.seed
                            : SplitMix64(options.seed ^ (0xd1b54a32d192ed03ULL * static_cast<uint64_t>(run))).Next());
    std::vector<int64_t> membership = singletons;
    double quality = LevelModularity(base, membership, options.resolution);
    for (int iteration = 0; iteration < std::max(1, options.max_iterations); ++iteration) {
      std::vector<int64_t> candidate = membership;
      if (absl::Status status = LeidenPass(base, options.resolution, rng, candidate, ctx);
          !status.ok()) {
        return status;
      }
      MergeCommunities(base, options.resolution, candidate);
      const double candidate_quality = LevelModularity(base, candidate, options.resolution);
      if (candidate_quality <= quality + kSlack * std::abs(quality)) break;
      membership = std::move(candidate);
      quality = candidate_quality;
    }
    // Strictly better only: ties keep the earlier run, so restarts never
    // make a result worse than run 0's.
    if (quality > best_quality + kSlack * std::abs(best_quality)) {
      best = std::move(membership);
      best_quality = quality;
    }
  }
  return best;
}

}  // namespace icd::traces
