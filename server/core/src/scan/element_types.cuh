// Element types of icd's CUDA kernels (scan/, fused/) as stored in memory,
// converted to float32 on use. CUDA code only; no LibTorch.
#ifndef ICD_CORE_SRC_SCAN_ELEMENT_TYPES_CUH_
#define ICD_CORE_SRC_SCAN_ELEMENT_TYPES_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "scan/selective_scan_launch.h"

namespace icd::cuda_elements {

// FromFloat rounds to nearest even, as LibTorch's casts do; the scan pads
// a raw time step with NegativeInfinity (softplus(-inf) = 0: an inert step).
struct Float32Element {
  using Storage = float;
  static __device__ __forceinline__ float ToFloat(float value) { return value; }
  static __device__ __forceinline__ float FromFloat(float value) { return value; }
  static __device__ __forceinline__ float NegativeInfinity() { return __uint_as_float(0xff800000u); }
};
struct BFloat16Element {
  using Storage = unsigned short;
  static __device__ __forceinline__ float ToFloat(unsigned short bits) {
    return __uint_as_float(static_cast<unsigned int>(bits) << 16);
  }
  static __device__ __forceinline__ unsigned short FromFloat(float value) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(value));
  }
  static __device__ __forceinline__ unsigned short NegativeInfinity() { return 0xff80u; }
};
struct Float16Element {
  using Storage = unsigned short;
  static __device__ __forceinline__ float ToFloat(unsigned short bits) {
    return __half2float(__ushort_as_half(bits));
  }
  static __device__ __forceinline__ unsigned short FromFloat(float value) {
    return __half_as_ushort(__float2half_rn(value));
  }
  static __device__ __forceinline__ unsigned short NegativeInfinity() { return 0xfc00u; }
};

// The value rounded to the element type's precision, as a float.
template <class Element>
__device__ __forceinline__ float RoundTo(float value) {
  return Element::ToFloat(Element::FromFloat(value));
}

// launch(Element{}) for the element type `type` names: a launcher's one
// dispatch from the runtime type to its kernel templates. An out-of-range
// value is cudaErrorInvalidValue.
template <class Launch>
int ForElementType(scan::ScanElementType type, Launch&& launch) {
  switch (type) {
    case scan::ScanElementType::kFloat32: return launch(Float32Element{});
    case scan::ScanElementType::kBFloat16: return launch(BFloat16Element{});
    case scan::ScanElementType::kFloat16: return launch(Float16Element{});
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace icd::cuda_elements

#endif  // ICD_CORE_SRC_SCAN_ELEMENT_TYPES_CUH_
