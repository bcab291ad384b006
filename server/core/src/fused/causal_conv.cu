// Causal depthwise conv1d + SiLU on CUDA (launch interface: fused_launch.h),
// written from the definition: out[t] = silu(bias + Σ_k w[k] · in[t - K+1 + k])
// over [history | x]. Replaces a transposed copy, LibTorch's generic
// depthwise conv, a transpose back and a silu pass: it reads the strided x
// half of in_proj's output once and writes what x_proj and the scan read.
//
// Work split: a thread owns one channel of one batch row over kSteps time
// steps, so that a warp's loads and stores are 32 consecutive channels of
// one step (row-contiguous); it loads its K-1 + kSteps inputs up front (all
// in flight together), then computes from registers.
#include <cuda_runtime.h>

#include <cstdint>

#include "fused/fused_launch.h"
#include "scan/element_types.cuh"

namespace icd::fused {
namespace {

using cuda_elements::RoundTo;

constexpr int kThreads = 128;
constexpr int kSteps = 32;
// Up to kSteps steps are one tile: its thread reads a channel's history
// before it writes the next one, so the two may share storage.
static_assert(kSteps == kMaxInPlaceConvSteps);

template <class Element, int kWidth>
__global__ void __launch_bounds__(kThreads) CausalConvSiluKernel(const CausalConvLaunchArgs args) {
  using Storage = typename Element::Storage;
  constexpr int kHalo = kWidth - 1;
  const int64_t channel = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (channel >= args.channels) return;
  const int64_t batch = blockIdx.z;
  const int64_t first_step = static_cast<int64_t>(blockIdx.y) * kSteps;
  const int64_t seq_len = args.seq_len;
  const auto* values = static_cast<const Storage*>(args.values) +
                       batch * args.values_batch_stride + channel;
  const auto* history =
      args.history != nullptr
          ? static_cast<const Storage*>(args.history) + (batch * args.channels + channel) * kHalo
          : nullptr;

  // window[i] is the input at step first_step - kHalo + i: before step 0
  // from the history (or zero), past the sequence zero (never used).
  float window[kHalo + kSteps];
#pragma unroll
  for (int i = 0; i < kHalo + kSteps; ++i) {
    const int64_t step = first_step - kHalo + i;
    float value = 0.0f;
    if (step >= 0 && step < seq_len) {
      value = Element::ToFloat(__ldg(values + step * args.values_time_stride));
    } else if (step < 0 && history != nullptr) {
      value = Element::ToFloat(history[kHalo + step]);
    }
    window[i] = value;
  }
  const auto* weight = static_cast<const Storage*>(args.weight) + channel * kWidth;
  float taps[kWidth];
#pragma unroll
  for (int k = 0; k < kWidth; ++k) taps[k] = Element::ToFloat(weight[k]);
  const float bias =
      args.bias != nullptr ? Element::ToFloat(static_cast<const Storage*>(args.bias)[channel]) : 0.0f;

  auto* output = static_cast<Storage*>(args.output) + batch * seq_len * args.channels + channel;
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    const int64_t step = first_step + s;
    if (step < seq_len) {
      float sum = bias;
#pragma unroll
      for (int k = 0; k < kWidth; ++k) sum = fmaf(taps[k], window[s + k], sum);
      // The conv's output is a compute-dtype tensor in the reference.
      const float conv = RoundTo<Element>(sum);
      output[step * args.channels] = Element::FromFloat(conv / (1.0f + expf(-conv)));
    }
  }

  // The last K-1 inputs of [history | x], from the tile that holds step L-1.
  if (args.next_history != nullptr && first_step + kSteps >= seq_len) {
    auto* next = static_cast<Storage*>(args.next_history) + (batch * args.channels + channel) * kHalo;
#pragma unroll
    for (int j = 0; j < kHalo; ++j) {
      // Step seq_len - kHalo + j sits at window index seq_len - first_step + j.
      const int64_t index = seq_len - first_step + j;
#pragma unroll
      for (int i = 0; i < kHalo + kSteps; ++i) {
        if (i == index) next[j] = Element::FromFloat(window[i]);
      }
    }
  }
}

template <class Element, int kWidth>
int LaunchWidth(const CausalConvLaunchArgs& args, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned int>((args.channels + kThreads - 1) / kThreads),
                  static_cast<unsigned int>((args.seq_len + kSteps - 1) / kSteps),
                  static_cast<unsigned int>(args.batch));
  CausalConvSiluKernel<Element, kWidth><<<grid, kThreads, 0, stream>>>(args);
  return static_cast<int>(cudaGetLastError());
}

template <class Element>
int LaunchElement(const CausalConvLaunchArgs& args, cudaStream_t stream) {
  switch (args.width) {
    case 1: return LaunchWidth<Element, 1>(args, stream);
    case 2: return LaunchWidth<Element, 2>(args, stream);
    case 3: return LaunchWidth<Element, 3>(args, stream);
    case 4: return LaunchWidth<Element, 4>(args, stream);
    case 5: return LaunchWidth<Element, 5>(args, stream);
    case 6: return LaunchWidth<Element, 6>(args, stream);
    case 7: return LaunchWidth<Element, 7>(args, stream);
    case 8: return LaunchWidth<Element, 8>(args, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace

int LaunchCausalConvSilu(const CausalConvLaunchArgs& args, void* stream) {
  const int invalid = static_cast<int>(cudaErrorInvalidValue);
  if (args.batch < 1 || args.batch > 65535 || args.seq_len < 1 ||
      (args.seq_len + kSteps - 1) / kSteps > 65535 || args.channels < 1 ||
      args.channels > (int64_t{1} << 31) - 1 || args.width < 1 || args.width > kMaxConvWidth ||
      args.values == nullptr || args.weight == nullptr || args.output == nullptr ||
      (args.next_history != nullptr && args.next_history == args.history &&
       args.seq_len > kMaxInPlaceConvSteps)) {
    return invalid;
  }
  auto* cuda_stream = static_cast<cudaStream_t>(stream);
  return cuda_elements::ForElementType(args.element_type, [&](auto element) {
    return LaunchElement<decltype(element)>(args, cuda_stream);
  });
}

}  // namespace icd::fused
