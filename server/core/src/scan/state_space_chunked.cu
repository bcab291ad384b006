// Mamba-2's scan in the chunked form of the state-space duality (Mamba-2
// paper §6), on tensor cores: the CUDA counterpart of StateSpaceScanChunked
// (state_space_scan.cc), for bfloat16 x, B and C. Contract:
// state_space_scan.h; launch interface: state_space_scan_launch.h.
//
// For a head h and a chunk of Q steps with decay terms a_t = Δ_t A_h and the
// segment sums seg(t, s) = a_{s+1} + … + a_t:
//   y_t = Σ_{s≤t} (C_t·B_s) exp(seg(t, s)) Δ_s x_s      within the chunk
//       + exp(a_0 + … + a_t) S_start C_t                 the state it enters with
//       + D x_t,
//   S_end = exp(a_0 + … + a_{Q-1}) S_start + Σ_s exp(seg(Q-1, s)) Δ_s x_s B_sᵀ.
// Three kernels: ChunkStateKernel (every chunk's own Σ term, in parallel),
// StatePassingKernel (the short recurrence over chunks, which leaves each
// chunk's S_start in the workspace) and ChunkOutputKernel (y, in parallel).
//
// Precision. The products run on bfloat16 tensor cores with float32
// accumulation. B, C and x are bfloat16 already and enter exactly; the
// operands computed here (the gains (C·B) exp(seg) Δ, the weighted inputs
// exp(seg) Δ x, and S_start) enter as a pair of bfloat16 values, high and
// low, whose sum holds 16 bits of the float32 value, in two products. Every
// decay is the exponential of a segment's own sum of terms of one sign,
// never a difference of running sums, as in StateSpaceScanChunked.
//
// Padding is inert: steps past L have Δ = 0 (decay 1, no drive) and B = C =
// x = 0, states past N have B = C = 0, rows past P have x = 0.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "scan/element_types.cuh"
#include "scan/state_space_delta.cuh"
#include "scan/state_space_scan_launch.h"

namespace icd::scan {
namespace {

namespace wmma = nvcuda::wmma;
using Element = cuda_elements::BFloat16Element;
using Bits = unsigned short;  // a bfloat16 as stored
using Bf16 = __nv_bfloat16;

constexpr int kChunk = 64;    // Q, steps per chunk
constexpr int kRowTile = 64;  // rows p of a head per block
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 16;     // the MMA's m = n = k
constexpr int kPad = 8;       // bfloat16 row padding: 16 bytes, rows start in other banks

using AFragment = wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, Bf16, wmma::row_major>;
using ATransposed = wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, Bf16, wmma::col_major>;
using BFragment = wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, Bf16, wmma::row_major>;
using BTransposed = wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, Bf16, wmma::col_major>;
using Accumulator = wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float>;

// Row strides (in elements) of the staged operands, for kStates states (N
// padded to 32, 64 or 128).
template <int kStates>
struct Strides {
  static constexpr int kState = kStates + kPad;  // B, C, S rows (bfloat16)
  static constexpr int kRow = kRowTile + kPad;   // x and weighted-x rows (bfloat16)
  static constexpr int kGain = kChunk + kPad;    // gain rows (bfloat16)
  static constexpr int kFloat = kChunk + 4;      // C·B and y rows (float32)
  static_assert(kRowTile == kChunk, "C·B scores and y share a buffer");
};

__device__ __forceinline__ const Bf16* AsBf16(const Bits* bits) {
  return reinterpret_cast<const Bf16*>(bits);
}

// value ≈ high + low, each bfloat16, their sum within 2^-16 of value.
__device__ __forceinline__ void Split(float value, Bits* high, Bits* low) {
  const Bits top = Element::FromFloat(value);
  *high = top;
  *low = Element::FromFloat(value - Element::ToFloat(top));
}

// Two values split as above, packed: the high halves' pair and the low
// halves' pair, the first value in the low 16 bits (memory order).
struct SplitPair {
  unsigned int high, low;
};
__device__ __forceinline__ SplitPair SplitTwo(float first, float second) {
  Bits high[2], low[2];
  Split(first, &high[0], &low[0]);
  Split(second, &high[1], &low[1]);
  return {static_cast<unsigned int>(high[0]) | (static_cast<unsigned int>(high[1]) << 16),
          static_cast<unsigned int>(low[0]) | (static_cast<unsigned int>(low[1]) << 16)};
}

// Where a (batch, head, chunk, row tile) block's pieces are.
struct ChunkPlace {
  int64_t batch, head, chunk, row_tile, first_step, first_row, group;
  int steps;  // real steps in this chunk
};

__device__ __forceinline__ ChunkPlace PlaceOf(const StateSpaceScanLaunchArgs& args,
                                              int64_t row_tiles) {
  ChunkPlace place;
  place.chunk = blockIdx.x / row_tiles;
  place.row_tile = blockIdx.x % row_tiles;
  place.head = blockIdx.y;
  place.batch = blockIdx.z;
  place.first_step = place.chunk * kChunk;
  place.first_row = place.row_tile * kRowTile;
  place.group = place.head / (args.heads / args.groups);
  const int64_t left = args.seq_len - place.first_step;
  place.steps = static_cast<int>(left < kChunk ? left : kChunk);
  return place;
}

int64_t ChunksOf(int64_t seq_len) { return (seq_len + kChunk - 1) / kChunk; }
int64_t RowTilesOf(int64_t head_dim) { return (head_dim + kRowTile - 1) / kRowTile; }

// Workspace layout: the chunks' states [B, H, chunks, row_tiles·64,
// kStates] (each chunk's own Σ term, then overwritten with its S_start),
// then the chunks' decays exp(a_0 + … + a_{Q-1}) [B, H, chunks].
struct Workspace {
  int64_t chunks, row_tiles, states;
  __host__ __device__ int64_t StateFloats() const { return row_tiles * kRowTile * states; }
  __host__ __device__ int64_t StateIndex(int64_t batch, int64_t head, int64_t heads,
                                         int64_t chunk) const {
    return ((batch * heads + head) * chunks + chunk) * StateFloats();
  }
  __host__ __device__ int64_t DecayIndex(int64_t batches, int64_t heads) const {
    return batches * heads * chunks * StateFloats();
  }
};

// Stages Δ_t and a_t = Δ_t A_h of the block's chunk (zeros past L).
__device__ __forceinline__ void StageDecayTerms(const StateSpaceScanLaunchArgs& args,
                                                const ChunkPlace& place, float* delta,
                                                float* log_decay) {
  const int t = static_cast<int>(threadIdx.x);
  if (t < kChunk) {
    const float value =
        t < place.steps ? DeltaAt<Element>(args, place.batch, place.first_step + t, place.head)
                        : 0.0f;
    delta[t] = value;
    log_decay[t] = value * DecayRateOf<Element>(args, place.head);
  }
}

// Copies `kRows` rows of kColumns bfloat16 values (zeros past `real_rows`
// and `real_columns`), row r at source + r · row_stride, into `tile` (row
// stride kTileStride): in 16-byte pieces, every load issued before the
// first store, so that a block waits for memory once per operand; piece by
// piece in 2-byte loads where the source is not aligned for them.
template <int kRows, int kColumns, int kTileStride>
__device__ __forceinline__ void StageRows(const Bits* source, int64_t row_stride, int real_rows,
                                          int64_t real_columns, Bits* tile) {
  constexpr int kPieceColumns = 8;
  constexpr int kPiecesPerRow = kColumns / kPieceColumns;
  constexpr int kPieces = kRows * kPiecesPerRow;
  constexpr int kPerThread = (kPieces + kThreads - 1) / kThreads;
  static_assert(kColumns % kPieceColumns == 0 && kTileStride % kPieceColumns == 0);
  const bool aligned = real_columns % kPieceColumns == 0 && row_stride % kPieceColumns == 0 &&
                       reinterpret_cast<uintptr_t>(source) % 16 == 0;
  uint4 pieces[kPerThread];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int i = static_cast<int>(threadIdx.x) + k * kThreads;
    const int row = i / kPiecesPerRow;
    const int column = (i % kPiecesPerRow) * kPieceColumns;
    pieces[k] = make_uint4(0, 0, 0, 0);
    if (i >= kPieces || row >= real_rows || column >= real_columns) continue;
    const Bits* from = source + row * row_stride + column;
    if (aligned) {
      pieces[k] = __ldg(reinterpret_cast<const uint4*>(from));
      continue;
    }
    unsigned int words[4];
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const Bits low = column + 2 * w < real_columns ? __ldg(from + 2 * w) : Bits(0);
      const Bits high = column + 2 * w + 1 < real_columns ? __ldg(from + 2 * w + 1) : Bits(0);
      words[w] = static_cast<unsigned int>(low) | (static_cast<unsigned int>(high) << 16);
    }
    pieces[k] = make_uint4(words[0], words[1], words[2], words[3]);
  }
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int i = static_cast<int>(threadIdx.x) + k * kThreads;
    if (i >= kPieces) continue;
    *reinterpret_cast<uint4*>(tile + (i / kPiecesPerRow) * kTileStride +
                              (i % kPiecesPerRow) * kPieceColumns) = pieces[k];
  }
}

// The chunk's [Q, kStates] rows of B or C.
template <int kStates>
__device__ __forceinline__ void StageProjection(const ScanOperand& operand,
                                                const StateSpaceScanLaunchArgs& args,
                                                const ChunkPlace& place, Bits* tile) {
  const auto* source = static_cast<const Bits*>(operand.data) + place.batch * operand.batch_stride +
                       place.first_step * operand.time_stride + place.group * args.state_size;
  StageRows<kChunk, kStates, Strides<kStates>::kState>(source, operand.time_stride, place.steps,
                                                        args.state_size, tile);
}

// The chunk's x of the block's kRowTile rows, [Q, kRowTile].
template <int kStates>
__device__ __forceinline__ void StageInputs(const StateSpaceScanLaunchArgs& args,
                                            const ChunkPlace& place, Bits* tile) {
  const auto* source = static_cast<const Bits*>(args.hidden.data) +
                       place.batch * args.hidden.batch_stride +
                       place.first_step * args.hidden.time_stride + place.head * args.head_dim +
                       place.first_row;
  StageRows<kChunk, kRowTile, Strides<kStates>::kRow>(
      source, args.hidden.time_stride, place.steps, args.head_dim - place.first_row, tile);
}

// Each chunk's own contribution to the state it leaves,
//   Σ_s exp(seg(Q-1, s)) Δ_s x_s B_sᵀ   as [rows, kStates],
// into the workspace, and the chunk's decay (row tile 0).
template <int kStates>
__global__ void __launch_bounds__(kThreads)
    ChunkStateKernel(const StateSpaceScanLaunchArgs args, float* workspace, Workspace layout) {
  using S = Strides<kStates>;
  __shared__ __align__(32) Bits b_tile[kChunk * S::kState];
  __shared__ __align__(32) Bits x_tile[kChunk * S::kRow];
  __shared__ __align__(32) Bits drive_high[kChunk * S::kRow];  // exp(seg) Δ_s x_s[p], [s][p]
  __shared__ __align__(32) Bits drive_low[kChunk * S::kRow];
  __shared__ float delta[kChunk];
  __shared__ float log_decay[kChunk];
  __shared__ float weight[kChunk];

  const ChunkPlace place = PlaceOf(args, layout.row_tiles);
  const int thread = static_cast<int>(threadIdx.x);
  StageDecayTerms(args, place, delta, log_decay);
  StageProjection<kStates>(args.b_proj, args, place, b_tile);
  StageInputs<kStates>(args, place, x_tile);
  __syncthreads();

  if (thread < kChunk) {
    float segment = 0.0f;  // seg(Q-1, s) = a_{s+1} + … + a_{Q-1}
    for (int k = kChunk - 1; k > thread; --k) segment += log_decay[k];
    weight[thread] = expf(segment) * delta[thread];
  } else if (thread == kChunk && place.row_tile == 0) {
    float total = 0.0f;
    for (int k = 0; k < kChunk; ++k) total += log_decay[k];
    workspace[layout.DecayIndex(gridDim.z, args.heads) +
              (place.batch * args.heads + place.head) * layout.chunks + place.chunk] = expf(total);
  }
  __syncthreads();
  // Eight rows p a thread: one 16-byte load of x, two 16-byte stores.
  for (int i = thread; i < kChunk * kRowTile / 8; i += kThreads) {
    const int s = i / (kRowTile / 8);
    const int p = (i % (kRowTile / 8)) * 8;
    const uint4 x = *reinterpret_cast<const uint4*>(x_tile + s * S::kRow + p);
    const unsigned int words[4] = {x.x, x.y, x.z, x.w};
    unsigned int high[4], low[4];
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const SplitPair pair = SplitTwo(weight[s] * Element::ToFloat(Bits(words[w] & 0xffffu)),
                                      weight[s] * Element::ToFloat(Bits(words[w] >> 16)));
      high[w] = pair.high;
      low[w] = pair.low;
    }
    *reinterpret_cast<uint4*>(drive_high + s * S::kRow + p) =
        make_uint4(high[0], high[1], high[2], high[3]);
    *reinterpret_cast<uint4*>(drive_low + s * S::kRow + p) =
        make_uint4(low[0], low[1], low[2], low[3]);
  }
  __syncthreads();

  // [rows, kStates] = driveᵀ [rows, Q] · B [Q, kStates], tile by tile.
  constexpr int kRowTiles = kRowTile / kTile;
  constexpr int kStateTiles = kStates / kTile;
  float* out = workspace + layout.StateIndex(place.batch, place.head, args.heads, place.chunk) +
               place.first_row * kStates;
  const int warp = thread / 32;
  for (int tile = warp; tile < kRowTiles * kStateTiles; tile += kWarps) {
    const int row = (tile / kStateTiles) * kTile;
    const int state = (tile % kStateTiles) * kTile;
    Accumulator sum;
    wmma::fill_fragment(sum, 0.0f);
#pragma unroll
    for (int s = 0; s < kChunk; s += kTile) {
      BFragment b;
      wmma::load_matrix_sync(b, AsBf16(b_tile + s * S::kState + state), S::kState);
      ATransposed drive;
      wmma::load_matrix_sync(drive, AsBf16(drive_high + s * S::kRow + row), S::kRow);
      wmma::mma_sync(sum, drive, b, sum);
      wmma::load_matrix_sync(drive, AsBf16(drive_low + s * S::kRow + row), S::kRow);
      wmma::mma_sync(sum, drive, b, sum);
    }
    wmma::store_matrix_sync(out + row * kStates + state, sum, kStates, wmma::mem_row_major);
  }
}

// The recurrence over chunks, S_start(c+1) = decay(c) S_start(c) + own(c),
// four elements of a head's padded state per thread: each chunk's own term
// in the workspace is replaced by the state the chunk starts from; S_L to
// state_out. The chunks' loads go out kAhead at a time: a thread's chain
// of chunks is otherwise one memory latency per chunk.
template <int kStates>
__global__ void __launch_bounds__(kThreads)
    StatePassingKernel(const StateSpaceScanLaunchArgs args, float* workspace, Workspace layout) {
  const int64_t first_element = 4 * (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x);
  if (first_element >= layout.StateFloats()) return;
  const int64_t head = blockIdx.y;
  const int64_t batch = blockIdx.z;
  const int64_t p = first_element / kStates;
  const int64_t n = first_element % kStates;  // n .. n + 3, in one row (kStates % 4 == 0)
  const int64_t state_index =
      ((batch * args.heads + head) * args.head_dim + p) * args.state_size + n;
  auto real = [&](int k) { return p < args.head_dim && n + k < args.state_size; };
  float state[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    state[k] = real(k) && args.state_in != nullptr ? args.state_in[state_index + k] : 0.0f;
  }
  auto* own = reinterpret_cast<float4*>(workspace + layout.StateIndex(batch, head, args.heads, 0) +
                                        first_element);
  const int64_t chunk_stride = layout.StateFloats() / 4;  // in float4
  const float* decays = workspace + layout.DecayIndex(gridDim.z, args.heads) +
                        (batch * args.heads + head) * layout.chunks;
  constexpr int kAhead = 16;
  for (int64_t first = 0; first < layout.chunks; first += kAhead) {
    float4 terms[kAhead];
    float decay[kAhead];
#pragma unroll
    for (int k = 0; k < kAhead; ++k) {
      const bool inside = first + k < layout.chunks;
      terms[k] = inside ? __ldcs(own + (first + k) * chunk_stride) : make_float4(0, 0, 0, 0);
      decay[k] = inside ? decays[first + k] : 1.0f;
    }
#pragma unroll
    for (int k = 0; k < kAhead; ++k) {
      if (first + k < layout.chunks) {
        own[(first + k) * chunk_stride] = make_float4(state[0], state[1], state[2], state[3]);
      }
      state[0] = fmaf(decay[k], state[0], terms[k].x);
      state[1] = fmaf(decay[k], state[1], terms[k].y);
      state[2] = fmaf(decay[k], state[2], terms[k].z);
      state[3] = fmaf(decay[k], state[3], terms[k].w);
    }
  }
  if (args.state_out == nullptr) return;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (real(k)) args.state_out[state_index + k] = state[k];
  }
}

// Dynamic shared memory of ChunkOutputKernel, in bytes, by part.
template <int kStates>
struct OutputLayout {
  using S = Strides<kStates>;
  static constexpr int kProjection = kChunk * S::kState * 2;
  static constexpr int kGains = 2 * kChunk * S::kGain * 2;
  static constexpr int kC = 0;
  // B until C·B is formed, then the gains' high and low halves.
  static constexpr int kBOrGains = kC + kProjection;
  static constexpr int kX = kBOrGains + (kProjection > kGains ? kProjection : kGains);
  static constexpr int kStartHigh = kX + kChunk * S::kRow * 2;
  static constexpr int kStartLow = kStartHigh + kRowTile * S::kState * 2;
  static constexpr int kScores = kStartLow + kRowTile * S::kState * 2;  // C·B, then y
  static constexpr int kDelta = kScores + kChunk * S::kFloat * 4;
  static constexpr int kLogDecay = kDelta + kChunk * 4;
  static constexpr int kEntryDecay = kLogDecay + kChunk * 4;
  static constexpr int kBytes = kEntryDecay + kChunk * 4;
  static_assert(kBOrGains % 32 == 0 && kX % 32 == 0 && kStartHigh % 32 == 0 &&
                    kStartLow % 32 == 0 && kScores % 32 == 0,
                "the MMA's loads and stores want 32-byte aligned tiles");
};

// y of one chunk and row tile: the gains G = (C·B) ∘ exp(seg) Δ (lower
// triangle) times x, plus exp(a_0 + … + a_t) C_t·S_start, plus D x.
template <int kStates>
__global__ void __launch_bounds__(kThreads)
    ChunkOutputKernel(const StateSpaceScanLaunchArgs args, const float* workspace,
                      Workspace layout) {
  using S = Strides<kStates>;
  using L = OutputLayout<kStates>;
  extern __shared__ __align__(128) unsigned char shared[];
  auto* c_tile = reinterpret_cast<Bits*>(shared + L::kC);
  auto* b_tile = reinterpret_cast<Bits*>(shared + L::kBOrGains);
  auto* gain_high = reinterpret_cast<Bits*>(shared + L::kBOrGains);
  Bits* gain_low = gain_high + kChunk * S::kGain;
  auto* x_tile = reinterpret_cast<Bits*>(shared + L::kX);
  auto* start_high = reinterpret_cast<Bits*>(shared + L::kStartHigh);  // S_start [p][n]
  auto* start_low = reinterpret_cast<Bits*>(shared + L::kStartLow);
  auto* scores = reinterpret_cast<float*>(shared + L::kScores);
  auto* delta = reinterpret_cast<float*>(shared + L::kDelta);
  auto* log_decay = reinterpret_cast<float*>(shared + L::kLogDecay);
  auto* entry_decay = reinterpret_cast<float*>(shared + L::kEntryDecay);

  const ChunkPlace place = PlaceOf(args, layout.row_tiles);
  const int thread = static_cast<int>(threadIdx.x);
  const int warp = thread / 32;
  const bool has_start = place.chunk > 0 || args.state_in != nullptr;
  StageDecayTerms(args, place, delta, log_decay);
  StageProjection<kStates>(args.c_proj, args, place, c_tile);
  StageProjection<kStates>(args.b_proj, args, place, b_tile);
  StageInputs<kStates>(args, place, x_tile);
  if (has_start) {
    // S_start [rows, kStates] in float32, four values a load, all loads first.
    const auto* start = reinterpret_cast<const float4*>(
        workspace + layout.StateIndex(place.batch, place.head, args.heads, place.chunk) +
        place.first_row * kStates);
    constexpr int kPerThread = kRowTile * kStates / 4 / kThreads;
    float4 values[kPerThread];
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) values[k] = __ldcs(start + thread + k * kThreads);
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int i = 4 * (thread + k * kThreads);
      const int at = (i / kStates) * S::kState + i % kStates;
      const SplitPair first = SplitTwo(values[k].x, values[k].y);
      const SplitPair second = SplitTwo(values[k].z, values[k].w);
      *reinterpret_cast<uint2*>(start_high + at) = make_uint2(first.high, second.high);
      *reinterpret_cast<uint2*>(start_low + at) = make_uint2(first.low, second.low);
    }
  }
  __syncthreads();

  if (thread < kChunk) {
    float prefix = 0.0f;  // a_0 + … + a_t
    for (int k = 0; k <= thread; ++k) prefix += log_decay[k];
    entry_decay[thread] = expf(prefix);
  }
  // C·B on the tiles of the lower triangle (i ≥ j).
  constexpr int kStepTiles = kChunk / kTile;
  constexpr int kTriangle = kStepTiles * (kStepTiles + 1) / 2;
  for (int tile = warp; tile < kTriangle; tile += kWarps) {
    int i = 0;
    while ((i + 1) * (i + 2) / 2 <= tile) ++i;
    const int j = tile - i * (i + 1) / 2;
    Accumulator sum;
    wmma::fill_fragment(sum, 0.0f);
#pragma unroll
    for (int n = 0; n < kStates; n += kTile) {
      AFragment c;
      wmma::load_matrix_sync(c, AsBf16(c_tile + i * kTile * S::kState + n), S::kState);
      BTransposed b;
      wmma::load_matrix_sync(b, AsBf16(b_tile + j * kTile * S::kState + n), S::kState);
      wmma::mma_sync(sum, c, b, sum);
    }
    wmma::store_matrix_sync(scores + i * kTile * S::kFloat + j * kTile, sum, S::kFloat,
                            wmma::mem_row_major);
  }
  __syncthreads();

  // The gains, over B's buffer: row t by four threads, a quarter of the
  // steps s each, walking s down from the diagonal so that seg(t, s) is a
  // running sum of the segment's own terms; a quarter row is written as
  // two 16-byte stores per half.
  {
    constexpr int kQuarter = kChunk / 4;
    const int t = thread / 4;
    const int first = (thread % 4) * kQuarter;
    const int top = t < first + kQuarter - 1 ? t : first + kQuarter - 1;
    float segment = 0.0f;  // seg(t, top)
    for (int k = top + 1; k <= t; ++k) segment += log_decay[k];
    float gains[kQuarter];
#pragma unroll
    for (int q = kQuarter - 1; q >= 0; --q) {
      const int step = first + q;
      gains[q] = 0.0f;
      if (step <= top) {
        gains[q] = scores[t * S::kFloat + step] * expf(segment) * delta[step];
        segment += log_decay[step];
      }
    }
    unsigned int high[kQuarter / 2], low[kQuarter / 2];
#pragma unroll
    for (int w = 0; w < kQuarter / 2; ++w) {
      const SplitPair pair = SplitTwo(gains[2 * w], gains[2 * w + 1]);
      high[w] = pair.high;
      low[w] = pair.low;
    }
    auto* high_row = reinterpret_cast<uint4*>(gain_high + t * S::kGain + first);
    auto* low_row = reinterpret_cast<uint4*>(gain_low + t * S::kGain + first);
    static_assert(kQuarter == 16, "a quarter row is two 16-byte pieces");
    high_row[0] = make_uint4(high[0], high[1], high[2], high[3]);
    high_row[1] = make_uint4(high[4], high[5], high[6], high[7]);
    low_row[0] = make_uint4(low[0], low[1], low[2], low[3]);
    low_row[1] = make_uint4(low[4], low[5], low[6], low[7]);
  }
  __syncthreads();

  // y tiles: warp w owns (i, j) and (3 - i, j), i = w / 4, j = w % 4, so
  // that each warp has five tiles of gains to multiply.
  static_assert(kChunk == 4 * kTile && kRowTile == 4 * kTile && kWarps == 8);
  float* output_tile = scores;  // y, [t][p]
  for (int pass = 0; pass < 2; ++pass) {
    const int i = pass == 0 ? warp / 4 : 3 - warp / 4;
    const int j = warp % 4;
    float* y = output_tile + i * kTile * S::kFloat + j * kTile;
    Accumulator sum;
    wmma::fill_fragment(sum, 0.0f);
    if (has_start) {
#pragma unroll
      for (int n = 0; n < kStates; n += kTile) {
        AFragment c;
        wmma::load_matrix_sync(c, AsBf16(c_tile + i * kTile * S::kState + n), S::kState);
        BTransposed start;
        wmma::load_matrix_sync(start, AsBf16(start_high + j * kTile * S::kState + n), S::kState);
        wmma::mma_sync(sum, c, start, sum);
        wmma::load_matrix_sync(start, AsBf16(start_low + j * kTile * S::kState + n), S::kState);
        wmma::mma_sync(sum, c, start, sum);
      }
      // Each row t times exp(a_0 + … + a_t): through shared memory, as the
      // fragment's layout is the library's.
      wmma::store_matrix_sync(y, sum, S::kFloat, wmma::mem_row_major);
      __syncwarp();
      for (int e = thread % 32; e < kTile * kTile; e += 32) {
        y[(e / kTile) * S::kFloat + e % kTile] *= entry_decay[i * kTile + e / kTile];
      }
      __syncwarp();
      wmma::load_matrix_sync(sum, y, S::kFloat, wmma::mem_row_major);
    }
    for (int k = 0; k <= i; ++k) {
      BFragment x;
      wmma::load_matrix_sync(x, AsBf16(x_tile + k * kTile * S::kRow + j * kTile), S::kRow);
      AFragment gain;
      wmma::load_matrix_sync(gain, AsBf16(gain_high + i * kTile * S::kGain + k * kTile), S::kGain);
      wmma::mma_sync(sum, gain, x, sum);
      wmma::load_matrix_sync(gain, AsBf16(gain_low + i * kTile * S::kGain + k * kTile), S::kGain);
      wmma::mma_sync(sum, gain, x, sum);
    }
    wmma::store_matrix_sync(y, sum, S::kFloat, wmma::mem_row_major);
  }
  __syncthreads();

  const int64_t output_row = args.heads * args.head_dim;  // y [B, L, H·P]
  float* output = args.output + (place.batch * args.seq_len + place.first_step) * output_row +
                  place.head * args.head_dim + place.first_row;
  for (int i = thread; i < kChunk * kRowTile; i += kThreads) {
    const int t = i / kRowTile;
    const int p = i % kRowTile;
    if (t >= place.steps || place.first_row + p >= args.head_dim) continue;
    float y = output_tile[t * S::kFloat + p];
    if (args.skip.data != nullptr) {
      y = fmaf(SkipOf<Element>(args, place.head, place.first_row + p),
               Element::ToFloat(x_tile[t * S::kRow + p]), y);
    }
    __stcs(output + t * output_row + p, y);
  }
}

// N padded to the kernels' 32, 64 or 128 states.
int64_t PaddedStates(int64_t state_size) {
  return state_size <= 32 ? 32 : state_size <= 64 ? 64 : 128;
}

Workspace LayoutOf(const StateSpaceScanLaunchArgs& args) {
  return Workspace{ChunksOf(args.seq_len), RowTilesOf(args.head_dim),
                   PaddedStates(args.state_size)};
}

template <int kStates>
int LaunchStates(const StateSpaceScanLaunchArgs& args, cudaStream_t stream) {
  const Workspace layout = LayoutOf(args);
  const dim3 blocks(static_cast<unsigned int>(layout.chunks * layout.row_tiles),
                    static_cast<unsigned int>(args.heads), static_cast<unsigned int>(args.batch));
  ChunkStateKernel<kStates><<<blocks, kThreads, 0, stream>>>(args, args.workspace, layout);
  const dim3 passing(static_cast<unsigned int>((layout.StateFloats() / 4 + kThreads - 1) / kThreads),
                     static_cast<unsigned int>(args.heads), static_cast<unsigned int>(args.batch));
  StatePassingKernel<kStates><<<passing, kThreads, 0, stream>>>(args, args.workspace, layout);
  constexpr int kBytes = OutputLayout<kStates>::kBytes;
  // Per call: the attribute is the current device's.
  const cudaError_t configured = cudaFuncSetAttribute(
      ChunkOutputKernel<kStates>, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
  if (configured != cudaSuccess) return static_cast<int>(configured);
  ChunkOutputKernel<kStates><<<blocks, kThreads, kBytes, stream>>>(args, args.workspace, layout);
  return static_cast<int>(cudaGetLastError());
}

bool ChunkedRuns(const StateSpaceScanLaunchArgs& args) {
  return args.element_type == ScanElementType::kBFloat16 &&
         args.state_size <= kMaxCudaStateSpaceStateSize;
}

}  // namespace

StateSpaceForm StateSpaceFormFor(const StateSpaceScanLaunchArgs& args) {
  StateSpaceForm form = args.form;
  if (form == StateSpaceForm::kAuto) {
    static const char* forced = std::getenv("ICD_STATE_SPACE_FORM");
    if (forced != nullptr && std::strcmp(forced, "recurrence") == 0) {
      form = StateSpaceForm::kRecurrence;
    } else if (forced != nullptr && std::strcmp(forced, "chunked") == 0) {
      form = StateSpaceForm::kChunked;
    } else if (args.seq_len == 1) {
      form = StateSpaceForm::kStep;
    } else {
      form = args.seq_len > kChunk ? StateSpaceForm::kChunked : StateSpaceForm::kRecurrence;
    }
  }
  if (form == StateSpaceForm::kChunked && !ChunkedRuns(args)) return StateSpaceForm::kRecurrence;
  if (form == StateSpaceForm::kStep && args.seq_len != 1) return StateSpaceForm::kRecurrence;
  return form;
}

int64_t StateSpaceWorkspaceFloats(const StateSpaceScanLaunchArgs& args) {
  if (StateSpaceFormFor(args) != StateSpaceForm::kChunked) return 0;
  const Workspace layout = LayoutOf(args);
  return layout.DecayIndex(args.batch, args.heads) + args.batch * args.heads * layout.chunks;
}

int LaunchStateSpaceChunked(const StateSpaceScanLaunchArgs& args, void* stream) {
  if (!ChunkedRuns(args) || args.workspace == nullptr || args.groups < 1 ||
      args.heads % args.groups != 0 || args.heads > 65535 || args.batch > 65535 ||
      ChunksOf(args.seq_len) * RowTilesOf(args.head_dim) > 0x7fffffff) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  auto* cuda_stream = static_cast<cudaStream_t>(stream);
  switch (PaddedStates(args.state_size)) {
    case 32: return LaunchStates<32>(args, cuda_stream);
    case 64: return LaunchStates<64>(args, cuda_stream);
    default: return LaunchStates<128>(args, cuda_stream);
  }
}

}  // namespace icd::scan
