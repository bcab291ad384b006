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
// (and its bias) in one dtype the kernel reads, A / D in float32,
// 1 <= N <= kMaxCudaStateSize.
// Δ's time step as dt_proj's product (delta_input, delta_proj_weight) is
// taken in one step of time only.
bool KernelTakes(const ScanInputs& inputs, torch::ScalarType accumulate) {
  if (accumulate != torch::kFloat32) return false;
  const bool delta_in_kernel = !inputs.delta.defined();
  const torch::Tensor& delta = delta_in_kernel ? inputs.delta_input : inputs.delta;
  const torch::Tensor* operands[] = {&inputs.hidden, &delta,          &inputs.a_decay,
                                     &inputs.b_proj, &inputs.c_proj, &inputs.d_skip,
                                     &inputs.gate};
  for (const torch::Tensor* operand : operands) {
    if (!operand->defined() || !operand->is_cuda() ||
        operand->device() != inputs.hidden.device()) {
      return false;
    }
  }
  if (inputs.hidden.dim() != 3 || inputs.a_decay.dim() != 2) return false;
  const int64_t batch = inputs.hidden.size(0);
  const int64_t seq_len = inputs.hidden.size(1);
  const int64_t inner = inputs.hidden.size(2);
  const int64_t state_size = inputs.a_decay.size(1);
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
      !HasSizes(inputs.a_decay, {inner, state_size}) || !HasSizes(inputs.d_skip, {inner})) {
    return false;
  }
  const torch::ScalarType compute = inputs.hidden.scalar_type();
  // The bias in the compute dtype, or already widened to float32 (a decode
  // session keeps it so): the kernel adds it in float32 either way.
  if (inputs.delta_bias.defined() &&
      (!HasSizes(inputs.delta_bias, {inner}) ||
       (inputs.delta_bias.scalar_type() != compute &&
        inputs.delta_bias.scalar_type() != torch::kFloat32) ||
       inputs.delta_bias.device() != inputs.hidden.device())) {
    return false;
  }
  return KernelElementType(compute).has_value() && inputs.gate.scalar_type() == compute &&
         inputs.b_proj.scalar_type() == compute && inputs.c_proj.scalar_type() == compute &&
         delta.scalar_type() == compute &&
         inputs.a_decay.scalar_type() == torch::kFloat32 &&
         inputs.d_skip.scalar_type() == torch::kFloat32;
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
  const torch::Tensor a_decay = inputs.a_decay.contiguous();  // [I, N]
  const torch::Tensor d_skip = inputs.d_skip.contiguous();    // [I]
  // The bias is added in float32 inside the kernel: exact for every dtype.
  const torch::Tensor delta_bias =
      inputs.delta_bias.defined() ? inputs.delta_bias.to(torch::kFloat32).contiguous()
                                  : torch::Tensor();  // [I]
  const int64_t batch = hidden.size(0);
  const int64_t seq_len = hidden.size(1);
  const int64_t inner = hidden.size(2);
  const int64_t state_size = a_decay.size(1);

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
  args.delta_bias = delta_bias.defined() ? delta_bias.data_ptr<float>() : nullptr;
  args.gate = Operand(gate);
  args.b_proj = Operand(b_proj);
  args.c_proj = Operand(c_proj);
  args.a_decay = a_decay.data_ptr<float>();
  args.d_skip = d_skip.data_ptr<float>();
  args.state_in = state_in.defined() ? state_in.data_ptr<float>() : nullptr;
  args.state_out = state_out.defined() ? state_out.data_ptr<float>() : nullptr;
  args.output_rounded = output.data_ptr();
  // Early reads only of the very tensors the caller vouched for.
  args.operands_early =
      inputs.operands_settled && a_decay.is_same(inputs.a_decay) &&
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
