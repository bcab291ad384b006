// icd's fused CUDA kernels for the forward's non-matmul work (fused_launch.h
// says what each computes). Each entry point returns nullopt when its kernel
// does not take the inputs (CPU tensors, float64, shapes out of range, a
// build without CUDA, a GPU the build's architectures do not cover); the
// caller then runs its LibTorch ops, which stay the reference.
#ifndef ICD_CORE_SRC_FUSED_FUSED_H_
#define ICD_CORE_SRC_FUSED_FUSED_H_

#include "torch_api.h"

#include <optional>

namespace icd::fused {

// silu(causal depthwise conv over time), as forward_internal's
// CausalDepthwiseConv followed by torch::silu. values [B, L, C] (channels
// contiguous; any batch and time strides, e.g. a narrow() of in_proj's
// output); weight [C, 1, K]; bias [C] or undefined; history [B, C, K-1] or
// undefined (zeros); all in one compute dtype on one CUDA device. Returns
// [B, L, C] contiguous; `next_history` (optional) receives the last K-1
// inputs of [history | values] as a new tensor [B, C, K-1]. With
// `in_place` (a decode step: `next_history` points at `history`), they are
// written into `history`'s own storage instead, when it is contiguous in the
// compute dtype and L is at most kMaxInPlaceConvSteps (else a new tensor).
std::optional<torch::Tensor> CausalConvSilu(const torch::Tensor& values,
                                            const torch::Tensor& weight,
                                            const torch::Tensor& bias,
                                            const torch::Tensor& history,
                                            torch::Tensor* next_history,
                                            bool in_place = false);

struct AddRmsNormResult {
  torch::Tensor residual;  // residual + mixed, float32 [..., D]
  torch::Tensor normed;    // the RMS norm of it times weight, compute dtype [..., D]
};

// residual + mixed (widened), then HF's MambaRMSNorm of the sum: residual
// float32 [..., D] contiguous; mixed [..., D] in the compute dtype or
// undefined (nothing to add); weight [D] in the compute dtype (float32,
// bfloat16 or float16). `residual` is not written.
std::optional<AddRmsNormResult> AddRmsNorm(const torch::Tensor& residual,
                                           const torch::Tensor& mixed,
                                           const torch::Tensor& weight, double eps);

// Mamba-2's gated RMS norm (forward_mamba2.cc's GatedNorm with a norm
// weight): values y [..., I] float32, contiguous; gate z [..., I] in the
// compute dtype, last axis contiguous (any row stride: a narrow() of
// in_proj's output); weight [I] in the compute dtype; `groups` dividing I.
// Returns [..., I] in the compute dtype, computed in float32 and rounded once.
// `weight_settled`: the model's own tensor (FewRowsLinear's sense), which
// a decode step (rows of one token) may then load before the kernel ahead
// ends (EarlyOperandsEnabled).
std::optional<torch::Tensor> GatedRmsNorm(const torch::Tensor& values, const torch::Tensor& gate,
                                          const torch::Tensor& weight, int64_t groups,
                                          double eps, bool norm_before_gate,
                                          bool weight_settled = false);

// torch::linear(input, weight, bias) for inputs of at most
// kMaxFewRowsLinearRows rows (input [..., K], the product of the leading
// sizes): one pass over the weight, which dominates a decode step's reads.
// weight [N, K] contiguous, bias [N] or undefined, all in one compute dtype
// on one CUDA device; input's rows must be 16-byte aligned (else nullopt).
// Returns [..., N]: float32 dot products rounded once (as cuBLAS, in another
// summation order). `weight_settled`: the weight is a model's own tensor,
// not one a kernel just made (a dtype conversion, a scaled copy), so that
// a decode step may load it before the kernel ahead of it ends.
std::optional<torch::Tensor> FewRowsLinear(const torch::Tensor& input,
                                           const torch::Tensor& weight,
                                           const torch::Tensor& bias,
                                           bool weight_settled = false);

struct LinearConvStepResult {
  torch::Tensor projected;  // FewRowsLinear's output [B, 1, N]
  torch::Tensor convolved;  // silu(conv) of its C conv channels [B, 1, C]
};

// A decode step's in_proj and conv in one kernel: FewRowsLinear(input,
// weight, bias) for input [B, 1, K], whose C outputs of each row from
// `conv_offset` on are also the next step of CausalConvSilu (conv_weight
// [C, 1, K'], conv_bias [C] or undefined) over `history` [B, C, K'-1],
// contiguous in the compute dtype, which moves one step in place. nullopt
// (and `history` untouched) where either kernel would decline.
//
// conv_settled: conv_weight and conv_bias are the model's own tensors and
// `history` was last written by this kernel a step earlier (a decode
// session's), so they may be read before the kernel ahead ends
// (ICD_FEW_ROWS_EARLY_CONV).
std::optional<LinearConvStepResult> FewRowsLinearConvStep(
    const torch::Tensor& input, const torch::Tensor& weight, const torch::Tensor& bias,
    const torch::Tensor& conv_weight, const torch::Tensor& conv_bias, torch::Tensor* history,
    int64_t conv_offset = 0, bool weight_settled = false, bool conv_settled = false);

// The kernels' run-time settings from the environment (the README's table:
// ICD_FEW_ROWS_*) are read once; after this the next launch reads them
// again, for a measurement or a test that changes them within one process.
// Graphs captured before keep the settings they had. Nothing on the CPU.
void ReloadLaunchSettings();

// Tests: how many few-rows launches in this process loaded their first
// weights early (ICD_FEW_ROWS_EARLY_LOADS with a settled weight; none on the
// CPU).
int64_t FewRowsLinearEarlyLaunches();

// Tests: how many few-rows launches with a conv step read its operands
// early (ICD_FEW_ROWS_EARLY_CONV with conv_settled; none on the CPU).
int64_t FewRowsLinearEarlyConvLaunches();

// Unless ICD_EARLY_OPERANDS=0 (re-read after ReloadLaunchSettings), decode
// kernels other than the projections load their settled operands before
// waiting for the kernel ahead: the gated norm its weight, the state steps their state, A and D (and Mamba-1's
// dt_proj bias and weight: scan::StateSpaceInputs and ScanInputs'
// operands_settled). False on the CPU.
bool EarlyOperandsEnabled();

// Tests: how many gated-norm launches in this process loaded their weight
// early (none on the CPU).
int64_t GatedRmsNormEarlyLaunches();

}  // namespace icd::fused

#endif  // ICD_CORE_SRC_FUSED_FUSED_H_
