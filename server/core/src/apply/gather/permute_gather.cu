// Batched permutation gather: every weight tensor an apply touches, in one
// kernel launch. Each thread block takes a few rows of one task and looks
// each source row up once. Rows whose columns stay move as row copies (16
// bytes per thread where aligned). Rows whose columns move too are gathered
// one of two ways (GatherColumns):
//   kStaged  the block's rows are staged in shared memory with 16-byte loads
//            (as many as fit in kStageBytes), the columns are gathered out of
//            shared memory, and the target rows are written 16 bytes per
//            thread: global memory sees a copy's access pattern;
//   kDirect  columns are read through the index straight from global memory
//            (scattered inside one source row, which stays in L1/L2) and
//            written one element per thread.
// Rows larger than the stage always go direct.
#include <cuda_runtime.h>

#include <cstdint>

#include "apply/gather/permute_gather_launch.h"

namespace icd::gather {
namespace {

constexpr int kThreads = 256;

__device__ bool Aligned16(const void* pointer) {
  return (reinterpret_cast<uintptr_t>(pointer) & 15) == 0;
}

// Offset inside a source row of element `within` of a target row, for
// rows of cols x inner elements whose columns move by `col_index`.
__device__ int64_t SourceOffset(const int32_t* col_index, uint32_t inner, uint32_t within) {
  if (inner == 1) return col_index[within];
  const uint32_t col = within / inner;
  return static_cast<int64_t>(col_index[col]) * inner + (within - col * inner);
}

// Rows [first_row, end_row) staged together: one barrier between the loads
// and the gather, so every thread has several 16-byte loads in flight.
template <typename Word>
__device__ void GatherStagedRows(const GatherTask& task, int64_t first_row, int64_t end_row) {
  extern __shared__ uint4 stage_words[];  // uint4: 16-byte aligned
  auto* stage = reinterpret_cast<unsigned char*>(stage_words);
  const auto row_elements = static_cast<uint32_t>(task.cols * task.inner);
  const int64_t row_bytes = static_cast<int64_t>(row_elements) * static_cast<int64_t>(sizeof(Word));
  const auto rows = static_cast<uint32_t>(end_row - first_row);
  const auto inner = static_cast<uint32_t>(task.inner);
  const auto* source = static_cast<const unsigned char*>(task.source);
  auto* target = static_cast<unsigned char*>(task.target);

  const bool wide = row_bytes % 16 == 0 && Aligned16(source) && Aligned16(target);
  if (wide) {
    const auto chunks = static_cast<uint32_t>(row_bytes / 16);
    for (uint32_t i = threadIdx.x; i < rows * chunks; i += kThreads) {
      const uint32_t local = i / chunks, chunk = i - local * chunks;
      const int64_t row = first_row + local;
      const int64_t from = task.row_index != nullptr ? task.row_index[row] : row;
      reinterpret_cast<uint4*>(stage)[i] =
          reinterpret_cast<const uint4*>(source + from * row_bytes)[chunk];
    }
  } else {
    for (uint32_t i = threadIdx.x; i < rows * row_elements; i += kThreads) {
      const uint32_t local = i / row_elements, within = i - local * row_elements;
      const int64_t row = first_row + local;
      const int64_t from = task.row_index != nullptr ? task.row_index[row] : row;
      reinterpret_cast<Word*>(stage)[i] = reinterpret_cast<const Word*>(source + from * row_bytes)[within];
    }
  }
  __syncthreads();
  const Word* staged = reinterpret_cast<const Word*>(stage);
  if (wide) {
    constexpr int kPerChunk = 16 / sizeof(Word);
    const auto chunks = static_cast<uint32_t>(row_bytes / 16);
    for (uint32_t i = threadIdx.x; i < rows * chunks; i += kThreads) {
      const uint32_t local = i / chunks, chunk = i - local * chunks;
      const Word* staged_row = staged + local * row_elements;
      union {
        uint4 wide;
        Word words[kPerChunk];
      } packed;
      for (int k = 0; k < kPerChunk; ++k) {
        packed.words[k] = staged_row[SourceOffset(task.col_index, inner, chunk * kPerChunk + k)];
      }
      reinterpret_cast<uint4*>(target + (first_row + local) * row_bytes)[chunk] = packed.wide;
    }
  } else {
    for (uint32_t i = threadIdx.x; i < rows * row_elements; i += kThreads) {
      const uint32_t local = i / row_elements, within = i - local * row_elements;
      reinterpret_cast<Word*>(target + (first_row + local) * row_bytes)[within] =
          staged[local * row_elements + SourceOffset(task.col_index, inner, within)];
    }
  }
}

template <typename Word>
__device__ void GatherBlock(const GatherTask& task, int64_t block_in_task) {
  const Word* source = static_cast<const Word*>(task.source);
  Word* target = static_cast<Word*>(task.target);
  const int64_t row_elements = task.cols * task.inner;
  const int64_t first_row = block_in_task * task.rows_per_block;
  const int64_t end_row = min(task.rows, first_row + task.rows_per_block);
  const auto row_size = static_cast<uint32_t>(row_elements);
  const auto inner = static_cast<uint32_t>(task.inner);
  if (task.staged) {
    GatherStagedRows<Word>(task, first_row, end_row);
    return;
  }
  if (row_size >= kThreads && task.col_index == nullptr) {
    // Whole rows move: a row copy, 16 bytes per thread where aligned.
    const int64_t row_bytes = row_elements * static_cast<int64_t>(sizeof(Word));
    for (int64_t row = first_row; row < end_row; ++row) {
      const int64_t from = task.row_index != nullptr ? task.row_index[row] : row;
      const auto* source_row = reinterpret_cast<const unsigned char*>(source) + from * row_bytes;
      auto* target_row = reinterpret_cast<unsigned char*>(target) + row * row_bytes;
      if (Aligned16(source_row) && Aligned16(target_row) && row_bytes % 16 == 0) {
        for (int64_t i = threadIdx.x; i < row_bytes / 16; i += kThreads) {
          reinterpret_cast<uint4*>(target_row)[i] = reinterpret_cast<const uint4*>(source_row)[i];
        }
      } else {
        for (uint32_t within = threadIdx.x; within < row_size; within += kThreads) {
          reinterpret_cast<Word*>(target_row)[within] =
              reinterpret_cast<const Word*>(source_row)[within];
        }
      }
    }
    return;
  }
  if (row_size >= kThreads) {
    for (int64_t row = first_row; row < end_row; ++row) {
      const int64_t from = task.row_index != nullptr ? task.row_index[row] : row;
      const Word* source_row = source + from * row_elements;
      Word* target_row = target + row * row_elements;
      for (uint32_t within = threadIdx.x; within < row_size; within += kThreads) {
        target_row[within] = source_row[task.col_index == nullptr
                                            ? within
                                            : SourceOffset(task.col_index, inner, within)];
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
    target[row * row_elements + within] =
        source[from * row_elements +
               (task.col_index == nullptr ? within : SourceOffset(task.col_index, inner, within))];
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

void PlanRows(GatherTask& task, GatherColumns columns) {
  const int64_t row_elements = task.cols * task.inner;
  const int64_t row_bytes = row_elements * task.element_bytes;
  task.staged = columns == GatherColumns::kStaged && task.col_index != nullptr &&
                row_elements >= kThreads && row_bytes <= kStageBytes;
  if (task.staged) {
    task.rows_per_block = static_cast<int32_t>(kStageBytes / row_bytes);
    return;
  }
  constexpr int64_t kElementsPerBlock = 8192;
  task.rows_per_block = row_elements >= kElementsPerBlock
                            ? 1
                            : static_cast<int32_t>(kElementsPerBlock / (row_elements > 0 ? row_elements : 1));
}

int64_t BlocksFor(const GatherTask& task) {
  return (task.rows + task.rows_per_block - 1) / task.rows_per_block;
}

const char* LaunchPermuteGather(const GatherTask* tasks, int64_t task_count,
                                int64_t total_blocks, bool any_staged, void* stream) {
  if (task_count == 0 || total_blocks == 0) return nullptr;
  PermuteGatherKernel<<<static_cast<unsigned int>(total_blocks), kThreads,
                        any_staged ? kStageBytes : 0, static_cast<cudaStream_t>(stream)>>>(
      tasks, task_count);
  const cudaError_t status = cudaGetLastError();
  return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}

}  // namespace icd::gather
