#include "traces/layout.h"

#include <algorithm>
#include <numeric>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace icd::traces {

absl::StatusOr<LayoutConstraints> MakeConstraints(const GroupInfo& group, int64_t preserve_block) {
  LayoutConstraints constraints;
  constraints.segment = group.block > 0 ? group.block : (group.whole > 0 ? group.whole : group.size);
  if (preserve_block < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("group '", group.name, "': preserve_block must be >= 0"));
  }
  if (preserve_block > 0) {
    if (constraints.segment % preserve_block != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "group '", group.name, "': preserve_block ", preserve_block, " does not divide ",
          constraints.segment == group.size ? "the group's size " : "the group's block ",
          constraints.segment));
    }
    constraints.unit = preserve_block;
  }
  return constraints;
}

absl::StatusOr<Clustering> ClusterAndOrder(const torch::Tensor& graph,
                                           const torch::Tensor& activity_rate,
                                           const LayoutConstraints& constraints,
                                           const LeidenOptions& options,
                                           const CallContext& ctx) {
  const int64_t channels = graph.size(0);
  const int64_t segment = constraints.segment;
  const int64_t unit = constraints.unit;
  const int64_t units_per_segment = segment / unit;
  const torch::Tensor rate = activity_rate.to(torch::kCPU, torch::kFloat64).contiguous();
  const double* rate_of = rate.data_ptr<double>();

  Clustering result;
  result.membership.assign(static_cast<size_t>(channels), 0);
  result.order.reserve(static_cast<size_t>(channels));
  for (int64_t start = 0; start < channels; start += segment) {
    // The segment's unit graph: W summed over unit pairs.
    const torch::Tensor block = graph.narrow(0, start, segment).narrow(1, start, segment);
    const torch::Tensor unit_graph =
        block.reshape({units_per_segment, unit, units_per_segment, unit}).sum({1, 3});
    auto labels = LeidenCluster(unit_graph, options, ctx);
    if (!labels.ok()) return labels.status();
    int64_t clusters = 0;
    for (int64_t label : *labels) clusters = std::max(clusters, label + 1);

    std::vector<double> unit_rate(static_cast<size_t>(units_per_segment), 0);
    std::vector<int64_t> cluster_size(static_cast<size_t>(clusters), 0);
    for (int64_t u = 0; u < units_per_segment; ++u) {
      for (int64_t k = 0; k < unit; ++k) unit_rate[static_cast<size_t>(u)] += rate_of[start + u * unit + k];
      ++cluster_size[static_cast<size_t>((*labels)[static_cast<size_t>(u)])];
      for (int64_t k = 0; k < unit; ++k) {
        result.membership[static_cast<size_t>(start + u * unit + k)] =
            result.clusters + (*labels)[static_cast<size_t>(u)];
      }
    }
    // Units: larger clusters first, then most active first; ties by index.
    std::vector<int64_t> units(static_cast<size_t>(units_per_segment));
    std::iota(units.begin(), units.end(), 0);
    std::stable_sort(units.begin(), units.end(), [&](int64_t a, int64_t b) {
      const int64_t la = (*labels)[static_cast<size_t>(a)], lb = (*labels)[static_cast<size_t>(b)];
      if (la != lb) {
        const int64_t sa = cluster_size[static_cast<size_t>(la)], sb = cluster_size[static_cast<size_t>(lb)];
        return sa != sb ? sa > sb : la < lb;
      }
      return unit_rate[static_cast<size_t>(a)] > unit_rate[static_cast<size_t>(b)];
    });
    for (int64_t u : units) {
      std::vector<int64_t> inside(static_cast<size_t>(unit));
      std::iota(inside.begin(), inside.end(), start + u * unit);
      std::stable_sort(inside.begin(), inside.end(),
                       [&](int64_t a, int64_t b) { return rate_of[a] > rate_of[b]; });
      result.order.insert(result.order.end(), inside.begin(), inside.end());
    }
    result.clusters += clusters;
  }
  return result;
}

double MeanBlocksTouched(const torch::Tensor& active, const std::vector<int64_t>& order,
                     int64_t block) {
  const int64_t rows = active.size(0);
  if (rows == 0) return 0;
  const int64_t channels = active.size(1);
  const int64_t blocks = (channels + block - 1) / block;
  torch::Tensor placed =
      active.index_select(1, torch::tensor(order, torch::kInt64).to(active.device()));
  placed = torch::constant_pad_nd(placed, {0, blocks * block - channels});
  return placed.reshape({rows, blocks, block}).amax(2).sum().item<double>() /
         static_cast<double>(rows);
}

std::vector<int64_t> RefineForBlocks(const torch::Tensor& active, std::vector<int64_t> order,
                                     int64_t block, const LayoutConstraints& constraints,
                                     int max_passes) {
  const int64_t rows = active.size(0), channels = active.size(1);
  if (rows == 0 || block >= channels) return order;
  const int64_t blocks = (channels + block - 1) / block;
  const auto device = active.device();
  const torch::Tensor positions = torch::arange(channels, torch::TensorOptions().device(device));
  const torch::Tensor block_of = torch::div(positions, block, "floor");
  // Swaps that keep the constraints: same segment, same unit when units
  // move whole (a swap across units would break a preserved pattern), and
  // different blocks (a swap inside a block changes nothing).
  torch::Tensor allowed = block_of.unsqueeze(1) != block_of.unsqueeze(0);
  const torch::Tensor segment_of = torch::div(positions, constraints.segment, "floor");
  allowed &= segment_of.unsqueeze(1) == segment_of.unsqueeze(0);
  if (constraints.unit > 1) {
    const torch::Tensor unit_of = torch::div(positions, constraints.unit, "floor");
    allowed &= unit_of.unsqueeze(1) == unit_of.unsqueeze(0);
  }
  allowed = torch::triu(allowed, 1);
  if (!allowed.any().item<bool>()) return order;

  for (int pass = 0; pass < max_passes; ++pass) {
    const torch::Tensor placed =
        active.index_select(1, torch::tensor(order, torch::kInt64).to(device)).to(torch::kFloat32);
    const torch::Tensor padded = torch::constant_pad_nd(placed, {0, blocks * block - channels});
    const torch::Tensor count = padded.reshape({rows, blocks, block}).sum(2);  // [R, blocks]
    const torch::Tensor empty = (count == 0).to(torch::kFloat32).index_select(1, block_of);
    const torch::Tensor single = (count == 1).to(torch::kFloat32).index_select(1, block_of);
    const torch::Tensor crowd = count.index_select(1, block_of);
    const torch::Tensor idle = 1 - placed;
    // Change of touched blocks when positions p and q swap, summed over rows:
    // G = T + T^T, T = A^T ((1-A) ∘ Z) − (A ∘ O)^T (1-A), with Z / O marking
    // rows where a position's block holds no / exactly one active channel.
    const torch::Tensor half = placed.t().mm(idle * empty) - (placed * single).t().mm(idle);
    // Ties (a plateau: one swap of a pair that needs two) are broken by the
    // change of Σ count², which rewards concentrating a row's active
    // channels. Both parts are integers (exact in float32 below 2^24), so
    // the float64 key orders swaps lexicographically: touched first.
    const torch::Tensor spread = placed.t().mm(idle * crowd) - (placed * crowd).t().mm(idle) +
                                 placed.t().mm(idle);
    const double spread_bound = 4.0 * static_cast<double>(rows) * static_cast<double>(block + 1) + 1;
    torch::Tensor gain = (half + half.t()).to(torch::kFloat64) * spread_bound -
                         2 * (spread + spread.t()).to(torch::kFloat64);
    gain = torch::where(allowed, gain, torch::zeros_like(gain));
    // Greedy: best swaps first, at most one per block per pass (a swap makes
    // the gains of other swaps touching its blocks stale).
    const int64_t candidates = std::min<int64_t>(gain.numel(), 8 * blocks);
    auto [values, flat] = gain.flatten().topk(candidates, 0, /*largest=*/false);
    const torch::Tensor host_values = values.to(torch::kCPU);
    const torch::Tensor host_flat = flat.to(torch::kCPU);
    std::vector<char> used(static_cast<size_t>(blocks), 0);
    int64_t swaps = 0;
    for (int64_t k = 0; k < candidates; ++k) {
      if (host_values[k].item<double>() > -0.5) break;  // not an improvement
      const int64_t index = host_flat[k].item<int64_t>();
      const int64_t p = index / channels, q = index % channels;
      const auto bp = static_cast<size_t>(p / block), bq = static_cast<size_t>(q / block);
      if (used[bp] || used[bq]) continue;
      used[bp] = used[bq] = 1;
      std::swap(order[static_cast<size_t>(p)], order[static_cast<size_t>(q)]);
      ++swaps;
    }
    if (swaps == 0) break;
  }
  return order;
}

}  // namespace icd::traces
