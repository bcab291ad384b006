// y = x Wᵀ (+ bias) for a few rows of x (launch interface: fused_launch.h):
// a decode step's projections, where every weight is read once per token and
// the GEMM is a matrix-vector product bound by memory. A warp owns one output
// feature: its lanes stream that weight row in 16-byte loads (all in flight
// together), multiply them into every row of x, and reduce with shuffles.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fused/fused_launch.h"
#include "scan/element_types.cuh"

namespace icd::fused {
namespace {

using cuda_elements::BFloat16Element;
using cuda_elements::Float16Element;
using cuda_elements::Float32Element;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kLoadBytes = 16;

// The kLoadBytes / sizeof(Storage) values of one 16-byte load, as float32.
template <class Element>
struct Unpack;

template <>
struct Unpack<Float32Element> {
  static constexpr int kValues = 4;
  static __device__ __forceinline__ void Run(const uint4& bits, float* out) {
    out[0] = __uint_as_float(bits.x);
    out[1] = __uint_as_float(bits.y);
    out[2] = __uint_as_float(bits.z);
    out[3] = __uint_as_float(bits.w);
  }
};

template <>
struct Unpack<BFloat16Element> {
  static constexpr int kValues = 8;
  static __device__ __forceinline__ void Run(const uint4& bits, float* out) {
    const unsigned int words[4] = {bits.x, bits.y, bits.z, bits.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(words[i] << 16);
      out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
  }
};

template <>
struct Unpack<Float16Element> {
  static constexpr int kValues = 8;
  static __device__ __forceinline__ void Run(const uint4& bits, float* out) {
    const unsigned int words[4] = {bits.x, bits.y, bits.z, bits.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 pair = __half22float2(*reinterpret_cast<const __half2*>(&words[i]));
      out[2 * i] = pair.x;
      out[2 * i + 1] = pair.y;
    }
  }
};

// Weights are read once: past L1 (and kept out of it), x from L1/L2.
__device__ __forceinline__ uint4 LoadStreaming(const void* address) {
  return __ldcs(static_cast<const uint4*>(address));
}

template <class Element, int kRows>
__global__ void __launch_bounds__(kThreads) FewRowsLinearKernel(const FewRowsLinearLaunchArgs args) {
  using Storage = typename Element::Storage;
  constexpr int kValues = Unpack<Element>::kValues;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t feature = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (feature >= args.out_features) return;
  const int64_t in_features = args.in_features;
  const auto* weight = static_cast<const Storage*>(args.weight) + feature * in_features;
  const auto* input = static_cast<const Storage*>(args.input);

  float sums[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) sums[r] = 0.0f;
#pragma unroll 4
  for (int64_t k = static_cast<int64_t>(lane) * kValues; k < in_features; k += 32 * kValues) {
    float weights[kValues];
    Unpack<Element>::Run(LoadStreaming(weight + k), weights);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float values[kValues];
      Unpack<Element>::Run(__ldg(reinterpret_cast<const uint4*>(input + r * args.input_row_stride + k)),
                           values);
#pragma unroll
      for (int i = 0; i < kValues; ++i) sums[r] = fmaf(weights[i], values[i], sums[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      sums[r] += __shfl_xor_sync(0xffffffffu, sums[r], offset);
    }
  }
  if (lane != 0) return;
  const float bias =
      args.bias != nullptr ? Element::ToFloat(static_cast<const Storage*>(args.bias)[feature]) : 0.0f;
  auto* output = static_cast<Storage*>(args.output);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    output[r * args.out_features + feature] = Element::FromFloat(sums[r] + bias);
  }
}

template <class Element>
int LaunchElement(const FewRowsLinearLaunchArgs& args, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned int>((args.out_features + kWarps - 1) / kWarps));
  switch (args.rows) {
    case 1: FewRowsLinearKernel<Element, 1><<<grid, kThreads, 0, stream>>>(args); break;
    case 2: FewRowsLinearKernel<Element, 2><<<grid, kThreads, 0, stream>>>(args); break;
    case 3: FewRowsLinearKernel<Element, 3><<<grid, kThreads, 0, stream>>>(args); break;
    case 4: FewRowsLinearKernel<Element, 4><<<grid, kThreads, 0, stream>>>(args); break;
    case 5: FewRowsLinearKernel<Element, 5><<<grid, kThreads, 0, stream>>>(args); break;
    case 6: FewRowsLinearKernel<Element, 6><<<grid, kThreads, 0, stream>>>(args); break;
    case 7: FewRowsLinearKernel<Element, 7><<<grid, kThreads, 0, stream>>>(args); break;
    case 8: FewRowsLinearKernel<Element, 8><<<grid, kThreads, 0, stream>>>(args); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

bool Aligned(const void* pointer) {
  return reinterpret_cast<uintptr_t>(pointer) % kLoadBytes == 0;
}

}  // namespace

int LaunchFewRowsLinear(const FewRowsLinearLaunchArgs& args, void* stream) {
  const int invalid = static_cast<int>(cudaErrorInvalidValue);
  const int64_t element_bytes = args.element_type == ElementType::kFloat32 ? 4 : 2;
  const int64_t per_load = kLoadBytes / element_bytes;
  if (args.rows < 1 || args.rows > kMaxFewRowsLinearRows || args.in_features < 1 ||
      args.in_features % per_load != 0 || args.input_row_stride % per_load != 0 ||
      args.out_features < 1 || (args.out_features + kWarps - 1) / kWarps > (int64_t{1} << 31) - 1 ||
      args.input == nullptr || args.weight == nullptr || args.output == nullptr ||
      !Aligned(args.input) || !Aligned(args.weight)) {
    return invalid;
  }
  auto* cuda_stream = static_cast<cudaStream_t>(stream);
  switch (args.element_type) {
    case ElementType::kFloat32: return LaunchElement<Float32Element>(args, cuda_stream);
    case ElementType::kBFloat16: return LaunchElement<BFloat16Element>(args, cuda_stream);
    case ElementType::kFloat16: return LaunchElement<Float16Element>(args, cuda_stream);
  }
  return invalid;
}

}  // namespace icd::fused
