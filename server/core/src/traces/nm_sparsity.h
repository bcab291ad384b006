// N:M-sparsity-aware channel permutation (Pool & Yu, "Channel Permutations for
// N:M Sparsity", NeurIPS 2021; NVIDIA Apex ASP's permutation search).
//
// A Linear layer pruned N:M along its input dimension keeps, in every row and
// every aligned group ("stripe") of M consecutive input columns, the N entries
// of largest saliency. Permuting the input channels changes which columns
// share a stripe, hence how much saliency survives. Given a saliency matrix
// S [rows, channels] (|W| of every Linear layer reading the channels, stacked
// by rows, or |W|·‖x‖), the search looks for the column order keeping the most.
//
// Definitions (sums in float64):
//   kept(order)  Σ_rows Σ_stripes (the N largest of S[row, order[j]] over the
//                stripe's M positions j).
//   upper_bound  Σ_rows Σ_blocks (the block·N/M largest entries of the row
//                inside the block), a block being an aligned run of `block`
//                channels (block = 0: all channels, one block). With block = 0
//                this is exactly the paper's bound (Apex's "50% rows" for
//                2:4): every row keeps its own top N/M share, as row-wise
//                unstructured pruning would, NOT the matrix-wide top share
//                ("unstructured" in Apex, which is higher and unreachable).
//                With block > 0 no channel leaves its block, so each block is
//                bounded on its own. No order keeps more; an order reaches it
//                when, in every row, each stripe holds N of the row's top share.
//   efficacy     (kept(solved) − kept(identity)) / (upper_bound − kept(identity)),
//                the paper's and Apex's measure; 1 when the denominator is 0.
//
// Search: deterministic for a seed on a given device, bounded by a round
// count (from the shape, or NmOptions::rounds), never by wall-clock time;
// how it moves columns is in docs/traces.md ("The search").
// The returned order never keeps less than the identity.
#ifndef ICD_CORE_SRC_TRACES_NM_SPARSITY_H_
#define ICD_CORE_SRC_TRACES_NM_SPARSITY_H_

#include "torch_api.h"

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
  // Search rounds. 0: automatic: rounds until the moves have cost about
  // 1.2e10 scalar operations (counted from the shapes, not timed), at least
  // 16 and at most 3000.
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
// multiple of m: N:M kernels have no partial groups, so a trailing partial
// group is refused (InvalidArgument) rather than padded. Also InvalidArgument:
// n < 1, m <= n, block < 0 or not a multiple of m dividing the channels,
// rounds < 0, an empty, non-2-D or non-float saliency, negative or
// non-finite entries. Cancelled / DeadlineExceeded from ctx, polled between
// rounds.
absl::StatusOr<NmSolution> SolveNmPermutation(const torch::Tensor& saliency,
                                              const NmOptions& options,
                                              const CallContext& ctx = {});

// Saliency kept by N:M magnitude pruning of saliency's columns taken in
// `order` (float64). Preconditions, not checked: order is a permutation of
// the channels, the channel count a multiple of m, 1 <= n < m.
double KeptSaliency(const torch::Tensor& saliency, const std::vector<int64_t>& order,
                    int64_t n, int64_t m);

// The upper bound defined above (same preconditions; block as in NmOptions).
double NmUpperBound(const torch::Tensor& saliency, int64_t n, int64_t m, int64_t block = 0);

// 0/1 mask of `values`' shape and dtype keeping the n largest |values| of
// every aligned group of m along the last axis (ties: the lower index). The
// last axis must be a multiple of m (else c10::Error).
torch::Tensor NmMask(const torch::Tensor& values, int64_t n, int64_t m);

}  // namespace icd::traces

#endif  // ICD_CORE_SRC_TRACES_NM_SPARSITY_H_
