// Community detection by modularity on a dense weighted graph: the Leiden
// algorithm (Traag, Waltman and van Eck, 2019) — Louvain's local moves, a
// refinement that only merges well-connected sub-communities, aggregation —
// iterated from its own result until the modularity stops improving.
//
// Graph construction and aggregation are LibTorch tensor operations (on the
// graph's device); the local moves, sequential by nature, scan dense rows on
// the CPU: O(n^2) per sweep.
#ifndef ICD_CORE_SRC_TRACES_LOUVAIN_H_
#define ICD_CORE_SRC_TRACES_LOUVAIN_H_

#include <torch/torch.h>

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "icd/core/types.h"

namespace icd::traces {

struct LeidenOptions {
  double resolution = 1.0;
  uint64_t seed = 0;  // node visiting order; the result is a function of it
  int max_iterations = 10;  // whole Leiden passes, each from the last result
};

// weights: [n, n] symmetric, non-negative (the diagonal is ignored), any
// float dtype and device. Returns labels 0..K-1 numbered by first
// appearance. Cancelled / DeadlineExceeded from ctx between sweeps.
absl::StatusOr<std::vector<int64_t>> LeidenCluster(const torch::Tensor& weights,
                                                   const LeidenOptions& options,
                                                   const CallContext& ctx = {});

}  // namespace icd::traces

#endif  // ICD_CORE_SRC_TRACES_LOUVAIN_H_
