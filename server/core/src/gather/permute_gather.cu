// Batched permutation gather: every weight tensor an apply touches, in one
// kernel launch. Each thread block takes a few rows of one task; a row's
// source row is looked up once, and its columns are read through the column
// index (scattered inside one source row, which stays in L1/L2) and written
// contiguously, so the kernel moves each byte about as a copy does.
#include <cuda_runtime.h>

#include <cstdint>

#include "gather/permute_gather_launch.h"

namespace icd::gather {
namespace {

constexpr int kThreads = 256;

template <typename Word>
__device__ void GatherBlock(const GatherTask& task, int64_t block_in_task) {
  const Word* source = static_cast<const Word*>(task.source);
  Word* target = static_cast<Word*>(task.target);
  const int64_t row_elements = task.cols * task.inner;
  const int64_t first_row = block_in_task * task.rows_per_block;
  const int64_t end_row = min(task.rows, first_row + task.rows_per_block);
  const auto row_size = static_cast<uint32_t>(row_elements);
  const uint32_t inner = static_cast<uint32_t>(task.inner);
  // Offset inside the source row of element `within` of a target row.
  auto source_offset = [&](uint32_t within) -> int64_t {
    if (task.col_index == nullptr) return within;
    if (inner == 1) return task.col_index[within];
    const uint32_t col = within / inner;
    return task.col_index[col] * inner + (within - col * inner);
  };
  if (row_size >= kThreads) {
    for (int64_t row = first_row; row < end_row; ++row) {
      const int64_t from = task.row_index != nullptr ? task.row_index[row] : row;
      const Word* source_row = source + from * row_elements;
      Word* target_row = target + row * row_elements;
      for (uint32_t within = threadIdx.x; within < row_size; within += kThreads) {
        target_row[within] = source_row[source_offset(within)];
      }
    }
    return;
  }
  // Short rows: threads range over all the block's elements.
  const auto count = static_cast<uint32_t>((end_row - first_row) * row_elements);
  for (uint32_t e = threadIdx.x; e < count; e += kThreads) {
    const uint32_t local_row = e / row_size;
    const uint32_t within = e - local_row * row_size;
    const int64_t row = first_row + local_row;
    const int64_t from = task.row_index != nullptr ? task.row_index[row] : row;
    target[row * row_elements + within] = source[from * row_elements + source_offset(within)];
  }
}

__global__ void __launch_bounds__(kThreads)
    PermuteGatherKernel(const GatherTask* tasks, int64_t task_count) {
  // The block's task: the last one whose first_block is <= this block.
  const auto block = static_cast<int64_t>(blockIdx.x);
  int64_t low = 0, high = task_count - 1;
  while (low < high) {
    const int64_t mid = (low + high + 1) / 2;
    if (tasks[mid].first_block <= block) {
      low = mid;
    } else {
      high = mid - 1;
    }
  }
  const GatherTask& task = tasks[low];
  const int64_t block_in_task = block - task.first_block;
  switch (task.element_bytes) {
    case 1: GatherBlock<uint8_t>(task, block_in_task); break;
    case 2: GatherBlock<uint16_t>(task, block_in_task); break;
    case 4: GatherBlock<uint32_t>(task, block_in_task); break;
    case 8: GatherBlock<uint64_t>(task, block_in_task); break;
    default: break;
  }
}

}  // namespace

int32_t RowsPerBlock(int64_t row_elements) {
  constexpr int64_t kElementsPerBlock = 8192;
  if (row_elements >= kElementsPerBlock) return 1;
  return static_cast<int32_t>(kElementsPerBlock / (row_elements > 0 ? row_elements : 1));
}

int64_t BlocksFor(const GatherTask& task) {
  return (task.rows + task.rows_per_block - 1) / task.rows_per_block;
}

const char* LaunchPermuteGather(const GatherTask* tasks, int64_t task_count,
                                int64_t total_blocks, void* stream) {
  if (task_count == 0 || total_blocks == 0) return nullptr;
  PermuteGatherKernel<<<static_cast<unsigned int>(total_blocks), kThreads, 0,
                        static_cast<cudaStream_t>(stream)>>>(tasks, task_count);
  const cudaError_t status = cudaGetLastError();
  return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}

}  // namespace icd::gather
