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

namespace {

// `tensor` gathered along each axis of `index_of` (axis -> source positions).
torch::Tensor Gathered(const torch::Tensor& tensor, std::map<int, torch::Tensor>& index_of) {
  if (tensor.dim() == 2 && index_of.size() == 2) {
    return tensor.index({index_of[0].unsqueeze(1), index_of[1]});
  }
  torch::Tensor gathered = tensor;
  for (const auto& [axis, index] : index_of) gathered = gathered.index_select(axis, index);
  return gathered;
}

}  // namespace

void GatherWithLibTorch(const std::vector<TensorGather>& plan) {
  if (plan.empty()) return;
  torch::NoGradGuard no_grad;
  const PlanIndices all = CollectIndices(plan);
  const auto& offset_of = all.offset_of;
  torch::Tensor indices = torch::empty({all.total}, torch::kInt64);
  CopyIndices(all, indices.data_ptr<int64_t>());
  indices = indices.to(plan.front().tensor->device());
  size_t done = 0;
  try {
    for (; done < plan.size(); ++done) {
      const TensorGather& gather = plan[done];
      std::map<int, torch::Tensor> index_of;
      for (const auto& [axis, index] : gather.index_of) {
        index_of[axis] =
            indices.narrow(0, offset_of.at(index), static_cast<int64_t>(index->size()));
      }
      *gather.tensor = Gathered(*gather.tensor, index_of);
    }
  } catch (...) {
    UndoGathered(plan, done);
    throw;
  }
}

void UndoGathered(const std::vector<TensorGather>& plan, size_t count) {
  torch::NoGradGuard no_grad;
  for (size_t i = count; i-- > 0;) {
    torch::Tensor& tensor = *plan[i].tensor;
    std::map<int, torch::Tensor> inverse_of;
    for (const auto& [axis, index] : plan[i].index_of) {
      torch::Tensor inverse = torch::empty({static_cast<int64_t>(index->size())}, torch::kInt64);
      int64_t* out = inverse.data_ptr<int64_t>();
      for (size_t k = 0; k < index->size(); ++k) out[(*index)[k]] = static_cast<int64_t>(k);
      inverse_of[axis] = inverse.to(tensor.device());
    }
    tensor = Gathered(tensor, inverse_of);
  }
}

#ifndef ICD_HAVE_CUDA_GATHER
bool GatherWithCuda(const std::vector<TensorGather>&) { return false; }
void SetCudaGatherColumns(GatherColumns) {}
#endif

}  // namespace icd::gather
