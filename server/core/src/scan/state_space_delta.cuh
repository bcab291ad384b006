// Δ and the per-head parameters of Mamba-2's scan as both of its CUDA forms
// read them (state_space_scan.cu, state_space_chunked.cu): Δ from Δ itself,
// or from the raw time step with the bias, softplus and limit rounded as HF
// computes them; A, D and dt_bias in float32 or the model's dtype.
#ifndef ICD_CORE_SRC_SCAN_STATE_SPACE_DELTA_CUH_
#define ICD_CORE_SRC_SCAN_STATE_SPACE_DELTA_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "scan/element_types.cuh"
#include "scan/scan_math.cuh"
#include "scan/state_space_scan_launch.h"

namespace icd::scan {

// A of `head`: given, or -exp(A_log) in float32 (LibTorch's expf on CUDA).
template <class Element>
__device__ __forceinline__ float DecayRateOf(const StateSpaceScanLaunchArgs& args, int64_t head) {
  return args.a_decay != nullptr ? args.a_decay[head] : -expf(ParameterAt<Element>(args.a_log, head));
}

// D x's D for (head, channel row): per channel or per head; 0 without one.
template <class Element>
__device__ __forceinline__ float SkipOf(const StateSpaceScanLaunchArgs& args, int64_t head,
                                        int64_t row) {
  if (args.skip.data == nullptr) return 0.0f;
  return ParameterAt<Element>(args.skip,
                              args.skip_per_channel ? head * args.head_dim + row : head);
}

// Δ of (batch, step, head) from whichever source the arguments give.
template <class Element>
__device__ __forceinline__ float DeltaAt(const StateSpaceScanLaunchArgs& args, int64_t batch,
                                         int64_t step, int64_t head) {
  if (args.delta.data != nullptr) {
    return static_cast<const float*>(args.delta.data)[batch * args.delta.batch_stride +
                                                       step * args.delta.time_stride + head];
  }
  using Storage = typename Element::Storage;
  const Storage raw = static_cast<const Storage*>(
      args.time_step.data)[batch * args.time_step.batch_stride + step * args.time_step.time_stride +
                           head];
  const float bias =
      args.time_step_bias.data != nullptr ? ParameterAt<Element>(args.time_step_bias, head) : 0.0f;
  const float delta = SoftplusDelta<Element>(Element::ToFloat(raw), bias);
  if (!args.delta_limited) return delta;
  return cuda_elements::RoundTo<Element>(fminf(fmaxf(delta, args.delta_min), args.delta_max));
}

}  // namespace icd::scan

#endif  // ICD_CORE_SRC_SCAN_STATE_SPACE_DELTA_CUH_
