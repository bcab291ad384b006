// Residual add + RMS norm on CUDA (launch interface: fused_launch.h). One
// block per row: the first pass adds the mixer's output into the float32
// residual, writes it and sums the squares; the second reads the row back
// (from L1/L2: at most a few tens of KB) and writes the normalised, scaled
// row. Replaces LibTorch's cast, add, pow, mean, add, rsqrt, mul, cast and
// mul passes over [B·L, D].
#include <cuda_runtime.h>

#include <cstdint>

#include "fused/fused_launch.h"
#include "scan/element_types.cuh"

namespace icd::fused {
namespace {

using cuda_elements::RoundTo;

constexpr int kThreads = 256;

// The block's sum of `value`, returned to every thread.
__device__ __forceinline__ float BlockSum(float value) {
  __shared__ float warp_sums[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  return total;
}

template <class Element>
__global__ void __launch_bounds__(kThreads) AddRmsNormKernel(const AddRmsNormLaunchArgs args) {
  using Storage = typename Element::Storage;
  const int64_t width = args.width;
  const int64_t row_start = static_cast<int64_t>(blockIdx.x) * width;
  const float* residual = args.residual + row_start;
  const auto* mixed =
      args.mixed != nullptr ? static_cast<const Storage*>(args.mixed) + row_start : nullptr;
  float* residual_out = args.residual_out + row_start;

  float squares = 0.0f;
  // Unrolled: a row of a few thousand is a few loads per thread, issued
  // together rather than one round trip each (a decode step's one row).
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < width; i += kThreads) {
    float value = residual[i];
    if (mixed != nullptr) value += Element::ToFloat(mixed[i]);
    residual_out[i] = value;
    squares = fmaf(value, value, squares);
  }
  // mean(x²) as LibTorch's mean: the sum times 1/D.
  const float mean_square = BlockSum(squares) * (1.0f / static_cast<float>(width));
  const float scale = rsqrtf(mean_square + args.eps);

  const auto* weight = static_cast<const Storage*>(args.weight);
  auto* normed = static_cast<Storage*>(args.normed) + row_start;
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < width; i += kThreads) {
    // This thread wrote residual_out[i] above: program order, no barrier.
    const float normalised = RoundTo<Element>(residual_out[i] * scale);
    normed[i] = Element::FromFloat(normalised * Element::ToFloat(weight[i]));
  }
}

}  // namespace

int LaunchAddRmsNorm(const AddRmsNormLaunchArgs& args, void* stream) {
  const int invalid = static_cast<int>(cudaErrorInvalidValue);
  if (args.rows < 1 || args.rows > (int64_t{1} << 31) - 1 || args.width < 1 ||
      args.residual == nullptr || args.weight == nullptr || args.residual_out == nullptr ||
      args.normed == nullptr) {
    return invalid;
  }
  auto* cuda_stream = static_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned int>(args.rows));
  return cuda_elements::ForElementType(args.element_type, [&](auto element) {
    AddRmsNormKernel<decltype(element)><<<grid, kThreads, 0, cuda_stream>>>(args);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace icd::fused
