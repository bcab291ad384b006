// Forward dispatch and the pieces every family shares: embedding, block norms
// (RMSNorm, or mamba_ssm's LayerNorm), residual stream, final norm and head.
// The mixers live in forward_mamba1.cc and forward_mamba2.cc.
#include "forward/forward.h"

#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <exception>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "blocks/mixer.h"
#include "io/config.h"
#include "cpu_vector.h"
#include "forward/forward_internal.h"
#include "fused/fused.h"
#include "icd/core/status_macros.h"

namespace icd {
namespace forward_internal {

absl::Status CheckTensor(const Weights& weights, const std::string& name,
                         const std::vector<int64_t>& shape) {
  auto found = weights.find(name);
  if (found == weights.end() || !found->second.defined()) {
    return absl::InvalidArgumentError(absl::StrCat("missing tensor ", name));
  }
  const torch::Tensor& tensor = found->second;
  if (tensor.sizes().vec() != shape) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor ", name, " has shape [", absl::StrJoin(tensor.sizes().vec(), ", "),
        "], expected [", absl::StrJoin(shape, ", "), "]"));
  }
  if (!tensor.is_floating_point()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor ", name, " is not floating point"));
  }
  return absl::OkStatus();
}

torch::Tensor TensorAs(const Weights& weights, const std::string& name,
                       torch::ScalarType dtype) {
  return weights.at(name).to(dtype);
}

torch::Tensor OptionalTensorAs(const Weights& weights, const std::string& name,
                               torch::ScalarType dtype) {
  auto found = weights.find(name);
  if (found == weights.end()) return torch::Tensor();
  return found->second.to(dtype);
}

torch::Tensor Linear(const torch::Tensor& input, const torch::Tensor& weight,
                     const torch::Tensor& bias, bool weight_settled) {
  std::optional<torch::Tensor> few_rows =
      fused::FewRowsLinear(input, weight, bias, weight_settled);
  if (few_rows.has_value()) return *std::move(few_rows);
  return torch::linear(input, weight, bias);
}

bool IsModelTensor(const Weights& weights, const std::string& name, const torch::Tensor& view) {
  auto found = weights.find(name);
  return found != weights.end() && view.is_same(found->second);
}

torch::Tensor RmsNormalize(const torch::Tensor& values, double eps,
                           torch::ScalarType accumulate) {
  torch::Tensor wide = values.to(accumulate);
  torch::Tensor mean_square = wide.pow(2).mean(-1, /*keepdim=*/true);
  return wide * torch::rsqrt(mean_square + eps);
}

void Capture::Add(const std::string& group, const torch::Tensor& values) const {
  if (!Wants(group)) return;
  sink_->Add(group, values.reshape({-1, values.size(-1)}));
}

void CheckCallInLayer(const CallContext& ctx, int64_t layer) {
  absl::Status status = CheckCall(ctx, "forward");
  if (!status.ok()) {
    throw CallStopped{absl::Status(status.code(),
                                   absl::StrCat(status.message(), " (in layer ", layer, ")"))};
  }
}

int64_t ScanStepsPerCheck(int64_t state_elements, const ScanCheck& check) {
  return std::clamp<int64_t>(check.values / std::max<int64_t>(state_elements, 1), 1,
                             check.most_steps);
}

std::string LayerGroupName(int64_t layer, const std::string& suffix) {
  return absl::StrCat("layers.", layer, ".", suffix);
}

namespace {

using cpu_vector::kLanes;
using cpu_vector::Load;
using cpu_vector::Store;
using cpu_vector::Vector;

// The CPU's causal conv, one batch row's positions [first, last): out[t, c] =
// bias[c] + Σ_k taps[k, c] · in[t - K+1 + k, c] (bias first, then the taps
// oldest to newest, as the CUDA kernel), where positions before 0 come from
// `history` [C, K-1] (null: zeros). values rows `time_stride` apart,
// channels contiguous; taps [K, C]; out [L, C]. With `silu` (float32 only)
// out is silu of the conv, e^-x by cpu_vector::Exp.
// Rows of `values` prefetched ahead of the one being read: they are in_proj's
// output rows, time_stride apart, just written by the GEMM and not in a
// pattern the hardware prefetcher follows (the conv of mamba2-pydoc's
// Evaluate 5.0 -> 1.6 ms on the 2-core VM, docs/mamba2-scan.md).
constexpr int64_t kConvRowsAhead = 4;

template <class Scalar>
[[gnu::always_inline]] inline void ConvRows(const Scalar* values, int64_t time_stride,
                                            const Scalar* taps, const Scalar* bias,
                                            const Scalar* history, int64_t channels,
                                            int64_t kernel, int64_t first, int64_t last,
                                            bool silu, Scalar* __restrict__ out) {
  const int64_t blocked = channels - channels % kLanes<Scalar>;
  const int64_t halo = kernel - 1;
  for (int64_t t = first; t < last; ++t) {
    Scalar* row = out + t * channels;
    if (t >= halo) {
      for (int64_t c0 = 0; c0 < blocked; c0 += kLanes<Scalar>) {
        if (t + kConvRowsAhead < last) {
          __builtin_prefetch(values + (t + kConvRowsAhead) * time_stride + c0);
        }
        Vector<Scalar> sum = {}, tap, value;
        if (bias != nullptr) Load(sum, bias + c0);
        for (int64_t k = 0; k < kernel; ++k) {
          Load(tap, taps + k * channels + c0);
          Load(value, values + (t - halo + k) * time_stride + c0);
          sum += tap * value;
        }
        if constexpr (std::is_same_v<Scalar, float>) {
          if (silu) {
            Vector<float> decay = Vector<float>{} - sum;
            cpu_vector::Exp(decay);
            sum = sum / (decay + 1.0f);
          }
        }
        Store(row + c0, sum);
      }
    }
    for (int64_t c = t >= halo ? blocked : 0; c < channels; ++c) {
      Scalar sum = bias != nullptr ? bias[c] : Scalar(0);
      for (int64_t k = 0; k < kernel; ++k) {
        const int64_t source = t - halo + k;
        const Scalar value = source >= 0 ? values[source * time_stride + c]
                             : history != nullptr ? history[c * halo + halo + source]
                                                  : Scalar(0);
        sum += taps[k * channels + c] * value;
      }
      row[c] = silu ? sum / (Scalar(1) + std::exp(-sum)) : sum;
    }
  }
}

ICD_VECTOR_CLONES void ConvRowsOf(const float* values, int64_t time_stride, const float* taps,
                                  const float* bias, const float* history, int64_t channels,
                                  int64_t kernel, int64_t first, int64_t last, bool silu,
                                  float* out) {
  ConvRows<float>(values, time_stride, taps, bias, history, channels, kernel, first, last, silu,
                  out);
}

ICD_VECTOR_CLONES void ConvRowsOf(const double* values, int64_t time_stride, const double* taps,
                                  const double* bias, const double* history, int64_t channels,
                                  int64_t kernel, int64_t first, int64_t last, bool silu,
                                  double* out) {
  ConvRows<double>(values, time_stride, taps, bias, history, channels, kernel, first, last, silu,
                   out);
}

template <class Scalar>
torch::Tensor ConvLoop(const torch::Tensor& values, const torch::Tensor& weight,
                       const torch::Tensor& bias, const torch::Tensor& history, bool silu) {
  const int64_t batch = values.size(0), seq_len = values.size(1), channels = values.size(2);
  const int64_t kernel = weight.size(2);
  const torch::Tensor taps = weight.reshape({channels, kernel}).t().contiguous();  // [K, C]
  const torch::Tensor bias_values = bias.defined() ? bias.contiguous() : bias;      // [C]
  const torch::Tensor past = history.defined() ? history.contiguous() : history;   // [B, C, K-1]
  torch::Tensor output = torch::empty({batch, seq_len, channels}, values.options());
  const int64_t rows_per_task = std::max<int64_t>(1, 16384 / channels);
  at::parallel_for(0, batch * seq_len, rows_per_task, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t b = begin / seq_len;
      const int64_t stop = std::min(end, (b + 1) * seq_len);
      ConvRowsOf(values.data_ptr<Scalar>() + b * values.stride(0), values.stride(1),
                 taps.data_ptr<Scalar>(),
                 bias_values.defined() ? bias_values.data_ptr<Scalar>() : nullptr,
                 past.defined() ? past.data_ptr<Scalar>() + b * channels * (kernel - 1) : nullptr,
                 channels, kernel, begin - b * seq_len, stop - b * seq_len, silu,
                 output.data_ptr<Scalar>() + b * seq_len * channels);
      begin = stop;
    }
  });
  return output;
}

// CausalDepthwiseConvPass as a native loop on the CPU (float32, float64;
// channels contiguous): [B, L, C] contiguous out, with no transposes and no
// conv1d; with `silu` (float32) silu of the conv in the same pass, which
// *silu_taken then says. nullopt where it does not apply.
std::optional<torch::Tensor> CausalDepthwiseConvLoop(const torch::Tensor& values,
                                                     const torch::Tensor& weight,
                                                     const torch::Tensor& bias,
                                                     const torch::Tensor& history, bool silu,
                                                     bool* silu_taken) {
  const torch::ScalarType dtype = values.scalar_type();
  if (!values.device().is_cpu() || values.dim() != 3 || values.stride(2) != 1 ||
      (dtype != torch::kFloat32 && dtype != torch::kFloat64) || weight.scalar_type() != dtype ||
      !weight.device().is_cpu() || (bias.defined() && bias.scalar_type() != dtype) ||
      (history.defined() && (!history.device().is_cpu() || history.scalar_type() != dtype))) {
    return std::nullopt;
  }
  *silu_taken = silu && dtype == torch::kFloat32;
  return dtype == torch::kFloat32 ? ConvLoop<float>(values, weight, bias, history, silu)
                                  : ConvLoop<double>(values, weight, bias, history, false);
}

// One conv1d over all of `values` (CausalDepthwiseConv's contract).
torch::Tensor CausalDepthwiseConvPass(const torch::Tensor& values, const torch::Tensor& weight,
                                      const torch::Tensor& bias, const torch::Tensor& history,
                                      torch::Tensor* next_history, bool then_silu) {
  const int64_t seq_len = values.size(1);
  const int64_t channels = weight.size(0);
  const int64_t kernel = weight.size(2);
  auto activated = [then_silu](torch::Tensor conv) {
    return then_silu ? torch::silu(conv) : conv;
  };
  bool silu_taken = false;
  if (std::optional<torch::Tensor> conv =
          CausalDepthwiseConvLoop(values, weight, bias, history, then_silu, &silu_taken)) {
    if (next_history != nullptr) {
      // The last K-1 inputs of [history | values] (zeros before the sequence).
      const torch::Tensor channels_first = values.transpose(1, 2);  // [B, C, L]
      const torch::Tensor past =
          history.defined() ? history.to(values.scalar_type())
                            : torch::zeros({values.size(0), channels, kernel - 1}, values.options());
      *next_history = torch::cat({past, channels_first}, 2)
                          .narrow(2, seq_len, kernel - 1)
                          .contiguous();  // [B, C, K-1]
    }
    return silu_taken ? *std::move(conv) : activated(*std::move(conv));  // [B, L, C]
  }
  // conv1d wants channels first.
  const torch::Tensor channels_first = values.transpose(1, 2);  // [B, C, L]
  if (history.defined()) {
    // The history stands in for the left padding: L outputs, all causal.
    torch::Tensor extended =
        torch::cat({history.to(channels_first.scalar_type()), channels_first}, 2);  // [B, C, K-1+L]
    if (next_history != nullptr) {
      *next_history = extended.narrow(2, seq_len, kernel - 1).contiguous();  // [B, C, K-1]
    }
    const int64_t no_padding = 0;  // a literal 0 would also match conv1d's string padding
    torch::Tensor conv = torch::conv1d(extended, weight, bias, /*stride=*/1, no_padding,
                                       /*dilation=*/1, /*groups=*/channels);
    return activated(conv.transpose(1, 2));  // [B, L, C]
  }
  if (next_history != nullptr) {
    // Zeros before the sequence, so a sequence shorter than K-1 keeps some.
    *next_history = torch::constant_pad_nd(channels_first, {kernel - 1, 0})
                        .narrow(2, seq_len, kernel - 1)
                        .contiguous();  // [B, C, K-1]
  }
  // Zero history: padding K-1 on both sides, and the first L outputs are the
  // causal ones.
  torch::Tensor conv = torch::conv1d(channels_first, weight, bias,
                                     /*stride=*/1, /*padding=*/kernel - 1,
                                     /*dilation=*/1, /*groups=*/channels);
  return activated(conv.narrow(2, 0, seq_len).transpose(1, 2));  // [B, L, C]
}

}  // namespace

torch::Tensor CausalDepthwiseConv(const torch::Tensor& values, const torch::Tensor& weight,
                                  const torch::Tensor& bias, const torch::Tensor& history,
                                  torch::Tensor* next_history, const CallContext& ctx,
                                  int64_t layer, bool then_silu) {
  // On the CPU long inputs go in chunks of time of about 4096 positions,
  // each continuing the history of the one before, with a check of ctx
  // between them: one conv1d over a long input cannot be stopped
  // (docs/results.md, "Notes from the sources").
  const int64_t batch = values.size(0);
  const int64_t seq_len = values.size(1);
  const int64_t steps = std::max<int64_t>(1, kPositionsPerChunk / std::max<int64_t>(batch, 1));
  if (!values.device().is_cpu() || seq_len <= steps) {
    return CausalDepthwiseConvPass(values, weight, bias, history, next_history, then_silu);
  }
  torch::Tensor carried = history;  // [B, C, K-1] or undefined (zeros)
  std::vector<torch::Tensor> outputs;  // [B, steps, C] each
  for (int64_t start = 0; start < seq_len; start += steps) {
    if (start > 0) CheckCallInLayer(ctx, layer);
    torch::Tensor next;
    outputs.push_back(CausalDepthwiseConvPass(
        values.narrow(1, start, std::min(steps, seq_len - start)), weight, bias, carried, &next,
        then_silu));
    carried = next;
  }
  if (next_history != nullptr) *next_history = carried;
  return torch::cat(outputs, 1);  // [B, L, C]
}

}  // namespace forward_internal

namespace {

using forward_internal::Capture;
using forward_internal::CheckTensor;
using forward_internal::Precision;

constexpr char kFinalNorm[] = "backbone.norm_f";

absl::Status CheckConfig(const ModelConfig& config) {
  if (config.d_model <= 0 || config.n_layer <= 0 || config.vocab_size <= 0 ||
      config.d_inner <= 0 || config.d_state <= 0 || config.d_conv <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "config needs positive d_model, n_layer, vocab_size, d_inner, d_state, d_conv; got ",
        config.d_model, ", ", config.n_layer, ", ", config.vocab_size, ", ", config.d_inner,
        ", ", config.d_state, ", ", config.d_conv));
  }
  if (static_cast<int64_t>(config.mixers.size()) != config.n_layer) {
    return absl::InvalidArgumentError(absl::StrCat(
        "config plans ", config.mixers.size(), " blocks for ", config.n_layer, " layers"));
  }
  for (const MixerType type : blocks::MixerTypes(config)) {
    ICD_RETURN_IF_ERROR(blocks::ShapesOf(type).check_config(config));
  }
  return absl::OkStatus();
}

// Every tensor the config implies, with its shape (config.h's one table), and
// nothing else: a silently ignored bias would change the function unnoticed.
// A tied head may still be listed under its own name: it is then ignored.
absl::Status CheckWeights(const ModelConfig& config, const Weights& weights) {
  const auto expected = ExpectedShapes(config);
  for (const auto& [name, shape] : expected) {
    absl::Status status = CheckTensor(weights, name, shape);
    if (!status.ok()) return status;
  }
  for (const auto& [name, tensor] : weights) {
    if (expected.count(name) == 0 && !(config.tied && name == kHeadTensor)) {
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected tensor ", name, ": the config says it is absent"));
    }
  }
  // One device per layer, the final norm's for the head: the forward moves
  // the residual stream between layers only (LoadOptions::placement).
  const torch::Device tail = weights.at(std::string(kFinalNorm) + ".weight").device();
  for (const auto& [name, tensor] : weights) {
    if (!tensor.defined() || name == kEmbeddingTensor) continue;
    const int64_t layer = LayerOfTensor(name);
    const std::string anchor =
        layer >= 0 ? LayerTensorName(layer, "norm.weight") : std::string(kFinalNorm) + ".weight";
    const torch::Device device = layer >= 0 ? weights.at(anchor).device() : tail;
    if (tensor.device() != device) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", name, " is on ",
                                                     tensor.device().str(), ", ", anchor,
                                                     " on ", device.str()));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckInputIds(const ModelConfig& config, const torch::Tensor& input_ids) {
  if (!input_ids.defined() || input_ids.dim() != 2 || input_ids.scalar_type() != torch::kInt64) {
    return absl::InvalidArgumentError("input_ids must be an int64 tensor [batch, seq]");
  }
  if (input_ids.size(0) <= 0 || input_ids.size(1) <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("input_ids is empty: [",
                                                   input_ids.size(0), ", ", input_ids.size(1), "]"));
  }
  const int64_t lowest = input_ids.min().item<int64_t>();
  const int64_t highest = input_ids.max().item<int64_t>();
  if (lowest < 0 || highest >= config.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat("input_ids outside [0, ", config.vocab_size,
                                                   "): min ", lowest, ", max ", highest));
  }
  return absl::OkStatus();
}

// A non-empty state must be one this config and batch produced: one layer
// state per layer, each tensor of the shape forward.h gives.
absl::Status CheckState(const ModelConfig& config, const RecurrentState& state, int64_t batch) {
  if (state.layers.empty()) return absl::OkStatus();
  if (static_cast<int64_t>(state.layers.size()) != config.n_layer) {
    return absl::InvalidArgumentError(absl::StrCat("recurrent state has ", state.layers.size(),
                                                   " layers, the model ", config.n_layer));
  }

  // An empty expected shape: the kind holds no such tensor; kAnyLength: a
  // cache's time axis, any length.
  auto check = [batch](size_t layer, const char* what, const torch::Tensor& tensor,
                       const std::vector<int64_t>& shape) {
    if (shape.empty() && !tensor.defined()) return absl::OkStatus();
    bool fits = tensor.defined() && tensor.dim() == static_cast<int64_t>(shape.size());
    for (size_t axis = 0; fits && axis < shape.size(); ++axis) {
      fits = shape[axis] == blocks::kAnyLength || tensor.size(static_cast<int64_t>(axis)) == shape[axis];
    }
    if (fits) return absl::OkStatus();
    std::vector<std::string> expected;
    for (const int64_t size : shape) {
      expected.push_back(size == blocks::kAnyLength ? "any" : std::to_string(size));
    }
    return absl::InvalidArgumentError(absl::StrCat(
        "recurrent state: layer ", layer, " ", what, " is ",
        tensor.defined() ? absl::StrCat("[", absl::StrJoin(tensor.sizes().vec(), ", "), "]")
                         : "undefined",
        ", expected ", shape.empty() ? "none" : absl::StrCat("[", absl::StrJoin(expected, ", "), "]"),
        " (batch ", batch, ")"));
  };
  for (size_t layer = 0; layer < state.layers.size(); ++layer) {
    const LayerState& layer_state = state.layers[layer];
    blocks::StateShapes shapes =
        blocks::ShapesAt(config, static_cast<int64_t>(layer)).state_shapes(config, batch);
    if (blocks::AttentionBeside(config, static_cast<int64_t>(layer))) {
      // the attention's cache beside the Mamba state
      shapes.attention_cache = blocks::kAttentionShapes.state_shapes(config, batch).attention_cache;
    }
    absl::Status status =
        check(layer, "conv_history", layer_state.conv_history, shapes.conv_history);
    if (status.ok()) status = check(layer, "ssm_state", layer_state.ssm_state, shapes.ssm_state);
    if (status.ok()) {
      status = check(layer, "attention_keys", layer_state.attention_keys, shapes.attention_cache);
    }
    if (status.ok()) {
      status =
          check(layer, "attention_values", layer_state.attention_values, shapes.attention_cache);
    }
    if (status.ok() && layer_state.attention_keys.defined() &&
        layer_state.attention_keys.size(2) != layer_state.attention_values.size(2)) {
      status = absl::InvalidArgumentError(absl::StrCat(
          "recurrent state: layer ", layer, " holds ", layer_state.attention_keys.size(2),
          " positions of keys and ", layer_state.attention_values.size(2), " of values"));
    }
    if (!status.ok()) return status;
  }
  return absl::OkStatus();
}

absl::Status PollContext(const CallContext& ctx, int64_t layer) {
  absl::Status status = CheckCall(ctx, "forward");
  if (status.ok()) return status;
  return absl::Status(status.code(),
                      absl::StrCat(status.message(), " (before layer ", layer, ")"));
}

// residual [B, L, d_model] in precision.accumulate -> [B, L, d_model] in
// precision.compute. RMSNorm as HF's MambaRMSNorm: normalise wide, cast back,
// then scale by the weight. LayerNorm (mamba_ssm rms_norm=False) entirely wide.
torch::Tensor BlockNorm(const ModelConfig& config, const Weights& weights,
                        const std::string& prefix, const Precision& precision,
                        const torch::Tensor& residual) {
  if (config.layer_norm) {
    torch::Tensor weight = forward_internal::TensorAs(weights, prefix + ".weight", precision.accumulate);
    torch::Tensor bias = forward_internal::TensorAs(weights, prefix + ".bias", precision.accumulate);
    return torch::layer_norm(residual.to(precision.accumulate), {config.d_model}, weight, bias,
                             config.norm_eps)
        .to(precision.compute);
  }
  torch::Tensor weight = forward_internal::TensorAs(weights, prefix + ".weight", precision.compute);
  return forward_internal::RmsNormalize(residual, config.norm_eps, precision.accumulate)
             .to(precision.compute) *
         weight;
}

// residual += pending (the last mixer's output, when defined; then reset),
// then BlockNorm of the sum. On CUDA with RMSNorm both run as one kernel
// (fused/fused.h); otherwise as LibTorch ops, the add as HF's residual add.
torch::Tensor AddAndNorm(const ModelConfig& config, const Weights& weights,
                         const std::string& prefix, const Precision& precision,
                         torch::Tensor* residual, torch::Tensor* pending) {
  if (!config.layer_norm) {
    std::optional<fused::AddRmsNormResult> fused = fused::AddRmsNorm(
        *residual, *pending,
        forward_internal::TensorAs(weights, prefix + ".weight", precision.compute),
        config.norm_eps);
    if (fused.has_value()) {
      *residual = std::move(fused->residual);
      *pending = torch::Tensor();
      return std::move(fused->normed);
    }
  }
  if (pending->defined()) {
    *residual = *residual + pending->to(precision.accumulate);
    *pending = torch::Tensor();
  }
  return BlockNorm(config, weights, prefix, precision, *residual);
}

// A layer state written in place (LayerState::in_place) keeps its storage:
// where the mixer replaced a tensor (a path without an in-place kernel), the
// new values are copied into the one the caller holds.
void KeepStorage(const LayerState& held, LayerState* written) {
  auto keep = [](const torch::Tensor& kept, torch::Tensor* tensor) {
    if (!kept.defined() || tensor->is_same(kept)) return;
    kept.copy_(*tensor);
    *tensor = kept;
  };
  keep(held.conv_history, &written->conv_history);
  keep(held.ssm_state, &written->ssm_state);
}

// `state` (optional) is read, and replaced only when the forward succeeds.
absl::StatusOr<torch::Tensor> RunForward(const ModelConfig& config, const Weights& weights,
                                         const torch::Tensor& input_ids, const CallContext& ctx,
                                         const Capture& capture, RecurrentState* state) {
  const torch::Tensor& embedding = weights.at(kEmbeddingTensor);  // [V, d_model]
  Precision precision;
  precision.compute = embedding.scalar_type();
  precision.accumulate =
      precision.compute == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;

  torch::Tensor ids = input_ids.to(embedding.device());  // [B, L]
  // 1. Embedding; the residual stream stays wide (residual_in_fp32).
  torch::Tensor residual = torch::embedding(embedding, ids).to(precision.accumulate);  // [B, L, d_model]
  if (config.embedding_multiplier != 1.0) residual = residual * config.embedding_multiplier;
  // Zamba2's shared blocks read the embeddings beside the residual.
  const torch::Tensor embedded = blocks::HasSharedBlocks(config) ? residual : torch::Tensor();
  // Granite 4.0 scales every block's output before the add.
  auto scaled = [&config](torch::Tensor output) {
    return config.residual_multiplier != 1.0 ? output * config.residual_multiplier : output;
  };
  // Tensors are replaced, never written in place: the caller's state stays
  // intact until the swap at the end.
  std::vector<LayerState> next_layers;
  if (state != nullptr) {
    next_layers = state->layers;
    next_layers.resize(static_cast<size_t>(config.n_layer));
  }
  torch::Tensor mixed;  // [B, L, d_model]: the last mixer's output, added by the next norm
  // A model over several devices (LoadOptions::placement): the residual
  // stream moves to each layer's device, and the layer runs there.
  c10::OptionalDeviceGuard device_guard;
  auto run_on = [&](const torch::Tensor& anchor) {
    if (anchor.device() == residual.device()) return;
    residual = residual.to(anchor.device());
    if (mixed.defined()) mixed = mixed.to(anchor.device());
    if (anchor.is_cuda()) device_guard.reset_device(anchor.device());
  };
  for (int64_t layer = 0; layer < config.n_layer; ++layer) {
    absl::Status status = PollContext(ctx, layer);
    if (!status.ok()) return status;
    run_on(weights.at(LayerTensorName(layer, "norm.weight")));
    LayerState* layer_state =
        state != nullptr ? &next_layers[static_cast<size_t>(layer)] : nullptr;
    // 2. Block: residual + Mixer(Norm(residual)); the add is done with the
    // next norm.
    torch::Tensor normed;  // [B, L, d_model]
    if (blocks::SharedBlockAt(config, layer).block >= 0) {
      // Zamba2: the shared block's output joins the mixer's input only,
      // residual + mixer(norm(residual + block)).
      if (mixed.defined()) residual = residual + mixed.to(precision.accumulate);
      mixed = torch::Tensor();
      const torch::Tensor block = blocks::SharedBlock(config, weights, layer, precision, residual,
                                                      embedded, capture, layer_state);
      normed = BlockNorm(config, weights, LayerTensorName(layer, "norm"), precision,
                         residual + block.to(precision.accumulate));
    } else {
      normed = AddAndNorm(config, weights, LayerTensorName(layer, "norm"), precision, &residual,
                          &mixed);
    }
    capture.Add("residual", normed);
    if (config.parallel_attention) {
      // Falcon-H1: the Mamba mixer and attention side by side on one norm.
      const torch::Tensor mamba =
          blocks::MixerAt(config, layer)
              .forward(config, weights, layer, precision,
                       config.ssm_in_multiplier != 1.0 ? normed * config.ssm_in_multiplier : normed,
                       capture, layer_state, ctx);
      const torch::Tensor attention = blocks::kAttentionMixer.forward(
          config, weights, layer, precision,
          config.attention_in_multiplier != 1.0 ? normed * config.attention_in_multiplier : normed,
          capture, layer_state, ctx);
      mixed = scaled(mamba * config.ssm_out_multiplier +
                     attention * config.attention_out_multiplier);
    } else {
      mixed = scaled(blocks::MixerAt(config, layer)
                         .forward(config, weights, layer, precision, normed, capture, layer_state,
                                  ctx));
    }
    if (blocks::HasMlp(config)) {
      // mamba_ssm's second block of the layer: norm2 -> gated MLP -> add.
      normed = AddAndNorm(config, weights, LayerTensorName(layer, "norm2"), precision, &residual,
                          &mixed);
      capture.Add("residual", normed);
      mixed = scaled(blocks::GatedMlp(config, weights, layer, normed, capture));
    }
    if (layer_state != nullptr && layer_state->in_place) {
      KeepStorage(state->layers[static_cast<size_t>(layer)], layer_state);
    }
  }
  absl::Status status = PollContext(ctx, config.n_layer);
  if (!status.ok()) return status;
  // 3. Final norm and head (the embedding when tied); logits in float32.
  run_on(weights.at(std::string(kFinalNorm) + ".weight"));
  torch::Tensor normed = AddAndNorm(config, weights, kFinalNorm, precision, &residual, &mixed);
  capture.Add("residual", normed);
  const torch::Tensor& head = config.tied ? embedding : weights.at(kHeadTensor);  // [V, d_model]
  if (normed.device() != head.device()) {  // a tied head of a placed model
    normed = normed.to(head.device());
    if (head.is_cuda()) device_guard.reset_device(head.device());
  }
  const torch::Tensor head_weight = head.to(precision.compute);
  torch::Tensor logits =
      forward_internal::Linear(normed, head_weight, torch::Tensor(), head_weight.is_same(head))
          .to(torch::kFloat32);  // [B, L, V]
  if (config.logits_scaling != 1.0) logits = logits / config.logits_scaling;
  if (config.logits_multiplier != 1.0) logits = logits * config.logits_multiplier;
  if (state != nullptr) state->layers = std::move(next_layers);
  return logits;
}

// No exception leaves the forward (Guarded); a stop inside a layer's scan
// (CallStopped) is its status.
template <typename Fn>
absl::StatusOr<torch::Tensor> GuardedForward(Fn&& fn) {
  return Guarded("forward", [&]() -> absl::StatusOr<torch::Tensor> {
    try {
      torch::NoGradGuard no_grad;
      return fn();
    } catch (const forward_internal::CallStopped& stopped) {
      return stopped.status;
    }
  });
}

}  // namespace

absl::Status CheckForwardInputs(const ModelConfig& config, const Weights& weights,
                                const torch::Tensor& input_ids) {
  try {
    absl::Status status = CheckConfig(config);
    if (status.ok()) status = CheckWeights(config, weights);
    if (status.ok()) status = CheckInputIds(config, input_ids);
    return status;
  } catch (const std::exception& error) {
    return InternalFailure("forward checks", error.what());
  }
}

namespace {


// Both entry points after their input checks: the state's shape, the
// context, then the forward, with LibTorch's exceptions as statuses.
absl::StatusOr<torch::Tensor> RunChecked(const ModelConfig& config, const Weights& weights,
                                         const torch::Tensor& input_ids, const CallContext& ctx,
                                         CaptureSink* capture, RecurrentState* state) {
  return GuardedForward([&]() -> absl::StatusOr<torch::Tensor> {
    absl::Status checked = state != nullptr ? CheckState(config, *state, input_ids.size(0))
                                            : absl::OkStatus();
    if (checked.ok()) checked = PollContext(ctx, 0);
    if (!checked.ok()) return checked;
    const int64_t seq_len = input_ids.size(1);
    const int64_t steps =
        std::max<int64_t>(1, forward_internal::kPositionsPerChunk / input_ids.size(0));
    if (seq_len <= steps || !input_ids.device().is_cpu()) {
      if (capture != nullptr) capture->SetWindow(0, seq_len);
      return RunForward(config, weights, input_ids, ctx, Capture(capture), state);
    }
    // Long sequences run in chunks of time, each continuing the state of the
    // one before, so that no single matmul outlasts the context's check.
    RecurrentState carried = state != nullptr ? *state : RecurrentState{};
    std::vector<torch::Tensor> logits;  // [B, chunk, V] each
    for (int64_t start = 0; start < seq_len; start += steps) {
      const int64_t length = std::min(steps, seq_len - start);
      if (capture != nullptr) capture->SetWindow(start, length);
      absl::StatusOr<torch::Tensor> chunk =
          RunForward(config, weights, input_ids.narrow(1, start, length), ctx, Capture(capture),
                     &carried);
      if (!chunk.ok()) return chunk.status();
      logits.push_back(*std::move(chunk));
    }
    if (state != nullptr) *state = std::move(carried);
    return torch::cat(logits, 1);  // [B, L, V]
  });
}

}  // namespace

absl::StatusOr<torch::Tensor> Forward(const ModelConfig& config, const Weights& weights,
                                      const torch::Tensor& input_ids, const CallContext& ctx,
                                      CaptureSink* capture, RecurrentState* state) {
  absl::Status status = CheckForwardInputs(config, weights, input_ids);
  if (!status.ok()) return status;
  return RunChecked(config, weights, input_ids, ctx, capture, state);
}

absl::StatusOr<torch::Tensor> ForwardPrechecked(const ModelConfig& config, const Weights& weights,
                                                const torch::Tensor& input_ids,
                                                const CallContext& ctx, RecurrentState* state) {
  return RunChecked(config, weights, input_ids, ctx, nullptr, state);
}

}  // namespace icd
