// Plain-C++ interface of icd's fused elementwise kernels (causal_conv.cu,
// rms_norm.cu, few_rows_linear.cu): raw device pointers, sizes and strides in elements, the
// stream as void*. No LibTorch and no CUDA header here (as
// scan/selective_scan_launch.h); the LibTorch side is fused_cuda.cc.
#ifndef ICD_CORE_SRC_FUSED_FUSED_LAUNCH_H_
#define ICD_CORE_SRC_FUSED_FUSED_LAUNCH_H_

#include <cstdint>

#include "scan/selective_scan_launch.h"

namespace icd::fused {

using ElementType = scan::ScanElementType;

// Widest causal conv the kernel is compiled for (Mamba uses 4).
inline constexpr int64_t kMaxConvWidth = 8;

// Causal depthwise conv over time, then SiLU, for batch B, time L, channels
// C, width K. Every operand but `values` and `output` is contiguous; all in
// element_type. Accumulates in float32 (bias first, then taps oldest to
// newest), rounds the conv to element_type, applies SiLU in float32 and
// rounds again: LibTorch's conv1d then silu in the compute dtype.
struct CausalConvLaunchArgs {
  int64_t batch = 0;
  int64_t seq_len = 0;
  int64_t channels = 0;
  int64_t width = 0;
  ElementType element_type = ElementType::kFloat32;
  const void* values = nullptr;     // x [B, L, C], channels contiguous
  int64_t values_batch_stride = 0;  // in elements
  int64_t values_time_stride = 0;   // in elements
  const void* weight = nullptr;     // [C, K]
  const void* bias = nullptr;       // [C]; null: none
  const void* history = nullptr;    // [B, C, K-1], the inputs before x[:, 0]; null: zeros
  void* output = nullptr;           // silu(conv) [B, L, C], contiguous
  void* next_history = nullptr;     // [B, C, K-1]: the last K-1 inputs; null: not kept.
                                    // May be `history` itself only for L at most
                                    // kMaxInPlaceConvSteps (one thread then reads
                                    // and writes each channel's history).
};

// Longest sequence whose history the conv kernel updates in place.
inline constexpr int64_t kMaxInPlaceConvSteps = 32;

// The residual add and the RMS norm of the next block in one pass, per row of
// width D: residual_out = residual + mixed (mixed widened exactly), then
// normed = round(round(residual_out · rsqrt(mean(residual_out²) + eps)) · weight),
// the roundings to element_type where LibTorch's reference rounds (HF's
// MambaRMSNorm: normalise in float32, cast, scale in the compute dtype).
struct AddRmsNormLaunchArgs {
  int64_t rows = 0;
  int64_t width = 0;
  ElementType element_type = ElementType::kFloat32;
  float eps = 0.0f;
  const float* residual = nullptr;  // [rows, D], contiguous
  const void* mixed = nullptr;      // [rows, D], element_type, contiguous; null: add nothing
  const void* weight = nullptr;     // [D], element_type
  float* residual_out = nullptr;    // [rows, D]; may be `residual` itself
  void* normed = nullptr;           // [rows, D], element_type
};

// Mamba-2's gated RMS norm, per row of width I in `groups` groups of I /
// groups channels: gate = silu(z), to_norm = y (norm_before_gate) or y·gate,
// output = to_norm · rsqrt(mean over the group of to_norm² + eps) · weight,
// times gate again when norm_before_gate; all in float32 (forward_mamba2.cc's
// GatedNorm), rounded once to element_type.
struct GatedRmsNormLaunchArgs {
  int64_t rows = 0;
  int64_t width = 0;
  int64_t groups = 1;
  ElementType element_type = ElementType::kFloat32;
  float eps = 0.0f;
  bool norm_before_gate = false;
  const float* values = nullptr;  // y [rows, I], contiguous
  const void* gate = nullptr;     // z [rows, I], element_type, rows gate_row_stride apart
  int64_t gate_row_stride = 0;    // in elements
  const void* weight = nullptr;   // [I], element_type
  void* output = nullptr;         // [rows, I], element_type, contiguous
  // The weight is loaded before waiting for the kernel ahead (a decode
  // step's settled weight under ICD_EARLY_OPERANDS: fused.h).
  bool weight_early = false;
};

// Most rows of x the few-rows linear takes (a decode step's batch).
inline constexpr int64_t kMaxFewRowsLinearRows = 8;

// output = input · weightᵀ (+ bias), for rows <= kMaxFewRowsLinearRows, in
// element_type with float32 accumulation: each output is one float32 dot
// product (its own summation order, not cuBLAS's), plus the bias in float32,
// rounded once. in_features and input_row_stride are multiples of 16 bytes'
// worth of elements; input and weight are 16-byte aligned.
struct FewRowsLinearLaunchArgs {
  int64_t rows = 0;
  int64_t in_features = 0;
  int64_t out_features = 0;
  ElementType element_type = ElementType::kFloat32;
  const void* input = nullptr;    // [rows, in_features], rows input_row_stride apart
  int64_t input_row_stride = 0;   // in elements
  const void* weight = nullptr;   // [out_features, in_features], contiguous
  // The weight is the model's own tensor, not a copy made for this call: no
  // kernel of the step writes it, so its loads may start before the kernels
  // ahead end (ICD_FEW_ROWS_EARLY_LOADS; dependent_launch.cuh's rule).
  bool weight_settled = false;
  const void* bias = nullptr;     // [out_features]; null: none
  void* output = nullptr;         // [rows, out_features], contiguous
  // Optional, when conv_output is set (a decode step's in_proj and its conv
  // in one kernel): each row's conv_channels outputs from conv_offset on, as
  // rounded into `output`, are also the next input of a causal depthwise
  // conv + SiLU (CausalConvLaunchArgs' arithmetic, one time step per row)
  // whose history is shifted in place.
  int64_t conv_offset = 0;            // Mamba-1: 0 (x first); Mamba-2: d_inner (after z)
  int64_t conv_channels = 0;          // C, conv_offset + C <= out_features
  int64_t conv_width = 0;             // K <= kMaxConvWidth
  const void* conv_weight = nullptr;  // [C, K]
  const void* conv_bias = nullptr;    // [C]; null: none
  void* conv_history = nullptr;       // [rows, C, K-1], read and written
  void* conv_output = nullptr;        // silu(conv) [rows, C], contiguous
  // conv_weight and conv_bias are the model's own tensors and conv_history
  // was last written by this kernel a step earlier (no other kernel of the
  // step writes them), so all three may be read before the kernels ahead
  // end (ICD_FEW_ROWS_EARLY_CONV; dependent_launch.cuh's rule).
  bool conv_settled = false;
};

// Enqueue on `stream` (a cudaStream_t) of the current device. Return 0
// (cudaSuccess) or a cudaError_t value: cudaErrorInvalidValue for arguments
// out of range.
int LaunchCausalConvSilu(const CausalConvLaunchArgs& args, void* stream);
int LaunchAddRmsNorm(const AddRmsNormLaunchArgs& args, void* stream);
int LaunchGatedRmsNorm(const GatedRmsNormLaunchArgs& args, void* stream);
int LaunchFewRowsLinear(const FewRowsLinearLaunchArgs& args, void* stream);

// The few-rows linear's settings from the environment (ICD_FEW_ROWS_*:
// few_rows_linear.cu, the README's table) are read once; this has the next
// launch read them again, for a measurement or a test that changes them in
// one process. Launches captured in a graph keep the settings they had.
void ReloadFewRowsLinearSettings();

// fused.h's FewRowsLinearEarlyLaunches, FewRowsLinearEarlyConvLaunches,
// EarlyOperandsEnabled and GatedRmsNormEarlyLaunches are defined with the
// kernels.

}  // namespace icd::fused

#endif  // ICD_CORE_SRC_FUSED_FUSED_LAUNCH_H_
