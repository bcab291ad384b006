// One step of time of Mamba-2's scan (a decode step, L = 1; launch
// interface: state_space_scan_launch.h). The recurrence kernel
// (state_space_scan.cu) stages a chunk of steps in shared memory and sums
// C·S by a butterfly over kLanes steps, nearly all of it padding when there
// is one step. Here a row's N states are spread over kLanes lanes of a warp,
// so that its reads and writes of S are coalesced and batch 1 still gives
// thousands of warps; C·S is summed by a shuffle tree. The arithmetic per
// state is the recurrence kernel's: S = fma(S, exp(Δ A_h), (Δ x) B_n),
// float32 throughout, y = C·S + D x.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "scan/dependent_launch.cuh"
#include "scan/element_types.cuh"
#include "scan/scan_math.cuh"
#include "scan/state_space_delta.cuh"
#include "scan/state_space_scan_launch.h"

namespace icd::scan {
namespace {

constexpr int kStepThreads = 128;

// A lane holds states lane + k·kLanes, k < kPerLane (N ≤ kLanes · kPerLane).
template <class Element, int kLanes, int kPerLane>
__global__ void __launch_bounds__(kStepThreads) StateSpaceStepKernel(const StateSpaceScanLaunchArgs args,
                                                                      const bool early_dependents) {
  using Storage = typename Element::Storage;
  constexpr int kRowsPerBlock = kStepThreads / kLanes;
  const int lane = static_cast<int>(threadIdx.x) % kLanes;
  const int64_t head_dim = args.head_dim;
  const int64_t heads = args.heads;
  const int64_t rows = args.batch * heads * head_dim;
  const int64_t wanted = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock +
                         static_cast<int>(threadIdx.x) / kLanes;
  // Lanes past the last row redo it and write nothing: every lane of a warp
  // takes part in the shuffles.
  const bool real = wanted < rows;
  const int64_t row = real ? wanted : rows - 1;  // (batch, head, p), as S is laid out
  const int64_t batch = row / (heads * head_dim);
  const int64_t head = row / head_dim % heads;
  const int64_t p = row % head_dim;
  const int64_t group = head / (heads / args.groups);
  const int64_t state_size = args.state_size;
  const float* state_in =
      args.state_in != nullptr ? args.state_in + row * state_size : nullptr;
  // No kernel of the step writes the state (but this one), A or D
  // (operands_early; dependent_launch.cuh says why that is the rule): read
  // before waiting for the kernels ahead; else with the rest, after.
  float previous[kPerLane];
  auto load_state = [&] {
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int64_t n = lane + k * kLanes;
      previous[k] = n < state_size && state_in != nullptr ? state_in[n] : 0.0f;
    }
  };
  float rate = 0.0f;
  float skip = 0.0f;
  if (args.operands_early) {
    load_state();
    rate = DecayRateOf<Element>(args, head);
    skip = SkipOf<Element>(args, head, p);
  }

  dependent_launch::WaitThenAllowDependents(early_dependents);  // x, B, C and the time step come from them
  if (!args.operands_early) {
    load_state();
    rate = DecayRateOf<Element>(args, head);
    skip = SkipOf<Element>(args, head, p);
  }
  const auto* b_proj = static_cast<const Storage*>(args.b_proj.data) +
                       batch * args.b_proj.batch_stride + group * state_size;
  const auto* c_proj = static_cast<const Storage*>(args.c_proj.data) +
                       batch * args.c_proj.batch_stride + group * state_size;
  // Every load first: the step is a handful of dependent latencies per warp.
  float b_values[kPerLane];
  float c_values[kPerLane];
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int64_t n = lane + k * kLanes;
    const bool state_real = n < state_size;
    b_values[k] = state_real ? Element::ToFloat(__ldg(b_proj + n)) : 0.0f;
    c_values[k] = state_real ? Element::ToFloat(__ldg(c_proj + n)) : 0.0f;
  }
  const float x = Element::ToFloat(static_cast<const Storage*>(
      args.hidden.data)[batch * args.hidden.batch_stride + head * head_dim + p]);
  const float delta = DeltaAt<Element>(args, batch, 0, head);
  const float decay = expf(delta * rate);
  const float drive = delta * x;
  float sum = 0.0f;
  float* state_out = args.state_out != nullptr ? args.state_out + row * state_size : nullptr;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const float state = fmaf(previous[k], decay, drive * b_values[k]);
    sum = fmaf(state, c_values[k], sum);
    const int64_t n = lane + k * kLanes;
    if (real && state_out != nullptr && n < state_size) state_out[n] = state;
  }
  sum = LaneGroupSum<kLanes>(sum);
  if (!real || lane != 0) return;
  float y = sum;
  if (args.skip.data != nullptr) y = fmaf(skip, x, y);
  args.output[batch * heads * head_dim + head * head_dim + p] = y;  // y [B, 1, H·P]
}

template <class Element, int kLanes, int kPerLane>
int LaunchStepTile(const StateSpaceScanLaunchArgs& args, cudaStream_t stream) {
  constexpr int kRowsPerBlock = kStepThreads / kLanes;
  const int64_t rows = args.batch * args.heads * args.head_dim;
  const dim3 grid(static_cast<unsigned int>((rows + kRowsPerBlock - 1) / kRowsPerBlock));
  return static_cast<int>(dependent_launch::LaunchDependent(
      StateSpaceStepKernel<Element, kLanes, kPerLane>, grid, kStepThreads, stream, args,
      dependent_launch::EarlyDependents()));
}

// Lanes per row by N: up to four states a lane.
template <class Element>
int LaunchStepElement(const StateSpaceScanLaunchArgs& args, cudaStream_t stream) {
  if (args.state_size <= 16) return LaunchStepTile<Element, 4, 4>(args, stream);
  if (args.state_size <= 32) return LaunchStepTile<Element, 8, 4>(args, stream);
  if (args.state_size <= 64) return LaunchStepTile<Element, 16, 4>(args, stream);
  return LaunchStepTile<Element, 32, 4>(args, stream);
}

std::atomic<int64_t> early_launches{0};

}  // namespace

int LaunchStateSpaceStep(const StateSpaceScanLaunchArgs& args, void* stream) {
  if (args.seq_len != 1 || args.batch * args.heads * args.head_dim > 0x7fffffff) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  auto* cuda_stream = static_cast<cudaStream_t>(stream);
  const int status = cuda_elements::ForElementType(args.element_type, [&](auto element) {
    return LaunchStepElement<decltype(element)>(args, cuda_stream);
  });
  if (args.operands_early && status == static_cast<int>(cudaSuccess)) ++early_launches;
  return status;
}

int64_t StateSpaceStepEarlyLaunchCount() { return early_launches.load(); }

}  // namespace icd::scan
