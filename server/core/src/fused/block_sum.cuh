// The sum over a block of kBlockThreads threads, in one fixed order: a
// shuffle tree within each warp, then the warps' sums in warp order (the
// norm kernels, rms_norm.cu). A kernel that needs a norm's scale as the
// same float, bit for bit, sums the same way through this.
#ifndef ICD_CORE_SRC_FUSED_BLOCK_SUM_CUH_
#define ICD_CORE_SRC_FUSED_BLOCK_SUM_CUH_

#include <cuda_runtime.h>

#include <cstdint>

namespace icd::fused {

// Threads of the add + RMS norm kernel's block (rms_norm.cu). A kernel that
// makes the same norm bit for bit (few_rows_linear.cu's AddRmsNormRows)
// splits the row over as many threads and sums through BlockSum of as many.
inline constexpr int kAddRmsNormThreads = 256;

// Returned to every thread; every thread of the block must call it, and a
// second call needs a barrier after the first (the warps' sums are reused).
template <int kBlockThreads>
__device__ __forceinline__ float BlockSum(float value) {
  __shared__ float warp_sums[kBlockThreads / 32];
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
  for (int w = 0; w < kBlockThreads / 32; ++w) total += warp_sums[w];
  return total;
}

// An RMS norm's scale from the block's sum of squares: rsqrt(mean + eps),
// the mean as LibTorch's (the sum times 1/D), one rounding of the multiply
// and add (an explicit fma, so that no kernel's contraction differs).
__device__ __forceinline__ float RmsScale(float sum_of_squares, int64_t width, float eps) {
  return rsqrtf(__fmaf_rn(sum_of_squares, 1.0f / static_cast<float>(width), eps));
}

}  // namespace icd::fused

#endif  // ICD_CORE_SRC_FUSED_BLOCK_SUM_CUH_
