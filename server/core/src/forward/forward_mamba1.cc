// Mamba-1 and FalconMamba mixers, step by step as HF's MambaMixer.slow_forward
// (mamba_symmetries.md §2.2-2.3).
#include <algorithm>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "forward/forward_internal.h"
#include "fused/fused.h"
#include "scan/selective_scan.h"

namespace icd::forward_internal {
namespace {

// One layer's mixer tensors, cast to the dtype each step computes in.
struct Mamba1Layer {
  torch::Tensor in_proj_w;   // [2*d_inner, d_model], compute; rows [x | z]
  torch::Tensor in_proj_b;   // [2*d_inner] or undefined
  torch::Tensor conv_w;      // [d_inner, 1, d_conv]
  torch::Tensor conv_b;      // [d_inner] or undefined
  torch::Tensor x_proj_w;    // [dt_rank + 2*d_state, d_inner]; rows [dt | B | C]
  torch::Tensor dt_proj_w;   // [d_inner, dt_rank]
  torch::Tensor dt_proj_b;   // [d_inner]
  torch::Tensor a_log;       // [d_inner, d_state], as stored
  torch::Tensor d_skip;      // [d_inner], as stored
  torch::Tensor out_proj_w;  // [d_model, d_inner]
  torch::Tensor out_proj_b;  // [d_model] or undefined
  // The projections' weights are the model's own tensors (IsModelTensor).
  bool in_proj_settled = false;
  bool x_proj_settled = false;
  bool dt_proj_settled = false;
  bool out_proj_settled = false;
  bool conv_settled = false;  // conv_w and conv_b (where defined) are the model's own
};

Mamba1Layer Mamba1LayerView(const Weights& weights, int64_t layer, const Precision& precision) {
  const torch::ScalarType compute = precision.compute;
  Mamba1Layer view;
  view.in_proj_w = TensorAs(weights, MixerTensorName(layer, "in_proj.weight"), compute);
  view.in_proj_b = OptionalTensorAs(weights, MixerTensorName(layer, "in_proj.bias"), compute);
  view.conv_w = TensorAs(weights, MixerTensorName(layer, "conv1d.weight"), compute);
  view.conv_b = OptionalTensorAs(weights, MixerTensorName(layer, "conv1d.bias"), compute);
  view.x_proj_w = TensorAs(weights, MixerTensorName(layer, "x_proj.weight"), compute);
  view.dt_proj_w = TensorAs(weights, MixerTensorName(layer, "dt_proj.weight"), compute);
  view.dt_proj_b = TensorAs(weights, MixerTensorName(layer, "dt_proj.bias"), compute);
  view.a_log = weights.at(MixerTensorName(layer, "A_log"));
  view.d_skip = weights.at(MixerTensorName(layer, "D"));
  view.out_proj_w = TensorAs(weights, MixerTensorName(layer, "out_proj.weight"), compute);
  view.out_proj_b = OptionalTensorAs(weights, MixerTensorName(layer, "out_proj.bias"), compute);
  auto settled = [&](const char* suffix, const torch::Tensor& tensor) {
    return IsModelTensor(weights, MixerTensorName(layer, suffix), tensor);
  };
  view.in_proj_settled = settled("in_proj.weight", view.in_proj_w);
  view.x_proj_settled = settled("x_proj.weight", view.x_proj_w);
  view.dt_proj_settled = settled("dt_proj.weight", view.dt_proj_w);
  view.out_proj_settled = settled("out_proj.weight", view.out_proj_w);
  view.conv_settled = settled("conv1d.weight", view.conv_w) &&
                      (!view.conv_b.defined() || settled("conv1d.bias", view.conv_b));
  return view;
}

// scan::SelectiveScan over the whole sequence, in chunks of time carrying
// h from one to the next (the same steps, bitwise), checking ctx between
// chunks. The CUDA kernel takes the sequence in one launch.
torch::Tensor ScanInChunks(const scan::ScanInputs& inputs, torch::ScalarType wide,
                           torch::Tensor* state, bool in_place, const CallContext& ctx,
                           int64_t layer) {
  const int64_t seq_len = inputs.hidden.size(1);
  const int64_t steps =
      ScanStepsPerCheck(inputs.hidden.size(0) * inputs.hidden.size(2) * inputs.b_proj.size(2),
                        kSelectiveScanCheck);  // B·I·N state values a step
  if (seq_len <= steps || scan::UsesCudaKernel(inputs, wide)) {
    return scan::SelectiveScan(inputs, wide, state, in_place);
  }
  const scan::ScanInputs resolved = scan::ResolveParameters(inputs, wide);  // A once, not per chunk
  torch::Tensor carried = state != nullptr ? *state : torch::Tensor();  // h, [B, I, N]
  std::vector<torch::Tensor> outputs;  // [B, steps, I] each
  for (int64_t start = 0; start < seq_len; start += steps) {
    if (start > 0) CheckCallInLayer(ctx, layer);
    const int64_t length = std::min(steps, seq_len - start);
    outputs.push_back(
        scan::SelectiveScan(scan::TimeSlice(resolved, start, length), wide, &carried));
  }
  if (state != nullptr) *state = carried;
  return torch::cat(outputs, 1);  // [B, L, I]
}

}  // namespace

torch::Tensor Mamba1Mixer(const ModelConfig& config, const Weights& weights, int64_t layer,
                          const Precision& precision, const torch::Tensor& normed,
                          const Capture& capture, LayerState* state, const CallContext& ctx) {
  const Mamba1Layer view = Mamba1LayerView(weights, layer, precision);
  const int64_t inner = config.d_inner;
  const int64_t state_size = config.d_state;
  const torch::ScalarType wide = precision.accumulate;

  // 1. Gated MLP's linear projection: [x | z]. A decode step on CUDA takes
  // step 2's conv in the same kernel (fused/fused.h).
  const bool in_place = state != nullptr && state->in_place;
  std::optional<fused::LinearConvStepResult> step;
  if (in_place && normed.size(1) == 1) {
    step = fused::FewRowsLinearConvStep(normed, view.in_proj_w, view.in_proj_b, view.conv_w,
                                        view.conv_b, &state->conv_history, 0,
                                        view.in_proj_settled, view.conv_settled);
  }
  torch::Tensor projected =
      step.has_value()
          ? step->projected
          : Linear(normed, view.in_proj_w, view.in_proj_b, view.in_proj_settled);  // [B, L, 2I]
  torch::Tensor conv_input = projected.narrow(-1, 0, inner);              // [B, L, I]
  torch::Tensor gate = projected.narrow(-1, inner, inner);                // [B, L, I]

  // 2. Causal depthwise convolution (continuing the state's history), then
  // silu: icd's fused kernel on CUDA (fused/fused.h), LibTorch's ops
  // otherwise (the reference, in chunks that check the call).
  std::optional<torch::Tensor> fused_hidden =
      step.has_value() ? std::optional<torch::Tensor>(step->convolved)
                       : fused::CausalConvSilu(
                             conv_input, view.conv_w, view.conv_b,
                             state != nullptr ? state->conv_history : torch::Tensor(),
                             state != nullptr ? &state->conv_history : nullptr,
                             in_place);  // [B, L, I]
  torch::Tensor hidden =
      fused_hidden.has_value()
          ? *std::move(fused_hidden)
          : CausalDepthwiseConv(conv_input, view.conv_w, view.conv_b,
                                state != nullptr ? state->conv_history : torch::Tensor(),
                                state != nullptr ? &state->conv_history : nullptr, ctx, layer,
                                /*then_silu=*/true);  // [B, L, I]

  // 3.a. Selection: x_proj rows are [dt | B | C].
  torch::Tensor ssm_params =
      Linear(hidden, view.x_proj_w, torch::Tensor(), view.x_proj_settled);  // [B, L, R + 2N]
  torch::Tensor time_step = ssm_params.narrow(-1, 0, config.dt_rank);               // [B, L, R]
  torch::Tensor b_proj = ssm_params.narrow(-1, config.dt_rank, state_size);         // [B, L, N]
  torch::Tensor c_proj = ssm_params.narrow(-1, config.dt_rank + state_size, state_size);  // [B, L, N]
  if (config.family == Family::kFalconMamba) {
    // FalconMamba (HF slow path): weightless RMS over N on B and C and over
    // the rank axis on the time step, before dt_proj; results cast back.
    const torch::ScalarType compute = precision.compute;
    b_proj = RmsNormalize(b_proj, config.mixer_rms_eps, wide).to(compute);
    c_proj = RmsNormalize(c_proj, config.mixer_rms_eps, wide).to(compute);
    time_step = RmsNormalize(time_step, config.mixer_rms_eps, wide).to(compute);
  } else if (config.mixer_norm_weights) {
    // Jamba: the same over each, with weights and the block norms' eps.
    const torch::ScalarType compute = precision.compute;
    auto norm = [&](const torch::Tensor& values, const char* weight) {
      return RmsNormalize(values, config.norm_eps, wide).to(compute) *
             TensorAs(weights, MixerTensorName(layer, weight), compute);
    };
    b_proj = norm(b_proj, "b_layernorm.weight");
    c_proj = norm(c_proj, "c_layernorm.weight");
    time_step = norm(time_step, "dt_layernorm.weight");
  }
  // Captured as the scan and dt_proj see them, so FalconMamba's RMS (which
  // commutes with both groups' permutations) is already applied.
  const std::string state_group = LayerGroupName(layer, "state");
  capture.Add(state_group, b_proj);
  capture.Add(state_group, c_proj);
  capture.Add(LayerGroupName(layer, "dt_rank"), time_step);
  // Δ = softplus(dt_proj(δ)), in the compute dtype as HF; the scan applies
  // the softplus. On CUDA the bias is added inside the scan kernel too (one
  // [B, L, I] pass less); on the CPU it stays in the linear, as HF. In one
  // step of time on CUDA the scan kernel takes dt_proj's product as well (a
  // decode step's kernel less).
  const bool bias_in_scan = time_step.is_cuda();
  scan::ScanInputs scan_inputs;
  if (bias_in_scan && time_step.size(1) == 1) {
    scan_inputs.delta_input = time_step;             // [B, 1, R]
    scan_inputs.delta_proj_weight = view.dt_proj_w;  // [I, R]
  } else {
    scan_inputs.delta = Linear(time_step, view.dt_proj_w,
                               bias_in_scan ? torch::Tensor() : view.dt_proj_b,
                               view.dt_proj_settled);  // [B, L, I]
  }

  // 3.b-c. Discretisation, the recurrence over time (from and into the
  // state's h), skip D·x and gate silu(z): scan/selective_scan.h (icd's CUDA
  // kernel on GPU builds).
  scan_inputs.hidden = hidden;
  scan_inputs.delta_bias = bias_in_scan ? view.dt_proj_b : torch::Tensor();
  scan_inputs.b_proj = b_proj;
  scan_inputs.c_proj = c_proj;
  scan_inputs.gate = gate;
  // A = -exp(A_log) and D in `wide`: a decode session's state computes them
  // once (its model does not change); every other call hands A_log, D and
  // the bias over as the model holds them, and the CUDA kernel widens them
  // as it reads them (no kernel launched for them; the other paths widen
  // them first, scan::ResolveParameters).
  if (in_place && state->scan_decay.defined()) {
    scan_inputs.a_decay = state->scan_decay;
    scan_inputs.d_skip = state->scan_skip;
    // The kernel widens the bias exactly; only it takes a float32 one.
    if (state->scan_delta_bias.defined()) scan_inputs.delta_bias = state->scan_delta_bias;
    // Made by an earlier step, as the state was, and dt_proj's weight the
    // model's own: the step kernel may read them before the kernel ahead
    // ends.
    scan_inputs.operands_settled =
        fused::EarlyOperandsEnabled() &&
        (!scan_inputs.delta_proj_weight.defined() || view.dt_proj_settled);
  } else if (in_place) {
    scan_inputs.a_decay = -torch::exp(view.a_log.to(wide));  // [I, N]
    scan_inputs.d_skip = view.d_skip.to(wide);               // [I]
    state->scan_decay = scan_inputs.a_decay;
    state->scan_skip = scan_inputs.d_skip;
    if (bias_in_scan && scan::UsesCudaKernel(scan_inputs, wide)) {
      state->scan_delta_bias = view.dt_proj_b.to(torch::kFloat32);
    }
  } else {
    // (A third dtype, which the kernel does not read, is widened here: a
    // mixed checkpoint still scans in one launch.)
    auto as_held = [&](const torch::Tensor& parameter) {
      const torch::ScalarType type = parameter.scalar_type();
      return type == precision.compute || type == wide ? parameter : parameter.to(wide);
    };
    scan_inputs.a_log = as_held(view.a_log);    // [I, N]
    scan_inputs.d_skip = as_held(view.d_skip);  // [I]
  }
  // Its output is already in the compute dtype.
  torch::Tensor out_proj_input =
      ScanInChunks(scan_inputs, wide, state != nullptr ? &state->ssm_state : nullptr, in_place,
                   ctx, layer);  // [B, L, I]

  // 4. Final linear projection.
  capture.Add(LayerGroupName(layer, "inner"), out_proj_input);
  return Linear(out_proj_input, view.out_proj_w, view.out_proj_b,
                view.out_proj_settled);  // [B, L, d_model]
}

}  // namespace icd::forward_internal
