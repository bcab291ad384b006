// CUDA builds only (ICD_HAVE_CUDA_GATHER): GatherWithCuda, the LibTorch side
// of permute_gather.cu (device guard, current stream, pinned staging).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "apply/gather/permute_gather.h"
#include "apply/gather/permute_gather_launch.h"

namespace icd::gather {
namespace {

// Tensors gathered per launch, by bytes: the new tensors of a batch exist
// beside the old ones until the batch is done, so this bounds the extra
// memory an apply holds (or one tensor, when a tensor is larger).
constexpr int64_t kBatchBytes = int64_t{512} << 20;

bool Takes(const TensorGather& gather, const torch::Device& device) {
  const torch::Tensor& tensor = *gather.tensor;
  if (!tensor.is_cuda() || tensor.device() != device || !tensor.is_contiguous() ||
      tensor.dim() < 1 || tensor.numel() == 0) {
    return false;
  }
  const int64_t bytes = tensor.element_size();
  if (bytes != 1 && bytes != 2 && bytes != 4 && bytes != 8) return false;
  for (const auto& [axis, index] : gather.index_of) {
    if (axis < 0 || axis > 1 || axis >= tensor.dim()) return false;
    if (tensor.size(axis) > std::numeric_limits<int32_t>::max()) return false;  // int32 indices
  }
  const int64_t row_elements = tensor.dim() == 1 ? tensor.numel() : tensor.numel() / tensor.size(0);
  return row_elements < kMaxRowElements;
}

// A device copy of `bytes` host bytes, staged through pinned memory so that
// the copy is asynchronous on the current stream.
torch::Tensor ToDevice(const void* data, int64_t bytes, const torch::Device& device) {
  torch::Tensor staging =
      torch::empty({bytes}, torch::TensorOptions().dtype(torch::kUInt8).pinned_memory(true));
  std::memcpy(staging.data_ptr(), data, static_cast<size_t>(bytes));
  return staging.to(device, /*non_blocking=*/true);
}

std::atomic<GatherColumns> g_columns{GatherColumns::kStaged};

}  // namespace

void SetCudaGatherColumns(GatherColumns columns) { g_columns = columns; }

bool GatherWithCuda(const std::vector<TensorGather>& plan) {
  if (plan.empty()) return true;
  const torch::Device device = plan.front().tensor->device();
  for (const TensorGather& gather : plan) {
    if (!Takes(gather, device)) return false;
  }
  torch::NoGradGuard no_grad;
  const c10::cuda::CUDAGuard guard(device);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());

  // Every distinct index once, as int32, written straight into pinned
  // memory and sent to the device in one asynchronous copy.
  const PlanIndices all = CollectIndices(plan);
  const auto& offset_of = all.offset_of;
  torch::Tensor pinned =
      torch::empty({all.total}, torch::TensorOptions().dtype(torch::kInt32).pinned_memory(true));
  CopyIndices(all, pinned.data_ptr<int32_t>());
  const torch::Tensor indices = pinned.to(device, /*non_blocking=*/true);
  const auto* index_base = indices.data_ptr<int32_t>();
  const GatherColumns columns = g_columns;
  auto device_index = [&](const TensorGather& gather, int axis) -> const int32_t* {
    auto it = gather.index_of.find(axis);
    return it == gather.index_of.end() ? nullptr : index_base + offset_of.at(it->second);
  };

  size_t next = 0;
  // A throw in a later batch (an out-of-memory for its targets) puts the
  // batches already swapped in back: no tensor is left moved.
  try {
    while (next < plan.size()) {
      std::vector<GatherTask> tasks;
      std::vector<torch::Tensor> targets;
      int64_t batch_bytes = 0, blocks = 0;
      bool any_staged = false;
      size_t end = next;
      for (; end < plan.size(); ++end) {
        const TensorGather& gather = plan[end];
        const torch::Tensor& source = *gather.tensor;
        const int64_t bytes = source.numel() * source.element_size();
        if (!tasks.empty() && batch_bytes + bytes > kBatchBytes) break;
        batch_bytes += bytes;
        GatherTask task;
        task.source = source.data_ptr();
        targets.push_back(torch::empty_like(source));
        task.target = targets.back().data_ptr();
        task.element_bytes = static_cast<int32_t>(source.element_size());
        if (source.dim() == 1) {
          // A vector is one row whose columns move.
          task.rows = 1;
          task.cols = source.size(0);
          task.inner = 1;
          task.col_index = device_index(gather, 0);
        } else {
          task.rows = source.size(0);
          task.cols = source.size(1);
          task.inner = source.numel() / (task.rows * task.cols);
          task.row_index = device_index(gather, 0);
          task.col_index = device_index(gather, 1);
        }
        PlanRows(task, columns);
        any_staged |= task.staged;
        task.first_block = blocks;
        blocks += BlocksFor(task);
        tasks.push_back(task);
      }
      const torch::Tensor device_tasks = ToDevice(
          tasks.data(), static_cast<int64_t>(tasks.size() * sizeof(GatherTask)), device);
      if (const char* error =
              LaunchPermuteGather(static_cast<const GatherTask*>(device_tasks.data_ptr()),
                                  static_cast<int64_t>(tasks.size()), blocks, any_staged,
                                  stream.stream())) {
        throw std::runtime_error(std::string("permutation gather kernel: ") + error);
      }
      // The old tensors go back to the caching allocator, stream-ordered after
      // the kernel that reads them.
      for (size_t i = next; i < end; ++i) *plan[i].tensor = std::move(targets[i - next]);
      next = end;
    }
  } catch (...) {
    UndoGathered(plan, next);
    throw;
  }
  return true;
}

}  // namespace icd::gather
