#include "apply/gather/permute_gather.h"

namespace icd::gather {

PlanIndices CollectIndices(const std::vector<TensorGather>& plan) {
  PlanIndices out;
  for (const TensorGather& gather : plan) {
    for (const auto& [axis, index] : gather.index_of) {
      if (out.offset_of.emplace(index, out.total).second) {
        out.distinct.push_back(index);
        out.total += static_cast<int64_t>(index->size());
      }
    }
  }
  return out;
}

void GatherWithLibTorch(const std::vector<TensorGather>& plan) {
  if (plan.empty()) return;
  torch::NoGradGuard no_grad;
  const PlanIndices all = CollectIndices(plan);
  const auto& offset_of = all.offset_of;
  torch::Tensor indices = torch::empty({all.total}, torch::kInt64);
  CopyIndices(all, indices.data_ptr<int64_t>());
  indices = indices.to(plan.front().tensor->device());
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
void SetCudaGatherColumns(GatherColumns) {}
#endif

}  // namespace icd::gather
