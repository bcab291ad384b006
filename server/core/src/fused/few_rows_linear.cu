// y = x Wᵀ (+ bias) for a few rows of x (launch interface: fused_launch.h):
// a decode step's projections, where every weight is read once per token and
// the GEMM is a matrix-vector product bound by memory. A warp (or a few, when
// features are few) owns one output feature: its lanes stream that weight
// row in 16-byte loads, kUnroll in flight at once, multiply them into every
// row of x, and reduce with shuffles.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>

#include "fused/fused_launch.h"
#include "scan/dependent_launch.cuh"
#include "scan/element_types.cuh"

namespace icd::fused {
namespace {

using cuda_elements::RoundTo;

using cuda_elements::BFloat16Element;
using cuda_elements::Float16Element;
using cuda_elements::Float32Element;

// Tuning knobs, fixed here; bench/linear_bench.cu builds variants with -D.
#ifndef ICD_FEW_ROWS_LINEAR_WARPS
#define ICD_FEW_ROWS_LINEAR_WARPS 8
#endif
#ifndef ICD_FEW_ROWS_LINEAR_UNROLL
#define ICD_FEW_ROWS_LINEAR_UNROLL 4
#endif
// Blocks per multiprocessor below which a feature's row is split over more
// warps (Split).
#ifndef ICD_FEW_ROWS_LINEAR_BLOCKS_PER_SM
#define ICD_FEW_ROWS_LINEAR_BLOCKS_PER_SM 4
#endif

constexpr int kWarps = ICD_FEW_ROWS_LINEAR_WARPS;
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

__device__ __forceinline__ void PrefetchL2(const void* address) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(address));
}

// Loads of a lane in flight together.
constexpr int kUnroll = ICD_FEW_ROWS_LINEAR_UNROLL;

// With conv_settled and early_conv, each lane of the warp that finishes
// `channel`'s feature loads that channel's operand number `lane` (when the
// operands number at most 32, as Launch checks) before the wait, and puts it
// into shared memory after it, so that the conv step after the dot product
// waits on no load.
template <class Element>
__device__ __forceinline__ typename Element::Storage ConvOperand(
    const FewRowsLinearLaunchArgs& args, int channel, int lane) {
  using Storage = typename Element::Storage;
  const int width = static_cast<int>(args.conv_width);
  const int halo = width - 1;
  const int rows = static_cast<int>(args.rows);
  if (lane < width) return static_cast<const Storage*>(args.conv_weight)[channel * width + lane];
  if (lane < width + rows * halo) {
    const int row = (lane - width) / halo;
    const int channels = static_cast<int>(args.conv_channels);
    return static_cast<const Storage*>(
        args.conv_history)[(row * channels + channel) * halo + (lane - width) - row * halo];
  }
  if (lane == width + rows * halo && args.conv_bias != nullptr) {
    return static_cast<const Storage*>(args.conv_bias)[channel];
  }
  return Element::FromFloat(0.0f);
}

// One causal conv step of `channel` in `row` whose newest input is `input`
// (the linear's rounded output): bias first, then the taps oldest to newest,
// the conv rounded, SiLU in float32 (causal_conv.cu's arithmetic); the
// history moves one step. Operands from `copied` (ConvOperand's: the
// taps, each row's history, then the bias) when set, else from global
// memory.
template <class Element>
__device__ __forceinline__ void ConvStep(const FewRowsLinearLaunchArgs& args, int row,
                                         int64_t channel, typename Element::Storage input,
                                         const typename Element::Storage* copied) {
  using Storage = typename Element::Storage;
  const int halo = static_cast<int>(args.conv_width) - 1;
  auto* history = static_cast<Storage*>(args.conv_history) + (row * args.conv_channels + channel) * halo;
  const Storage* taps = copied != nullptr
                            ? copied
                            : static_cast<const Storage*>(args.conv_weight) + channel * args.conv_width;
  const Storage* recent = copied != nullptr ? copied + args.conv_width + row * halo : history;
  Storage past[kMaxConvWidth - 1];
#pragma unroll
  for (int k = 0; k < kMaxConvWidth - 1; ++k) {
    if (k < halo) past[k] = recent[k];
  }
  float sum = 0.0f;
  if (args.conv_bias != nullptr) {
    sum = Element::ToFloat(copied != nullptr
                               ? copied[args.conv_width + args.rows * halo]
                               : static_cast<const Storage*>(args.conv_bias)[channel]);
  }
#pragma unroll
  for (int k = 0; k < kMaxConvWidth - 1; ++k) {
    if (k < halo) sum = fmaf(Element::ToFloat(taps[k]), Element::ToFloat(past[k]), sum);
  }
  sum = fmaf(Element::ToFloat(taps[halo]), Element::ToFloat(input), sum);
  const float conv = RoundTo<Element>(sum);
  static_cast<Storage*>(args.conv_output)[row * args.conv_channels + channel] =
      Element::FromFloat(conv / (1.0f + expf(-conv)));
#pragma unroll
  for (int k = 0; k + 1 < kMaxConvWidth - 1; ++k) {
    if (k + 1 < halo) history[k] = past[k + 1];
  }
  if (halo > 0) history[halo - 1] = input;
}

// A block's kWarps warps compute kWarps / split output features; the `split`
// warps of one feature take interleaved 16-byte columns of its weight row
// (split > 1 when there are too few features to fill the GPU), and their
// partial sums are added in shared memory in warp order (deterministic).
//
// The weights are the model's, not the previous kernel's: before waiting for
// that kernel (dependent_launch.cuh), each lane's first `prefetches` loads
// head for L2, or with `early` (a settled weight, ICD_FEW_ROWS_EARLY_LOADS)
// its first kUnroll loads go to registers. With `early_conv` (settled conv
// operands, ICD_FEW_ROWS_EARLY_CONV) the conv step's operands are copied
// to shared memory as well (ConvOperand).
template <class Element, int kRows>
__global__ void __launch_bounds__(kThreads) FewRowsLinearKernel(const FewRowsLinearLaunchArgs args,
                                                                const int split,
                                                                const int prefetches,
                                                                const bool early,
                                                                const bool early_conv,
                                                                const bool early_dependents) {
  using Storage = typename Element::Storage;
  __shared__ Storage conv_operands[kWarps][32];  // ConvOperand's, with early_conv
  constexpr int kValues = Unpack<Element>::kValues;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int part = warp % split;
  const int64_t feature = static_cast<int64_t>(blockIdx.x) * (kWarps / split) + warp / split;
  const bool real = feature < args.out_features;
  const int64_t in_features = args.in_features;
  const auto* weight = static_cast<const Storage*>(args.weight) + (real ? feature : 0) * in_features;
  const auto* input = static_cast<const Storage*>(args.input);

  float sums[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) sums[r] = 0.0f;
  const int64_t stride = static_cast<int64_t>(split) * 32 * kValues;
  const int64_t lane_first = (static_cast<int64_t>(part) * 32 + lane) * kValues;
  uint4 loaded[kUnroll];
  auto load = [&](int64_t first) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = first + u * stride;
      loaded[u] = k < in_features ? LoadStreaming(weight + k) : make_uint4(0, 0, 0, 0);
    }
  };
  if (early) {
    if (real) load(lane_first);
  } else {
    for (int u = 0; u < prefetches; ++u) {
      const int64_t k = lane_first + u * stride;
      if (!real || k >= in_features) break;
      PrefetchL2(weight + k);
    }
  }
  const bool conv_early = early_conv && real && part == 0 && feature >= args.conv_offset &&
                          feature - args.conv_offset < args.conv_channels;
  Storage conv_operand{};
  if (conv_early) {
    conv_operand = ConvOperand<Element>(args, static_cast<int>(feature - args.conv_offset), lane);
  }
  dependent_launch::WaitThenAllowDependents(early_dependents);  // x comes from them
  if (conv_early) {
    conv_operands[warp][lane] = conv_operand;
    __syncwarp();  // lane 0 reads them after the dot product
  }
  for (int64_t first = lane_first; real && first < in_features; first += kUnroll * stride) {
    if (!early || first != lane_first) load(first);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = first + u * stride;
      if (k >= in_features) break;
      float weights[kValues];
      Unpack<Element>::Run(loaded[u], weights);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float values[kValues];
        Unpack<Element>::Run(
            __ldg(reinterpret_cast<const uint4*>(input + r * args.input_row_stride + k)), values);
#pragma unroll
        for (int i = 0; i < kValues; ++i) sums[r] = fmaf(weights[i], values[i], sums[r]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      sums[r] += __shfl_xor_sync(0xffffffffu, sums[r], offset);
    }
  }
  if (split > 1) {
    __shared__ float partial[kWarps][kRows];
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) partial[warp][r] = sums[r];
    }
    __syncthreads();
    if (part != 0 || lane != 0) return;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float total = 0.0f;
      for (int p = 0; p < split; ++p) total += partial[warp + p][r];
      sums[r] = total;
    }
  } else if (lane != 0) {
    return;
  }
  if (!real) return;
  const float bias =
      args.bias != nullptr ? Element::ToFloat(static_cast<const Storage*>(args.bias)[feature]) : 0.0f;
  auto* output = static_cast<Storage*>(args.output);
  const int64_t conv_channel = feature - args.conv_offset;
  const bool conv =
      args.conv_output != nullptr && conv_channel >= 0 && conv_channel < args.conv_channels;
  const Storage* copied = early_conv ? conv_operands[warp] : nullptr;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const Storage value = Element::FromFloat(sums[r] + bias);
    output[r * args.out_features + feature] = value;
    if (conv) ConvStep<Element>(args, r, conv_channel, value, copied);
  }
}

// The run-time settings, from the environment: read at the first launch,
// and again at the first launch after ReloadFewRowsLinearSettings (a
// measurement or a test that changes them within one process).
//   ICD_FEW_ROWS_BLOCKS_PER_SM=N: blocks per multiprocessor Split aims at
//     (default ICD_FEW_ROWS_LINEAR_BLOCKS_PER_SM).
//   ICD_FEW_ROWS_PREFETCH=N: loads of each lane prefetched before the
//     previous kernel has finished (default kUnroll, the first iteration's;
//     the whole row measured slower: deploy/results/h200-gpu-2026-12-02i).
//   ICD_EARLY_OPERANDS=0: no early loads in the other decode kernels. By
//     default they read their settled operands the same way (fused.h's
//     EarlyOperandsEnabled; Mamba-2's step 5% faster on the H200, Mamba-1's
//     unchanged: deploy/results/h200-gpu-2026-12-03g).
//   ICD_FEW_ROWS_EARLY_LOADS=0: no early loads. By default a settled
//     weight's first iteration of loads goes into registers before the
//     previous kernel has finished, in place of those prefetches (a decode
//     step 4-5% faster on the H200: deploy/results/h200-gpu-2026-12-03f).
//   ICD_FEW_ROWS_EARLY_CONV=0: by default, with a decode step's conv in
//     in_proj and its operands settled (FewRowsLinearLaunchArgs::
//     conv_settled), the taps, bias and history are read before the
//     previous kernel has finished (both steps 1.5-2.7% faster on the H200:
//     deploy/results/h200-gpu-2026-12-03h); 0 reads them after the dot
//     product.
//   ICD_EARLY_DEPENDENTS=0 (dependent_launch.cuh) is reloaded with these.
struct Settings {
  std::mutex reading;
  std::atomic<bool> stale{true};
  std::atomic<int> blocks_per_multiprocessor{ICD_FEW_ROWS_LINEAR_BLOCKS_PER_SM};
  std::atomic<int> prefetches{kUnroll};
  std::atomic<bool> early_loads{true};
  std::atomic<bool> early_operands{true};
  std::atomic<bool> early_conv{true};
};

Settings& SettingsStore() {
  static Settings settings;
  return settings;
}

Settings& CurrentSettings() {
  Settings& settings = SettingsStore();
  if (settings.stale.load(std::memory_order_acquire)) {
    const std::lock_guard<std::mutex> lock(settings.reading);
    if (settings.stale.load(std::memory_order_relaxed)) {
      auto number = [](const char* name, int unset) {
        const char* value = std::getenv(name);
        return value != nullptr ? std::atoi(value) : unset;
      };
      const int blocks = number("ICD_FEW_ROWS_BLOCKS_PER_SM", 0);
      settings.blocks_per_multiprocessor = blocks > 0 ? blocks : ICD_FEW_ROWS_LINEAR_BLOCKS_PER_SM;
      // Any number, as given: none or fewer than none prefetch nothing.
      settings.prefetches = number("ICD_FEW_ROWS_PREFETCH", kUnroll);
      settings.early_loads = number("ICD_FEW_ROWS_EARLY_LOADS", 1) != 0;
      settings.early_operands = number("ICD_EARLY_OPERANDS", 1) != 0;
      settings.early_conv = number("ICD_FEW_ROWS_EARLY_CONV", 1) != 0;
      settings.stale.store(false, std::memory_order_release);
    }
  }
  return settings;
}

int BlocksPerMultiprocessor() { return CurrentSettings().blocks_per_multiprocessor.load(); }
int Prefetches() { return CurrentSettings().prefetches.load(); }
bool EarlyLoads() { return CurrentSettings().early_loads.load(); }
bool EarlyConv() { return CurrentSettings().early_conv.load(); }

std::atomic<int64_t> early_launches{0};
std::atomic<int64_t> early_conv_launches{0};

// Warps per feature: enough blocks for about BlocksPerMultiprocessor() per
// multiprocessor.
int Split(int64_t out_features) {
  static const int multiprocessors = [] {
    int device = 0;
    int count = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      (void)cudaGetLastError();
      return 132;
    }
    return count;
  }();
  const int blocks_per_multiprocessor = BlocksPerMultiprocessor();
  int split = 1;
  while (split < kWarps &&
         (out_features * split + kWarps - 1) / kWarps < blocks_per_multiprocessor * multiprocessors) {
    split *= 2;
  }
  return split;
}

int Launch(void (*kernel)(FewRowsLinearLaunchArgs, int, int, bool, bool, bool), dim3 grid,
           const FewRowsLinearLaunchArgs& args, int split, cudaStream_t stream) {
  const bool early = EarlyLoads() && args.weight_settled;
  // ConvOperand: a lane per operand.
  const bool early_conv = EarlyConv() && args.conv_output != nullptr && args.conv_settled &&
                          args.conv_width + args.rows * (args.conv_width - 1) + 1 <= 32;
  const cudaError_t status = dependent_launch::LaunchDependent(
      kernel, grid, kThreads, stream, args, split, Prefetches(), early, early_conv,
      dependent_launch::EarlyDependents());
  if (early && status == cudaSuccess) ++early_launches;
  if (early_conv && status == cudaSuccess) ++early_conv_launches;
  return static_cast<int>(status);
}

template <class Element>
int LaunchElement(const FewRowsLinearLaunchArgs& args, cudaStream_t stream) {
  const int split = Split(args.out_features);
  const int features_per_block = kWarps / split;
  const dim3 grid(
      static_cast<unsigned int>((args.out_features + features_per_block - 1) / features_per_block));
  switch (args.rows) {
    case 1: return Launch(FewRowsLinearKernel<Element, 1>, grid, args, split, stream);
    case 2: return Launch(FewRowsLinearKernel<Element, 2>, grid, args, split, stream);
    case 3: return Launch(FewRowsLinearKernel<Element, 3>, grid, args, split, stream);
    case 4: return Launch(FewRowsLinearKernel<Element, 4>, grid, args, split, stream);
    case 5: return Launch(FewRowsLinearKernel<Element, 5>, grid, args, split, stream);
    case 6: return Launch(FewRowsLinearKernel<Element, 6>, grid, args, split, stream);
    case 7: return Launch(FewRowsLinearKernel<Element, 7>, grid, args, split, stream);
    case 8: return Launch(FewRowsLinearKernel<Element, 8>, grid, args, split, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

bool Aligned(const void* pointer) {
  return reinterpret_cast<uintptr_t>(pointer) % kLoadBytes == 0;
}

}  // namespace

int64_t FewRowsLinearEarlyLaunches() { return early_launches.load(); }
int64_t FewRowsLinearEarlyConvLaunches() { return early_conv_launches.load(); }

bool EarlyOperandsEnabled() { return CurrentSettings().early_operands.load(); }

void ReloadFewRowsLinearSettings() {
  Settings& settings = SettingsStore();
  // Under the lock: a read in progress finishes first, and cannot clear
  // this reload with the values it read before.
  const std::lock_guard<std::mutex> lock(settings.reading);
  settings.stale.store(true, std::memory_order_release);
  dependent_launch::ReloadEarlyDependents();
}

int LaunchFewRowsLinear(const FewRowsLinearLaunchArgs& args, void* stream) {
  const int invalid = static_cast<int>(cudaErrorInvalidValue);
  const int64_t element_bytes = args.element_type == ElementType::kFloat32 ? 4 : 2;
  const int64_t per_load = kLoadBytes / element_bytes;
  if (args.rows < 1 || args.rows > kMaxFewRowsLinearRows || args.in_features < 1 ||
      args.in_features % per_load != 0 || args.input_row_stride % per_load != 0 ||
      args.out_features < 1 || args.out_features > (int64_t{1} << 31) - 1 ||
      args.input == nullptr || args.weight == nullptr || args.output == nullptr ||
      !Aligned(args.input) || !Aligned(args.weight)) {
    return invalid;
  }
  if (args.conv_output != nullptr &&
      (args.conv_channels < 1 || args.conv_offset < 0 ||
       args.conv_offset + args.conv_channels > args.out_features || args.conv_width < 1 ||
       args.conv_width > kMaxConvWidth || args.conv_weight == nullptr ||
       (args.conv_width > 1 && args.conv_history == nullptr))) {
    return invalid;
  }
  auto* cuda_stream = static_cast<cudaStream_t>(stream);
  return cuda_elements::ForElementType(args.element_type, [&](auto element) {
    return LaunchElement<decltype(element)>(args, cuda_stream);
  });
}

}  // namespace icd::fused
