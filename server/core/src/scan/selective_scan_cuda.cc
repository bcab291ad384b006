// CUDA builds only (ICD_HAVE_CUDA_SCAN): SelectiveScan on icd's kernel
// (selective_scan.cu, through the plain interface selective_scan_launch.h)
// when it takes the inputs, the LibTorch reference otherwise: float64
// models, CPU tensors, N above kMaxCudaStateSize, mixed compute dtypes, and
// GPUs the build's CUDA architectures do not cover.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <initializer_list>
#include <optional>

#include "scan/kernel_operands.h"
#include "scan/selective_scan.h"
#include "scan/selective_scan_launch.h"

namespace icd::scan {
namespace {

bool HasSizes(const torch::Tensor& tensor, std::initializer_list<int64_t> sizes) {
  return tensor.sizes() == torch::IntArrayRef(sizes);
}

// The kernel's domain: float32 accumulation, every tensor on one CUDA
// device, shapes as ScanInputs states them, x / z / B / C / the time step
// in one dtype the kernel reads, A in float32, A_log / D / the bias in
// float32 or that dtype, 1 <= N <= kMaxCudaStateSize.
// Δ's time step as dt_proj's product (delta_input, delta_proj_weight) is
// taken in one step of time only.
bool KernelTakes(const ScanInputs& inputs, torch::ScalarType accumulate) {
  if (accumulate != torch::kFloat32) return false;
  const bool delta_in_kernel = !inputs.delta.defined();
  const torch::Tensor& delta = delta_in_kernel ? inputs.delta_input : inputs.delta;
  const bool from_log = !inputs.a_decay.defined();
  const torch::Tensor& decay_rate = from_log ? inputs.a_log : inputs.a_decay;  // A or A_log
  const torch::Tensor* operands[] = {&inputs.hidden, &delta,          &decay_rate,
                                     &inputs.b_proj, &inputs.c_proj, &inputs.d_skip,
                                     &inputs.gate};
  for (const torch::Tensor* operand : operands) {
    if (!operand->defined() || !operand->is_cuda() ||
        operand->device() != inputs.hidden.device()) {
      return false;
    }
  }
  if (inputs.hidden.dim() != 3 || decay_rate.dim() != 2) return false;
  const int64_t batch = inputs.hidden.size(0);
  const int64_t seq_len = inputs.hidden.size(1);
  const int64_t inner = inputs.hidden.size(2);
  const int64_t state_size = decay_rate.size(1);
  if (batch < 1 || batch > 65535 || seq_len < 1 || inner < 1 || state_size < 1 ||
      state_size > kMaxCudaStateSize) {
    return false;
  }
  if (delta_in_kernel &&
      (seq_len != 1 || !inputs.delta_proj_weight.defined() || delta.dim() != 3 ||
       !HasSizes(delta, {batch, seq_len, delta.size(2)}) ||
       !HasSizes(inputs.delta_proj_weight, {inner, delta.size(2)}) ||
       !inputs.delta_proj_weight.is_contiguous() ||
       inputs.delta_proj_weight.device() != inputs.hidden.device() ||
       inputs.delta_proj_weight.scalar_type() != inputs.hidden.scalar_type())) {
    return false;
  }
  if (!HasSizes(delta_in_kernel ? inputs.gate : inputs.delta, {batch, seq_len, inner}) ||
      !HasSizes(inputs.gate, {batch, seq_len, inner}) ||
      !HasSizes(inputs.b_proj, {batch, seq_len, state_size}) ||
      !HasSizes(inputs.c_proj, {batch, seq_len, state_size}) ||
      !HasSizes(decay_rate, {inner, state_size}) || !HasSizes(inputs.d_skip, {inner})) {
    return false;
  }
  const torch::ScalarType compute = inputs.hidden.scalar_type();
  // A parameter as the model holds it or widened to float32 (a decode
  // session keeps them so): the kernel reads either in float32.
  auto parameter_taken = [&](const torch::Tensor& parameter) {
    return parameter.scalar_type() == compute || parameter.scalar_type() == torch::kFloat32;
  };
  if (inputs.delta_bias.defined() &&
      (!HasSizes(inputs.delta_bias, {inner}) || !parameter_taken(inputs.delta_bias) ||
       inputs.delta_bias.device() != inputs.hidden.device())) {
    return false;
  }
  return KernelElementType(compute).has_value() && inputs.gate.scalar_type() == compute &&
         inputs.b_proj.scalar_type() == compute && inputs.c_proj.scalar_type() == compute &&
         delta.scalar_type() == compute &&
         (from_log ? parameter_taken(decay_rate) : decay_rate.scalar_type() == torch::kFloat32) &&
         parameter_taken(inputs.d_skip);
}

// The kernel reads rows (the last axis) contiguous and takes any batch and
// time strides, so the engine's narrow() views of in_proj / x_proj outputs
// go in as they are.
torch::Tensor RowContiguous(const torch::Tensor& tensor) {
  return tensor.stride(-1) == 1 ? tensor : tensor.contiguous();
}

}  // namespace

bool UsesCudaKernel(const ScanInputs& inputs, torch::ScalarType accumulate) {
  return KernelTakes(inputs, accumulate);
}

torch::Tensor SelectiveScan(const ScanInputs& inputs, torch::ScalarType accumulate,
                            torch::Tensor* state, bool in_place) {
  if (!KernelTakes(inputs, accumulate)) {
    if (std::optional<torch::Tensor> loop = SelectiveScanLoop(inputs, accumulate, state)) {
      return *std::move(loop);  // CPU tensors
    }
    if (!inputs.delta.defined() && inputs.delta_proj_weight.defined()) {
      // dt_proj's product by torch::linear, then the kernel if it takes that.
      return SelectiveScan(ResolveDelta(inputs), accumulate, state, in_place);
    }
    return SelectiveScanReference(inputs, accumulate, state);
  }
  const c10::cuda::CUDAGuard device_guard(inputs.hidden.device());
  const bool delta_in_kernel = !inputs.delta.defined();
  const torch::Tensor hidden = RowContiguous(inputs.hidden);  // [B, L, I]
  // [B, L, I], or δ [B, L, R]
  const torch::Tensor delta = RowContiguous(delta_in_kernel ? inputs.delta_input : inputs.delta);
  const torch::Tensor gate = RowContiguous(inputs.gate);      // [B, L, I]
  const torch::Tensor b_proj = RowContiguous(inputs.b_proj);  // [B, L, N]
  const torch::Tensor c_proj = RowContiguous(inputs.c_proj);  // [B, L, N]
  // A, or A_log [I, N]; D and the bias [I], widened in the kernel (the
  // bias is added in float32 there: exact for every dtype).
  const torch::Tensor a_decay =
      inputs.a_decay.defined() ? inputs.a_decay.contiguous() : torch::Tensor();
  const torch::Tensor a_log = a_decay.defined() ? torch::Tensor() : inputs.a_log.contiguous();
  const torch::Tensor d_skip = inputs.d_skip.contiguous();
  const torch::Tensor delta_bias =
      inputs.delta_bias.defined() ? inputs.delta_bias.contiguous() : torch::Tensor();
  const int64_t batch = hidden.size(0);
  const int64_t seq_len = hidden.size(1);
  const int64_t inner = hidden.size(2);
  const int64_t state_size = (a_decay.defined() ? a_decay : a_log).size(1);

  const torch::TensorOptions wide = hidden.options().dtype(torch::kFloat32);
  torch::Tensor output = torch::empty({batch, seq_len, inner}, hidden.options());  // [B, L, I]
  torch::Tensor state_in;                                              // [B, I, N]
  torch::Tensor state_out;                                             // [B, I, N]
  // Written over: each h element is read and written by one thread.
  const bool update_state = in_place && state != nullptr && state->defined() &&
                            state->scalar_type() == torch::kFloat32 && state->is_contiguous();
  if (state != nullptr) {
    if (state->defined()) {
      state_in = state->to(wide).contiguous();
      TORCH_CHECK(HasSizes(state_in, {batch, inner, state_size}),
                  "selective scan: state must be [", batch, ", ", inner, ", ", state_size,
                  "], got ", state->sizes());
    }
    state_out = update_state ? state_in : torch::empty({batch, inner, state_size}, wide);
  }

  ScanLaunchArgs args;
  args.batch = batch;
  args.seq_len = seq_len;
  args.inner = inner;
  args.state_size = state_size;
  args.element_type = *KernelElementType(hidden.scalar_type());
  args.hidden = Operand(hidden);
  if (delta_in_kernel) {
    args.delta_proj_input = Operand(delta);
    args.delta_proj_weight = inputs.delta_proj_weight.data_ptr();
    args.delta_rank = delta.size(2);
  } else {
    args.delta_raw = Operand(delta);
  }
  args.delta_bias = Parameter(delta_bias);
  args.gate = Operand(gate);
  args.b_proj = Operand(b_proj);
  args.c_proj = Operand(c_proj);
  args.a_decay = a_decay.defined() ? a_decay.data_ptr<float>() : nullptr;
  args.a_log = Parameter(a_log);
  args.d_skip = Parameter(d_skip);
  args.state_in = state_in.defined() ? state_in.data_ptr<float>() : nullptr;
  args.state_out = state_out.defined() ? state_out.data_ptr<float>() : nullptr;
  args.output_rounded = output.data_ptr();
  // Early reads only of the very tensors the caller vouched for.
  args.operands_early =
      inputs.operands_settled &&
      (a_decay.defined() ? a_decay.is_same(inputs.a_decay) : a_log.is_same(inputs.a_log)) &&
      d_skip.is_same(inputs.d_skip) &&
      (!delta_bias.defined() || delta_bias.is_same(inputs.delta_bias)) &&
      (!state_in.defined() || state_in.is_same(*state));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(hidden.device().index()).stream();
  const int status = LaunchSelectiveScan(args, static_cast<void*>(stream));
  if (status == ScanLaunchNoKernelImageStatus()) {
    // Built for other CUDA architectures than this GPU's: still correct.
    return SelectiveScanReference(inputs, accumulate, state);
  }
  TORCH_CHECK(status == 0, "selective scan kernel: ", ScanLaunchErrorString(status));
  if (state != nullptr) *state = state_out;
  return output;
}

int64_t SelectiveStateStepEarlyLaunches() { return SelectiveStateStepEarlyLaunchCount(); }

}  // namespace icd::scan
