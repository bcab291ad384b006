// The sum over a block of kBlockThreads threads, in one fixed order: a
// shuffle tree within each warp, then the warps' sums in warp order (the
// norm kernels, rms_norm.cu). A kernel that needs a norm's scale as the
// same float, bit for bit, sums the same way through this.
#ifndef ICD_CORE_SRC_FUSED_BLOCK_SUM_CUH_
#define ICD_CORE_SRC_FUSED_BLOCK_SUM_CUH_

#include <cuda_runtime.h>

namespace icd::fused {

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

}  // namespace icd::fused

#endif  // ICD_CORE_SRC_FUSED_BLOCK_SUM_CUH_
