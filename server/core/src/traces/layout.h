// From a partition to an order of channels, under the group's constraints,
// and the physical score of an order: blocks touched per row.
#ifndef ICD_CORE_SRC_TRACES_LAYOUT_H_
#define ICD_CORE_SRC_TRACES_LAYOUT_H_

#include "torch_api.h"

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "icd/core/types.h"
#include "traces/leiden.h"

namespace icd::traces {

// Which moves an order may make. Channels stay inside aligned segments of
// `segment` channels (the group's own block / whole constraint; the whole
// group when free). Inside a segment, aligned units of `unit` channels move
// as wholes, and channels move only inside their unit (preserve_block: an
// N:M pattern or quantisation groups stay valid); unit 1 when free.
struct LayoutConstraints {
  int64_t segment = 0;
  int64_t unit = 1;
};

// InvalidArgument (naming the group) when preserve_block does not fit the
// group's size or its own constraint.
absl::StatusOr<LayoutConstraints> MakeConstraints(const GroupInfo& group, int64_t preserve_block);

struct Clustering {
  std::vector<int64_t> membership;  // per channel; labels 0..clusters-1
  int64_t clusters = 0;
  std::vector<int64_t> order;  // gather: new position j holds channel order[j]
};

// Clusters the units of every segment by modularity on `graph` [C, C] and
// lays the clusters out contiguously (larger first), units inside a cluster
// and channels inside a unit by activity rate (most active first).
absl::StatusOr<Clustering> ClusterAndOrder(const torch::Tensor& graph,
                                           const torch::Tensor& activity_rate,
                                           const LayoutConstraints& constraints,
                                           const LeidenOptions& options,
                                           const CallContext& ctx = {});

// Mean, over rows, of the number of aligned blocks of `block` positions that
// hold at least one active channel when the channels are taken in `order`.
// active: [rows, C] 0/1. The last block may be partial. 0 for no rows.
double MeanBlocksTouched(const torch::Tensor& active, const std::vector<int64_t>& order,
                     int64_t block);

// Local search on the block objective itself: swaps of two channels between
// blocks of `block` positions, chosen by their exact change of blocks touched
// on `active` (training rows), applied greedily while one helps, within the
// constraints. Never returns an order worse on `active` than it was given.
std::vector<int64_t> RefineForBlocks(const torch::Tensor& active, std::vector<int64_t> order,
                                     int64_t block, const LayoutConstraints& constraints,
                                     int max_passes);

}  // namespace icd::traces

#endif  // ICD_CORE_SRC_TRACES_LAYOUT_H_
