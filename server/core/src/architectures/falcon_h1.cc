// TII's Falcon-H1: its config.json (docs/hybrid_symmetries.md, "Falcon-H1").
#include <algorithm>

#include "io/config_fields.h"

namespace icd::config_fields {

// transformers' FalconH1ForCausalLM: every layer holds a Mamba-2 mixer
// (mamba.*) and attention (self_attn.*, icd's "attn") side by side on
// input_layernorm's output, then pre_ff_layernorm and a SwiGLU feed-forward;
// scalar multipliers around each (model.h), the Mamba-2 in_proj's output
// slices times ssm_multipliers; the gated norm optional (mamba_rms_norm).
absl::StatusOr<ModelConfig> ParseFalconH1(const Json& root, const std::string& source) {
  Fields f(root, source);
  ICD_ASSIGN_OR_RETURN(ModelConfig c,
                       HfHybridBase(f, source, "falcon_h1", Family::kMamba2, 128000, 1e-5));
  c.parallel_attention = true;
  ICD_ASSIGN_OR_RETURN(c.n_layer, f.PositiveInt("num_hidden_layers", 32));
  if (c.n_layer > kMaxLayers) return f.Error("num_hidden_layers", "is too large");

  // Mamba-2: d_inner is mamba_d_ssm (or expand x hidden); one bias flag for
  // in_proj and out_proj in icd.
  ICD_RETURN_IF_ERROR(ParseMambaFields(root, f, source, 256, c, /*read_d_ssm=*/true));
  ICD_ASSIGN_OR_RETURN(bool out_bias, f.Bool("projectors_bias", false));
  if (out_bias != c.proj_bias) {
    return Unsupported(source, "mamba_proj_bias and projectors_bias that differ (icd's Mamba-2 "
                               "has one bias flag for in_proj and out_proj)");
  }
  ICD_ASSIGN_OR_RETURN(c.gated_norm, f.Bool("mamba_rms_norm", false));
  ICD_ASSIGN_OR_RETURN(c.norm_before_gate, f.Bool("mamba_norm_before_gate", true));
  c.grouped_gated_norm = true;  // FalconH1RMSNormGated: per group of d_ssm / n_groups

  AttentionConfig& a = c.attention;
  ICD_RETURN_IF_ERROR(ParseSeparateAttention(f, c.d_model, 8, std::nullopt, a));
  a.module = "attn";
  ICD_RETURN_IF_ERROR(ParseRope(root, f, source, 1.0, a));  // the whole head

  ICD_ASSIGN_OR_RETURN(c.d_intermediate, f.PositiveInt("intermediate_size", 14336));
  if (c.d_intermediate > kMaxDimension) return f.Error("intermediate_size", "is too large");
  ICD_ASSIGN_OR_RETURN(bool mlp_bias, f.Bool("mlp_bias", false));
  if (mlp_bias) return Unsupported(source, "Falcon-H1 with MLP biases (mlp_bias)");
  c.mlp_separate_projections = true;

  // The multipliers: scalars, or lists of them; every one finite and nonzero.
  auto scalar = [&](const char* key, double& out) -> absl::Status {
    ICD_ASSIGN_OR_RETURN(out, f.Number(key, 1.0));
    if (!std::isfinite(out) || out == 0) return f.Error(key, "must be a finite, nonzero number");
    return absl::OkStatus();
  };
  ICD_RETURN_IF_ERROR(scalar("embedding_multiplier", c.embedding_multiplier));
  ICD_RETURN_IF_ERROR(scalar("lm_head_multiplier", c.logits_multiplier));
  ICD_RETURN_IF_ERROR(scalar("attention_in_multiplier", c.attention_in_multiplier));
  ICD_RETURN_IF_ERROR(scalar("attention_out_multiplier", c.attention_out_multiplier));
  ICD_RETURN_IF_ERROR(scalar("key_multiplier", a.key_multiplier));
  ICD_RETURN_IF_ERROR(scalar("ssm_in_multiplier", c.ssm_in_multiplier));
  ICD_RETURN_IF_ERROR(scalar("ssm_out_multiplier", c.ssm_out_multiplier));
  auto list = [&](const char* key, size_t length, std::vector<double>& out) -> absl::Status {
    if (!f.Has(key)) return absl::OkStatus();
    const Json& values = root.at(key);
    if (!values.is_array() || values.size() != length) {
      return f.Error(key, absl::StrCat("must be a list of ", length, " numbers"));
    }
    for (const Json& value : values) {
      ICD_ASSIGN_OR_RETURN(double number, f.ParseNumber(key, value));
      if (!std::isfinite(number) || number == 0) {
        return f.Error(key, "must hold finite, nonzero numbers");
      }
      out.push_back(number);
    }
    return absl::OkStatus();
  };
  ICD_RETURN_IF_ERROR(list("ssm_multipliers", 5, c.ssm_multipliers));
  std::vector<double> mlp;
  ICD_RETURN_IF_ERROR(list("mlp_multipliers", 2, mlp));
  if (!mlp.empty()) {
    c.mlp_gate_multiplier = mlp[0];
    c.mlp_down_multiplier = mlp[1];
  }
  return c;
}

}  // namespace icd::config_fields
