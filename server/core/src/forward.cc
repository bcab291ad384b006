// Forward dispatch and the pieces every family shares: embedding, block norms
// (RMSNorm, or mamba_ssm's LayerNorm), residual stream, final norm and head.
// The mixers live in forward_mamba1.cc and forward_mamba2.cc.
#include "forward.h"

#include <chrono>
#include <exception>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "config.h"
#include "forward_internal.h"

namespace icd {
namespace forward_internal {

std::string LayerTensorName(int64_t layer, const std::string& suffix) {
  return absl::StrCat("backbone.layers.", layer, ".", suffix);
}

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

std::string LayerGroupName(int64_t layer, const std::string& suffix) {
  return absl::StrCat("layers.", layer, ".", suffix);
}

torch::Tensor CausalDepthwiseConv(const torch::Tensor& values, const torch::Tensor& weight,
                                  const torch::Tensor& bias) {
  const int64_t seq_len = values.size(1);
  const int64_t channels = weight.size(0);
  const int64_t kernel = weight.size(2);
  // conv1d wants channels first: [B, C, L]; padding K-1 on both sides, and
  // the first L outputs are the causal ones.
  torch::Tensor conv = torch::conv1d(values.transpose(1, 2), weight, bias,
                                     /*stride=*/1, /*padding=*/kernel - 1,
                                     /*dilation=*/1, /*groups=*/channels);
  return conv.narrow(2, 0, seq_len).transpose(1, 2);  // [B, L, C]
}

}  // namespace forward_internal

namespace {

using forward_internal::Capture;
using forward_internal::CheckTensor;
using forward_internal::LayerTensorName;
using forward_internal::Precision;

constexpr char kEmbedding[] = "backbone.embeddings.weight";
constexpr char kFinalNorm[] = "backbone.norm_f";
constexpr char kHead[] = "lm_head.weight";

absl::Status CheckConfig(const ModelConfig& config) {
  if (config.d_model <= 0 || config.n_layer <= 0 || config.vocab_size <= 0 ||
      config.d_inner <= 0 || config.d_state <= 0 || config.d_conv <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "config needs positive d_model, n_layer, vocab_size, d_inner, d_state, d_conv; got ",
        config.d_model, ", ", config.n_layer, ", ", config.vocab_size, ", ", config.d_inner,
        ", ", config.d_state, ", ", config.d_conv));
  }
  if (config.family == Family::kMamba2) {
    if (config.nheads <= 0 || config.headdim <= 0 || config.ngroups <= 0 ||
        config.nheads * config.headdim != config.d_inner || config.nheads % config.ngroups != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "Mamba-2 config needs nheads*headdim == d_inner and ngroups dividing nheads; got nheads ",
          config.nheads, ", headdim ", config.headdim, ", ngroups ", config.ngroups,
          ", d_inner ", config.d_inner));
    }
  } else if (config.dt_rank <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("config needs a positive dt_rank; got ", config.dt_rank));
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
    if (expected.count(name) == 0 && !(config.tied && name == kHead)) {
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected tensor ", name, ": the config says it is absent"));
    }
  }
  const torch::Device device = weights.at(kEmbedding).device();
  for (const auto& [name, tensor] : weights) {
    if (tensor.defined() && tensor.device() != device) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor ", name, " is on ", tensor.device().str(), ", the embedding on ", device.str()));
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

absl::Status PollContext(const CallContext& ctx, int64_t layer) {
  if (ctx.cancelled && ctx.cancelled()) {
    return absl::CancelledError(absl::StrCat("forward cancelled before layer ", layer));
  }
  if (ctx.deadline.has_value() && std::chrono::steady_clock::now() >= *ctx.deadline) {
    return absl::DeadlineExceededError(
        absl::StrCat("forward passed its deadline before layer ", layer));
  }
  return absl::OkStatus();
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

absl::StatusOr<torch::Tensor> RunForward(const ModelConfig& config, const Weights& weights,
                                         const torch::Tensor& input_ids, const CallContext& ctx,
                                         const Capture& capture) {
  const torch::Tensor& embedding = weights.at(kEmbedding);  // [V, d_model]
  Precision precision;
  precision.compute = embedding.scalar_type();
  precision.accumulate =
      precision.compute == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;

  torch::Tensor ids = input_ids.to(embedding.device());  // [B, L]
  // 1. Embedding; the residual stream stays wide (residual_in_fp32).
  torch::Tensor residual = torch::embedding(embedding, ids).to(precision.accumulate);  // [B, L, d_model]
  for (int64_t layer = 0; layer < config.n_layer; ++layer) {
    absl::Status status = PollContext(ctx, layer);
    if (!status.ok()) return status;
    // 2. Block: residual + Mixer(Norm(residual)).
    torch::Tensor normed = BlockNorm(config, weights, LayerTensorName(layer, "norm"), precision,
                                     residual);  // [B, L, d_model]
    capture.Add("residual", normed);
    torch::Tensor mixed =
        config.family == Family::kMamba2
            ? forward_internal::Mamba2Mixer(config, weights, layer, precision, normed, capture)
            : forward_internal::Mamba1Mixer(config, weights, layer, precision, normed, capture);
    residual = residual + mixed.to(precision.accumulate);
  }
  absl::Status status = PollContext(ctx, config.n_layer);
  if (!status.ok()) return status;
  // 3. Final norm and head (the embedding when tied); logits in float32.
  torch::Tensor normed = BlockNorm(config, weights, kFinalNorm, precision, residual);
  capture.Add("residual", normed);
  const torch::Tensor& head = config.tied ? embedding : weights.at(kHead);  // [V, d_model]
  return torch::linear(normed, head.to(precision.compute)).to(torch::kFloat32);  // [B, L, V]
}

}  // namespace

absl::StatusOr<torch::Tensor> Forward(const ModelConfig& config, const Weights& weights,
                                      const torch::Tensor& input_ids, const CallContext& ctx,
                                      CaptureSink* capture) {
  try {
    torch::NoGradGuard no_grad;
    absl::Status status = CheckConfig(config);
    if (status.ok()) status = CheckWeights(config, weights);
    if (status.ok()) status = CheckInputIds(config, input_ids);
    if (status.ok()) status = PollContext(ctx, 0);
    if (!status.ok()) return status;
    return RunForward(config, weights, input_ids, ctx, Capture(capture));
  } catch (const c10::Error& error) {
    return absl::InternalError(absl::StrCat("forward failed: ", error.what_without_backtrace()));
  } catch (const std::exception& error) {
    return absl::InternalError(absl::StrCat("forward failed: ", error.what()));
  }
}

}  // namespace icd
