// Residual add + RMS norm on CUDA, and Mamba-2's gated RMS norm (launch
// interface: fused_launch.h). Residual add + RMS norm, one block per row:
// the first pass adds the mixer's output into the float32 residual, writes
// it and sums the squares; the second writes the normalised, scaled row.
// Each replaces some ten LibTorch passes over [B·L, D] (cast, add, pow,
// mean, add, rsqrt, mul, cast, mul; the gated norm's silu and products).
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "fused/block_sum.cuh"
#include "fused/fused_launch.h"
#include "scan/dependent_launch.cuh"
#include "scan/element_types.cuh"

namespace icd::fused {
namespace {

using cuda_elements::RoundTo;

constexpr int kThreads = 256;

// A row of at most kThreads * kPerThread values is held in registers: every
// load of the row is issued before the first store (the residual may be
// written in place, so loads and stores interleaved in one loop would wait
// for each other: a decode step's single row is latency, not bandwidth).
// kPerThread 0: any width, the row read back from L1/L2 in the second pass.
template <class Element, int kPerThread>
__global__ void __launch_bounds__(kThreads) AddRmsNormKernel(const AddRmsNormLaunchArgs args,
                                                            const bool early_dependents) {
  using Storage = typename Element::Storage;
  const int64_t width = args.width;
  const int64_t row_start = static_cast<int64_t>(blockIdx.x) * width;
  const float* residual = args.residual + row_start;
  const auto* mixed =
      args.mixed != nullptr ? static_cast<const Storage*>(args.mixed) + row_start : nullptr;
  float* residual_out = args.residual_out + row_start;
  const auto* weight = static_cast<const Storage*>(args.weight);
  auto* normed = static_cast<Storage*>(args.normed) + row_start;
  const int thread = static_cast<int>(threadIdx.x);
  dependent_launch::WaitThenAllowDependents(early_dependents);  // the residual and mixed come from them

  float squares = 0.0f;
  if constexpr (kPerThread > 0) {
    float values[kPerThread];
    float scales[kPerThread];
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int64_t i = thread + static_cast<int64_t>(u) * kThreads;
      values[u] = 0.0f;
      scales[u] = 0.0f;
      if (i < width) {
        values[u] = residual[i];
        if (mixed != nullptr) values[u] += Element::ToFloat(mixed[i]);
        scales[u] = Element::ToFloat(weight[i]);
      }
    }
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int64_t i = thread + static_cast<int64_t>(u) * kThreads;
      if (i < width) residual_out[i] = values[u];
      squares = fmaf(values[u], values[u], squares);
    }
    // mean(x²) as LibTorch's mean: the sum times 1/D.
    const float scale = rsqrtf(BlockSum<kThreads>(squares) * (1.0f / static_cast<float>(width)) + args.eps);
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int64_t i = thread + static_cast<int64_t>(u) * kThreads;
      if (i < width) {
        const float normalised = RoundTo<Element>(values[u] * scale);
        normed[i] = Element::FromFloat(normalised * scales[u]);
      }
    }
  } else {
    for (int64_t i = thread; i < width; i += kThreads) {
      float value = residual[i];
      if (mixed != nullptr) value += Element::ToFloat(mixed[i]);
      residual_out[i] = value;
      squares = fmaf(value, value, squares);
    }
    const float scale = rsqrtf(BlockSum<kThreads>(squares) * (1.0f / static_cast<float>(width)) + args.eps);
    for (int64_t i = thread; i < width; i += kThreads) {
      // This thread wrote residual_out[i] above: program order, no barrier.
      const float normalised = RoundTo<Element>(residual_out[i] * scale);
      normed[i] = Element::FromFloat(normalised * Element::ToFloat(weight[i]));
    }
  }
}

template <class Element>
cudaError_t LaunchRows(const AddRmsNormLaunchArgs& args, dim3 grid, cudaStream_t stream) {
  const bool early_dependents = dependent_launch::EarlyDependents();
  if (args.width <= kThreads * 4) {
    return dependent_launch::LaunchDependent(AddRmsNormKernel<Element, 4>, grid, kThreads, stream, args,
                                             early_dependents);
  } else if (args.width <= kThreads * 8) {
    return dependent_launch::LaunchDependent(AddRmsNormKernel<Element, 8>, grid, kThreads, stream, args,
                                             early_dependents);
  } else if (args.width <= kThreads * 16) {
    return dependent_launch::LaunchDependent(AddRmsNormKernel<Element, 16>, grid, kThreads, stream, args,
                                             early_dependents);
  } else {
    return dependent_launch::LaunchDependent(AddRmsNormKernel<Element, 0>, grid, kThreads, stream, args,
                                             early_dependents);
  }
}

// One block per (row, group). A group of at most kThreads * kPerThread
// channels is held in registers, every load issued before the first use (a
// decode step's single row is latency); kPerThread 0: any width, two passes
// over it, the second read back from L1/L2.
template <class Element, int kPerThread>
__global__ void __launch_bounds__(kThreads) GatedRmsNormKernel(const GatedRmsNormLaunchArgs args,
                                                              const bool early_dependents) {
  using Storage = typename Element::Storage;
  const int64_t group_width = args.width / args.groups;
  const int64_t row = blockIdx.x;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * group_width;
  const float* values = args.values + row * args.width + first;
  const auto* gate = static_cast<const Storage*>(args.gate) + row * args.gate_row_stride + first;
  const auto* weight = static_cast<const Storage*>(args.weight) + first;
  auto* output = static_cast<Storage*>(args.output) + row * args.width + first;
  const int thread = static_cast<int>(threadIdx.x);
  const float inverse_width = 1.0f / static_cast<float>(group_width);
  dependent_launch::WaitThenAllowDependents(early_dependents);  // y and z come from them
  // silu(z) in float32, as torch::silu of the widened gate.
  auto activate = [](Storage bits) {
    const float z = Element::ToFloat(bits);
    return z / (1.0f + expf(-z));
  };
  float squares = 0.0f;
  if constexpr (kPerThread > 0) {
    float scanned[kPerThread];
    Storage gate_bits[kPerThread];
    Storage weight_bits[kPerThread];
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int64_t i = thread + static_cast<int64_t>(u) * kThreads;
      const bool real = i < group_width;
      scanned[u] = real ? values[i] : 0.0f;
      gate_bits[u] = real ? gate[i] : Storage(0);
      weight_bits[u] = real ? weight[i] : Storage(0);
    }
    float activated[kPerThread];
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      activated[u] = activate(gate_bits[u]);
      if (!args.norm_before_gate) scanned[u] *= activated[u];
      squares = fmaf(scanned[u], scanned[u], squares);
    }
    const float scale = rsqrtf(BlockSum<kThreads>(squares) * inverse_width + args.eps);
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int64_t i = thread + static_cast<int64_t>(u) * kThreads;
      float normed = scanned[u] * scale * Element::ToFloat(weight_bits[u]);
      if (args.norm_before_gate) normed *= activated[u];
      if (i < group_width) output[i] = Element::FromFloat(normed);
    }
  } else {
    for (int64_t i = thread; i < group_width; i += kThreads) {
      const float value = args.norm_before_gate ? values[i] : values[i] * activate(gate[i]);
      squares = fmaf(value, value, squares);
    }
    const float scale = rsqrtf(BlockSum<kThreads>(squares) * inverse_width + args.eps);
    for (int64_t i = thread; i < group_width; i += kThreads) {
      const float activated = activate(gate[i]);
      const float value = args.norm_before_gate ? values[i] : values[i] * activated;
      float normed = value * scale * Element::ToFloat(weight[i]);
      if (args.norm_before_gate) normed *= activated;
      output[i] = Element::FromFloat(normed);
    }
  }
}

// Four consecutive values of a row, as one load or store.
template <class Storage>
struct alignas(4 * sizeof(Storage)) Quad {
  Storage values[4];
};

// GatedRmsNormKernel's arithmetic with every access four values wide: a
// fourth of the load instructions per value. What a thread holds across the
// block's sum is only the values (and silu(z) when the norm comes first), the
// weight read afterwards from L1/L2 (every row reads it), so that a
// prefill's thousands of rows keep more blocks in flight. Where the row,
// gate and weight are aligned for it (GatedQuadsAligned).
//
// kEarlyWeight (a decode step's settled weight, ICD_EARLY_OPERANDS): the
// weight is loaded before waiting for the kernel ahead and held through the
// sum; a template flag, so the kernel without it keeps its registers.
template <class Element, int kQuads, bool kNormFirst, bool kEarlyWeight>
__global__ void __launch_bounds__(kThreads)
    GatedRmsNormQuadKernel(const GatedRmsNormLaunchArgs args, const bool early_dependents) {
  using Storage = typename Element::Storage;
  using StorageQuad = Quad<Storage>;
  const int64_t group_width = args.width / args.groups;
  const int64_t quads = group_width / 4;
  const int64_t row = blockIdx.x;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * group_width;
  const auto* values = reinterpret_cast<const float4*>(args.values + row * args.width + first);
  const auto* gate = reinterpret_cast<const StorageQuad*>(
      static_cast<const Storage*>(args.gate) + row * args.gate_row_stride + first);
  const auto* weight =
      reinterpret_cast<const StorageQuad*>(static_cast<const Storage*>(args.weight) + first);
  auto* output = reinterpret_cast<StorageQuad*>(static_cast<Storage*>(args.output) +
                                                row * args.width + first);
  const int thread = static_cast<int>(threadIdx.x);
  const float inverse_width = 1.0f / static_cast<float>(group_width);
  // A settled weight (no kernel of the step writes it: dependent_launch.cuh)
  // is loaded before the wait; else after the block's sum, from L1/L2.
  StorageQuad early_weight[kEarlyWeight ? kQuads : 1];
  if constexpr (kEarlyWeight) {
#pragma unroll
    for (int u = 0; u < kQuads; ++u) {
      const int64_t i = thread + static_cast<int64_t>(u) * kThreads;
      early_weight[u] = i < quads ? weight[i] : StorageQuad{};
    }
  }
  dependent_launch::WaitThenAllowDependents(early_dependents);  // y and z come from them
  float scanned[kQuads][4];
  StorageQuad gate_bits[kQuads];
#pragma unroll
  for (int u = 0; u < kQuads; ++u) {
    const int64_t i = thread + static_cast<int64_t>(u) * kThreads;
    float4 loaded = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    gate_bits[u] = StorageQuad{};
    if (i < quads) {
      loaded = values[i];
      gate_bits[u] = gate[i];
    }
    scanned[u][0] = loaded.x;
    scanned[u][1] = loaded.y;
    scanned[u][2] = loaded.z;
    scanned[u][3] = loaded.w;
  }
  float squares = 0.0f;
  float activated[kNormFirst ? kQuads : 1][4];
#pragma unroll
  for (int u = 0; u < kQuads; ++u) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float z = Element::ToFloat(gate_bits[u].values[j]);
      const float silu = z / (1.0f + expf(-z));  // as torch::silu in float32
      if constexpr (kNormFirst) {
        activated[u][j] = silu;
      } else {
        scanned[u][j] *= silu;
      }
      squares = fmaf(scanned[u][j], scanned[u][j], squares);
    }
  }
  const float scale = rsqrtf(BlockSum<kThreads>(squares) * inverse_width + args.eps);
#pragma unroll
  for (int u = 0; u < kQuads; ++u) {
    const int64_t i = thread + static_cast<int64_t>(u) * kThreads;
    if (i >= quads) continue;
    StorageQuad weight_bits;
    if constexpr (kEarlyWeight) {
      weight_bits = early_weight[u];
    } else {
      weight_bits = weight[i];
    }
    StorageQuad normed;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float value = scanned[u][j] * scale * Element::ToFloat(weight_bits.values[j]);
      if constexpr (kNormFirst) value *= activated[u][j];
      normed.values[j] = Element::FromFloat(value);
    }
    output[i] = normed;
  }
}

std::atomic<int64_t> gated_early_launches{0};

template <class Element, int kQuads, bool kEarlyWeight>
cudaError_t LaunchGatedQuadsAs(const GatedRmsNormLaunchArgs& args, dim3 grid,
                               cudaStream_t stream) {
  const bool early_dependents = dependent_launch::EarlyDependents();
  if (args.norm_before_gate) {
    return dependent_launch::LaunchDependent(
        GatedRmsNormQuadKernel<Element, kQuads, true, kEarlyWeight>, grid, kThreads, stream, args,
        early_dependents);
  }
  return dependent_launch::LaunchDependent(
      GatedRmsNormQuadKernel<Element, kQuads, false, kEarlyWeight>, grid, kThreads, stream, args,
      early_dependents);
}

template <class Element, int kQuads>
cudaError_t LaunchGatedQuads(const GatedRmsNormLaunchArgs& args, dim3 grid, cudaStream_t stream) {
  if (!args.weight_early) return LaunchGatedQuadsAs<Element, kQuads, false>(args, grid, stream);
  const cudaError_t status = LaunchGatedQuadsAs<Element, kQuads, true>(args, grid, stream);
  if (status == cudaSuccess) ++gated_early_launches;
  return status;
}

// Whether every row of values, gate, weight and output starts aligned for
// GatedRmsNormQuadKernel's accesses.
template <class Element>
bool GatedQuadsAligned(const GatedRmsNormLaunchArgs& args) {
  constexpr uintptr_t kQuadBytes = 4 * sizeof(typename Element::Storage);
  auto aligned = [](const void* pointer, uintptr_t bytes) {
    return reinterpret_cast<uintptr_t>(pointer) % bytes == 0;
  };
  return (args.width / args.groups) % 4 == 0 && args.gate_row_stride % 4 == 0 &&
         aligned(args.values, 16) && aligned(args.gate, kQuadBytes) &&
         aligned(args.weight, kQuadBytes) && aligned(args.output, kQuadBytes);
}

template <class Element>
cudaError_t LaunchGatedRows(const GatedRmsNormLaunchArgs& args, dim3 grid, cudaStream_t stream) {
  const int64_t group_width = args.width / args.groups;
  if (GatedQuadsAligned<Element>(args) && group_width <= kThreads * 4 * 8) {
    const int64_t quads = group_width / 4;
    if (quads <= kThreads) return LaunchGatedQuads<Element, 1>(args, grid, stream);
    if (quads <= kThreads * 2) return LaunchGatedQuads<Element, 2>(args, grid, stream);
    if (quads <= kThreads * 4) return LaunchGatedQuads<Element, 4>(args, grid, stream);
    if (quads <= kThreads * 6) return LaunchGatedQuads<Element, 6>(args, grid, stream);
    return LaunchGatedQuads<Element, 8>(args, grid, stream);
  }
  const bool early_dependents = dependent_launch::EarlyDependents();
  if (group_width <= kThreads * 4) {
    return dependent_launch::LaunchDependent(GatedRmsNormKernel<Element, 4>, grid, kThreads, stream, args,
                                             early_dependents);
  } else if (group_width <= kThreads * 8) {
    return dependent_launch::LaunchDependent(GatedRmsNormKernel<Element, 8>, grid, kThreads, stream, args,
                                             early_dependents);
  } else if (group_width <= kThreads * 24) {
    return dependent_launch::LaunchDependent(GatedRmsNormKernel<Element, 24>, grid, kThreads, stream, args,
                                             early_dependents);
  } else {
    return dependent_launch::LaunchDependent(GatedRmsNormKernel<Element, 0>, grid, kThreads, stream, args,
                                             early_dependents);
  }
}

}  // namespace

int64_t GatedRmsNormEarlyLaunches() { return gated_early_launches.load(); }

int LaunchGatedRmsNorm(const GatedRmsNormLaunchArgs& args, void* stream) {
  if (args.rows < 1 || args.rows > (int64_t{1} << 31) - 1 || args.width < 1 ||
      args.groups < 1 || args.groups > 65535 || args.width % args.groups != 0 ||
      args.values == nullptr || args.gate == nullptr || args.weight == nullptr ||
      args.output == nullptr) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  auto* cuda_stream = static_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned int>(args.rows), static_cast<unsigned int>(args.groups));
  return cuda_elements::ForElementType(args.element_type, [&](auto element) {
    return static_cast<int>(LaunchGatedRows<decltype(element)>(args, grid, cuda_stream));
  });
}

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
    return static_cast<int>(LaunchRows<decltype(element)>(args, grid, cuda_stream));
  });
}

}  // namespace icd::fused
