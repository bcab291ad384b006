// Programmatic dependent launch (Hopper and later) for the decode step's
// kernels: a kernel launched with LaunchDependent may be scheduled while the
// kernel before it in the stream is still finishing (once every block of
// that one has called AllowDependents), runs what needs nothing from it
// (weight prefetches), then waits in WaitForPrerequisites until it has
// completed and its writes are visible. A decode step is some 200-300
// kernels of a few microseconds each, so each one's ramp-up hidden behind
// the previous one's tail is a large part of the step. Inside a CUDA graph
// capture the launches become programmatic edges. Kernels launched without
// it, and GPUs before sm_90, run as ordinary stream-ordered launches.
#ifndef ICD_CORE_SRC_SCAN_DEPENDENT_LAUNCH_CUH_
#define ICD_CORE_SRC_SCAN_DEPENDENT_LAUNCH_CUH_

#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <utility>

namespace icd::dependent_launch {

// Lets the next kernel in the stream be scheduled once every block of this
// one has passed here (or exited).
__device__ __forceinline__ void AllowDependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

// Blocks until the kernels this one depends on have completed and their
// memory is visible: before the first read of anything they write.
__device__ __forceinline__ void WaitForPrerequisites() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// A decode kernel waits for the kernels ahead and lets the next one be
// scheduled. With `early_dependents` (EarlyDependents) it lets the next one
// be scheduled before its wait ends rather than after, so that the next
// kernel's blocks take free slots and start their early loads while the
// chain of small kernels ahead still runs. Reads and writes after the wait
// stay safe: no block exits before its wait, so the next kernel's wait ends
// only after this one has completed, and this one's only after those before
// it. What is read before the wait is another matter: with every kernel
// letting the next start early, a kernel may begin several kernels ahead
// of the last one that finished, back to the last launch without dependent
// launch (a LibTorch op, cuBLAS, the gather; each decode step starts with
// one). So an operand read before the wait must be written by no kernel
// since that launch: the model's own weights, and state that only the same
// kernel of the same layer writes, a step earlier.
__device__ __forceinline__ void WaitThenAllowDependents(bool early_dependents) {
  if (early_dependents) AllowDependents();
  WaitForPrerequisites();
  if (!early_dependents) AllowDependents();
}

// Unless ICD_EARLY_DEPENDENTS=0, the decode kernels pass early_dependents
// above (on the H200, mamba-2.8b's step 0.6-4.9% faster in six rounds,
// mamba2-2.7b's 0-2% in five of six: deploy/results/h200-gpu-2026-12-03h).
// Read at the first launch and again after ReloadEarlyDependents
// (fused::ReloadLaunchSettings).
inline std::atomic<int>& EarlyDependentsSetting() {
  static std::atomic<int> setting{-1};  // -1: not read yet
  return setting;
}
inline bool EarlyDependents() {
  int setting = EarlyDependentsSetting().load(std::memory_order_relaxed);
  if (setting < 0) {
    const char* value = std::getenv("ICD_EARLY_DEPENDENTS");
    setting = value == nullptr || std::strcmp(value, "0") != 0 ? 1 : 0;
    EarlyDependentsSetting().store(setting, std::memory_order_relaxed);
  }
  return setting == 1;
}
inline void ReloadEarlyDependents() { EarlyDependentsSetting().store(-1, std::memory_order_relaxed); }

// ICD_DEPENDENT_LAUNCH=0 launches these kernels the ordinary way (for
// measuring what the overlap is worth, in one build).
inline bool Enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("ICD_DEPENDENT_LAUNCH");
    return value == nullptr || std::strcmp(value, "0") != 0;
  }();
  return enabled;
}

// kernel<<<grid, block, 0, stream>>>(args...), allowed to overlap the
// previous kernel in the stream as above.
template <class... Parameters, class... Arguments>
cudaError_t LaunchDependent(void (*kernel)(Parameters...), dim3 grid, dim3 block,
                            cudaStream_t stream, Arguments&&... arguments) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = Enabled() ? 1 : 0;
  config.attrs = attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Arguments>(arguments)...);
}

}  // namespace icd::dependent_launch

#endif  // ICD_CORE_SRC_SCAN_DEPENDENT_LAUNCH_CUH_
