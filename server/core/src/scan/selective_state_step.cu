// One step of time of the selective scan (a decode step, L = 1; launch
// interface: selective_scan_launch.h): the state update without the chunked
// kernel's staging through shared memory. A channel's N states are spread
// over kLanes lanes, so that the reads and writes of A and h are coalesced
// and batch 1 still fills the GPU; C·h is summed by a shuffle tree. The
// arithmetic per state is the chunked kernel's (Δ from SoftplusDelta, decays
// on the special-function unit, silu on the FMA pipes). Optionally Δ's raw
// time step is dt_proj's product, computed here: a [R]-long dot product per
// channel that would otherwise be a matrix-vector kernel of its own.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "scan/dependent_launch.cuh"
#include "scan/element_types.cuh"
#include "scan/scan_math.cuh"
#include "scan/selective_scan_launch.h"

namespace icd::scan {
namespace {

using cuda_elements::RoundTo;

constexpr int kThreads = 128;
// dt_proj terms a lane holds (a rank up to kRankTerms · kLanes: mamba-2.8b's
// 160 over 16 lanes; a larger one is read in a loop). More terms cost
// registers, so fewer blocks at once (16: 64 registers against 48).
constexpr int kRankTerms = 10;

// States a lane owns: LaunchElement gives N <= kLanes lanes below 32, and 32
// lanes for N up to kMaxCudaStateSize (LaunchLanes refuses anything else).
static_assert(kMaxCudaStateSize % 32 == 0, "StateTerms splits N over 32 lanes");
__host__ __device__ constexpr int StateTerms(int lanes) {
  return lanes == 32 ? static_cast<int>(kMaxCudaStateSize / 32) : 1;
}

template <class Element, int kLanes>
__global__ void __launch_bounds__(kThreads) SelectiveStateStepKernel(const ScanLaunchArgs args,
                                                                     const bool early_dependents) {
  using Storage = typename Element::Storage;
  constexpr int kChannelsPerBlock = kThreads / kLanes;
  constexpr int kStateTerms = StateTerms(kLanes);
  const int lane = static_cast<int>(threadIdx.x) % kLanes;
  const int64_t inner = args.inner;
  const int64_t wanted =
      static_cast<int64_t>(blockIdx.x) * kChannelsPerBlock + static_cast<int>(threadIdx.x) / kLanes;
  // Lanes past the last channel redo the last one and write nothing: every
  // lane of a warp takes part in the shuffles.
  const bool real = wanted < inner;
  const int64_t channel = real ? wanted : inner - 1;
  const int64_t batch = blockIdx.y;
  const int64_t state_size = args.state_size;
  const bool projected = args.delta_proj_weight != nullptr;
  const bool held = projected && args.delta_rank <= kRankTerms * kLanes;
  const auto* rank_weight = projected ? static_cast<const Storage*>(args.delta_proj_weight) +
                                            channel * args.delta_rank
                                      : nullptr;
  const int64_t rate_row = channel * state_size;  // A or A_log [I, N]
  const int64_t state_row = (batch * inner + channel) * state_size;
  // What no kernel of the step writes (A, D, dt_proj's bias and weight, the
  // layer's own state: operands_early) is read before waiting for the
  // kernel ahead; else with the rest, after.
  float bias = 0.0f;
  float skip = 0.0f;
  Storage rank_weights[kRankTerms] = {};
  float rates[kStateTerms] = {};
  float previous[kStateTerms] = {};
  auto load_settled = [&] {
    bias = args.delta_bias.data != nullptr ? ParameterAt<Element>(args.delta_bias, channel) : 0.0f;
    skip = ParameterAt<Element>(args.d_skip, channel);
    if (held) {
#pragma unroll
      for (int i = 0; i < kRankTerms; ++i) {
        const int64_t r = lane + static_cast<int64_t>(i) * kLanes;
        if (r < args.delta_rank) rank_weights[i] = rank_weight[r];
      }
    }
#pragma unroll
    for (int i = 0; i < kStateTerms; ++i) {
      const int64_t n = lane + static_cast<int64_t>(i) * kLanes;
      if (n < state_size) {
        rates[i] = DecayRateAt<Element>(args, rate_row + n);
        previous[i] = args.state_in != nullptr ? args.state_in[state_row + n] : 0.0f;
      }
    }
  };
  if (args.operands_early) load_settled();
  dependent_launch::WaitThenAllowDependents(early_dependents);  // x, z, the time step, B, C come from them
  // Every other load the step needs is issued here, before the first result
  // is used: a decode step's kernel is a chain of memory latencies, and the
  // state's loads do not depend on Δ.
  if (!args.operands_early) load_settled();
  const auto* hidden = static_cast<const Storage*>(args.hidden.data);
  const auto* gate = static_cast<const Storage*>(args.gate.data);
  const Storage x_bits = hidden[batch * args.hidden.batch_stride + channel];
  const Storage z_bits = gate[batch * args.gate.batch_stride + channel];
  const auto* rank_input = projected ? static_cast<const Storage*>(args.delta_proj_input.data) +
                                           batch * args.delta_proj_input.batch_stride
                                     : nullptr;
  Storage rank_inputs[kRankTerms] = {};
  if (held) {
#pragma unroll
    for (int i = 0; i < kRankTerms; ++i) {
      const int64_t r = lane + static_cast<int64_t>(i) * kLanes;
      if (r < args.delta_rank) rank_inputs[i] = __ldg(rank_input + r);
    }
  }
  const auto* b_proj =
      static_cast<const Storage*>(args.b_proj.data) + batch * args.b_proj.batch_stride;
  const auto* c_proj =
      static_cast<const Storage*>(args.c_proj.data) + batch * args.c_proj.batch_stride;
  Storage b_bits[kStateTerms] = {};
  Storage c_bits[kStateTerms] = {};
#pragma unroll
  for (int i = 0; i < kStateTerms; ++i) {
    const int64_t n = lane + static_cast<int64_t>(i) * kLanes;
    if (n < state_size) {
      b_bits[i] = __ldg(b_proj + n);
      c_bits[i] = __ldg(c_proj + n);
    }
  }

  const float x = Element::ToFloat(x_bits);
  const float z = Element::ToFloat(z_bits);
  float delta = 0.0f;
  if (projected) {
    // dt_proj's output in the compute dtype, as the linear would round it.
    float dot = 0.0f;
    if (held) {
#pragma unroll
      for (int i = 0; i < kRankTerms; ++i) {
        if (lane + static_cast<int64_t>(i) * kLanes < args.delta_rank) {
          dot = fmaf(Element::ToFloat(rank_weights[i]), Element::ToFloat(rank_inputs[i]), dot);
        }
      }
    } else {
      for (int64_t r = lane; r < args.delta_rank; r += kLanes) {
        dot = fmaf(Element::ToFloat(rank_weight[r]), Element::ToFloat(__ldg(rank_input + r)), dot);
      }
    }
    delta = SoftplusDelta<Element>(RoundTo<Element>(LaneGroupSum<kLanes>(dot)), bias);
  } else if (args.delta_raw.data != nullptr) {
    const auto* raw = static_cast<const Storage*>(args.delta_raw.data);
    delta = SoftplusDelta<Element>(
        Element::ToFloat(raw[batch * args.delta_raw.batch_stride + channel]), bias);
  } else {
    delta = static_cast<const float*>(args.delta.data)[batch * args.delta.batch_stride + channel];
  }
  const float delta_x = delta * x;
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kStateTerms; ++i) {
    const int64_t n = lane + static_cast<int64_t>(i) * kLanes;
    if (n >= state_size) break;
    const float decay = Exp2Unit(delta * (rates[i] * kLog2E));
    const float state = fmaf(decay, previous[i], delta_x * Element::ToFloat(b_bits[i]));
    sum = fmaf(Element::ToFloat(c_bits[i]), state, sum);
    if (real && args.state_out != nullptr) args.state_out[state_row + n] = state;
  }
  sum = LaneGroupSum<kLanes>(sum);
  if (!real || lane != 0) return;
  const float y = (sum + skip * x) * Silu(z);
  const int64_t out = batch * inner + channel;  // y [B, 1, I]
  if (args.output_rounded != nullptr) {
    static_cast<Storage*>(args.output_rounded)[out] = Element::FromFloat(y);
  } else {
    args.output[out] = y;
  }
}

template <class Element, int kLanes>
int LaunchLanes(const ScanLaunchArgs& args, cudaStream_t stream) {
  constexpr int kChannelsPerBlock = kThreads / kLanes;
  if (args.state_size > int64_t{StateTerms(kLanes)} * kLanes) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const dim3 grid(static_cast<unsigned int>((args.inner + kChannelsPerBlock - 1) / kChannelsPerBlock),
                  static_cast<unsigned int>(args.batch));
  return static_cast<int>(dependent_launch::LaunchDependent(
      SelectiveStateStepKernel<Element, kLanes>, grid, kThreads, stream, args,
      dependent_launch::EarlyDependents()));
}

// Lanes per channel: N rounded up to a power of two, 4 to 32.
template <class Element>
int LaunchElement(const ScanLaunchArgs& args, cudaStream_t stream) {
  if (args.state_size <= 4) return LaunchLanes<Element, 4>(args, stream);
  if (args.state_size <= 8) return LaunchLanes<Element, 8>(args, stream);
  if (args.state_size <= 16) return LaunchLanes<Element, 16>(args, stream);
  return LaunchLanes<Element, 32>(args, stream);
}

std::atomic<int64_t> early_launches{0};

}  // namespace

int LaunchSelectiveStateStep(const ScanLaunchArgs& args, void* stream) {
  const int sources = (args.delta.data != nullptr) + (args.delta_raw.data != nullptr) +
                      (args.delta_proj_weight != nullptr);
  if (args.seq_len != 1 || args.batch < 1 || args.batch > 65535 || args.inner < 1 ||
      args.inner > (int64_t{1} << 31) - 1 || args.state_size < 1 ||
      args.state_size > kMaxCudaStateSize || args.hidden.data == nullptr ||
      args.gate.data == nullptr || args.b_proj.data == nullptr || args.c_proj.data == nullptr ||
      (args.a_decay == nullptr) == (args.a_log.data == nullptr) || args.d_skip.data == nullptr ||
      sources != 1 ||
      (args.delta_proj_weight != nullptr &&
       (args.delta_proj_input.data == nullptr || args.delta_rank < 1)) ||
      (args.output == nullptr) == (args.output_rounded == nullptr)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  auto* cuda_stream = static_cast<cudaStream_t>(stream);
  const int status = cuda_elements::ForElementType(args.element_type, [&](auto element) {
    return LaunchElement<decltype(element)>(args, cuda_stream);
  });
  if (args.operands_early && status == static_cast<int>(cudaSuccess)) ++early_launches;
  return status;
}

int64_t SelectiveStateStepEarlyLaunchCount() { return early_launches.load(); }

}  // namespace icd::scan
