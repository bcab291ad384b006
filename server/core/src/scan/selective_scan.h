// Mamba-1's selective scan (mamba_symmetries.md §2.2): the recurrence over
// time of one layer, with the skip and the gate. One entry point; on a CUDA
// tensor it runs icd's kernel (selective_scan.cu) when the build has it,
// everywhere else the LibTorch reference below, which is also what the
// kernel is tested against.
#ifndef ICD_CORE_SRC_SCAN_SELECTIVE_SCAN_H_
#define ICD_CORE_SRC_SCAN_SELECTIVE_SCAN_H_

#include <optional>

#include "torch_api.h"

namespace icd::scan {

// Per layer, with batch B, time L, inner channels I, state size N. All
// tensors on one device. `hidden`, `delta`, `b_proj`, `c_proj` and `gate`
// are in the compute dtype (float32, bfloat16, float16, float64) and may be
// non-contiguous views; `a_decay` is in `accumulate`; `a_log`, `d_skip` and
// `delta_bias` in the compute dtype or `accumulate`, as the model holds them
// (the CUDA kernel widens them as it reads them, the other paths first).
// The scan takes the time step before its softplus, so that on CUDA the
// bias add and softplus happen inside the kernel instead of in two
// [B, L, I] passes: Δ = softplus(delta + delta_bias), computed in the
// compute dtype as HF does (delta_bias undefined: Δ = softplus(delta)).
struct ScanInputs {
  torch::Tensor hidden;      // x after conv and silu           [B, L, I]
  torch::Tensor delta;       // dt_proj(δ), with or without bias [B, L, I];
                             // undefined when the next two are set:
  torch::Tensor delta_input;        // δ [B, L, R] and dt_proj's weight [I, R],
  torch::Tensor delta_proj_weight;  // whose product is Δ's time step: taken
                                    // inside the CUDA kernel in one step of
                                    // time (a decode step), by torch::linear
                                    // otherwise (ResolveDelta)
  torch::Tensor delta_bias;  // dt_proj's bias, or undefined    [I]
                             // (the CUDA kernel also takes it widened to float32)
  torch::Tensor a_decay;     // A = -exp(A_log)                 [I, N]; or
  torch::Tensor a_log;       // undefined, with A_log, taken as -exp(A_log.to(accumulate))
  torch::Tensor b_proj;   // B                       [B, L, N]
  torch::Tensor c_proj;   // C                       [B, L, N]
  torch::Tensor d_skip;   // D                       [I]
  torch::Tensor gate;     // z                       [B, L, I]
  // A, D, dt_proj's bias and weight and the state were written before the
  // kernel ahead of the scan's (a decode session's own, the weight the
  // model's), so that the CUDA step kernel may read them before waiting for
  // that kernel (ICD_EARLY_OPERANDS, fused.h). Only where the kernel reads
  // these very tensors, not copies made for the call.
  bool operands_settled = false;
};

// Tests: how many step-kernel launches in this process read their settled
// operands early (operands_settled); none without CUDA.
int64_t SelectiveStateStepEarlyLaunches();

// `inputs` with `delta` defined: dt_proj's product taken by torch::linear
// when only delta_input and delta_proj_weight are given.
ScanInputs ResolveDelta(const ScanInputs& inputs);

// `inputs` with A resolved from A_log and D in `accumulate` (LibTorch ops):
// what the LibTorch and CPU paths take.
ScanInputs ResolveParameters(const ScanInputs& inputs, torch::ScalarType accumulate);

// The inputs' time steps [start, start + length): views of the per-step
// operands, the per-channel ones as they are (a scan in chunks of time).
ScanInputs TimeSlice(const ScanInputs& inputs, int64_t start, int64_t length);

// Returns y_t = (C_t · h_t + D x_t) · silu(z_t) [B, L, I], computed in
// `accumulate` and rounded once to the compute dtype (hidden's), where
// h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_t and the state h is [B, I, N] in
// `accumulate`. `state` (optional) carries h across calls, for decoding:
// when defined on entry it is h_0 (zeros otherwise); on return it holds h_L,
// a new tensor, or with `in_place` (a decode step) the same tensor written
// over where the CUDA kernel runs and h is contiguous float32.
torch::Tensor SelectiveScan(const ScanInputs& inputs, torch::ScalarType accumulate,
                            torch::Tensor* state = nullptr, bool in_place = false);

// The LibTorch reference: the same contract, on any device.
torch::Tensor SelectiveScanReference(const ScanInputs& inputs, torch::ScalarType accumulate,
                                     torch::Tensor* state = nullptr);

// The recurrence as a native loop on the CPU, float32 (compute and
// accumulate): the same contract as SelectiveScan, its own order of sums
// and an exp to 1.6e-7 (cpu_vector::Exp); channels in vectors of 8 per
// thread, so the result does not depend on the number of threads.
// SelectiveScan takes it for CPU tensors; nullopt where it does not apply.
std::optional<torch::Tensor> SelectiveScanLoop(const ScanInputs& inputs,
                                               torch::ScalarType accumulate,
                                               torch::Tensor* state = nullptr);

// Whether SelectiveScan would use the CUDA kernel for these inputs.
bool UsesCudaKernel(const ScanInputs& inputs, torch::ScalarType accumulate);

}  // namespace icd::scan

#endif  // ICD_CORE_SRC_SCAN_SELECTIVE_SCAN_H_
