// Mamba-2's scan (mamba_symmetries.md §2.4): per head h of group g(h),
//   S_t = exp(Δ_t A_h) S_{t-1} + Δ_t x_t B_tᵀ,   y_t = S_t C_t + D x_t,
// with the state S [P, N] per head. Two forms of the same function: the
// recurrence, one step after another (the reference, and a decode step),
// and the chunked form of the Mamba-2 paper's state-space duality (§6),
// where all but a short recurrence over chunks is batched matrix products.
// They differ only in the order of their sums. LibTorch ops, any device.
#ifndef ICD_CORE_SRC_SCAN_STATE_SPACE_SCAN_H_
#define ICD_CORE_SRC_SCAN_STATE_SPACE_SCAN_H_

#include <optional>
#include <utility>

#include "scan/state_space_scan_launch.h"
#include "torch_api.h"

namespace icd::scan {

// One layer, with batch B, time L, heads H in G groups (the heads of a group
// contiguous: g(h) = h / (H / G)), head dim P, state size N. All in one
// floating dtype (the forward's accumulate dtype), on one device; views are
// fine. The CUDA kernel (StateSpaceScanCuda) also takes x, B, C in the
// compute dtype and Δ as its raw time step; Widened gives the form the
// other three functions take.
struct StateSpaceInputs {
  torch::Tensor hidden;   // x, [B, L, H, P]
  torch::Tensor delta;    // Δ, after softplus and any clamp, [B, L, H]; or
                          // undefined, with Δ from the next two:
  torch::Tensor time_step;       // the time step [B, L, H] (compute dtype) and
  torch::Tensor time_step_bias;  // dt_bias [H] (compute dtype, or float32 widened
                                 // from it): Δ = softplus(time_step + bias),
                                 // clamped to delta_limit when set, in the
                                 // compute dtype as HF computes it
  std::optional<std::pair<double, double>> delta_limit;
  torch::Tensor a_decay;  // A = -exp(A_log), [H]; or undefined, with
  torch::Tensor a_log;    // A_log [H], taken as -exp(A_log.to(accumulate)) by
                          // Widened, and in float32 by the CUDA kernels
  torch::Tensor b_proj;   // B, [B, L, G, N]
  torch::Tensor c_proj;   // C, [B, L, G, N]
  torch::Tensor skip;     // D, [H] or [H·P] (per channel); undefined: none.
                          // The CUDA kernels take dt_bias, A_log and D in float32
                          // or the compute dtype; the other forms, Widened's
  // A, D and the state were written before the kernel ahead of the scan's (a
  // decode session's own: A and D computed once, the state by this layer's
  // last step), so that the CUDA step kernel may read them before waiting
  // for that kernel (ICD_EARLY_OPERANDS, fused.h). Only where the kernel
  // reads these very tensors, not copies made for the call.
  bool operands_settled = false;
};

// `inputs` with Δ resolved (LibTorch ops, in the time step's dtype), A
// resolved from A_log, and x, Δ, B, C, A, D in `accumulate`.
StateSpaceInputs Widened(const StateSpaceInputs& inputs, torch::ScalarType accumulate);

// Returns y [B, L, H, P], y_t = S_t C_t + D x_t (no gate). `state` (optional) carries
// S [B, H, P, N] across calls: when defined on entry it is S_0 (zeros
// otherwise); on return it holds S_L.
torch::Tensor StateSpaceScanSequential(const StateSpaceInputs& inputs,
                                       torch::Tensor* state = nullptr);

// The same, in chunks of `chunk` steps (the last one padded with inert
// steps, Δ = 0). The decay between two steps of a chunk is the exponential
// of a sum of that segment's own Δ·A terms, never a difference of running
// sums, so that it keeps its relative precision however long the chunk.
torch::Tensor StateSpaceScanChunked(const StateSpaceInputs& inputs, int64_t chunk,
                                    torch::Tensor* state = nullptr);

// The recurrence as a native loop on the CPU (float32 or float64 inputs;
// nullopt otherwise, e.g. on CUDA): one thread owns a (batch, head) pair at
// a time and keeps its state in cache, so the result does not depend on the
// number of threads. The state is held as [N, P], so that both its update
// and y = S C run along P without a reduction in the inner loop. Same
// contract as above; the order of sums is its own.
std::optional<torch::Tensor> StateSpaceScanLoop(const StateSpaceInputs& inputs,
                                                torch::Tensor* state = nullptr);

// icd's CUDA kernels: the recurrence with each thread's states in
// registers (state_space_scan.cu), and for bfloat16 the chunked form on
// tensor cores (state_space_chunked.cu), which `form` kAuto picks for
// sequences longer than one of its 64-step chunks; x, B, C read in the
// compute dtype (float32, bfloat16, float16) and Δ from either source; A, D,
// S and y in float32. Same contract as above. With `in_place` (a decode
// step) a contiguous float32 *state is written over instead of replaced.
// nullopt where it does not take the inputs (CPU tensors, float64, N above
// 128, kChunked for other dtypes than bfloat16, a build without CUDA or for
// other GPUs), before anything is written.
std::optional<torch::Tensor> StateSpaceScanCuda(const StateSpaceInputs& inputs,
                                                torch::Tensor* state = nullptr,
                                                bool in_place = false,
                                                StateSpaceForm form = StateSpaceForm::kAuto);

// Tests: how many step-kernel launches in this process read their settled
// operands early (operands_settled); none without CUDA.
int64_t StateSpaceStepEarlyLaunches();

// The inputs' time steps [start, start + length).
StateSpaceInputs TimeSlice(const StateSpaceInputs& inputs, int64_t start, int64_t length);

}  // namespace icd::scan

#endif  // ICD_CORE_SRC_SCAN_STATE_SPACE_SCAN_H_
