// One group's problem end to end: statistics -> graph -> partition -> order
// -> scores (PermutationResult), for either objective.
#ifndef ICD_CORE_SRC_TRACES_SOLVE_H_
#define ICD_CORE_SRC_TRACES_SOLVE_H_

#include "torch_api.h"

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "icd/core/traces.h"
#include "icd/core/types.h"
#include "model.h"
#include "traces/graph.h"
#include "traces/stats.h"

namespace icd::traces {

enum class Objective { kCoactivation, kNmSparsity };

// SolverOptions with every default filled in and every field checked.
struct ResolvedOptions {
  Objective objective = Objective::kCoactivation;
  Statistic statistic = Statistic::kCorrelation;
  double activation_quantile = 0.9;
  double resolution = 1.0;
  uint64_t seed = 0;
  int32_t seeds = 1;
  int32_t nm_n = 2;
  int32_t nm_m = 4;
  int32_t preserve_block = 0;
  std::vector<int32_t> block_sizes = {16, 64};
  bool return_graph = false;
};

// InvalidArgument naming the field for an unknown objective or statistic,
// a quantile outside [0, 1), a non-positive resolution, bad N:M or sizes.
absl::StatusOr<ResolvedOptions> ResolveSolverOptions(const SolverOptions& options);

// The statistics a group needs for these options.
StatsOptions StatsOptionsFor(const ResolvedOptions& options, int64_t channels,
                             torch::Device device);

// The saliency matrix of the Linear layers whose input axis is the group
// ([rows, C]: |W| of each, rows stacked), times the channels' RMS when the
// statistics have rows. InvalidArgument when no Linear layer reads the group.
absl::StatusOr<torch::Tensor> NmSaliency(const GroupInfo& group, const Weights& weights,
                                         const TraceStats& stats);

// Solves one group. `stats` is finished; `holdout` [H, C] raw rows. Blocks
// touched are scored on held-out rows only: with H = 0 the result has no
// `blocks` and its `scores_note` says why. `weights` is read for the
// nm_sparsity objective only.
absl::StatusOr<PermutationResult> SolveGroup(const GroupInfo& group, const TraceStats& stats,
                                             const torch::Tensor& holdout,
                                             const ResolvedOptions& options,
                                             const Weights& weights, const CallContext& ctx);

// The ComputePermutation stream state behind TraceSession.
class TraceSessionState {
 public:
  // Called at Finish with the finished statistics and the held-out rows;
  // looks the model up again and solves under its lock.
  using Solver = std::function<absl::StatusOr<PermutationResult>(
      const TraceStats&, const torch::Tensor& holdout, const CallContext&)>;

  TraceSessionState(const TraceHeader& header, const ResolvedOptions& options,
                    torch::Device device, Solver solver);

  absl::Status AddRows(std::string_view f32_le, int64_t rows, const CallContext& ctx);
  absl::StatusOr<PermutationResult> Finish(const CallContext& ctx);

 private:
  TraceHeader header_;
  ResolvedOptions options_;
  torch::Device device_;
  Solver solver_;
  TraceStats stats_;
  HoldoutTail tail_;
  int64_t rows_seen_ = 0;
  std::optional<absl::Status> failed_;  // a refused chunk poisons the stream
};

// Default hold-out for a stream of `rows` rows when none was asked for.
int64_t DefaultHoldout(int64_t rows);
// Largest hold-out buffer one stream may ask for, in float32 values.
inline constexpr int64_t kMaxHoldoutValues = int64_t{1} << 28;  // 1 GiB

}  // namespace icd::traces

namespace icd {
class TraceSession::Impl : public traces::TraceSessionState {
 public:
  using traces::TraceSessionState::TraceSessionState;
};
}  // namespace icd

#endif  // ICD_CORE_SRC_TRACES_SOLVE_H_
