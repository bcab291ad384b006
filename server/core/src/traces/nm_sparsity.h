// N:M-sparsity-aware channel permutation (Pool & Yu, "Channel Permutations for
// N:M Sparsity", NeurIPS 2021; NVIDIA Apex ASP's permutation search).
//
// A Linear layer pruned N:M along its input dimension keeps, in every row and
// every aligned group ("stripe") of M consecutive input columns, the N entries
// of largest saliency. Permuting the input channels changes which columns
// share a stripe, hence how much saliency survives. Given a saliency matrix
// S [rows, channels] (|W| of every Linear layer reading the channels, stacked
// by rows, or |W|·‖x‖), the solver looks for the column order that keeps the
// most.
//
// Definitions (all sums in float64):
//   kept(order)    Σ_rows Σ_stripes (sum of the N largest of S[row, order[j]]
//                  over the stripe's M positions j).
//   upper_bound    Σ_rows Σ_blocks (sum of the largest block·N/M entries of
//                  the row inside the block), where a block is an aligned run
//                  of `block` channels (block = 0: all channels, one block).
//                  With block = 0 this is exactly the paper's bound, Apex's
//                  "50% rows" for 2:4: every row keeps its own top N/M share
//                  with no grouping at all (row-wise unstructured pruning, not
//                  the matrix-wide top share). With block > 0 channels cannot
//                  leave their block, so each block is bounded on its own.
//                  No order can exceed it; it is reached iff some order puts
//                  exactly the row's top share... in every stripe.
//   efficacy       (kept(solved) − kept(identity)) / (upper_bound − kept(identity)),
//                  the paper's and Apex's metric; 1 when the denominator is 0.
//
// Search (deterministic for a seed; the work is bounded by a round count
// derived from the shape, never by wall-clock time):
//   1. start: identity, or the column-strength deal below when it keeps more;
//   2. rounds alternate two exact large-neighbourhood moves, each applied only
//      where it strictly improves:
//      - assignment: every stripe ejects one random column; within random
//        sets of up to 32 stripes the ejected columns are reassigned, one per
//        stripe, by an optimal linear assignment (Hungarian). A stripe's kept
//        with one foreign column y is base + Σ_rows max(0, y − t_N), t_N being
//        the N-th largest of its remaining M−1 columns, so the gain matrix is
//        one batched tensor expression;
//      - pair: a random perfect matching of stripes; for every pair, all ways
//        to split its 2M columns into two stripes (35 for 2:4; splits moving
//        at most one or two columns when M is large) are evaluated at once.
//   Every stripe set or pair touches disjoint stripes, so all improvements of
//   a round apply together. Both moves respect `block`.
#ifndef ICD_CORE_SRC_TRACES_NM_SPARSITY_H_
#define ICD_CORE_SRC_TRACES_NM_SPARSITY_H_

#include <torch/torch.h>

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "icd/core/types.h"

namespace icd::traces {

struct NmOptions {
  int64_t n = 2;
  int64_t m = 4;
  // >0: channels may only move inside their aligned block of this many
  // channels (a multiple of m dividing the channel count), e.g. a Mamba-2
  // head. 0: no constraint.
  int64_t block = 0;
  uint64_t seed = 0;
  // Search rounds. 0: automatic, from the shape (about 4e10 scalar
  // evaluations in all, between 24 and 400 rounds).
  int64_t rounds = 0;
};

struct NmSolution {
  std::vector<int64_t> order;  // gather: new column j = old column order[j]
  double kept_identity = 0;
  double kept_solved = 0;
  double upper_bound = 0;
  double efficacy = 0;
  int64_t rounds = 0;  // rounds run
};

// saliency: [rows, channels], finite, >= 0, float32 or float64, CPU or CUDA
// (computed on its device, in its dtype). The channel count must be a
// multiple of m: N:M hardware has no partial groups, so a trailing partial
// group is refused rather than silently padded.
absl::StatusOr<NmSolution> SolveNmPermutation(const torch::Tensor& saliency,
                                              const NmOptions& options,
                                              const CallContext& ctx = {});

// Saliency kept by N:M magnitude pruning of saliency's columns taken in
// `order` (float64). The caller guarantees the shapes (order a permutation of
// the channels, channels a multiple of m).
double KeptSaliency(const torch::Tensor& saliency, const std::vector<int64_t>& order,
                    int64_t n, int64_t m);

// The upper bound defined above.
double NmUpperBound(const torch::Tensor& saliency, int64_t n, int64_t m, int64_t block = 0);

// 0/1 mask of `values`' shape and dtype keeping the n largest |values| of
// every aligned group of m along the last axis (ties: the lower index).
torch::Tensor NmMask(const torch::Tensor& values, int64_t n, int64_t m);

}  // namespace icd::traces

#endif  // ICD_CORE_SRC_TRACES_NM_SPARSITY_H_
