// CUDA builds only (ICD_HAVE_CUDA_FUSED): the LibTorch side of the fused
// kernels (causal_conv.cu, rms_norm.cu through fused_launch.h): checks of
// the kernels' domain, outputs, the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <utility>
#include <vector>

#include "fused/fused.h"
#include "fused/fused_launch.h"
#include "scan/kernel_operands.h"

namespace icd::fused {
namespace {

using scan::KernelElementType;

// Defined, on `device`, of `dtype`.
bool OnDeviceAs(const torch::Tensor& tensor, const torch::Device& device,
                torch::ScalarType dtype) {
  return tensor.defined() && tensor.device() == device && tensor.scalar_type() == dtype;
}

cudaStream_t CurrentStream(const torch::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

// A kernel built for other architectures than this GPU's declines (the
// caller's LibTorch ops are still correct); any other failure is an error.
bool Launched(int status, const char* kernel) {
  if (status == static_cast<int>(cudaErrorNoKernelImageForDevice)) {
    (void)cudaGetLastError();  // clear it: the fallback's launches must not see it
    return false;
  }
  TORCH_CHECK(status == 0, kernel, ": ", cudaGetErrorString(static_cast<cudaError_t>(status)));
  return true;
}

}  // namespace

std::optional<torch::Tensor> CausalConvSilu(const torch::Tensor& values,
                                            const torch::Tensor& weight,
                                            const torch::Tensor& bias,
                                            const torch::Tensor& history,
                                            torch::Tensor* next_history, bool in_place) {
  if (!values.defined() || !values.is_cuda() || values.dim() != 3) return std::nullopt;
  const torch::Device device = values.device();
  const torch::ScalarType compute = values.scalar_type();
  const std::optional<ElementType> element_type = KernelElementType(compute);
  if (!element_type.has_value() || !OnDeviceAs(weight, device, compute) || weight.dim() != 3) {
    return std::nullopt;
  }
  const int64_t batch = values.size(0);
  const int64_t seq_len = values.size(1);
  const int64_t channels = values.size(2);
  const int64_t width = weight.size(2);
  if (batch < 1 || seq_len < 1 || width < 1 || width > kMaxConvWidth || values.stride(2) != 1 ||
      weight.size(0) != channels || weight.size(1) != 1) {
    return std::nullopt;
  }
  if (bias.defined() && (!OnDeviceAs(bias, device, compute) || bias.dim() != 1 ||
                         bias.size(0) != channels)) {
    return std::nullopt;
  }
  if (history.defined() &&
      (!history.is_cuda() || history.device() != device || history.dim() != 3 ||
       history.size(0) != batch || history.size(1) != channels || history.size(2) != width - 1)) {
    return std::nullopt;
  }

  const c10::cuda::CUDAGuard device_guard(device);
  const torch::Tensor taps = weight.contiguous();                               // [C, 1, K]
  const torch::Tensor bias_values = bias.defined() ? bias.contiguous() : bias;  // [C]
  const bool update_history = in_place && next_history != nullptr &&
                              history.defined() && history.scalar_type() == compute &&
                              history.is_contiguous() && seq_len <= kMaxInPlaceConvSteps;
  // The history in the compute dtype, as the reference concatenates it.
  const torch::Tensor past =
      history.defined() ? history.to(compute).contiguous() : torch::Tensor();  // [B, C, K-1]
  torch::Tensor output = torch::empty({batch, seq_len, channels}, values.options());  // [B, L, C]
  torch::Tensor next;  // [B, C, K-1]
  if (update_history) {
    next = past;  // `history` itself (already contiguous, in the compute dtype)
  } else if (next_history != nullptr) {
    next = torch::empty({batch, channels, width - 1}, values.options());
  }

  CausalConvLaunchArgs args;
  args.batch = batch;
  args.seq_len = seq_len;
  args.channels = channels;
  args.width = width;
  args.element_type = *element_type;
  args.values = values.data_ptr();
  args.values_batch_stride = values.stride(0);
  args.values_time_stride = values.stride(1);
  args.weight = taps.data_ptr();
  args.bias = bias_values.defined() ? bias_values.data_ptr() : nullptr;
  args.history = past.defined() ? past.data_ptr() : nullptr;
  args.output = output.data_ptr();
  args.next_history = next.defined() ? next.data_ptr() : nullptr;
  if (!Launched(LaunchCausalConvSilu(args, CurrentStream(device)), "causal conv kernel")) {
    return std::nullopt;
  }
  if (next_history != nullptr && !update_history) *next_history = next;
  return output;
}

std::optional<AddRmsNormResult> AddRmsNorm(const torch::Tensor& residual,
                                           const torch::Tensor& mixed,
                                           const torch::Tensor& weight, double eps) {
  if (!residual.defined() || !residual.is_cuda() || residual.dim() < 1 ||
      residual.scalar_type() != torch::kFloat32 || !residual.is_contiguous() ||
      !weight.defined()) {
    return std::nullopt;
  }
  const torch::Device device = residual.device();
  const torch::ScalarType compute = weight.scalar_type();
  const std::optional<ElementType> element_type = KernelElementType(compute);
  const int64_t width = residual.size(-1);
  if (!element_type.has_value() || !OnDeviceAs(weight, device, compute) || weight.dim() != 1 ||
      weight.size(0) != width || width < 1 || residual.numel() == 0) {
    return std::nullopt;
  }
  if (mixed.defined() && (!OnDeviceAs(mixed, device, compute) ||
                          mixed.sizes() != residual.sizes() || !mixed.is_contiguous())) {
    return std::nullopt;
  }

  const c10::cuda::CUDAGuard device_guard(device);
  const torch::Tensor scale = weight.contiguous();  // [D]
  AddRmsNormResult result;
  result.residual = torch::empty_like(residual);                   // [..., D]
  result.normed = torch::empty(residual.sizes(), weight.options());  // [..., D]
  AddRmsNormLaunchArgs args;
  args.rows = residual.numel() / width;
  args.width = width;
  args.element_type = *element_type;
  args.eps = static_cast<float>(eps);
  args.residual = residual.data_ptr<float>();
  args.mixed = mixed.defined() ? mixed.data_ptr() : nullptr;
  args.weight = scale.data_ptr();
  args.residual_out = result.residual.data_ptr<float>();
  args.normed = result.normed.data_ptr();
  if (!Launched(LaunchAddRmsNorm(args, CurrentStream(device)), "add + RMS norm kernel")) {
    return std::nullopt;
  }
  return result;
}

std::optional<torch::Tensor> GatedRmsNorm(const torch::Tensor& values, const torch::Tensor& gate,
                                          const torch::Tensor& weight, int64_t groups,
                                          double eps, bool norm_before_gate, bool weight_settled) {
  if (!values.defined() || !values.is_cuda() || values.dim() < 1 ||
      values.scalar_type() != torch::kFloat32 || !values.is_contiguous() || !weight.defined()) {
    return std::nullopt;
  }
  const torch::Device device = values.device();
  const torch::ScalarType compute = weight.scalar_type();
  const std::optional<ElementType> element_type = KernelElementType(compute);
  const int64_t width = values.size(-1);
  if (!element_type.has_value() || !OnDeviceAs(weight, device, compute) || weight.dim() != 1 ||
      weight.size(0) != width || width < 1 || values.numel() == 0 || groups < 1 ||
      width % groups != 0 || !OnDeviceAs(gate, device, compute) ||
      gate.sizes() != values.sizes()) {
    return std::nullopt;
  }
  // Rows as one strided axis: a view where the leading axes collapse.
  const torch::Tensor gate_rows = gate.stride(-1) == 1 ? gate.reshape({-1, width})
                                                       : gate.contiguous().view({-1, width});
  if (gate_rows.stride(1) != 1) return std::nullopt;

  const c10::cuda::CUDAGuard device_guard(device);
  const torch::Tensor scale = weight.contiguous();                        // [I]
  torch::Tensor output = torch::empty(values.sizes(), weight.options());  // [..., I]
  GatedRmsNormLaunchArgs args;
  args.rows = values.numel() / width;
  args.width = width;
  args.groups = groups;
  args.element_type = *element_type;
  args.eps = static_cast<float>(eps);
  args.norm_before_gate = norm_before_gate;
  args.values = values.data_ptr<float>();
  args.gate = gate_rows.data_ptr();
  args.gate_row_stride = gate_rows.size(0) > 1 ? gate_rows.stride(0) : width;
  args.weight = scale.data_ptr();
  args.output = output.data_ptr();
  // Decode steps only (one token per row): a prefill's thousands of rows
  // keep their blocks light instead.
  args.weight_early = weight_settled && scale.is_same(weight) && values.dim() == 3 &&
                      values.size(1) == 1 && EarlyOperandsEnabled();
  if (!Launched(LaunchGatedRmsNorm(args, CurrentStream(device)), "gated RMS norm kernel")) {
    return std::nullopt;
  }
  return output;
}

namespace {

// A decode step's conv, for FewRowsLinearLaunch: the history is written in
// place, so it must be the tensor the caller keeps (contiguous, compute dtype).
struct ConvStepOperands {
  const torch::Tensor* weight;  // [C, 1, K]
  const torch::Tensor* bias;    // [C] or undefined
  torch::Tensor* history;       // [B, C, K-1]
  int64_t offset;               // the first of the C outputs
  bool settled;                 // FewRowsLinearConvStep's conv_settled
};

// FewRowsLinear, and with `conv` its conv step in the same kernel (then the
// second tensor is silu(conv) [B, 1, C]); nullopt where the kernel declines,
// before anything is written.
std::optional<std::pair<torch::Tensor, torch::Tensor>> FewRowsLinearLaunch(
    const torch::Tensor& input, const torch::Tensor& weight, const torch::Tensor& bias,
    const ConvStepOperands* conv, bool weight_settled) {
  if (!input.defined() || !input.is_cuda() || input.dim() < 1 || !weight.defined() ||
      weight.dim() != 2 || !weight.is_contiguous()) {
    return std::nullopt;
  }
  const torch::Device device = input.device();
  const torch::ScalarType compute = input.scalar_type();
  const std::optional<ElementType> element_type = KernelElementType(compute);
  const int64_t in_features = weight.size(1);
  const int64_t out_features = weight.size(0);
  if (!element_type.has_value() || !OnDeviceAs(weight, device, compute) ||
      input.size(-1) != in_features || in_features < 1 || out_features < 1 ||
      input.numel() == 0 || input.numel() / in_features > kMaxFewRowsLinearRows) {
    return std::nullopt;
  }
  if (bias.defined() && (!OnDeviceAs(bias, device, compute) || bias.dim() != 1 ||
                         bias.size(0) != out_features)) {
    return std::nullopt;
  }
  // Rows as one strided axis: a view where the leading axes collapse (a
  // narrow() of a projection's output does), else a contiguous copy.
  const torch::Tensor rows = input.stride(-1) == 1 ? input.reshape({-1, in_features})
                                                   : input.contiguous().view({-1, in_features});
  if (rows.stride(1) != 1) return std::nullopt;
  torch::Tensor taps;         // [C, 1, K]
  torch::Tensor conv_bias;    // [C]
  torch::Tensor conv_output;  // [B, 1, C]
  if (conv != nullptr) {
    const torch::Tensor& history = *conv->history;
    const int64_t channels = conv->weight->size(0);
    const int64_t width = conv->weight->dim() == 3 ? conv->weight->size(2) : 0;
    // One time step per row: input [B, 1, K].
    if (input.dim() != 3 || input.size(1) != 1 || !OnDeviceAs(*conv->weight, device, compute) ||
        conv->weight->dim() != 3 || conv->weight->size(1) != 1 || conv->offset < 0 ||
        conv->offset + channels > out_features ||
        width < 1 || width > kMaxConvWidth || !OnDeviceAs(history, device, compute) ||
        !history.is_contiguous() ||
        history.sizes() != torch::IntArrayRef({input.size(0), channels, width - 1})) {
      return std::nullopt;
    }
    if (conv->bias->defined() && (!OnDeviceAs(*conv->bias, device, compute) ||
                                  conv->bias->dim() != 1 || conv->bias->size(0) != channels)) {
      return std::nullopt;
    }
    taps = conv->weight->contiguous();
    conv_bias = conv->bias->defined() ? conv->bias->contiguous() : torch::Tensor();
  }
  const c10::cuda::CUDAGuard device_guard(device);
  const torch::Tensor bias_values = bias.defined() ? bias.contiguous() : bias;  // [N]
  std::vector<int64_t> output_sizes = input.sizes().vec();
  output_sizes.back() = out_features;
  torch::Tensor output = torch::empty(output_sizes, input.options());  // [..., N]

  FewRowsLinearLaunchArgs args;
  args.rows = rows.size(0);
  args.in_features = in_features;
  args.out_features = out_features;
  args.element_type = *element_type;
  args.input = rows.data_ptr();
  args.input_row_stride = rows.size(0) > 1 ? rows.stride(0) : in_features;
  args.weight = weight.data_ptr();
  args.weight_settled = weight_settled;
  args.bias = bias_values.defined() ? bias_values.data_ptr() : nullptr;
  args.output = output.data_ptr();
  if (conv != nullptr) {
    conv_output = torch::empty({input.size(0), 1, taps.size(0)}, input.options());
    args.conv_offset = conv->offset;
    args.conv_channels = taps.size(0);
    args.conv_width = taps.size(2);
    args.conv_weight = taps.data_ptr();
    args.conv_bias = conv_bias.defined() ? conv_bias.data_ptr() : nullptr;
    args.conv_history = conv->history->numel() > 0 ? conv->history->data_ptr() : nullptr;
    args.conv_output = conv_output.data_ptr();
    // Only the caller's own tensors, not copies made here.
    args.conv_settled = conv->settled && taps.is_same(*conv->weight) &&
                        (!conv_bias.defined() || conv_bias.is_same(*conv->bias));
  }
  const int status = LaunchFewRowsLinear(args, CurrentStream(device));
  // Unaligned rows or widths decline: cuBLAS takes them.
  if (status == static_cast<int>(cudaErrorInvalidValue)) {
    (void)cudaGetLastError();
    return std::nullopt;
  }
  if (!Launched(status, "few-rows linear kernel")) return std::nullopt;
  return std::make_pair(std::move(output), std::move(conv_output));
}

}  // namespace

std::optional<torch::Tensor> FewRowsLinear(const torch::Tensor& input,
                                           const torch::Tensor& weight,
                                           const torch::Tensor& bias, bool weight_settled) {
  auto result = FewRowsLinearLaunch(input, weight, bias, nullptr, weight_settled);
  if (!result.has_value()) return std::nullopt;
  return std::move(result->first);
}

std::optional<LinearConvStepResult> FewRowsLinearConvStep(
    const torch::Tensor& input, const torch::Tensor& weight, const torch::Tensor& bias,
    const torch::Tensor& conv_weight, const torch::Tensor& conv_bias, torch::Tensor* history,
    int64_t conv_offset, bool weight_settled, bool conv_settled) {
  if (history == nullptr) return std::nullopt;
  const ConvStepOperands conv{&conv_weight, &conv_bias, history, conv_offset, conv_settled};
  auto result = FewRowsLinearLaunch(input, weight, bias, &conv, weight_settled);
  if (!result.has_value()) return std::nullopt;
  return LinearConvStepResult{std::move(result->first), std::move(result->second)};
}

void ReloadLaunchSettings() { ReloadFewRowsLinearSettings(); }

}  // namespace icd::fused
