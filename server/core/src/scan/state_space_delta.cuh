// Δ of Mamba-2's scan as both of its CUDA forms read it (state_space_scan.cu,
// state_space_chunked.cu): from Δ itself, or from the raw time step with
// the bias, softplus and limit rounded as HF computes them.
#ifndef ICD_CORE_SRC_SCAN_STATE_SPACE_DELTA_CUH_
#define ICD_CORE_SRC_SCAN_STATE_SPACE_DELTA_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "scan/element_types.cuh"
#include "scan/scan_math.cuh"
#include "scan/state_space_scan_launch.h"

namespace icd::scan {

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
  const float bias = args.time_step_bias != nullptr ? args.time_step_bias[head] : 0.0f;
  const float delta = SoftplusDelta<Element>(Element::ToFloat(raw), bias);
  if (!args.delta_limited) return delta;
  return cuda_elements::RoundTo<Element>(fminf(fmaxf(delta, args.delta_min), args.delta_max));
}

}  // namespace icd::scan

#endif  // ICD_CORE_SRC_SCAN_STATE_SPACE_DELTA_CUH_
