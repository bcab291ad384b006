// icd's Mamba-1 selective scan on CUDA (contract: selective_scan.h; launch
// interface: selective_scan_launch.h). No LibTorch here: raw pointers in,
// y (float32, or rounded once to the element type) and the float32 state out.
//
// Work split. A channel's N states are spread over `kLanes` threads (each
// holding kStatesPerThread of them in registers), so that even batch 1 gives
// B * I * N / kStatesPerThread threads; a block scans kChannelsPerBlock
// channels of one batch row. Each thread walks the whole sequence once:
// exp(Δ A) is the special-function unit's ex2, the rest is FMA, accumulation
// is float32.
//
// Time is cut into chunks of kSteps. Per chunk the block stages Δ, Δ·x, B and
// C in shared memory (loaded one chunk ahead into registers, so that global
// latency overlaps the scan), each thread advances its states through the
// chunk, the per-step partial sums C·h of a channel's lanes are combined by a
// transposing butterfly (kLanes - 1 shuffles per kLanes steps instead of
// log2(kLanes) per step; afterwards lane j holds step j's sum), and
// y = (C·h + D x)·silu(z) is written once, by the thread that loaded x and z,
// in rows of kChannelsPerBlock channels.
//
// Within a chunk the steps go in batches of up to 8, phase by phase (all
// shared loads, then all exps, then the recurrence), so that a warp, which
// issues in order, need not wait for each step's loads and exp in turn
// (what it measured, and what is still open: docs/results.md, "Notes from
// the sources").
//
// Padding is inert by construction: steps past L and states past N get
// Δ = Δ·x = B = C = 0 and A = 0, i.e. decay 1 and drive 0, so the state is
// unchanged and nothing is added to y.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "scan/element_types.cuh"
#include "scan/scan_math.cuh"
#include "scan/selective_scan_launch.h"

namespace icd::scan {
namespace {

using cuda_elements::RoundTo;

template <int kStatesPerThread, int kLanes, int kChannelsPerBlock>
struct ScanTile {
  static constexpr int kThreads = kLanes * kChannelsPerBlock;
  static constexpr int kStates = kLanes * kStatesPerThread;  // N, padded
  // Time steps per chunk: long enough to amortise the two barriers, short
  // enough that the prefetch registers stay few when a thread loads many.
  static constexpr int kSteps = kLanes >= 8 ? 64 : 32;
  // Row pitch (float2) of the staging arrays: even, so that two steps load
  // as one 16-byte access, and 4 banks apart from row to row.
  static constexpr int kPitch = kSteps + 2;
  // Loader mapping: consecutive threads take consecutive channels (states)
  // of one step, so global loads and y stores are row-contiguous.
  static constexpr int kChannelRowsPerPass = kThreads / kChannelsPerBlock;  // = kLanes
  static constexpr int kChannelLoads = kSteps / kChannelRowsPerPass;
  static constexpr int kStateRowsPerPass = kThreads / kStates;
  static constexpr int kStateLoads = kSteps / kStateRowsPerPass;

  static_assert(kLanes >= 4 && kLanes <= 32 && (kLanes & (kLanes - 1)) == 0);
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps: shuffles use a full mask");
  static_assert(kStates <= kMaxCudaStateSize);
  static_assert(kChannelsPerBlock % kStatesPerThread == 0);
  static_assert(kSteps % kLanes == 0 && kSteps % kStateRowsPerPass == 0);
};

template <class Element, int kStatesPerThread, int kLanes, int kChannelsPerBlock,
          bool kUnrollGroups, bool kPrefetchL2>
__global__ void __launch_bounds__(kLanes* kChannelsPerBlock)
    SelectiveScanKernel(const ScanLaunchArgs args) {
  using Tile = ScanTile<kStatesPerThread, kLanes, kChannelsPerBlock>;
  using Storage = typename Element::Storage;
  constexpr int kSteps = Tile::kSteps;
  // Steps per phase batch: even (two steps per 16-byte load), at most 8 so
  // that a batch's loads and exps fit in registers.
  constexpr int kBatch = kLanes < 8 ? kLanes : 8;

  __shared__ __align__(16) float2 step_inputs[kChannelsPerBlock][Tile::kPitch];  // {Δ, Δ·x}
  __shared__ __align__(16) float2 projections[Tile::kStates][Tile::kPitch];      // {B, C}
  __shared__ float scan_sums[kSteps][kChannelsPerBlock + 1];                     // C·h

  const int thread = static_cast<int>(threadIdx.x);
  const int64_t batch = blockIdx.y;
  const int64_t first_channel = static_cast<int64_t>(blockIdx.x) * kChannelsPerBlock;
  const int64_t inner = args.inner;
  const int64_t seq_len = args.seq_len;
  const int64_t state_size = args.state_size;

  // Scan role: states lane, lane + kLanes, ... of one channel (interleaved,
  // so that the lanes of a step read consecutive B/C rows: no bank conflict).
  const int lane = thread % kLanes;
  const int scan_channel = thread / kLanes;
  const int64_t channel = first_channel + scan_channel;
  const int64_t state_row = (batch * inner + channel) * state_size;  // [B, I, N]
  float decay_rate[kStatesPerThread];  // A log2(e): exp(Δ A) = exp2(Δ decay_rate)
  float state[kStatesPerThread];
#pragma unroll
  for (int s = 0; s < kStatesPerThread; ++s) {
    const int64_t n = lane + s * kLanes;
    const bool real = channel < inner && n < state_size;
    decay_rate[s] = real ? DecayRateAt<Element>(args, channel * state_size + n) * kLog2E : 0.0f;
    state[s] = real && args.state_in != nullptr ? args.state_in[state_row + n] : 0.0f;
  }

  // Load role for x, Δ, z and y: channel `load_channel`, steps load_step +
  // k * kLanes of each chunk.
  const int load_channel = thread % kChannelsPerBlock;
  const int load_step = thread / kChannelsPerBlock;
  const int64_t io_channel = first_channel + load_channel;
  const bool io_real = io_channel < inner;
  const float skip = io_real ? ParameterAt<Element>(args.d_skip, io_channel) : 0.0f;
  const auto* hidden = static_cast<const Storage*>(args.hidden.data) +
                       batch * args.hidden.batch_stride + io_channel;
  // Δ itself in float32, or the raw time step in the element type (then
  // softplus(raw + bias) when staged, off the load's critical path).
  const bool raw_delta = args.delta_raw.data != nullptr;
  const ScanOperand& delta_operand = raw_delta ? args.delta_raw : args.delta;
  const auto* delta = static_cast<const float*>(delta_operand.data) +
                      batch * delta_operand.batch_stride + io_channel;
  const auto* delta_raw = static_cast<const Storage*>(delta_operand.data) +
                          batch * delta_operand.batch_stride + io_channel;
  const float delta_bias =
      io_real && args.delta_bias.data != nullptr ? ParameterAt<Element>(args.delta_bias, io_channel) : 0.0f;
  const auto* gate = static_cast<const Storage*>(args.gate.data) +
                     batch * args.gate.batch_stride + io_channel;
  const int64_t output_offset = batch * seq_len * inner + io_channel;
  float* output = args.output != nullptr ? args.output + output_offset : nullptr;
  Storage* output_rounded =
      args.output_rounded != nullptr ? static_cast<Storage*>(args.output_rounded) + output_offset
                                     : nullptr;

  // Load role for B and C: state `proj_state`, steps proj_step + k * rows.
  const int proj_state = thread % Tile::kStates;
  const int proj_step = thread / Tile::kStates;
  const bool proj_real = proj_state < state_size;
  const auto* b_proj = static_cast<const Storage*>(args.b_proj.data) +
                       batch * args.b_proj.batch_stride + proj_state;
  const auto* c_proj = static_cast<const Storage*>(args.c_proj.data) +
                       batch * args.c_proj.batch_stride + proj_state;

  // Next chunk's raw inputs, then the current chunk's x and z for y.
  float next_delta[Tile::kChannelLoads];
  Storage next_delta_raw[Tile::kChannelLoads];
  Storage next_hidden[Tile::kChannelLoads];
  Storage next_gate[Tile::kChannelLoads];
  Storage next_b[Tile::kStateLoads];
  Storage next_c[Tile::kStateLoads];
  float hidden_now[Tile::kChannelLoads];
  float gate_now[Tile::kChannelLoads];

  auto load_chunk = [&](int64_t chunk_start) {
#pragma unroll
    for (int k = 0; k < Tile::kChannelLoads; ++k) {
      const int64_t step = chunk_start + load_step + k * Tile::kChannelRowsPerPass;
      const bool real = io_real && step < seq_len;
      // Read once: streaming loads, so they do not push B/C out of L2.
      if (raw_delta) {
        next_delta_raw[k] = real ? __ldcs(delta_raw + step * delta_operand.time_stride)
                                 : Element::NegativeInfinity();
      } else {
        next_delta[k] = real ? __ldcs(delta + step * delta_operand.time_stride) : 0.0f;
      }
      next_hidden[k] = real ? __ldcs(hidden + step * args.hidden.time_stride) : Storage(0);
      next_gate[k] = real ? __ldcs(gate + step * args.gate.time_stride) : Storage(0);
    }
#pragma unroll
    for (int k = 0; k < Tile::kStateLoads; ++k) {
      const int64_t step = chunk_start + proj_step + k * Tile::kStateRowsPerPass;
      const bool real = proj_real && step < seq_len;
      // Every block of the batch row reads the same B and C: cached loads.
      next_b[k] = real ? __ldg(b_proj + step * args.b_proj.time_stride) : Storage(0);
      next_c[k] = real ? __ldg(c_proj + step * args.c_proj.time_stride) : Storage(0);
    }
  };

  // One prefetch per (row, operand) of a chunk's x, Δ, z strip: no
  // registers, no waiting; the register loads a chunk later then hit L2.
  // (An option, off by default: docs/results.md.)
  auto prefetch_chunk = [&](int64_t chunk_start) {
    const auto* hidden_strip = static_cast<const Storage*>(args.hidden.data) +
                               batch * args.hidden.batch_stride + first_channel;
    const auto* delta_strip = static_cast<const float*>(args.delta.data) +
                              batch * args.delta.batch_stride + first_channel;  // float32 Δ only
    const auto* gate_strip = static_cast<const Storage*>(args.gate.data) +
                             batch * args.gate.batch_stride + first_channel;
    for (int row = thread; row < 3 * kSteps; row += Tile::kThreads) {
      const int64_t step = chunk_start + row % kSteps;
      if (step >= seq_len) continue;
      const void* address = nullptr;
      if (row < kSteps) {
        address = hidden_strip + step * args.hidden.time_stride;
      } else if (row < 2 * kSteps) {
        address = delta_strip + step * args.delta.time_stride;
      } else {
        address = gate_strip + step * args.gate.time_stride;
      }
      asm volatile("prefetch.global.L2 [%0];" ::"l"(address));
    }
  };

  auto stage_chunk = [&]() {
#pragma unroll
    for (int k = 0; k < Tile::kChannelLoads; ++k) {
      const int step = load_step + k * Tile::kChannelRowsPerPass;
      const float x = Element::ToFloat(next_hidden[k]);
      const float step_delta =
          raw_delta ? SoftplusDelta<Element>(Element::ToFloat(next_delta_raw[k]), delta_bias)
                    : next_delta[k];
      step_inputs[load_channel][step] = make_float2(step_delta, step_delta * x);
      hidden_now[k] = x;
      gate_now[k] = Element::ToFloat(next_gate[k]);
    }
#pragma unroll
    for (int k = 0; k < Tile::kStateLoads; ++k) {
      const int step = proj_step + k * Tile::kStateRowsPerPass;
      projections[proj_state][step] =
          make_float2(Element::ToFloat(next_b[k]), Element::ToFloat(next_c[k]));
    }
  };

  if constexpr (kPrefetchL2) prefetch_chunk(kSteps);
  load_chunk(0);
  for (int64_t chunk_start = 0; chunk_start < seq_len; chunk_start += kSteps) {
    stage_chunk();
    __syncthreads();
    if (chunk_start + kSteps < seq_len) load_chunk(chunk_start + kSteps);
    if constexpr (kPrefetchL2) {
      if (chunk_start + 2 * kSteps < seq_len) prefetch_chunk(chunk_start + 2 * kSteps);
    }

    // The recurrence, kLanes steps per butterfly group. Unrolled, a group's
    // butterfly can overlap the next group's loads and exps, at the price of
    // registers (occupancy).
#pragma unroll(kUnrollGroups ? kSteps / kLanes : 1)
    for (int group = 0; group < kSteps / kLanes; ++group) {
      float partial[kLanes];
#pragma unroll
      for (int first = 0; first < kLanes; first += kBatch) {
        const int base = group * kLanes + first;
        // Phase 1: shared loads. {Δ_t, Δ_t x_t, Δ_t+1, Δ_t+1 x_t+1} of the
        // channel; {B_t, C_t, B_t+1, C_t+1} of state lane + s * kLanes.
        float4 inputs[kBatch / 2];
        float4 proj[kBatch / 2][kStatesPerThread];
#pragma unroll
        for (int pair = 0; pair < kBatch / 2; ++pair) {
          inputs[pair] =
              *reinterpret_cast<const float4*>(&step_inputs[scan_channel][base + 2 * pair]);
#pragma unroll
          for (int s = 0; s < kStatesPerThread; ++s) {
            proj[pair][s] =
                *reinterpret_cast<const float4*>(&projections[lane + s * kLanes][base + 2 * pair]);
          }
        }
        // Phase 2: decays exp(Δ A), none of which depends on the state.
        float decay[kBatch][kStatesPerThread];
#pragma unroll
        for (int pair = 0; pair < kBatch / 2; ++pair) {
#pragma unroll
          for (int s = 0; s < kStatesPerThread; ++s) {
            decay[2 * pair][s] = Exp2Unit(inputs[pair].x * decay_rate[s]);
            decay[2 * pair + 1][s] = Exp2Unit(inputs[pair].z * decay_rate[s]);
          }
        }
        // Phase 3: h_t = decay h_t-1 + Δ x B, partial C·h.
#pragma unroll
        for (int pair = 0; pair < kBatch / 2; ++pair) {
          float sum_even = 0.0f;
          float sum_odd = 0.0f;
#pragma unroll
          for (int s = 0; s < kStatesPerThread; ++s) {
            state[s] = fmaf(decay[2 * pair][s], state[s], inputs[pair].y * proj[pair][s].x);
            sum_even = fmaf(proj[pair][s].y, state[s], sum_even);
            state[s] = fmaf(decay[2 * pair + 1][s], state[s], inputs[pair].w * proj[pair][s].z);
            sum_odd = fmaf(proj[pair][s].w, state[s], sum_odd);
          }
          partial[first + 2 * pair] = sum_even;
          partial[first + 2 * pair + 1] = sum_odd;
        }
      }
      scan_sums[group * kLanes + lane][scan_channel] = TransposeSum(partial, lane);
    }
    __syncthreads();

    // y = (C·h + D x) · silu(z), one row of channels per pass.
#pragma unroll
    for (int k = 0; k < Tile::kChannelLoads; ++k) {
      const int step = load_step + k * Tile::kChannelRowsPerPass;
      if (io_real && chunk_start + step < seq_len) {
        const float scan = scan_sums[step][load_channel];
        const float y = (scan + skip * hidden_now[k]) * Silu(gate_now[k]);
        if (output_rounded != nullptr) {
          __stcs(output_rounded + (chunk_start + step) * inner, Element::FromFloat(y));
        } else {
          __stcs(output + (chunk_start + step) * inner, y);
        }
      }
    }
  }

  if (args.state_out != nullptr) {
#pragma unroll
    for (int s = 0; s < kStatesPerThread; ++s) {
      const int64_t n = lane + s * kLanes;
      if (channel < inner && n < state_size) args.state_out[state_row + n] = state[s];
    }
  }
}

// One compiled kernel shape.
template <int kStatesPerThread, int kLanes, int kChannelsPerBlock, bool kUnrollGroups,
          bool kPrefetchL2>
struct CompiledShape {
  static bool Matches(const ScanKernelShape& shape, int lanes) {
    return shape.states_per_thread == kStatesPerThread && lanes == kLanes &&
           shape.channels_per_block == kChannelsPerBlock &&
           shape.unroll_groups == kUnrollGroups && shape.prefetch_l2 == kPrefetchL2;
  }

  template <class Element>
  static int Launch(const ScanLaunchArgs& args, cudaStream_t stream) {
    const dim3 grid(static_cast<unsigned int>((args.inner + kChannelsPerBlock - 1) /
                                              kChannelsPerBlock),
                    static_cast<unsigned int>(args.batch));
    SelectiveScanKernel<Element, kStatesPerThread, kLanes, kChannelsPerBlock, kUnrollGroups,
                        kPrefetchL2><<<grid, kLanes * kChannelsPerBlock, 0, stream>>>(args);
    return static_cast<int>(cudaGetLastError());
  }
};

template <class... Shapes>
struct ShapeList {};

// The engine's shapes (DefaultScanKernelShape), every element type: 1, 2 or
// 4 states per thread, every lane count N <= 64 needs.
using EngineShapes =
    ShapeList<CompiledShape<1, 4, 16, false, false>, CompiledShape<1, 8, 16, false, false>,
              CompiledShape<1, 16, 16, false, false>, CompiledShape<1, 32, 16, false, false>,
              CompiledShape<2, 4, 16, false, false>, CompiledShape<2, 8, 16, false, false>,
              CompiledShape<2, 16, 16, false, false>, CompiledShape<2, 32, 16, false, false>,
              CompiledShape<4, 4, 16, false, false>, CompiledShape<4, 8, 16, false, false>,
              CompiledShape<4, 16, 16, false, false>>;

// Alternatives for 8 < N <= 16 that the bench compares, float32 and
// bfloat16 only: other block widths, unrolled groups, L2 prefetch.
using BenchShapes =
    ShapeList<CompiledShape<1, 16, 8, false, true>, CompiledShape<2, 8, 8, false, true>,
              CompiledShape<4, 4, 32, false, true>, CompiledShape<1, 16, 16, true, true>,
              CompiledShape<2, 8, 16, true, true>, CompiledShape<1, 16, 16, false, true>,
              CompiledShape<2, 8, 16, false, true>, CompiledShape<4, 4, 16, false, true>>;

constexpr int kNotCompiled = -1;

template <class Element, class... Shapes>
int LaunchFrom(ShapeList<Shapes...>, const ScanLaunchArgs& args, const ScanKernelShape& shape,
               int lanes, cudaStream_t stream) {
  int status = kNotCompiled;
  const bool found =
      ((Shapes::Matches(shape, lanes)
            ? (status = Shapes::template Launch<Element>(args, stream), true)
            : false) ||
       ...);
  return found ? status : kNotCompiled;
}

template <class... Shapes>
bool CompiledIn(ShapeList<Shapes...>, const ScanKernelShape& shape, int lanes) {
  return (Shapes::Matches(shape, lanes) || ...);
}

template <class Element>
int LaunchAnyShape(const ScanLaunchArgs& args, const ScanKernelShape& shape, int lanes,
                   cudaStream_t stream) {
  int status = LaunchFrom<Element>(EngineShapes{}, args, shape, lanes, stream);
  if constexpr (!std::is_same_v<Element, cuda_elements::Float16Element>) {
    if (status == kNotCompiled) {
      status = LaunchFrom<Element>(BenchShapes{}, args, shape, lanes, stream);
    }
  }
  return status;
}

// Lanes per channel for N states at states_per_thread each: a power of two
// (the butterfly), at least 4 (two steps per load, whole warps).
int LanesFor(int64_t state_size, int states_per_thread) {
  const int64_t needed = (state_size + states_per_thread - 1) / states_per_thread;
  int lanes = 4;
  while (lanes < needed) lanes *= 2;
  return lanes;
}

}  // namespace

ScanKernelShape DefaultScanKernelShape(int64_t batch, int64_t inner, int64_t state_size,
                                       int multiprocessors) {
  // The most states per thread that still leaves about 8 warps per SM:
  // fewer lanes per channel cost fewer shuffles and shared loads per state,
  // but batch 1 of a small model needs every thread it can get
  // (bench/scan_bench.cu times every shape; docs/results.md).
  const int64_t wanted_threads = int64_t{multiprocessors} * 8 * 32;
  ScanKernelShape shape;
  shape.channels_per_block = 16;
  shape.unroll_groups = false;
  shape.prefetch_l2 = false;
  shape.states_per_thread = 1;
  for (int states_per_thread : {4, 2}) {
    if (batch * inner * LanesFor(state_size, states_per_thread) >= wanted_threads) {
      shape.states_per_thread = states_per_thread;
      break;
    }
  }
  // N > 32 needs 2 states per thread at least (32 lanes at most).
  while (LanesFor(state_size, shape.states_per_thread) > 32) shape.states_per_thread *= 2;
  return shape;
}

bool ScanKernelShapeAvailable(const ScanKernelShape& shape, int64_t state_size,
                              ScanElementType element_type) {
  if (state_size < 1 || state_size > kMaxCudaStateSize || shape.states_per_thread < 1) {
    return false;
  }
  const int lanes = LanesFor(state_size, shape.states_per_thread);
  if (CompiledIn(EngineShapes{}, shape, lanes)) return true;
  return element_type != ScanElementType::kFloat16 && CompiledIn(BenchShapes{}, shape, lanes);
}

int LaunchSelectiveScan(const ScanLaunchArgs& args, void* stream) {
  // One step of time (a decode step): selective_state_step.cu.
  if (args.seq_len == 1) return LaunchSelectiveStateStep(args, stream);
  int device = 0;
  int multiprocessors = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess) {
    status = cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device);
  }
  if (status != cudaSuccess) return static_cast<int>(status);
  return LaunchSelectiveScan(
      args, DefaultScanKernelShape(args.batch, args.inner, args.state_size, multiprocessors),
      stream);
}

int LaunchSelectiveScan(const ScanLaunchArgs& args, const ScanKernelShape& shape,
                        void* stream) {
  const int invalid = static_cast<int>(cudaErrorInvalidValue);
  if (args.batch < 1 || args.batch > 65535 || args.seq_len < 1 || args.inner < 1 ||
      args.inner > (int64_t{1} << 31) - 1 || args.state_size < 1 ||
      args.state_size > kMaxCudaStateSize) {
    return invalid;
  }
  if (args.hidden.data == nullptr || args.gate.data == nullptr || args.b_proj.data == nullptr ||
      args.c_proj.data == nullptr || (args.a_decay == nullptr) == (args.a_log.data == nullptr) ||
      args.d_skip.data == nullptr) {
    return invalid;
  }
  // Exactly one Δ (float32, or raw; dt_proj's product only in one step)
  // and exactly one y; L2 prefetch reads float32 Δ only.
  const bool raw_delta = args.delta_raw.data != nullptr;
  if (raw_delta == (args.delta.data != nullptr) || args.delta_proj_weight != nullptr ||
      (args.output == nullptr) == (args.output_rounded == nullptr) ||
      (raw_delta && shape.prefetch_l2)) {
    return invalid;
  }
  if (!ScanKernelShapeAvailable(shape, args.state_size, args.element_type)) return invalid;
  const int lanes = LanesFor(args.state_size, shape.states_per_thread);
  auto* cuda_stream = static_cast<cudaStream_t>(stream);
  const int status = cuda_elements::ForElementType(args.element_type, [&](auto element) {
    return LaunchAnyShape<decltype(element)>(args, shape, lanes, cuda_stream);
  });
  return status == kNotCompiled ? invalid : status;
}

const char* ScanLaunchErrorString(int status) {
  return cudaGetErrorString(static_cast<cudaError_t>(status));
}

int ScanLaunchNoKernelImageStatus() { return static_cast<int>(cudaErrorNoKernelImageForDevice); }

}  // namespace icd::scan
