// Traces -> π: the engine's types for computing a permutation of one symmetry
// group from activation traces (design.md "Traces"). std + absl only.
#ifndef ICD_CORE_TRACES_H_
#define ICD_CORE_TRACES_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "icd/core/export.h"
#include "icd/core/types.h"

namespace icd {

// Zero / empty fields take the documented default (proto3 semantics), so the
// transport copies fields without interpreting them.
struct SolverOptions {
  // "coactivation" (default): cluster channels that fire together and lay
  // each cluster out contiguously. "nm_sparsity": the permutation that keeps
  // the most saliency under N:M pruning of the Linear layers reading the group.
  std::string objective;
  // Graph edge weight: "correlation" (default, |Pearson r|), "coactivation"
  // (joint probability of both channels active), "pmi" (positive pointwise
  // mutual information of activity).
  std::string statistic;
  // A channel is active on a row when |a| exceeds its own quantile q of |a|
  // (estimated on the first rows of the stream). 0: 0.9.
  double activation_quantile = 0;
  // Modularity resolution γ. 0: 1.0.
  double resolution = 0;
  uint64_t seed = 0;
  // >1: also solve with seeds seed+1 .. seed+seeds-1 and report the mean
  // adjusted Rand index of their partitions against the first.
  int32_t seeds = 0;
  // N:M pattern (nm_sparsity). 0: 2:4.
  int32_t nm_n = 0;
  int32_t nm_m = 0;
  // >0: only moves that keep aligned blocks of this many channels intact
  // (whole blocks move, or channels move inside their block), so an N:M
  // pattern (M) or quantisation groups of this size stay valid.
  int32_t preserve_block = 0;
  // Block sizes for blocks-touched scoring; sizes not smaller than a group
  // are left out of its scores. Empty: {16, 64}.
  std::vector<int32_t> block_sizes;
  // coactivation only: also return the graph that was clustered
  // (PermutationResult::graph); groups of at most kMaxReturnedGraphChannels.
  bool return_graph = false;
};

inline constexpr int64_t kMaxReturnedGraphChannels = 2048;

// Mean number of aligned blocks of `block` channels with at least one active
// channel, per held-out row, in the identity order and in the solved one.
struct BlocksTouched {
  int32_t block = 0;
  double identity = 0;
  double solved = 0;
};

struct PermutationResult {
  Permutation permutation;  // a valid permutation of the group
  double modularity = 0;  // Q of the solved partition on the statistic's graph
  // Q the same solver reaches on rows shuffled independently per channel.
  double modularity_null = 0;
  // True when Q exceeds the null by more than its noise (Q > 1.25 null +
  // 0.01) in a group of at least 16 channels; otherwise the clusters are not
  // evidence of structure and no gain is claimed.
  bool structure_found = false;
  double ari = 0;  // mean ARI across seeds; 0 when seeds <= 1
  int64_t clusters = 0;
  std::vector<BlocksTouched> blocks;  // on held-out rows only; empty when none
  // Why `blocks` is empty when it is (no held-out rows); empty otherwise.
  std::string scores_note;
  // nm_sparsity: saliency kept by N:M pruning after the permutation, and the
  // share of the gap to the upper bound it closes.
  double nm_efficacy = 0;
  double nm_kept_identity = 0;
  double nm_kept_solved = 0;
  double nm_upper_bound = 0;
  int64_t tokens = 0;  // rows the statistics were built from
  int64_t holdout_tokens = 0;  // rows the blocks were scored on
  double solve_ms = 0;
  // SolverOptions::return_graph: the statistic's graph [size * size],
  // row-major, in the channel order before the permutation; else empty.
  std::vector<float> graph;
};

struct TraceHeader {
  std::string model;
  std::string group;
  int64_t channels = 0;  // must equal the group's size
  // The last holdout_rows rows of the stream are held out for scoring.
  // 0: min(1024, a fifth of the stream).
  int64_t holdout_rows = 0;
  SolverOptions solver;
};

// One ComputePermutation stream: rows in, one result out. Memory is
// O(channels^2 + holdout rows * channels) whatever the stream's length.
class ICD_CORE_API TraceSession {
 public:
  class Impl;
  explicit TraceSession(std::unique_ptr<Impl> impl);
  ~TraceSession();
  TraceSession(const TraceSession&) = delete;
  TraceSession& operator=(const TraceSession&) = delete;

  // `f32_le`: `rows` rows of little-endian float32, row-major [rows,
  // channels]. InvalidArgument (and the session is poisoned) on a size that
  // does not match (checked arithmetic) or a non-finite value; the status of
  // CheckCall(ctx) when it fails during the statistics (poisoned too).
  absl::Status AddRows(std::string_view f32_le, int64_t rows, const CallContext& ctx = {});
  // Solves. The model is looked up again (it may have been unloaded).
  absl::StatusOr<PermutationResult> Finish(const CallContext& ctx = {});

 private:
  std::unique_ptr<Impl> impl_;
};

struct CaptureRequest {
  std::string model;
  std::vector<int64_t> input_ids;  // row-major [batch, seq]
  int64_t batch = 0;  // 0 means 1
  std::vector<int64_t> holdout_ids;  // same batch; scored, never solved on
  std::vector<std::string> groups;  // empty: every group
  SolverOptions solver;
};

}  // namespace icd

#endif  // ICD_CORE_TRACES_H_
