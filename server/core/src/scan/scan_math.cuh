// Device math the scan kernels share (selective_scan.cu, the chunked scan;
// selective_state_step.cu, one step of time; state_space_scan.cu, Mamba-2's):
// parameters as the model holds them, Mamba-1's A from A_log, the time
// step's softplus as the LibTorch reference rounds it, 2^x on the
// special-function unit and on the FMA pipes, silu, and the transposing sum
// of per-step partial sums over a group of lanes.
#ifndef ICD_CORE_SRC_SCAN_SCAN_MATH_CUH_
#define ICD_CORE_SRC_SCAN_SCAN_MATH_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "scan/element_types.cuh"
#include "scan/selective_scan_launch.h"

namespace icd::scan {

inline constexpr float kLog2E = 1.4426950408889634f;

// A parameter's value at `index`, in float32.
template <class Element>
__device__ __forceinline__ float ParameterAt(const ParameterOperand& parameter, int64_t index) {
  if (parameter.wide) return static_cast<const float*>(parameter.data)[index];
  return Element::ToFloat(static_cast<const typename Element::Storage*>(parameter.data)[index]);
}

// A of a Mamba-1 state (`index` into [I, N]): given, or -exp(A_log) in
// float32 (LibTorch's expf on CUDA, as the forward computed it before).
template <class Element>
__device__ __forceinline__ float DecayRateAt(const ScanLaunchArgs& args, int64_t index) {
  return args.a_decay != nullptr ? args.a_decay[index] : -expf(ParameterAt<Element>(args.a_log, index));
}

// Δ = softplus(raw + bias) as the LibTorch reference computes it in the
// compute dtype: the sum rounded, softplus in float32 (LibTorch's formula,
// threshold 20) rounded again. Exact libm calls: once per channel and step.
template <class Element>
__device__ __forceinline__ float SoftplusDelta(float raw, float bias) {
  const float sum = cuda_elements::RoundTo<Element>(raw + bias);
  return cuda_elements::RoundTo<Element>(sum > 20.0f ? sum : log1pf(expf(sum)));
}

// 2^x on the special-function unit (relative error about 2^-22; tiny
// results flush to zero, which only drops a state that has fully decayed).
__device__ __forceinline__ float Exp2Unit(float exponent) {
  float result;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(result) : "f"(exponent));
  return result;
}

// 2^x on the FMA pipes: 2^round(x) by exponent arithmetic times a degree-5
// fit of 2^f on [-0.5, 0.5] (relative error 1.6e-7). For silu, so that the
// special-function unit only does the scan's exps and one reciprocal.
__device__ __forceinline__ float Exp2Polynomial(float exponent) {
  constexpr float kRoundingShift = 12582912.0f;
  const float clamped = fminf(fmaxf(exponent, -125.0f), 125.0f);
  const float shifted = clamped + kRoundingShift;
  const float whole = shifted - kRoundingShift;
  const float fraction = clamped - whole;
  float power = 1.339086331e-03f;
  power = fmaf(power, fraction, 9.676031768e-03f);
  power = fmaf(power, fraction, 5.550356954e-02f);
  power = fmaf(power, fraction, 2.402210683e-01f);
  power = fmaf(power, fraction, 6.931471825e-01f);
  power = fmaf(power, fraction, 1.000000119e+00f);
  // Adding 1.5 * 2^23 leaves round(x) in the low mantissa bits of `shifted`
  // (two's complement); moved into the exponent field it scales 2^f.
  const unsigned int exponent_bits = __float_as_uint(shifted) << 23;
  return __uint_as_float(__float_as_uint(power) + exponent_bits);
}

// silu(z) = z / (1 + e^-z), its exp on the FMA pipes: the special-function
// unit is the scan's bottleneck (N exps per channel and step).
__device__ __forceinline__ float Silu(float gate) {
  return __fdividef(gate, 1.0f + Exp2Polynomial(-gate * kLog2E));
}

// The sum over an aligned group of kLanes lanes (a power of two, at most
// 32), in every lane of it; every lane of the warp takes part.
template <int kLanes>
__device__ __forceinline__ float LaneGroupSum(float value) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

// Transposing butterfly over an aligned group of kCount lanes: on entry each
// lane holds kCount per-step partial sums, on return lane j holds the sum
// over the group's lanes of step j. Each level halves the values a lane
// holds: it keeps the half whose step index has the lane's bit, and sends
// the other half to the partner that keeps it.
template <int kHalf, int kCount>
__device__ __forceinline__ void TransposeSumLevel(float (&values)[kCount], int lane) {
  if constexpr (kHalf >= 1) {
    const bool upper = (lane & kHalf) != 0;
#pragma unroll
    for (int k = 0; k < kHalf; ++k) {
      const float send = upper ? values[k] : values[k + kHalf];
      const float keep = upper ? values[k + kHalf] : values[k];
      values[k] = keep + __shfl_xor_sync(0xffffffffu, send, kHalf);
    }
    TransposeSumLevel<kHalf / 2>(values, lane);
  }
}

template <int kCount>
__device__ __forceinline__ float TransposeSum(float (&values)[kCount], int lane) {
  TransposeSumLevel<kCount / 2>(values, lane);
  return values[0];
}

}  // namespace icd::scan

#endif  // ICD_CORE_SRC_SCAN_SCAN_MATH_CUH_
