// Plain-C++ interface of icd's batched permutation gather (permute_gather.cu):
// raw device pointers and sizes, the stream as void*. No LibTorch and no CUDA
// header here, so that nvcc never compiles LibTorch. The LibTorch side is
// permute_gather_cuda.cc.
#ifndef ICD_CORE_SRC_GATHER_PERMUTE_GATHER_LAUNCH_H_
#define ICD_CORE_SRC_GATHER_PERMUTE_GATHER_LAUNCH_H_

#include <cstdint>

namespace icd::gather {

// One contiguous tensor seen as [rows, cols, inner], written to a new
// contiguous tensor of the same shape as
//   target[r, c, q] = source[row_index[r], col_index[c], q];
// a null index keeps that axis in place. Elements are copied as words of
// element_bytes (1, 2, 4 or 8), so every dtype moves bit for bit. Indices are
// 32-bit (every axis is shorter than 2^31): half the index traffic.
struct GatherTask {
  const void* source = nullptr;
  void* target = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t inner = 0;
  const int32_t* row_index = nullptr;  // device, length rows, or null
  const int32_t* col_index = nullptr;  // device, length cols, or null
  int32_t element_bytes = 0;
  int32_t rows_per_block = 1;  // PlanRows
  bool staged = false;         // PlanRows
  int64_t first_block = 0;     // thread blocks of all earlier tasks
};

// How rows whose columns move are gathered (permute_gather.cu says more):
// staged through shared memory, or read directly through the index.
enum class GatherColumns { kStaged, kDirect };

// Shared memory a launch reserves per block when any task is staged.
inline constexpr int kStageBytes = 32 * 1024;

// The largest row (cols x inner) and tensor the kernel takes: its offsets are
// 32-bit inside a row, and a grid has at most 2^31 - 1 blocks.
inline constexpr int64_t kMaxRowElements = int64_t{1} << 30;

// Sets task.staged and task.rows_per_block (element_bytes, cols, inner and
// col_index set): staged tasks take as many rows as kStageBytes holds; the
// others ~8K elements, so that small rows (A_log's 16 states, a bias) do
// not each cost a block.
void PlanRows(GatherTask& task, GatherColumns columns);

// Thread blocks a task needs.
int64_t BlocksFor(const GatherTask& task);

// Gathers every task in one launch on `stream` (a cudaStream_t). `tasks` is a
// device array of task_count tasks with first_block set in order;
// total_blocks = the last task's first_block + BlocksFor(it); any_staged:
// whether a task is staged (the launch then reserves kStageBytes of shared
// memory per block). Returns null, or CUDA's message for a launch error.
const char* LaunchPermuteGather(const GatherTask* tasks, int64_t task_count,
                                int64_t total_blocks, bool any_staged, void* stream);

}  // namespace icd::gather

#endif  // ICD_CORE_SRC_GATHER_PERMUTE_GATHER_LAUNCH_H_
