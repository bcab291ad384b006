#include "scan/selective_scan.h"

#include <vector>

namespace icd::scan {

ScanInputs ResolveDelta(const ScanInputs& inputs) {
  if (inputs.delta.defined() || !inputs.delta_proj_weight.defined()) return inputs;
  ScanInputs resolved = inputs;
  resolved.delta = torch::linear(inputs.delta_input, inputs.delta_proj_weight);  // [B, L, I]
  resolved.delta_input = torch::Tensor();
  resolved.delta_proj_weight = torch::Tensor();
  return resolved;
}

torch::Tensor SelectiveScanReference(const ScanInputs& given, torch::ScalarType accumulate,
                                     torch::Tensor* state) {
  const ScanInputs inputs = ResolveDelta(given);
  const int64_t batch = inputs.hidden.size(0);
  const int64_t seq_len = inputs.hidden.size(1);
  const int64_t inner = inputs.hidden.size(2);
  const int64_t state_size = inputs.a_decay.size(1);
  torch::Tensor hidden_wide = inputs.hidden.to(accumulate);  // [B, L, I]
  // Δ = softplus(dt_proj(δ)) in the compute dtype, as HF.
  torch::Tensor delta = torch::softplus(inputs.delta_bias.defined()
                                            ? inputs.delta + inputs.delta_bias
                                            : inputs.delta)
                            .to(accumulate);               // [B, L, I]
  torch::Tensor delta_x = delta * hidden_wide;             // [B, L, I]
  torch::Tensor b_wide = inputs.b_proj.to(accumulate);                // [B, L, N]
  torch::Tensor c_wide = inputs.c_proj.to(accumulate).unsqueeze(-1);  // [B, L, N, 1]

  // Sequential over time: one [B, I, N] state, no [B, I, L, N] tensor.
  torch::Tensor ssm_state =
      state != nullptr && state->defined()
          ? state->to(accumulate)
          : torch::zeros({batch, inner, state_size}, hidden_wide.options());  // [B, I, N]
  std::vector<torch::Tensor> scan_outputs;
  scan_outputs.reserve(static_cast<size_t>(seq_len));
  for (int64_t step = 0; step < seq_len; ++step) {
    torch::Tensor decay =
        torch::exp(delta.select(1, step).unsqueeze(-1) * inputs.a_decay);  // [B, I, N]
    torch::Tensor drive =
        delta_x.select(1, step).unsqueeze(-1) * b_wide.select(1, step).unsqueeze(1);  // [B, I, N]
    ssm_state = decay * ssm_state + drive;
    scan_outputs.push_back(torch::matmul(ssm_state, c_wide.select(1, step)).squeeze(-1));  // [B, I]
  }
  if (state != nullptr) *state = ssm_state;
  torch::Tensor scan_output = torch::stack(scan_outputs, 1);  // [B, L, I]
  // Skip connection D·x, then the gate silu(z).
  scan_output = scan_output + hidden_wide * inputs.d_skip;
  return (scan_output * torch::silu(inputs.gate.to(accumulate))).to(inputs.hidden.scalar_type());
}

ScanInputs TimeSlice(const ScanInputs& inputs, int64_t start, int64_t length) {
  ScanInputs slice = inputs;
  slice.hidden = inputs.hidden.narrow(1, start, length);
  if (inputs.delta.defined()) slice.delta = inputs.delta.narrow(1, start, length);
  if (inputs.delta_input.defined()) slice.delta_input = inputs.delta_input.narrow(1, start, length);
  slice.b_proj = inputs.b_proj.narrow(1, start, length);
  slice.c_proj = inputs.c_proj.narrow(1, start, length);
  slice.gate = inputs.gate.narrow(1, start, length);
  return slice;
}

#ifndef ICD_HAVE_CUDA_SCAN
bool UsesCudaKernel(const ScanInputs&, torch::ScalarType) { return false; }

torch::Tensor SelectiveScan(const ScanInputs& inputs, torch::ScalarType accumulate,
                            torch::Tensor* state, bool /*in_place*/) {
  return SelectiveScanReference(inputs, accumulate, state);
}
#endif  // The CUDA build defines both in selective_scan_cuda.cc.

}  // namespace icd::scan
