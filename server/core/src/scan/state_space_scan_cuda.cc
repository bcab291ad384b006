// CUDA builds only (ICD_HAVE_CUDA_SCAN): StateSpaceScanCuda on icd's kernel
// (state_space_scan.cu, through state_space_scan_launch.h): checks of the
// kernel's domain, the output and state tensors, the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <vector>

#include "scan/kernel_operands.h"
#include "scan/state_space_scan.h"
#include "scan/state_space_scan_launch.h"

namespace icd::scan {
namespace {

bool On(const torch::Tensor& tensor, const torch::Device& device) {
  return tensor.defined() && tensor.device() == device;
}

// The kernel reads [B, L, ...] operands with any batch and time strides and
// the inner axes contiguous (narrow() views of in_proj's output are).
bool InnerContiguous(const torch::Tensor& tensor) {
  int64_t expected = 1;
  for (int64_t axis = tensor.dim() - 1; axis >= 2; --axis) {
    if (tensor.size(axis) != 1 && tensor.stride(axis) != expected) return false;
    expected *= tensor.size(axis);
  }
  return true;
}

}  // namespace

std::optional<torch::Tensor> StateSpaceScanCuda(const StateSpaceInputs& inputs,
                                                torch::Tensor* state, bool in_place,
                                                StateSpaceForm form) {
  const torch::Tensor& hidden = inputs.hidden;  // [B, L, H, P]
  if (!hidden.defined() || !hidden.is_cuda() || hidden.dim() != 4) return std::nullopt;
  const torch::Device device = hidden.device();
  const torch::ScalarType compute = hidden.scalar_type();
  const std::optional<ScanElementType> element_type = KernelElementType(compute);
  if (!element_type.has_value()) return std::nullopt;
  const int64_t batch = hidden.size(0);
  const int64_t seq_len = hidden.size(1);
  const int64_t heads = hidden.size(2);
  const int64_t head_dim = hidden.size(3);
  const torch::Tensor& b_proj = inputs.b_proj;  // [B, L, G, N]
  const torch::Tensor& c_proj = inputs.c_proj;
  if (!On(b_proj, device) || !On(c_proj, device) || b_proj.dim() != 4 ||
      b_proj.sizes() != c_proj.sizes() || b_proj.scalar_type() != compute ||
      c_proj.scalar_type() != compute) {
    return std::nullopt;
  }
  const int64_t groups = b_proj.size(2);
  const int64_t state_size = b_proj.size(3);
  if (batch < 1 || seq_len < 1 || heads < 1 || head_dim < 1 || groups < 1 ||
      heads % groups != 0 || state_size < 1 || state_size > kMaxCudaStateSpaceStateSize ||
      b_proj.size(0) != batch || b_proj.size(1) != seq_len || !InnerContiguous(hidden) ||
      !InnerContiguous(b_proj) || !InnerContiguous(c_proj)) {
    return std::nullopt;
  }
  const bool raw_delta = !inputs.delta.defined();
  const torch::Tensor& delta = raw_delta ? inputs.time_step : inputs.delta;  // [B, L, H]
  if (!On(delta, device) || delta.dim() != 3 ||
      delta.sizes() != torch::IntArrayRef({batch, seq_len, heads}) || delta.stride(2) != 1 ||
      delta.scalar_type() != (raw_delta ? compute : torch::kFloat32)) {
    return std::nullopt;
  }
  // The per-head parameters: float32, or the compute dtype (widened in the
  // kernel, so that a prefill launches nothing to widen them).
  auto parameter_taken = [&](const torch::Tensor& parameter) {
    return On(parameter, device) &&
           (parameter.scalar_type() == torch::kFloat32 || parameter.scalar_type() == compute);
  };
  if (raw_delta && inputs.time_step_bias.defined() &&
      (!parameter_taken(inputs.time_step_bias) || inputs.time_step_bias.numel() != heads)) {
    return std::nullopt;
  }
  const bool from_log = !inputs.a_decay.defined();
  const torch::Tensor& decay_rate = from_log ? inputs.a_log : inputs.a_decay;  // [H]
  if (!parameter_taken(decay_rate) || decay_rate.numel() != heads ||
      (!from_log && decay_rate.scalar_type() != torch::kFloat32)) {
    return std::nullopt;
  }
  const bool skip_per_channel =
      inputs.skip.defined() && inputs.skip.numel() == heads * head_dim && head_dim != 1;
  if (inputs.skip.defined() &&
      (!parameter_taken(inputs.skip) || (inputs.skip.numel() != heads && !skip_per_channel))) {
    return std::nullopt;
  }
  const torch::TensorOptions wide = hidden.options().dtype(torch::kFloat32);
  const std::vector<int64_t> state_shape = {batch, heads, head_dim, state_size};
  if (state != nullptr && state->defined() &&
      (!On(*state, device) || state->sizes() != torch::IntArrayRef(state_shape))) {
    return std::nullopt;
  }

  const c10::cuda::CUDAGuard device_guard(device);
  const torch::Tensor rate = decay_rate.contiguous();  // A or A_log, [H]
  const torch::Tensor skip = inputs.skip.defined() ? inputs.skip.contiguous() : inputs.skip;
  const torch::Tensor bias = raw_delta && inputs.time_step_bias.defined()
                                 ? inputs.time_step_bias.contiguous()
                                 : torch::Tensor();  // [H]
  torch::Tensor output = torch::empty({batch, seq_len, heads, head_dim}, wide);  // y
  torch::Tensor state_in;   // [B, H, P, N]
  torch::Tensor state_out;  // [B, H, P, N]
  const bool update_state = in_place && state != nullptr && state->defined() &&
                            state->scalar_type() == torch::kFloat32 && state->is_contiguous();
  if (state != nullptr) {
    if (state->defined()) state_in = state->to(wide).contiguous();
    state_out = update_state ? state_in : torch::empty(state_shape, wide);
  }

  StateSpaceScanLaunchArgs args;
  args.form = form;
  args.batch = batch;
  args.seq_len = seq_len;
  args.heads = heads;
  args.head_dim = head_dim;
  args.groups = groups;
  args.state_size = state_size;
  args.element_type = *element_type;
  args.hidden = Operand(hidden);
  if (raw_delta) {
    args.time_step = Operand(delta);
    args.time_step_bias = Parameter(bias);
    if (inputs.delta_limit.has_value()) {
      args.delta_limited = true;
      args.delta_min = static_cast<float>(inputs.delta_limit->first);
      args.delta_max = static_cast<float>(inputs.delta_limit->second);
    }
  } else {
    args.delta = Operand(delta);
  }
  args.b_proj = Operand(b_proj);
  args.c_proj = Operand(c_proj);
  if (from_log) {
    args.a_log = Parameter(rate);
  } else {
    args.a_decay = rate.data_ptr<float>();
  }
  args.skip = Parameter(skip);
  args.skip_per_channel = skip_per_channel;
  args.state_in = state_in.defined() ? state_in.data_ptr<float>() : nullptr;
  args.state_out = state_out.defined() ? state_out.data_ptr<float>() : nullptr;
  args.output = output.data_ptr<float>();
  // Early reads only of the very tensors the caller vouched for.
  args.operands_early = inputs.operands_settled && rate.is_same(decay_rate) &&
                        (!skip.defined() || skip.is_same(inputs.skip)) &&
                        (!state_in.defined() || state_in.is_same(*state));
  if (form == StateSpaceForm::kChunked && StateSpaceFormFor(args) != StateSpaceForm::kChunked) {
    return std::nullopt;
  }
  torch::Tensor workspace;  // the chunked form's chunk states and decays
  if (const int64_t floats = StateSpaceWorkspaceFloats(args); floats > 0) {
    workspace = torch::empty({floats}, wide);
    args.workspace = workspace.data_ptr<float>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const int status = LaunchStateSpaceScan(args, static_cast<void*>(stream));
  if (status == ScanLaunchNoKernelImageStatus()) {
    (void)cudaGetLastError();  // built for other GPUs: the caller's LibTorch path
    return std::nullopt;
  }
  TORCH_CHECK(status == 0, "state-space scan kernel: ", ScanLaunchErrorString(status));
  if (state != nullptr) *state = state_out;
  return output;
}

int64_t StateSpaceStepEarlyLaunches() { return StateSpaceStepEarlyLaunchCount(); }

}  // namespace icd::scan
