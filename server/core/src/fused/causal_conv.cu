// Causal depthwise conv1d + SiLU on CUDA (launch interface: fused_launch.h),
// written from the definition: out[t] = silu(bias + Σ_k w[k] · in[t - K+1 + k])
// over [history | x]. Replaces a transposed copy, LibTorch's generic
// depthwise conv, a transpose back and a silu pass: it reads the strided x
// half of in_proj's output once and writes what x_proj and the scan read.
//
// Work split: a thread owns one channel (two, where aligned) of one batch
// row over kSteps time steps, so that a warp's loads and stores are
// consecutive channels of one step (row-contiguous); it loads its
// K-1 + kSteps inputs up front (all in flight together), then computes from
// registers.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

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

// kChannels consecutive channels of one step, as one load or store.
template <class Storage, int kChannels>
struct alignas(kChannels * sizeof(Storage)) ChannelPack {
  Storage values[kChannels];
};

// A thread owns kChannels consecutive channels (one 2- or 4-byte access per
// step for 2-byte elements: a warp's loads are 64 or 128 consecutive bytes).
template <class Element, int kWidth, int kChannels>
__global__ void __launch_bounds__(kThreads) CausalConvSiluKernel(const CausalConvLaunchArgs args) {
  using Storage = typename Element::Storage;
  using Pack = ChannelPack<Storage, kChannels>;
  constexpr int kHalo = kWidth - 1;
  const int64_t first_channel =
      (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kChannels;
  if (first_channel >= args.channels) return;
  const int64_t batch = blockIdx.z;
  const int64_t first_step = static_cast<int64_t>(blockIdx.y) * kSteps;
  const int64_t seq_len = args.seq_len;
  const auto* values = static_cast<const Storage*>(args.values) +
                       batch * args.values_batch_stride + first_channel;
  const auto* history = args.history != nullptr
                            ? static_cast<const Storage*>(args.history) +
                                  (batch * args.channels + first_channel) * kHalo
                            : nullptr;

  // window[i][c] is channel c's input at step first_step - kHalo + i: before
  // step 0 from the history (or zero), past the sequence zero (never used).
  float window[kHalo + kSteps][kChannels];
#pragma unroll
  for (int i = 0; i < kHalo + kSteps; ++i) {
    const int64_t step = first_step - kHalo + i;
    if (step >= 0 && step < seq_len) {
      const Pack loaded = *reinterpret_cast<const Pack*>(values + step * args.values_time_stride);
#pragma unroll
      for (int c = 0; c < kChannels; ++c) window[i][c] = Element::ToFloat(loaded.values[c]);
    } else {
#pragma unroll
      for (int c = 0; c < kChannels; ++c) {
        window[i][c] = step < 0 && history != nullptr
                           ? Element::ToFloat(history[c * kHalo + kHalo + step])
                           : 0.0f;
      }
    }
  }
  const auto* weight = static_cast<const Storage*>(args.weight) + first_channel * kWidth;
  float taps[kChannels][kWidth];
  float bias[kChannels];
#pragma unroll
  for (int c = 0; c < kChannels; ++c) {
#pragma unroll
    for (int k = 0; k < kWidth; ++k) taps[c][k] = Element::ToFloat(weight[c * kWidth + k]);
    bias[c] = args.bias != nullptr
                  ? Element::ToFloat(static_cast<const Storage*>(args.bias)[first_channel + c])
                  : 0.0f;
  }

  auto* output =
      static_cast<Storage*>(args.output) + batch * seq_len * args.channels + first_channel;
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    const int64_t step = first_step + s;
    if (step < seq_len) {
      Pack result;
#pragma unroll
      for (int c = 0; c < kChannels; ++c) {
        float sum = bias[c];
#pragma unroll
        for (int k = 0; k < kWidth; ++k) sum = fmaf(taps[c][k], window[s + k][c], sum);
        // The conv's output is a compute-dtype tensor in the reference.
        const float conv = RoundTo<Element>(sum);
        result.values[c] = Element::FromFloat(conv / (1.0f + expf(-conv)));
      }
      *reinterpret_cast<Pack*>(output + step * args.channels) = result;
    }
  }

  // The last K-1 inputs of [history | x], from the tile that holds step L-1.
  if (args.next_history != nullptr && first_step + kSteps >= seq_len) {
    auto* next = static_cast<Storage*>(args.next_history) +
                 (batch * args.channels + first_channel) * kHalo;
#pragma unroll
    for (int j = 0; j < kHalo; ++j) {
      // Step seq_len - kHalo + j sits at window index seq_len - first_step + j.
      const int64_t index = seq_len - first_step + j;
#pragma unroll
      for (int i = 0; i < kHalo + kSteps; ++i) {
        if (i == index) {
#pragma unroll
          for (int c = 0; c < kChannels; ++c) next[c * kHalo + j] = Element::FromFloat(window[i][c]);
        }
      }
    }
  }
}

// Two channels a thread where every row of values and output is aligned
// for it: an even channel count, strides and starts. ICD_CONV_PAIRS=0 keeps
// one (for measuring both in one build).
bool PairsAligned(const CausalConvLaunchArgs& args, int64_t element_bytes) {
  static const bool pairs = [] {
    const char* value = std::getenv("ICD_CONV_PAIRS");
    return value == nullptr || std::strcmp(value, "0") != 0;
  }();
  if (!pairs) return false;
  const auto aligned = [&](const void* pointer) {
    return reinterpret_cast<uintptr_t>(pointer) % (2 * element_bytes) == 0;
  };
  return args.channels % 2 == 0 && args.values_time_stride % 2 == 0 &&
         args.values_batch_stride % 2 == 0 && aligned(args.values) && aligned(args.output);
}

template <class Element, int kWidth>
int LaunchWidth(const CausalConvLaunchArgs& args, cudaStream_t stream) {
  const int channels_per_thread =
      PairsAligned(args, sizeof(typename Element::Storage)) ? 2 : 1;
  const int64_t threads = (args.channels + channels_per_thread - 1) / channels_per_thread;
  const dim3 grid(static_cast<unsigned int>((threads + kThreads - 1) / kThreads),
                  static_cast<unsigned int>((args.seq_len + kSteps - 1) / kSteps),
                  static_cast<unsigned int>(args.batch));
  if (channels_per_thread == 2) {
    CausalConvSiluKernel<Element, kWidth, 2><<<grid, kThreads, 0, stream>>>(args);
  } else {
    CausalConvSiluKernel<Element, kWidth, 1><<<grid, kThreads, 0, stream>>>(args);
  }
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
