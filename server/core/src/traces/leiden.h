// Community detection by modularity on a dense weighted graph: the Leiden
// algorithm (Traag, Waltman and van Eck, 2019) — Louvain's local moves, a
// refinement that only merges well-connected sub-communities, aggregation —
// iterated from its own result until the modularity stops improving, best
// of a few independent runs.
//
// On a GPU graph the dense passes over the input (aggregation S^T W S, the
// node-to-community links W S, modularity) are GEMMs on the device; the
// local moves and the refinement, sequential by nature, run on the host:
// dense row scans (O(n^2) per sweep) while communities are many, then a
// node-to-community link matrix (O(n K) per sweep, O(n) per move).
#ifndef ICD_CORE_SRC_TRACES_LEIDEN_H_
#define ICD_CORE_SRC_TRACES_LEIDEN_H_

#include "torch_api.h"

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "icd/core/types.h"

namespace icd::traces {

struct LeidenOptions {
  double resolution = 1.0;
  uint64_t seed = 0;  // node visiting order; the result is a function of it
  int max_iterations = 10;  // whole Leiden passes, each from the last result
  // Independent runs from singletons (run 0 from `seed`, the others from
  // seeds derived from it); the partition of highest modularity is kept.
  // On graphs without strong structure runs differ by a few per cent in Q
  // (so do igraph's across seeds): three runs lift the expected result.
  int restarts = 3;
  // The O(n^2) passes over the input graph (aggregation, node-to-community
  // links, modularity) run as tensor GEMMs on the graph's device whenever it
  // is not the CPU; on the CPU only when this is set (tests of that path),
  // as plain loops are faster there.
  bool tensor_dense_passes = false;
};

// weights: [n, n] symmetric, non-negative (the diagonal is ignored), any
// float dtype and device. Returns labels 0..K-1 numbered by first
// appearance. Cancelled / DeadlineExceeded from ctx between sweeps.
absl::StatusOr<std::vector<int64_t>> LeidenCluster(const torch::Tensor& weights,
                                                   const LeidenOptions& options,
                                                   const CallContext& ctx = {});

}  // namespace icd::traces

#endif  // ICD_CORE_SRC_TRACES_LEIDEN_H_
