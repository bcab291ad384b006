// The composed gathers of one apply, and how they run: one batched kernel on
// a CUDA device (permute_gather.cu, CUDA builds only), LibTorch's indexing
// otherwise. Both replace each tensor by a new one, bit for bit the gathered
// values.
#ifndef ICD_CORE_SRC_GATHER_PERMUTE_GATHER_H_
#define ICD_CORE_SRC_GATHER_PERMUTE_GATHER_H_

#include "torch_api.h"

#include <algorithm>
#include <map>
#include <unordered_map>
#include <vector>

#include "apply/gather/permute_gather_launch.h"

namespace icd::gather {

// One tensor's gather: for each axis that moves, the source position of
// every new position (length = the axis's size). Non-owning.
struct TensorGather {
  torch::Tensor* tensor = nullptr;
  std::map<int, const std::vector<int64_t>*> index_of;
};

// Every distinct index vector of a plan once, back to back (a group's index
// is shared by every tensor it alone moves): where each one starts, and the
// total length. CopyIndices writes them into a buffer of that length (for
// the device: pinned host memory, int32), with no growing vector between.
struct PlanIndices {
  int64_t total = 0;
  std::vector<const std::vector<int64_t>*> distinct;  // in offset order
  std::unordered_map<const std::vector<int64_t>*, int64_t> offset_of;
};
PlanIndices CollectIndices(const std::vector<TensorGather>& plan);
template <typename Index>
void CopyIndices(const PlanIndices& indices, Index* out) {
  for (const std::vector<int64_t>* index : indices.distinct) {
    out = std::copy(index->begin(), index->end(), out);  // narrows to Index: axes < 2^31
  }
}

// Which column gather the kernel uses (permute_gather_launch.h). Process-wide,
// for benchmarks that compare the two; kStaged unless set.
void SetCudaGatherColumns(GatherColumns columns);

// LibTorch: one host-to-device copy of every distinct index, then one
// indexing op per tensor. Any device, axis and dtype. A throw part way (an
// out-of-memory) leaves every tensor as it was (UndoGathered).
void GatherWithLibTorch(const std::vector<TensorGather>& plan);

// Puts the first `count` tensors of `plan`, already gathered, back: each
// gathered again with the inverse positions (LibTorch, on its device).
void UndoGathered(const std::vector<TensorGather>& plan, size_t count);

// The batched kernel, when every tensor is a contiguous CUDA tensor on one
// device whose moving axes are among the first two. Returns false, having
// changed nothing, when it does not take the plan. Launch errors throw.
bool GatherWithCuda(const std::vector<TensorGather>& plan);

}  // namespace icd::gather

#endif  // ICD_CORE_SRC_GATHER_PERMUTE_GATHER_H_
