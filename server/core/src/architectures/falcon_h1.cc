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
  ModelConfig c;
  c.layout = Layout::kHf;
  c.architecture = "falcon_h1";
  c.family = Family::kMamba2;
  c.parallel_attention = true;
  ICD_ASSIGN_OR_RETURN(c.d_model, f.PositiveInt("hidden_size", 4096));
  ICD_ASSIGN_OR_RETURN(c.n_layer, f.PositiveInt("num_hidden_layers", 32));
  if (c.n_layer > kMaxLayers) return f.Error("num_hidden_layers", "is too large");
  ICD_ASSIGN_OR_RETURN(c.vocab_size, f.PositiveInt("vocab_size", 128000));
  c.vocab_unpadded = c.vocab_size;
  ICD_ASSIGN_OR_RETURN(c.tied, f.Bool("tie_word_embeddings", false));
  ICD_ASSIGN_OR_RETURN(c.norm_eps, f.Number("rms_norm_eps", 1e-5));
  ICD_ASSIGN_OR_RETURN(std::string act, f.String("hidden_act", "silu"));
  if (act != "silu") return Unsupported(source, absl::StrCat("hidden_act '", act, "'"));

  // Mamba-2: d_inner is mamba_d_ssm (or expand x hidden).
  if (f.Has("mamba_d_ssm")) {
    ICD_ASSIGN_OR_RETURN(c.d_inner, f.PositiveInt("mamba_d_ssm", std::nullopt));
  } else {
    ICD_ASSIGN_OR_RETURN(double expand, f.Number("mamba_expand", 2));
    ICD_ASSIGN_OR_RETURN(c.d_inner, InnerWidth(expand, c.d_model, source, "mamba_expand"));
  }
  if (c.d_inner > kMaxDimension) return f.Error("mamba_d_ssm", "is too large");
  ICD_ASSIGN_OR_RETURN(c.nheads, f.PositiveInt("mamba_n_heads", 128));
  if (f.Has("mamba_d_head") && !(root.at("mamba_d_head").is_string() &&
                                 root.at("mamba_d_head").get<std::string>() == "auto")) {
    ICD_ASSIGN_OR_RETURN(c.headdim, f.PositiveInt("mamba_d_head", std::nullopt));
  } else {
    if (c.d_inner % c.nheads != 0) {
      return f.Error("mamba_n_heads", absl::StrCat(c.nheads, " does not divide d_ssm ", c.d_inner));
    }
    c.headdim = c.d_inner / c.nheads;
  }
  ICD_ASSIGN_OR_RETURN(c.ngroups, f.PositiveInt("mamba_n_groups", 1));
  ICD_ASSIGN_OR_RETURN(c.d_state, f.PositiveInt("mamba_d_state", 256));
  ICD_ASSIGN_OR_RETURN(c.d_conv, f.PositiveInt("mamba_d_conv", 4));
  ICD_ASSIGN_OR_RETURN(c.chunk_size, f.PositiveInt("mamba_chunk_size", 256));
  ICD_ASSIGN_OR_RETURN(c.conv_bias, f.Bool("mamba_conv_bias", true));
  ICD_ASSIGN_OR_RETURN(c.proj_bias, f.Bool("mamba_proj_bias", false));
  ICD_ASSIGN_OR_RETURN(bool out_bias, f.Bool("projectors_bias", false));
  if (out_bias != c.proj_bias) {
    return Unsupported(source, "mamba_proj_bias and projectors_bias that differ (icd's Mamba-2 "
                               "has one bias flag for in_proj and out_proj)");
  }
  if (f.Has("time_step_limit")) {
    const Json& limit = root.at("time_step_limit");
    if (!limit.is_array() || limit.size() != 2) {
      return f.Error("time_step_limit", "must be [min, max]");
    }
    ICD_ASSIGN_OR_RETURN(c.dt_min, f.ParseNumber("time_step_limit", limit[0]));
    ICD_ASSIGN_OR_RETURN(c.dt_max, f.ParseNumber("time_step_limit", limit[1]));
  }
  ICD_ASSIGN_OR_RETURN(c.gated_norm, f.Bool("mamba_rms_norm", false));
  ICD_ASSIGN_OR_RETURN(c.norm_before_gate, f.Bool("mamba_norm_before_gate", true));
  c.grouped_gated_norm = true;  // FalconH1RMSNormGated: per group of d_ssm / n_groups
  ICD_RETURN_IF_ERROR(CheckMamba2Shapes(c, source));

  AttentionConfig& a = c.attention;
  a.separate_projections = true;
  a.module = "attn";
  ICD_ASSIGN_OR_RETURN(a.heads, f.PositiveInt("num_attention_heads", 32));
  ICD_ASSIGN_OR_RETURN(a.kv_heads, f.PositiveInt("num_key_value_heads", 8));
  if (a.heads > kMaxDimension || a.heads % a.kv_heads != 0 ||
      (!f.Has("head_dim") && c.d_model % a.heads != 0)) {
    return f.Error("num_key_value_heads",
                   absl::StrCat(a.kv_heads, " must divide num_attention_heads ", a.heads,
                                ", which must divide hidden_size ", c.d_model,
                                " when head_dim is not given"));
  }
  ICD_ASSIGN_OR_RETURN(a.head_dim, f.PositiveInt("head_dim", c.d_model / a.heads));
  if (a.head_dim > kMaxDimension || a.qkv_rows() > kMaxDimension) {
    return f.Error("head_dim", "x the heads is too large");
  }
  ICD_ASSIGN_OR_RETURN(a.qkv_bias, f.Bool("attention_bias", false));
  a.out_bias = a.qkv_bias;
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
