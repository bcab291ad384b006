// The device side of step signals (step_signals.h says what they are for).
// A producer's blocks call PublishBlock after their writes; a consumer calls
// WaitForInputs where it would wait for the kernel ahead; the layer's
// out_proj calls ResetSignals after its own, ordinary, wait.
//
// Why this cannot deadlock: a kernel launched with dependent launch is
// scheduled only once every block of the kernel ahead has started
// (dependent_launch.cuh), so every block a consumer waits for is running or
// done before the consumer's first block polls. Without dependent launch the
// kernels run one after the other and every poll succeeds at once.
#ifndef ICD_CORE_SRC_SCAN_STEP_SIGNALS_CUH_
#define ICD_CORE_SRC_SCAN_STEP_SIGNALS_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "scan/dependent_launch.cuh"
#include "scan/step_signals.h"

namespace icd::step_signals {

// A poll that outlasts this stops the kernel (a trap, reported by the next
// CUDA call) rather than hanging the device: a producer a few microseconds
// away from its flags has failed.
constexpr uint64_t kPatienceNanoseconds = 10'000'000'000ull;

// Polls are relaxed loads, and one fence follows the poll that saw the flag
// (together an acquire): an acquire load per poll would also invalidate the
// multiprocessor's L1 each time, under the projections' blocks that share it
// and read x from there.
__device__ __forceinline__ int LoadRelaxed(const int* address) {
  int value;
  asm volatile("ld.relaxed.gpu.global.s32 %0, [%1];" : "=r"(value) : "l"(address) : "memory");
  return value;
}

__device__ __forceinline__ void StoreRelaxed(int* address, int value) {
  asm volatile("st.relaxed.gpu.global.s32 [%0], %1;" ::"l"(address), "r"(value) : "memory");
}

__device__ __forceinline__ uint64_t GlobalNanoseconds() {
  uint64_t now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  return now;
}

__device__ __forceinline__ int LinearBlock() {
  return static_cast<int>(blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z));
}

// One thread: until `await`'s flag for this block is raised (relaxed: the
// caller fences after).
__device__ __forceinline__ void PollFlag(const Await& await) {
  if (await.signal == nullptr) return;
  const int* flag = await.signal + (1 + LinearBlock() % kFlagLines) * kLineInts;
  if (LoadRelaxed(flag) != 0) return;
  const uint64_t start = GlobalNanoseconds();
  while (LoadRelaxed(flag) == 0) {
    __nanosleep(128);
    if (GlobalNanoseconds() - start > kPatienceNanoseconds) __trap();
  }
}

// Every thread of the block: returns once every signal of `awaits` is
// raised, with its producers' writes visible to the whole block.
__device__ __forceinline__ void AwaitSignals(const Awaits& awaits) {
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    PollFlag(awaits.first);
    PollFlag(awaits.second);
    PollFlag(awaits.third);
    __threadfence();  // with the polls' loads, an acquire of the producers' writes
  }
  __syncthreads();
}

// The decode kernels' wait (every thread of the block): for `awaits` when
// any is set, else for the kernel ahead (WaitThenAllowDependents, whose
// early_dependents applies to either). Loads after a wait for signals read
// what a running kernel writes: not through the read-only path (__ldg).
__device__ __forceinline__ void WaitForInputs(const Awaits& awaits, bool early_dependents) {
  if (awaits.first.signal == nullptr) {
    dependent_launch::WaitThenAllowDependents(early_dependents);
    return;
  }
  if (early_dependents) dependent_launch::AllowDependents();
  AwaitSignals(awaits);
  if (!early_dependents) dependent_launch::AllowDependents();
}

// One thread: `items` more of `total` done; the block that completes the
// count raises the flags, after every counted block's writes.
__device__ __forceinline__ void Count(int* signal, int items, int64_t total) {
  const int before = atomicAdd(signal, items);
  if (before + items != total) return;
  __threadfence();  // the counted blocks' writes (their adds came before) ahead of the flags
#pragma unroll 1
  for (int line = 1; line <= kFlagLines; ++line) StoreRelaxed(signal + line * kLineInts, 1);
}

// Every thread of the block, after its last write: the block's work items
// [begin, end) in the kernel's order (clipped to the total) are done.
__device__ __forceinline__ void PublishBlock(const Publish& publish, int64_t begin, int64_t end) {
  __syncthreads();  // every thread's writes before thread 0's fence
  if (publish.first == nullptr || threadIdx.x != 0 || threadIdx.y != 0) return;
  end = end < publish.total ? end : publish.total;
  if (begin >= end) return;
  const int64_t split = publish.first_items;
  const int64_t first = split <= begin ? 0 : (split < end ? split : end) - begin;
  const int64_t rest = (end - begin) - first;
  __threadfence();  // this block's writes ahead of its count
  if (first > 0) Count(publish.first, static_cast<int>(first), split);
  if (rest > 0) Count(publish.rest, static_cast<int>(rest), publish.total - split);
}

// Block 0, after the kernel's ordinary wait: the layer's kSignals signals
// (kLayerInts ints) back to zero for the next step. Every kernel that polls
// or counts them has completed by then (the wait covers the chain).
__device__ __forceinline__ void ResetSignals(int* signals) {
  if (signals == nullptr || LinearBlock() != 0) return;
  const int thread = static_cast<int>(threadIdx.x + blockDim.x * threadIdx.y);
  const int threads = static_cast<int>(blockDim.x * blockDim.y);
  for (int line = thread; line < kLayerInts / kLineInts; line += threads) {
    signals[line * kLineInts] = 0;
  }
}

}  // namespace icd::step_signals

#endif  // ICD_CORE_SRC_SCAN_STEP_SIGNALS_CUH_
