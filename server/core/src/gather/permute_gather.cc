#include "gather/permute_gather.h"

#include <unordered_map>

namespace icd::gather {

void GatherWithLibTorch(const std::vector<TensorGather>& plan) {
  if (plan.empty()) return;
  torch::NoGradGuard no_grad;
  // Each distinct index vector once (a group's index is shared by every
  // tensor it alone moves), in one buffer, copied to the device once.
  std::unordered_map<const std::vector<int64_t>*, int64_t> offset_of;
  std::vector<int64_t> all;
  for (const TensorGather& gather : plan) {
    for (const auto& [axis, index] : gather.index_of) {
      if (offset_of.emplace(index, static_cast<int64_t>(all.size())).second) {
        all.insert(all.end(), index->begin(), index->end());
      }
    }
  }
  const torch::Tensor indices =
      torch::from_blob(all.data(), {static_cast<int64_t>(all.size())}, torch::kInt64)
          .to(plan.front().tensor->device(), /*non_blocking=*/false, /*copy=*/true);
  for (const TensorGather& gather : plan) {
    torch::Tensor& tensor = *gather.tensor;
    std::map<int, torch::Tensor> index_of;
    for (const auto& [axis, index] : gather.index_of) {
      index_of[axis] = indices.narrow(0, offset_of.at(index), static_cast<int64_t>(index->size()));
    }
    if (tensor.dim() == 2 && index_of.size() == 2) {
      tensor = tensor.index({index_of[0].unsqueeze(1), index_of[1]});
    } else {
      torch::Tensor gathered = tensor;
      for (const auto& [axis, index] : index_of) gathered = gathered.index_select(axis, index);
      tensor = gathered;
    }
  }
}

#ifndef ICD_HAVE_CUDA_GATHER
bool GatherWithCuda(const std::vector<TensorGather>&) { return false; }
#endif

}  // namespace icd::gather
