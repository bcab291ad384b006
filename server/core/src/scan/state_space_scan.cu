// icd's Mamba-2 scan on CUDA (contract: state_space_scan.h; launch
// interface: state_space_scan_launch.h). No LibTorch here.
//
// The recurrence, one step after another, as the CPU's StateSpaceScanLoop.
// Mamba-2's decay is one exp per head and step (Mamba-1's is one per state),
// so per state and step what is left is a multiply and two FMAs; with
// thousands of rows of states side by side the GPU is busy without the
// chunked form's matrix products (docs/mamba2-scan.md).
//
// Work split. A block owns kRows rows p of one head h of one batch row; a
// row's N states are spread over kLanes lanes, kPairs pairs of states each,
// and a thread holds kRowsPerThread rows (1, or 2 in the tile that halves
// the shared-memory reads per state and step: WideTileFor).
// Time goes in chunks of kSteps: the block stages the chunk's B and C (a
// float4 per pair of states, {B_n, C_n, B_n+1, C_n+1}, so that lane j reads
// pair j + k·kLanes without bank conflicts), Δ, exp(Δ A_h) and x in shared
// memory; each thread advances its states through the chunk, and the
// per-step partial sums of C·S are combined by the transposing butterfly
// (scan_math.cuh) every kLanes steps; y = C·S + D x goes out in rows.
//
// Padding is inert: steps past L have Δ = 0 (decay 1, drive 0), states past
// N have B = C = 0, rows past P have x = 0 and keep no state.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "scan/dependent_launch.cuh"
#include "scan/element_types.cuh"
#include "scan/scan_math.cuh"
#include "scan/state_space_delta.cuh"
#include "scan/state_space_scan_launch.h"

namespace icd::scan {
namespace {

using cuda_elements::RoundTo;

constexpr int kSteps = 32;

// kRows rows per block, kRowsPerThread of them per thread (each B and C
// value a thread reads from shared memory then serves that many rows).
template <int kLanes, int kPairs, int kRows, int kRowsPerThread>
struct StateSpaceTile {
  static constexpr int kRowGroups = kRows / kRowsPerThread;
  static constexpr int kThreads = kLanes * kRowGroups;
  static constexpr int kPairsPerStep = kLanes * kPairs;  // N / 2, padded
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps: shuffles use a full mask");
  static_assert(kLanes >= 2 && kLanes <= 32 && (kLanes & (kLanes - 1)) == 0);
  static_assert(kSteps % kLanes == 0 && kRows % kRowsPerThread == 0);
  static_assert(2 * kPairsPerStep <= kMaxCudaStateSpaceStateSize);
  static_assert(kSteps * kPairsPerStep % kThreads == 0 && kSteps * kRows % kThreads == 0,
                "each thread stages as many values as the next");
};

// Two consecutive states' B (or C) values, n and n + 1 (n even), as loaded:
// one 4-byte (8-byte for float32) load where the operand is aligned for it,
// else two; zeros past N.
template <class Element>
struct StatePairs {
  using Storage = typename Element::Storage;
  using Raw = std::conditional_t<sizeof(Storage) == 2, unsigned int, float2>;

  static __device__ __forceinline__ Raw Load(const Storage* row, int64_t n, int64_t state_size,
                                             bool paired) {
    if (paired) return __ldg(reinterpret_cast<const Raw*>(row + n));
    const Storage low = __ldg(row + n);
    const Storage high = n + 1 < state_size ? __ldg(row + n + 1) : Storage(0);
    if constexpr (sizeof(Storage) == 2) {
      return static_cast<unsigned int>(low) | (static_cast<unsigned int>(high) << 16);
    } else {
      return make_float2(low, high);
    }
  }

  static __device__ __forceinline__ float2 Unpack(Raw raw) {
    if constexpr (sizeof(Storage) == 2) {
      return make_float2(Element::ToFloat(static_cast<Storage>(raw & 0xffffu)),
                         Element::ToFloat(static_cast<Storage>(raw >> 16)));
    } else {
      return raw;
    }
  }

  // Whether every row's pairs are aligned for one load: N even, and the
  // operand's start and strides whole pairs.
  static __device__ __forceinline__ bool Aligned(const ScanOperand& operand, int64_t state_size) {
    return state_size % 2 == 0 && operand.batch_stride % 2 == 0 && operand.time_stride % 2 == 0 &&
           reinterpret_cast<uintptr_t>(operand.data) % sizeof(Raw) == 0;
  }
};

// Five blocks per multiprocessor for 2-byte elements and a row per thread: a
// 2.7b-shaped layer's 640 blocks of 16 lanes then run in one wave on an H100
// / H200 (132 SMs).
template <class Element, int kRowsPerThread>
constexpr int kMinBlocks = sizeof(typename Element::Storage) == 2 && kRowsPerThread == 1 ? 5 : 1;

template <class Element, int kLanes, int kPairs, int kRows, int kRowsPerThread>
__global__ void __launch_bounds__(kLanes* kRows / kRowsPerThread,
                                  kMinBlocks<Element, kRowsPerThread>)
    StateSpaceScanKernel(const StateSpaceScanLaunchArgs args) {
  using Tile = StateSpaceTile<kLanes, kPairs, kRows, kRowsPerThread>;
  using Storage = typename Element::Storage;
  using Pairs = StatePairs<Element>;
  constexpr int kProjectionLoads = kSteps * Tile::kPairsPerStep / Tile::kThreads;
  constexpr int kInputLoads = kSteps * kRows / Tile::kThreads;
  __shared__ float4 projections[kSteps][Tile::kPairsPerStep];  // {B_n, C_n, B_n+1, C_n+1}
  __shared__ float deltas[kSteps];
  __shared__ float decays[kSteps];                 // exp(Δ A_h)
  __shared__ float inputs[kSteps][kRows];          // x
  __shared__ float outputs[kSteps][kRows + 1];     // C·S

  const int thread = static_cast<int>(threadIdx.x);
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t head = blockIdx.y;
  const int64_t batch = blockIdx.z;
  const int64_t heads = args.heads;
  const int64_t head_dim = args.head_dim;
  const int64_t state_size = args.state_size;
  const int64_t seq_len = args.seq_len;
  const int64_t group = head / (heads / args.groups);

  // Scan role: states 2(lane + k·kLanes) and the next one, k < kPairs, of
  // rows group + r·kRowGroups, r < kRowsPerThread.
  const int lane = thread % kLanes;
  const int row_group = thread / kLanes;
  auto row_of = [&](int r) { return row_group + r * Tile::kRowGroups; };
  auto state_row_of = [&](int r) {  // [B, H, P, N]
    return ((batch * heads + head) * head_dim + first_row + row_of(r)) * state_size;
  };
  dependent_launch::WaitForPrerequisites();  // every input comes from the kernels before
  dependent_launch::AllowDependents();
  const float a_decay = DecayRateOf<Element>(args, head);
  float state[kRowsPerThread][2 * kPairs];
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
    const bool row_real = first_row + row_of(r) < head_dim;
#pragma unroll
    for (int s = 0; s < 2 * kPairs; ++s) {
      const int64_t n = 2 * (lane + (s / 2) * kLanes) + s % 2;
      state[r][s] = row_real && n < state_size && args.state_in != nullptr
                        ? args.state_in[state_row_of(r) + n]
                        : 0.0f;
    }
  }

  const auto* hidden = static_cast<const Storage*>(args.hidden.data) +
                       batch * args.hidden.batch_stride + head * head_dim + first_row;
  const auto* b_proj = static_cast<const Storage*>(args.b_proj.data) +
                       batch * args.b_proj.batch_stride + group * state_size;
  const auto* c_proj = static_cast<const Storage*>(args.c_proj.data) +
                       batch * args.c_proj.batch_stride + group * state_size;
  const int64_t output_row = heads * head_dim;  // y [B, L, H·P]
  float* output = args.output + batch * seq_len * output_row + head * head_dim + first_row;
  const bool paired =
      Pairs::Aligned(args.b_proj, state_size) && Pairs::Aligned(args.c_proj, state_size);

  for (int64_t chunk_start = 0; chunk_start < seq_len; chunk_start += kSteps) {
    const int steps = static_cast<int>(seq_len - chunk_start < kSteps ? seq_len - chunk_start
                                                                       : kSteps);
    // Stage the chunk: every load issued first, then the conversions and
    // stores, so that a block waits for memory once per chunk. B and C are
    // read by every block of the group: cached loads.
    typename Pairs::Raw b_raw[kProjectionLoads];
    typename Pairs::Raw c_raw[kProjectionLoads];
#pragma unroll
    for (int k = 0; k < kProjectionLoads; ++k) {
      const int i = thread + k * Tile::kThreads;
      const int t = i / Tile::kPairsPerStep;
      const int64_t n = 2 * static_cast<int64_t>(i % Tile::kPairsPerStep);
      const bool real = t < steps && n < state_size;
      b_raw[k] = real ? Pairs::Load(b_proj + (chunk_start + t) * args.b_proj.time_stride, n,
                                    state_size, paired)
                      : typename Pairs::Raw{};
      c_raw[k] = real ? Pairs::Load(c_proj + (chunk_start + t) * args.c_proj.time_stride, n,
                                    state_size, paired)
                      : typename Pairs::Raw{};
    }
    Storage x_raw[kInputLoads];
#pragma unroll
    for (int k = 0; k < kInputLoads; ++k) {
      const int i = thread + k * Tile::kThreads;
      const int t = i / kRows;
      const int r = i % kRows;
      const bool real = t < steps && first_row + r < head_dim;
      x_raw[k] = real ? __ldcs(hidden + (chunk_start + t) * args.hidden.time_stride + r) : Storage(0);
    }
    const float delta =
        thread < steps ? DeltaAt<Element>(args, batch, chunk_start + thread, head) : 0.0f;
#pragma unroll
    for (int k = 0; k < kProjectionLoads; ++k) {
      const int i = thread + k * Tile::kThreads;
      const float2 b_pair = Pairs::Unpack(b_raw[k]);
      const float2 c_pair = Pairs::Unpack(c_raw[k]);
      projections[i / Tile::kPairsPerStep][i % Tile::kPairsPerStep] =
          make_float4(b_pair.x, c_pair.x, b_pair.y, c_pair.y);
    }
#pragma unroll
    for (int k = 0; k < kInputLoads; ++k) {
      const int i = thread + k * Tile::kThreads;
      inputs[i / kRows][i % kRows] = Element::ToFloat(x_raw[k]);
    }
    if (thread < kSteps) {
      deltas[thread] = delta;
      decays[thread] = thread < steps ? expf(delta * a_decay) : 1.0f;
    }
    __syncthreads();

    for (int first = 0; first < steps; first += kLanes) {
      float sums[kRowsPerThread][kLanes];
#pragma unroll
      for (int j = 0; j < kLanes; ++j) {
        const int t = first + j;
        const float decay = decays[t];
        float drive[kRowsPerThread];  // Δ x
        float sum[kRowsPerThread];
#pragma unroll
        for (int r = 0; r < kRowsPerThread; ++r) {
          drive[r] = deltas[t] * inputs[t][row_of(r)];
          sum[r] = 0.0f;
        }
#pragma unroll
        for (int k = 0; k < kPairs; ++k) {
          const float4 values = projections[t][lane + k * kLanes];
#pragma unroll
          for (int r = 0; r < kRowsPerThread; ++r) {
            state[r][2 * k] = fmaf(state[r][2 * k], decay, drive[r] * values.x);
            sum[r] = fmaf(state[r][2 * k], values.y, sum[r]);
            state[r][2 * k + 1] = fmaf(state[r][2 * k + 1], decay, drive[r] * values.z);
            sum[r] = fmaf(state[r][2 * k + 1], values.w, sum[r]);
          }
        }
#pragma unroll
        for (int r = 0; r < kRowsPerThread; ++r) sums[r][j] = sum[r];
      }
#pragma unroll
      for (int r = 0; r < kRowsPerThread; ++r) {
        outputs[first + lane][row_of(r)] = TransposeSum(sums[r], lane);
      }
    }
    __syncthreads();

    for (int i = thread; i < steps * kRows; i += Tile::kThreads) {
      const int t = i / kRows;
      const int r = i % kRows;
      const int64_t channel_row = first_row + r;
      if (channel_row >= head_dim) continue;
      float y = outputs[t][r];
      if (args.skip.data != nullptr) y = fmaf(SkipOf<Element>(args, head, channel_row), inputs[t][r], y);
      __stcs(output + (chunk_start + t) * output_row + r, y);
    }
    __syncthreads();  // the next chunk's staging writes over `inputs`
  }

  if (args.state_out == nullptr) return;
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
    if (first_row + row_of(r) >= head_dim) continue;
#pragma unroll
    for (int s = 0; s < 2 * kPairs; ++s) {
      const int64_t n = 2 * (lane + (s / 2) * kLanes) + s % 2;
      if (n < state_size) args.state_out[state_row_of(r) + n] = state[r][s];
    }
  }
}

template <class Element, int kLanes, int kPairs, int kRows, int kRowsPerThread = 1>
int LaunchTile(const StateSpaceScanLaunchArgs& args, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned int>((args.head_dim + kRows - 1) / kRows),
                  static_cast<unsigned int>(args.heads), static_cast<unsigned int>(args.batch));
  return static_cast<int>(dependent_launch::LaunchDependent(
      StateSpaceScanKernel<Element, kLanes, kPairs, kRows, kRowsPerThread>, grid,
      kLanes * kRows / kRowsPerThread, stream, args));
}

// The tiles for N from 65 to 128: 16 lanes of 4 pairs, a row per thread; 32
// lanes of 2 pairs (twice the threads, for small layers); 8 lanes of 8 pairs
// and two rows per thread (half the shared-memory reads per state and step).
enum class WideTile { kLanes16, kLanes32, kTwoRows };

// ICD_STATE_SPACE_TILE=16, 32 or 8x2 forces one (for measuring them in one
// build); otherwise 32 lanes where 16 would leave the GPU with fewer than
// about four blocks per multiprocessor, else 16. The two-row tile is not
// chosen by default until it is measured.
WideTile WideTileFor(const StateSpaceScanLaunchArgs& args) {
  static const char* forced = std::getenv("ICD_STATE_SPACE_TILE");
  if (forced != nullptr) {
    if (std::strcmp(forced, "16") == 0) return WideTile::kLanes16;
    if (std::strcmp(forced, "32") == 0) return WideTile::kLanes32;
    if (std::strcmp(forced, "8x2") == 0) return WideTile::kTwoRows;
  }
  int device = 0;
  int multiprocessors = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device) !=
          cudaSuccess) {
    (void)cudaGetLastError();
    return WideTile::kLanes16;
  }
  const int64_t blocks = args.batch * args.heads * ((args.head_dim + 7) / 8);
  return blocks < 4 * static_cast<int64_t>(multiprocessors) ? WideTile::kLanes32
                                                            : WideTile::kLanes16;
}

// The tile by N: pairs of states per lane and lanes per row.
template <class Element>
int LaunchElement(const StateSpaceScanLaunchArgs& args, cudaStream_t stream) {
  const int64_t pairs = (args.state_size + 1) / 2;
  if (pairs <= 4) return LaunchTile<Element, 4, 1, 32>(args, stream);
  if (pairs <= 8) return LaunchTile<Element, 8, 1, 16>(args, stream);
  if (pairs <= 16) return LaunchTile<Element, 8, 2, 16>(args, stream);
  if (pairs <= 32) return LaunchTile<Element, 16, 2, 8>(args, stream);
  switch (WideTileFor(args)) {
    case WideTile::kLanes32: return LaunchTile<Element, 32, 2, 4>(args, stream);
    case WideTile::kTwoRows: return LaunchTile<Element, 8, 8, 32, 2>(args, stream);
    case WideTile::kLanes16: break;
  }
  return LaunchTile<Element, 16, 4, 8>(args, stream);
}

}  // namespace

int LaunchStateSpaceScan(const StateSpaceScanLaunchArgs& args, void* stream) {
  const int sources = (args.delta.data != nullptr) + (args.time_step.data != nullptr);
  if (args.batch < 1 || args.batch > 65535 || args.seq_len < 1 || args.heads < 1 ||
      args.heads > 65535 || args.head_dim < 1 || args.groups < 1 ||
      args.heads % args.groups != 0 || args.state_size < 1 ||
      args.state_size > kMaxCudaStateSpaceStateSize || args.hidden.data == nullptr ||
      args.b_proj.data == nullptr || args.c_proj.data == nullptr ||
      (args.a_decay == nullptr) == (args.a_log.data == nullptr) ||
      args.output == nullptr || sources != 1) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  switch (StateSpaceFormFor(args)) {
    case StateSpaceForm::kChunked: return LaunchStateSpaceChunked(args, stream);
    case StateSpaceForm::kStep: return LaunchStateSpaceStep(args, stream);
    default: break;
  }
  auto* cuda_stream = static_cast<cudaStream_t>(stream);
  return cuda_elements::ForElementType(args.element_type, [&](auto element) {
    return LaunchElement<decltype(element)>(args, cuda_stream);
  });
}

}  // namespace icd::scan
