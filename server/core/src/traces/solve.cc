#include "traces/solve.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "icd/core/checked.h"
#include "icd/core/status_macros.h"
#include "apply/symmetry.h"
#include "traces/layout.h"
#include "traces/leiden.h"
#include "traces/nm_sparsity.h"

namespace icd::traces {
namespace {

absl::Status Refuse(const std::string& field, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat("solver option ", field, ": ", why));
}

// `value` as one of `choices` (empty: the first); otherwise a refusal naming
// `field` and every choice.
template <typename Enum>
absl::StatusOr<Enum> Choose(const std::string& field, const std::string& value,
                            std::initializer_list<std::pair<const char*, Enum>> choices) {
  if (value.empty()) return choices.begin()->second;
  std::vector<std::string> names;
  for (const auto& [name, choice] : choices) {
    if (value == name) return choice;
    names.push_back(name);
  }
  return Refuse(field, absl::StrCat("'", value, "' is not one of ", absl::StrJoin(names, ", ")));
}

bool EndsWith(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() &&
         text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Swap passes of the block refinement, sized so that its GEMMs stay near
// 2e11 multiply-adds whatever the group's width (a few seconds on two CPU
// cores, milliseconds on a GPU).
int RefinementPasses(int64_t channels, int64_t rows) {
  const double work = 4.0 * static_cast<double>(channels) * static_cast<double>(channels) *
                      static_cast<double>(std::max<int64_t>(rows, 1));
  return static_cast<int>(std::clamp(2e11 / work, 1.0, 30.0));
}
constexpr int64_t kRefinementRows = 512;

// Q must exceed the null by a quarter and by 0.01 before the clusters count
// as structure: the null is one shuffle, so this margin is its noise plus a
// safety factor (measured: unstructured traces land within a few percent).
// A group narrower than the smallest default block (16) never claims any:
// one block holds it whole, so there is no block to save, and its one-shuffle
// null is too noisy to tell.
constexpr int64_t kMinStructureChannels = 16;
bool StructureFound(int64_t channels, double modularity, double modularity_null) {
  return channels >= kMinStructureChannels && modularity > 1.25 * modularity_null + 0.01;
}

}  // namespace

absl::StatusOr<ResolvedOptions> ResolveSolverOptions(const SolverOptions& options) {
  ResolvedOptions resolved;
  ICD_ASSIGN_OR_RETURN(resolved.objective,
                       Choose<Objective>("objective", options.objective,
                                         {{"coactivation", Objective::kCoactivation},
                                          {"nm_sparsity", Objective::kNmSparsity}}));
  ICD_ASSIGN_OR_RETURN(resolved.statistic,
                       Choose<Statistic>("statistic", options.statistic,
                                         {{"correlation", Statistic::kCorrelation},
                                          {"coactivation", Statistic::kCoactivation},
                                          {"pmi", Statistic::kPmi}}));
  if (options.activation_quantile != 0) {
    if (!(options.activation_quantile > 0 && options.activation_quantile < 1)) {
      return Refuse("activation_quantile", "must lie in (0, 1)");
    }
    resolved.activation_quantile = options.activation_quantile;
  }
  if (options.resolution != 0) {
    if (!(options.resolution > 0 && std::isfinite(options.resolution))) {
      return Refuse("resolution", "must be positive");
    }
    resolved.resolution = options.resolution;
  }
  resolved.seed = options.seed;
  if (options.seeds < 0 || options.seeds > 64) return Refuse("seeds", "must lie in [0, 64]");
  resolved.seeds = std::max(options.seeds, 1);
  if (options.nm_n != 0 || options.nm_m != 0) {
    if (options.nm_n < 1 || options.nm_m <= options.nm_n || options.nm_m > 64) {
      return Refuse("nm_n/nm_m", absl::StrCat(options.nm_n, ":", options.nm_m,
                                              " is not an N:M pattern with 1 <= N < M <= 64"));
    }
    resolved.nm_n = options.nm_n;
    resolved.nm_m = options.nm_m;
  }
  if (options.preserve_block < 0) return Refuse("preserve_block", "must be >= 0");
  if (options.preserve_block > 0 && resolved.objective == Objective::kNmSparsity) {
    return Refuse("preserve_block", "applies to the coactivation objective only");
  }
  resolved.preserve_block = options.preserve_block;
  if (options.return_graph && resolved.objective == Objective::kNmSparsity) {
    return Refuse("return_graph", "applies to the coactivation objective only");
  }
  resolved.return_graph = options.return_graph;
  if (!options.block_sizes.empty()) {
    resolved.block_sizes = options.block_sizes;
    for (int32_t size : resolved.block_sizes) {
      if (size < 1) return Refuse("block_sizes", "every size must be positive");
    }
  }
  return resolved;
}

StatsOptions StatsOptionsFor(const ResolvedOptions& options, int64_t channels,
                             torch::Device device) {
  StatsOptions stats;
  stats.channels = channels;
  stats.outer_products = options.statistic == Statistic::kCorrelation;
  stats.coactivation = options.statistic != Statistic::kCorrelation;
  stats.activation_quantile = options.activation_quantile;
  stats.seed = options.seed;
  stats.device = device;
  return stats;
}

absl::StatusOr<torch::Tensor> NmSaliency(const GroupInfo& group, const Weights& weights,
                                         const TraceStats& stats) {
  // Linear layers reading the group: 2-D weights whose input axis (1) is a
  // member, element for element. The embedding reads nothing, unless it is
  // the tied head.
  const bool tied_head = weights.count(kHeadTensor) == 0;
  std::vector<torch::Tensor> parts;
  for (const GroupMember& member : group.members) {
    if (member.axis != 1 || member.expand != "identity" || !EndsWith(member.tensor, ".weight")) {
      continue;
    }
    if (member.tensor == kEmbeddingTensor && !tied_head) continue;
    const torch::Tensor& weight = weights.at(member.tensor);
    if (weight.dim() != 2) continue;
    // On the first part's device: a placed model's layers are on several.
    parts.push_back(weight.narrow(1, member.offset, member.length)
                        .abs()
                        .to(parts.empty() ? weight.device() : parts.front().device(),
                            torch::kFloat32));
  }
  if (parts.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "group '", group.name, "': no Linear layer reads it, so nm_sparsity does not apply"));
  }
  torch::Tensor saliency = torch::cat(parts, 0);
  if (stats.rows() > 0) {
    const torch::Tensor rms =
        (stats.sum_squares() / static_cast<double>(stats.rows())).sqrt().to(saliency.device());
    saliency = saliency * rms.to(torch::kFloat32).unsqueeze(0);
  }
  return saliency;
}

absl::StatusOr<PermutationResult> SolveGroup(const GroupInfo& group, const TraceStats& stats,
                                             const torch::Tensor& holdout,
                                             const ResolvedOptions& options,
                                             const Weights& weights, const CallContext& ctx) {
  const auto start = std::chrono::steady_clock::now();
  PermutationResult result;
  result.permutation.group = group.name;
  result.tokens = stats.rows();
  ICD_ASSIGN_OR_RETURN(LayoutConstraints constraints,
                       MakeConstraints(group, options.preserve_block));
  // Block sizes wider than the group say nothing about it (one block holds
  // everything): they are left out of this group's scores.
  std::vector<int32_t> block_sizes;
  for (int32_t size : options.block_sizes) {
    if (size < group.size) block_sizes.push_back(size);
  }
  std::vector<int64_t> order;
  const torch::Tensor rate =
      stats.active_count() / static_cast<double>(std::max<int64_t>(stats.rows(), 1));
  if (options.objective == Objective::kCoactivation) {
    if (stats.rows() < 2) {
      return absl::InvalidArgumentError(absl::StrCat(
          "group '", group.name, "': ", stats.rows(),
          " training rows; co-activation statistics need at least 2"));
    }
    if (options.return_graph && group.size > kMaxReturnedGraphChannels) {
      return absl::InvalidArgumentError(absl::StrCat(
          "group '", group.name, "': ", group.size, " channels; return_graph takes groups of at "
          "most ", kMaxReturnedGraphChannels, " (ask for the groups you want to plot)"));
    }
    LeidenOptions leiden{options.resolution, options.seed};
    const torch::Tensor graph = BuildGraph(stats, options.statistic, /*null=*/false);
    if (options.return_graph) {
      const torch::Tensor host = graph.to(torch::kCPU, torch::kFloat32).contiguous();
      const float* values = host.data_ptr<float>();
      result.graph.assign(values, values + host.numel());
    }
    ICD_ASSIGN_OR_RETURN(Clustering clustering,
                         ClusterAndOrder(graph, rate, constraints, leiden, ctx));
    result.modularity = Modularity(graph, clustering.membership, options.resolution);
    result.clusters = clustering.clusters;
    const torch::Tensor null_graph = BuildGraph(stats, options.statistic, /*null=*/true);
    ICD_ASSIGN_OR_RETURN(Clustering null_clustering,
                         ClusterAndOrder(null_graph, rate, constraints, leiden, ctx));
    result.modularity_null =
        Modularity(null_graph, null_clustering.membership, options.resolution);
    result.structure_found =
        StructureFound(group.size, result.modularity, result.modularity_null);
    if (options.seeds > 1) {
      double ari = 0;
      for (int32_t extra = 1; extra < options.seeds; ++extra) {
        LeidenOptions other = leiden;
        other.seed = options.seed + static_cast<uint64_t>(extra);
        ICD_ASSIGN_OR_RETURN(Clustering again, ClusterAndOrder(graph, rate, constraints, other, ctx));
        ari += AdjustedRandIndex(clustering.membership, again.membership);
      }
      result.ari = ari / (options.seeds - 1);
    }
    order = std::move(clustering.order);
    // Refine on the training sample for the first (smallest asked) block.
    const torch::Tensor sample = stats.sample();
    if (sample.size(0) > 0 && !block_sizes.empty()) {
      const torch::Tensor active =
          stats.Active(sample.narrow(0, 0, std::min<int64_t>(sample.size(0), kRefinementRows)));
      order = RefineForBlocks(active, std::move(order), block_sizes.front(), constraints,
                              RefinementPasses(group.size, active.size(0)));
    }
  } else {
    ICD_ASSIGN_OR_RETURN(torch::Tensor saliency, NmSaliency(group, weights, stats));
    NmOptions nm;
    nm.n = options.nm_n;
    nm.m = options.nm_m;
    nm.block = constraints.segment == group.size ? 0 : constraints.segment;
    nm.seed = options.seed;
    ICD_ASSIGN_OR_RETURN(NmSolution solution, SolveNmPermutation(saliency, nm, ctx));
    order = std::move(solution.order);
    result.nm_efficacy = solution.efficacy;
    result.nm_kept_identity = solution.kept_identity;
    result.nm_kept_solved = solution.kept_solved;
    result.nm_upper_bound = solution.upper_bound;
  }
  if (absl::Status valid = ValidatePermutation(group, order); !valid.ok()) {
    return absl::InternalError(absl::StrCat("solver produced an invalid order: ", valid.message()));
  }

  // Blocks touched: on held-out rows only; a score on the training rows
  // would flatter the solved order.
  result.holdout_tokens = holdout.size(0);
  if (holdout.size(0) == 0) {
    result.scores_note =
        "no held-out rows, so blocks touched were not scored (ComputePermutation: send at "
        "least 5 rows or set holdout_rows; CapturePermutation: sequences of at least 2 tokens "
        "or holdout_ids)";
  } else {
    const torch::Tensor active = stats.Active(holdout.to(stats.options().device));
    std::vector<int64_t> identity(static_cast<size_t>(group.size));
    for (int64_t i = 0; i < group.size; ++i) identity[static_cast<size_t>(i)] = i;
    for (int32_t size : block_sizes) {
      result.blocks.push_back(icd::BlocksTouched{size, MeanBlocksTouched(active, identity, size),
                                            MeanBlocksTouched(active, order, size)});
    }
  }
  result.permutation.index = std::move(order);
  result.solve_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  return result;
}

int64_t DefaultHoldout(int64_t rows) { return std::min<int64_t>(1024, rows / 5); }

TraceSessionState::TraceSessionState(const TraceHeader& header, const ResolvedOptions& options,
                                     torch::Device device, Solver solver)
    : header_(header),
      options_(options),
      device_(device),
      solver_(std::move(solver)),
      stats_(StatsOptionsFor(options, header.channels, device)),
      tail_(header.holdout_rows > 0 ? header.holdout_rows : 1024) {}

absl::Status TraceSessionState::AddRows(std::string_view f32_le, int64_t rows,
                                        const CallContext& ctx) {
  if (failed_) return *failed_;
  const int64_t channels = header_.channels;
  auto refuse = [&](std::string message) {
    failed_ = absl::InvalidArgumentError(
        absl::StrCat("group '", header_.group, "': ", message, "; nothing was kept"));
    return *failed_;
  };
  if (rows < 0) return refuse(absl::StrCat("rows: a chunk has ", rows, " rows"));
  // Checked: rows comes from the wire, and a product that wraps could match
  // the bytes that came.
  const absl::StatusOr<int64_t> expected =
      CheckedProduct({rows, channels, int64_t{4}}, "rows x channels x 4 bytes");
  if (!expected.ok()) return refuse(std::string(expected.status().message()));
  if (f32_le.size() != static_cast<uint64_t>(*expected)) {
    return refuse(absl::StrCat("a chunk of ", rows, " rows of ", channels, " channels needs ",
                               *expected, " bytes of float32, got ", f32_le.size()));
  }
  if (rows == 0) return absl::OkStatus();
  static_assert(sizeof(float) == 4);
  torch::Tensor chunk = torch::empty({rows, channels}, torch::kFloat32);
  std::memcpy(chunk.data_ptr<float>(), f32_le.data(), f32_le.size());  // little-endian hosts
  if (!torch::isfinite(chunk).all().item<bool>()) {
    const int64_t row = torch::isfinite(chunk).all(1).logical_not().nonzero()[0][0].item<int64_t>();
    return refuse(absl::StrCat("row ", rows_seen_ + row, " holds a NaN or infinite value"));
  }
  rows_seen_ += rows;
  absl::Status stopped = absl::OkStatus();
  try {
    tail_.Add(chunk, [&](const torch::Tensor& released) {
      if (stopped.ok()) stopped = stats_.Add(released, ctx);
    });
  } catch (const std::exception& e) {
    failed_ = InternalFailure("accumulating traces", e.what());
    return *failed_;
  }
  if (!stopped.ok()) failed_ = stopped;  // the statistics are incomplete
  if (stopped.ok()) ReportProgress(ctx, "rows", rows_seen_, 0);  // a stream's length is unknown
  return stopped;
}

absl::StatusOr<PermutationResult> TraceSessionState::Finish(const CallContext& ctx) {
  if (failed_) return *failed_;
  if (header_.holdout_rows > 0 && rows_seen_ - header_.holdout_rows < 2 &&
      options_.objective == Objective::kCoactivation) {
    return absl::InvalidArgumentError(absl::StrCat(
        "holdout_rows: ", header_.holdout_rows, " of the stream's ", rows_seen_,
        " rows held out leave ", std::max<int64_t>(rows_seen_ - header_.holdout_rows, 0),
        " training rows; the statistics need at least 2 (lower holdout_rows or send more "
        "rows)"));
  }
  try {
    const int64_t keep =
        header_.holdout_rows > 0 ? header_.holdout_rows : DefaultHoldout(rows_seen_);
    const torch::Tensor holdout = tail_.Finish(
        keep, header_.channels, [this](const torch::Tensor& released) { stats_.Add(released); });
    stats_.Finish();
    ReportProgress(ctx, "solve", 0, 1);
    absl::StatusOr<PermutationResult> result = solver_(stats_, holdout, ctx);
    if (result.ok()) ReportProgress(ctx, "solve", 1, 1);
    return result;
  } catch (const std::exception& e) {
    return InternalFailure("solving", e.what());
  }
}

}  // namespace icd::traces

namespace icd {

TraceSession::TraceSession(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
TraceSession::~TraceSession() = default;

absl::Status TraceSession::AddRows(std::string_view f32_le, int64_t rows,
                                   const CallContext& ctx) {
  return impl_->AddRows(f32_le, rows, ctx);
}

absl::StatusOr<PermutationResult> TraceSession::Finish(const CallContext& ctx) {
  return impl_->Finish(ctx);
}

}  // namespace icd
