// Mamba-2 mixer, step by step as HF's Mamba2Mixer.torch_forward and
// mamba_ssm's Mamba2 (mamba_symmetries.md §2.4-2.5). On CUDA the conv, the
// scan and the gated norm are icd's kernels (fused/fused.h,
// scan/state_space_scan.h); elsewhere the scan is the CPU's native loop or
// the chunked form of the state-space duality, and the rest LibTorch ops.
// Each form changes only the order of the sums.
#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "cpu_vector.h"
#include "forward/forward_internal.h"
#include "fused/fused.h"
#include "scan/state_space_scan.h"

namespace icd::forward_internal {
namespace {

// One layer's mixer tensors, cast to the dtype each step computes in.
struct Mamba2Layer {
  torch::Tensor in_proj_w;   // [2*d_inner + 2*ngroups*d_state + nheads, d_model]; rows [z | x | B | C | dt]
  torch::Tensor in_proj_b;   // [same rows] or undefined
  torch::Tensor conv_w;      // [conv_dim, 1, d_conv], conv_dim = d_inner + 2*ngroups*d_state
  torch::Tensor conv_b;      // [conv_dim] or undefined
  torch::Tensor dt_bias;     // [nheads], compute
  torch::Tensor a_log;       // [nheads], as stored
  torch::Tensor d_skip;      // [nheads] or [d_inner] (d_has_hdim), as stored
  torch::Tensor norm_w;      // [d_inner] or undefined (!gated_norm)
  bool norm_settled = false;  // norm_w is the model's own tensor (IsModelTensor)
  torch::Tensor out_proj_w;  // [d_model, d_inner]
  torch::Tensor out_proj_b;  // [d_model] or undefined
  // The projections' weights are the model's own tensors (IsModelTensor; not
  // in_proj's when Falcon-H1's multipliers scale a copy).
  bool in_proj_settled = false;
  bool out_proj_settled = false;
  bool conv_settled = false;  // conv_w and conv_b (where defined) are the model's own
};

Mamba2Layer Mamba2LayerView(const ModelConfig& config, const Weights& weights, int64_t layer,
                            const Precision& precision) {
  const torch::ScalarType compute = precision.compute;
  Mamba2Layer view;
  view.in_proj_w = TensorAs(weights, MixerTensorName(layer, "in_proj.weight"), compute);
  view.in_proj_b = OptionalTensorAs(weights, MixerTensorName(layer, "in_proj.bias"), compute);
  if (!config.ssm_multipliers.empty()) {
    // Falcon-H1's mup_vector on in_proj's output slices [z | x | B | C | dt],
    // folded into a scaled copy of its rows (the weights stay as loaded).
    const int64_t inner = config.d_inner, bc = config.ngroups * config.d_state;
    const std::vector<double>& m = config.ssm_multipliers;
    const auto wide = torch::dtype(torch::kFloat64);  // the multipliers as written
    const torch::Tensor rows = torch::cat(
        {torch::full({inner}, m[0], wide), torch::full({inner}, m[1], wide),
         torch::full({bc}, m[2], wide), torch::full({bc}, m[3], wide),
         torch::full({config.nheads}, m[4], wide)});
    const torch::Tensor scale = rows.to(view.in_proj_w.options());
    view.in_proj_w = view.in_proj_w * scale.unsqueeze(1);
    if (view.in_proj_b.defined()) view.in_proj_b = view.in_proj_b * scale;
  }
  view.conv_w = TensorAs(weights, MixerTensorName(layer, "conv1d.weight"), compute);
  view.conv_b = OptionalTensorAs(weights, MixerTensorName(layer, "conv1d.bias"), compute);
  view.dt_bias = TensorAs(weights, MixerTensorName(layer, "dt_bias"), compute);
  view.a_log = weights.at(MixerTensorName(layer, "A_log"));
  view.d_skip = weights.at(MixerTensorName(layer, "D"));
  view.norm_w = OptionalTensorAs(weights, MixerTensorName(layer, "norm.weight"), compute);
  view.out_proj_w = TensorAs(weights, MixerTensorName(layer, "out_proj.weight"), compute);
  view.out_proj_b = OptionalTensorAs(weights, MixerTensorName(layer, "out_proj.bias"), compute);
  view.in_proj_settled =
      IsModelTensor(weights, MixerTensorName(layer, "in_proj.weight"), view.in_proj_w);
  view.norm_settled = IsModelTensor(weights, MixerTensorName(layer, "norm.weight"), view.norm_w);
  view.out_proj_settled =
      IsModelTensor(weights, MixerTensorName(layer, "out_proj.weight"), view.out_proj_w);
  view.conv_settled =
      IsModelTensor(weights, MixerTensorName(layer, "conv1d.weight"), view.conv_w) &&
      (!view.conv_b.defined() ||
       IsModelTensor(weights, MixerTensorName(layer, "conv1d.bias"), view.conv_b));
  return view;
}

bool HasDtLimit(const ModelConfig& config) {
  return config.dt_min > 0.0 || std::isfinite(config.dt_max);
}

// One row's gated norm on the CPU (GatedNormLoop): per group of
// `group_width` channels, to_norm = y (norm first) or y·silu(z), its mean
// square summed over vectors of lanes, then to_norm·scale·weight (·silu(z)
// when norm first). `scratch` holds 2·group_width floats.
template <int kLanes>
[[gnu::always_inline]] inline void GatedNormRow(const float* values, const float* gate, const float* weight, float* output,
                  int64_t width, int64_t group_width, float eps, bool norm_before_gate,
                  float* scratch) {
  using cpu_vector::Load;
  using cpu_vector::Store;
  using Vector = cpu_vector::Vector<float>;
  float* to_norm = scratch;
  float* activated = scratch + group_width;
  for (int64_t first = 0; first < width; first += group_width) {
    Vector squares{};
    float tail_squares = 0.0f;
    int64_t c = 0;
    for (; c + kLanes <= group_width; c += kLanes) {
      Vector z, y;
      Load(z, gate + first + c);
      Load(y, values + first + c);
      Vector decay = Vector{} - z;
      cpu_vector::Exp(decay);
      const Vector silu = z / (decay + 1.0f);
      const Vector normed = norm_before_gate ? y : y * silu;
      Store(activated + c, silu);
      Store(to_norm + c, normed);
      squares += normed * normed;
    }
    for (; c < group_width; ++c) {
      const float z = gate[first + c];
      const float silu = z / (1.0f + std::exp(-z));
      const float normed = norm_before_gate ? values[first + c] : values[first + c] * silu;
      activated[c] = silu;
      to_norm[c] = normed;
      tail_squares += normed * normed;
    }
    float sum = 0.0f;
    for (int lane = 0; lane < kLanes; ++lane) sum += squares[lane];
    sum += tail_squares;
    const float scale = 1.0f / std::sqrt(sum / static_cast<float>(group_width) + eps);
    for (c = 0; c + kLanes <= group_width; c += kLanes) {
      Vector normed, scales;
      Load(normed, to_norm + c);
      Load(scales, weight + first + c);
      Vector value = normed * scale * scales;
      if (norm_before_gate) {
        Vector silu;
        Load(silu, activated + c);
        value *= silu;
      }
      Store(output + first + c, value);
    }
    for (; c < group_width; ++c) {
      float value = to_norm[c] * scale * weight[first + c];
      if (norm_before_gate) value *= activated[c];
      output[first + c] = value;
    }
  }
}

ICD_VECTOR_CLONES void GatedNormRows(const float* values, const float* gate,
                                     int64_t gate_row_stride, const float* weight, float* output,
                                     int64_t first_row, int64_t end_row, int64_t width,
                                     int64_t group_width, float eps, bool norm_before_gate) {
  std::vector<float> scratch(static_cast<size_t>(2 * group_width));
  for (int64_t row = first_row; row < end_row; ++row) {
    GatedNormRow<cpu_vector::kLanes<float>>(values + row * width, gate + row * gate_row_stride,
                                            weight, output + row * width, width, group_width,
                                            eps, norm_before_gate, scratch.data());
  }
}

// The gated norm as one native pass over float32 rows on the CPU, a task a
// few rows (each row's sums in one order: the result does not depend on the
// number of threads), in place of some eight LibTorch passes and their
// temporaries. scan_output [B, L, I] contiguous, gate [B, L, I] with its
// last axis contiguous (a narrow() of in_proj's output), weight [I].
// nullopt where it does not apply.
std::optional<torch::Tensor> GatedNormLoop(const torch::Tensor& scan_output,
                                           const torch::Tensor& gate, const torch::Tensor& weight,
                                           int64_t groups, double eps, bool norm_before_gate) {
  auto float32_cpu = [](const torch::Tensor& tensor) {
    return tensor.defined() && tensor.device().is_cpu() && tensor.scalar_type() == torch::kFloat32;
  };
  if (!float32_cpu(scan_output) || !float32_cpu(gate) || !float32_cpu(weight) ||
      scan_output.dim() != 3 || !scan_output.is_contiguous() || gate.sizes() != scan_output.sizes() ||
      gate.stride(2) != 1 || gate.stride(0) != gate.size(1) * gate.stride(1) ||
      weight.numel() != scan_output.size(2) || scan_output.size(2) % groups != 0) {
    return std::nullopt;
  }
  const int64_t rows = scan_output.size(0) * scan_output.size(1);
  const int64_t width = scan_output.size(2);
  const torch::Tensor weight_values = weight.contiguous();
  torch::Tensor output = torch::empty_like(scan_output);
  const int64_t rows_per_task = std::max<int64_t>(1, 16384 / width);
  at::parallel_for(0, rows, rows_per_task, [&](int64_t begin, int64_t end) {
    GatedNormRows(scan_output.data_ptr<float>(), gate.data_ptr<float>(), gate.stride(1),
                  weight_values.data_ptr<float>(), output.data_ptr<float>(), begin, end, width,
                  width / groups, static_cast<float>(eps), norm_before_gate);
  });
  return output;
}

// Step 6: the gated RMSNorm. scan_output [B, L, I] in accumulate, gate
// [B, L, I] in compute; returns [B, L, I] in compute. HF
// (grouped_gated_norm=false) normalises over the whole d_inner; mamba_ssm
// over each group of d_inner/ngroups channels. One kernel on CUDA.
torch::Tensor GatedNorm(const ModelConfig& config, const Mamba2Layer& view,
                        const Precision& precision, const torch::Tensor& scan_output,
                        const torch::Tensor& gate) {
  const int64_t groups = config.grouped_gated_norm ? config.ngroups : 1;
  const double eps = config.gated_norm_eps > 0 ? config.gated_norm_eps : config.norm_eps;
  if (config.gated_norm) {
    std::optional<torch::Tensor> fused = fused::GatedRmsNorm(
        scan_output, gate, view.norm_w, groups, eps, config.norm_before_gate, view.norm_settled);
    if (fused.has_value()) return *std::move(fused);
    // float32 on the CPU: one native pass (the output is already float32).
    if (precision.compute == torch::kFloat32) {
      std::optional<torch::Tensor> loop =
          GatedNormLoop(scan_output, gate, view.norm_w, groups, eps, config.norm_before_gate);
      if (loop.has_value()) return *std::move(loop);
    }
  }
  torch::Tensor gate_act = torch::silu(gate.to(precision.accumulate));
  if (!config.gated_norm) return (scan_output * gate_act).to(precision.compute);
  torch::Tensor to_norm = config.norm_before_gate ? scan_output : scan_output * gate_act;
  const std::vector<int64_t> flat_shape = to_norm.sizes().vec();
  std::vector<int64_t> grouped_shape = {flat_shape[0], flat_shape[1], groups,
                                        config.d_inner / groups};
  torch::Tensor normalized = RmsNormalize(to_norm.reshape(grouped_shape), eps,
                                          precision.accumulate)
                                 .reshape(flat_shape);  // [B, L, I]
  // As HF's MambaRMSNormGated: the weight scales the normalised values.
  normalized = normalized * view.norm_w.to(precision.accumulate);
  if (config.norm_before_gate) normalized = normalized * gate_act;
  return normalized.to(precision.compute);
}

// Steps per chunk of the chunked scan. On the CPU the native loop runs
// instead (Scan), 4x faster than the best chunk (docs/mamba2-scan.md); 32
// was that best, LibTorch's batched products being a loop of one small GEMM
// each. On CUDA, mamba_ssm's own default; not yet tuned.
int64_t ScanChunk(const torch::Device& device) { return device.is_cpu() ? 32 : 256; }

// Chunks between two checks of the call: a chunk's work is a few batched
// products, so this checks about as often as the recurrence did every
// ScanStepsPerCheck steps.
constexpr int64_t kScanChunksPerCheck = 16;

// The scan over the whole sequence: on CUDA icd's kernel, in one launch
// (with `in_place`, a decode step writes the state over); on the CPU the
// native loop; elsewhere a decode step (one token) as the recurrence,
// anything longer in the chunked form; in slices of time that carry S from
// one to the next and check ctx between them.
torch::Tensor Scan(const scan::StateSpaceInputs& given, torch::ScalarType accumulate,
                   torch::Tensor* state, bool in_place, const CallContext& ctx, int64_t layer) {
  if (std::optional<torch::Tensor> output = scan::StateSpaceScanCuda(given, state, in_place)) {
    return *std::move(output);
  }
  const scan::StateSpaceInputs inputs = scan::Widened(given, accumulate);
  const int64_t seq_len = inputs.hidden.size(1);
  if (inputs.hidden.device().is_cpu()) {
    // The CPU's form: the recurrence as a native loop, in slices of time as
    // Mamba-1's scan checks the call.
    const int64_t steps = ScanStepsPerCheck(
        inputs.hidden.numel() / seq_len * inputs.b_proj.size(-1), kStateSpaceScanCheck);
    torch::Tensor carried = state != nullptr ? *state : torch::Tensor();  // S, [B, H, P, N]
    std::vector<torch::Tensor> outputs;  // [B, steps, H, P] each
    for (int64_t start = 0; start < seq_len; start += steps) {
      if (start > 0) CheckCallInLayer(ctx, layer);
      std::optional<torch::Tensor> output = scan::StateSpaceScanLoop(
          scan::TimeSlice(inputs, start, std::min(steps, seq_len - start)), &carried);
      if (!output.has_value()) break;  // a dtype the loop does not take
      outputs.push_back(*std::move(output));
    }
    if (static_cast<int64_t>(outputs.size()) * steps >= seq_len) {
      if (state != nullptr) *state = carried;
      return outputs.size() == 1 ? outputs.front() : torch::cat(outputs, 1);  // [B, L, H, P]
    }
  }
  if (seq_len == 1) return scan::StateSpaceScanSequential(inputs, state);
  const int64_t chunk = ScanChunk(inputs.hidden.device());
  const int64_t slice = chunk * kScanChunksPerCheck;
  if (seq_len <= slice) return scan::StateSpaceScanChunked(inputs, chunk, state);
  torch::Tensor carried = state != nullptr ? *state : torch::Tensor();  // S, [B, H, P, N]
  std::vector<torch::Tensor> outputs;  // [B, slice, H, P] each
  for (int64_t start = 0; start < seq_len; start += slice) {
    if (start > 0) CheckCallInLayer(ctx, layer);
    outputs.push_back(scan::StateSpaceScanChunked(
        scan::TimeSlice(inputs, start, std::min(slice, seq_len - start)), chunk, &carried));
  }
  if (state != nullptr) *state = carried;
  return torch::cat(outputs, 1);  // [B, L, H, P]
}

}  // namespace

torch::Tensor Mamba2Mixer(const ModelConfig& config, const Weights& weights, int64_t layer,
                          const Precision& precision, const torch::Tensor& normed,
                          const Capture& capture, LayerState* state, const CallContext& ctx) {
  const Mamba2Layer view = Mamba2LayerView(config, weights, layer, precision);
  const int64_t batch = normed.size(0);
  const int64_t seq_len = normed.size(1);
  const int64_t inner = config.d_inner;
  const int64_t heads = config.nheads;
  const int64_t head_dim = config.headdim;
  const int64_t groups = config.ngroups;
  const int64_t state_size = config.d_state;
  const int64_t group_state = groups * state_size;
  const torch::ScalarType wide = precision.accumulate;

  const int64_t conv_dim = inner + 2 * group_state;

  // 1. Linear projection; order [z | x | B | C | dt] with xBC contiguous. A
  // decode step on CUDA takes step 2's conv in the same kernel (fused/fused.h).
  const bool in_place = state != nullptr && state->in_place;
  std::optional<fused::LinearConvStepResult> step;
  if (in_place && seq_len == 1) {
    step = fused::FewRowsLinearConvStep(normed, view.in_proj_w, view.in_proj_b, view.conv_w,
                                        view.conv_b, &state->conv_history, inner,
                                        view.in_proj_settled, view.conv_settled);
  }
  torch::Tensor projected =
      step.has_value()
          ? step->projected
          : Linear(normed, view.in_proj_w, view.in_proj_b, view.in_proj_settled);  // [B, L, *]
  torch::Tensor gate = projected.narrow(-1, 0, inner);                         // [B, L, I]
  torch::Tensor xbc = projected.narrow(-1, inner, conv_dim);                   // [B, L, conv_dim]
  torch::Tensor time_step = projected.narrow(-1, inner + conv_dim, heads);     // [B, L, H]

  // 2. Causal depthwise conv over xBC only (continuing the state's
  // history), silu, then split x, B, C: icd's fused kernel on CUDA.
  std::optional<torch::Tensor> fused_conv =
      step.has_value() ? std::optional<torch::Tensor>(step->convolved)
                       : fused::CausalConvSilu(
                             xbc, view.conv_w, view.conv_b,
                             state != nullptr ? state->conv_history : torch::Tensor(),
                             state != nullptr ? &state->conv_history : nullptr, in_place);
  if (fused_conv.has_value()) {
    xbc = *std::move(fused_conv);
  } else {
    xbc = CausalDepthwiseConv(xbc, view.conv_w, view.conv_b,
                              state != nullptr ? state->conv_history : torch::Tensor(),
                              state != nullptr ? &state->conv_history : nullptr, ctx, layer,
                              /*then_silu=*/true);  // [B, L, conv_dim]
  }
  const std::string state_group = LayerGroupName(layer, "state");
  capture.Add(state_group, xbc.narrow(-1, inner, group_state));                // B [B, L, G·N]
  capture.Add(state_group, xbc.narrow(-1, inner + group_state, group_state));  // C [B, L, G·N]

  // 3-5. Δ = softplus(dt + dt_bias) (compute dtype, as HF), clamped to
  // dt_limit only when it is not the default (0, inf); A = -exp(A_log), one
  // per head; S_t = exp(Δ_t A) S_{t-1} + Δ_t x_t B_t^T, y_t = S_t C_t + D x_t,
  // from the state's S (zeros without one): scan/state_space_scan.h. x, B,
  // C and the time step go in as the conv and in_proj left them; the scan
  // widens what it needs.
  scan::StateSpaceInputs scan_inputs;
  scan_inputs.hidden = xbc.narrow(-1, 0, inner).reshape({batch, seq_len, heads, head_dim});
  scan_inputs.time_step = time_step;
  scan_inputs.time_step_bias = view.dt_bias;
  if (HasDtLimit(config)) scan_inputs.delta_limit = std::make_pair(config.dt_min, config.dt_max);
  scan_inputs.b_proj =
      xbc.narrow(-1, inner, group_state).reshape({batch, seq_len, groups, state_size});
  scan_inputs.c_proj = xbc.narrow(-1, inner + group_state, group_state)
                           .reshape({batch, seq_len, groups, state_size});
  // A and D (one per head, or one per channel: mamba_ssm D_has_hdim) in
  // `wide`: a decode session computes them once (its model does not change),
  // with dt_bias widened to `wide` (float32 for every dtype the kernel takes,
  // as it adds it; float64 models keep theirs exact).
  if (in_place && state->scan_decay.defined()) {
    scan_inputs.a_decay = state->scan_decay;
    scan_inputs.skip = state->scan_skip;
    scan_inputs.time_step_bias = state->scan_delta_bias;
    // Made by an earlier step, as the state was: the step kernel may read
    // them before the kernel ahead ends.
    scan_inputs.operands_settled = fused::EarlyOperandsEnabled();
  } else if (in_place) {
    scan_inputs.a_decay = -torch::exp(view.a_log.to(wide));  // [H]
    scan_inputs.skip = view.d_skip.to(wide);                 // [H] or [I]
    state->scan_decay = scan_inputs.a_decay;
    state->scan_skip = scan_inputs.skip;
    state->scan_delta_bias = view.dt_bias.to(wide);
  } else {
    // As the model holds them: the CUDA kernels widen them as they read
    // them, the other forms through Widened (the same ops as above).
    scan_inputs.a_log = view.a_log;  // [H]
    scan_inputs.skip = view.d_skip;  // [H] or [I]
  }
  torch::Tensor scan_output =
      Scan(scan_inputs, wide, state != nullptr ? &state->ssm_state : nullptr, in_place, ctx,
           layer)
          .reshape({batch, seq_len, inner});  // [B, L, I]

  // 6. Gated RMSNorm (or the bare gate).
  torch::Tensor gated = GatedNorm(config, view, precision, scan_output, gate);

  capture.Add(LayerGroupName(layer, "headdim"), gated);
  const std::string heads_group = LayerGroupName(layer, "heads");
  if (capture.Wants(heads_group)) {
    // One magnitude per head: invariant under the head's own headdim
    // permutation, so it follows only the head map.
    torch::Tensor per_head = gated.to(wide).reshape({batch, seq_len, heads, head_dim});
    capture.Add(heads_group, per_head.pow(2).mean(-1).sqrt());  // [B, L, H]
  }

  // 7. Final linear projection.
  return Linear(gated, view.out_proj_w, view.out_proj_b,
                view.out_proj_settled);  // [B, L, d_model]
}

}  // namespace icd::forward_internal
