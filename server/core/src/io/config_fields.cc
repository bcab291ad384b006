// The shared pieces of the config parsers (io/config_fields.h).
#include "io/config_fields.h"

namespace icd::config_fields {
namespace {

constexpr char kSupported[] =
    "supported: HuggingFace MambaForCausalLM (model_type 'mamba'), "
    "FalconMambaForCausalLM ('falcon_mamba'), Mamba2ForCausalLM ('mamba2'); "
    "mamba_ssm MambaLMHeadModel with ssm_cfg.layer 'Mamba1' or 'Mamba2', with or "
    "without a gated MLP (d_intermediate) and causal attention layers (attn_layer_idx); "
    "NemotronHForCausalLM ('nemotron_h'), "
    "BambaForCausalLM ('bamba'), GraniteMoeHybridForCausalLM ('granitemoehybrid'), "
    "JambaForCausalLM ('jamba'), FalconH1ForCausalLM ('falcon_h1'), "
    "Zamba2ForCausalLM ('zamba2')";

}  // namespace

absl::Status Unsupported(const std::string& source, const std::string& what) {
  return absl::InvalidArgumentError(
      absl::StrCat(source, ": unsupported model: ", what, " (", kSupported, ")"));
}

absl::StatusOr<int64_t> InnerWidth(double expand, int64_t d_model, const std::string& source,
                                   const std::string& field) {
  const double inner = expand * static_cast<double>(d_model);
  if (!std::isfinite(expand) || !(inner >= 1) || inner > static_cast<double>(kMaxDimension)) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": ", field, " ", expand, " gives an inner width of ", inner,
        " channels; expected 1 to ", kMaxDimension));
  }
  return static_cast<int64_t>(inner);
}

absl::StatusOr<int64_t> DtRank(const Fields& fields, const char* key, int64_t d_model) {
  if (!fields.Has(key)) return CeilDiv(d_model, 16);
  const Json& value = fields.object().at(key);
  if (value.is_string() && value.get<std::string>() == "auto") return CeilDiv(d_model, 16);
  return fields.PositiveInt(key, std::nullopt);
}

absl::Status CheckMamba2Shapes(const ModelConfig& config, const std::string& source) {
  if (config.nheads > kMaxDimension || config.headdim > kMaxDimension) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": num_heads (", config.nheads, ") or head_dim (", config.headdim,
        ") above ", kMaxDimension));
  }
  if (config.nheads * config.headdim != config.d_inner) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": num_heads (", config.nheads, ") x head_dim (", config.headdim,
        ") must equal the inner width expand x hidden (", config.d_inner, ")"));
  }
  if (config.nheads % config.ngroups != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": num_heads (", config.nheads, ") must be a multiple of n_groups (",
        config.ngroups, ")"));
  }
  return absl::OkStatus();
}

const char* FirstPresent(const Fields& f, std::initializer_list<const char*> keys) {
  for (const char* key : keys) {
    if (f.Has(key)) return key;
  }
  return *(keys.end() - 1);
}

absl::Status ParseRope(const Json& root, const Fields& f, const std::string& source,
                       double default_factor, AttentionConfig& a) {
  static const Json kEmpty = Json::object();
  const Json& rope = f.Has("rope_parameters") ? root.at("rope_parameters") : kEmpty;
  if (!rope.is_object()) return f.Error("rope_parameters", "must be an object");
  Fields r(rope, source, "rope_parameters.");
  ICD_ASSIGN_OR_RETURN(std::string rope_type, r.String("rope_type", "default"));
  if (rope_type != "default") {
    return Unsupported(source, absl::StrCat("rope_type '", rope_type, "'"));
  }
  ICD_ASSIGN_OR_RETURN(double theta, f.Number("rope_theta", 10000.0));
  ICD_ASSIGN_OR_RETURN(a.rotary_base, r.Number("rope_theta", theta));
  ICD_ASSIGN_OR_RETURN(double factor, f.Number("partial_rotary_factor", default_factor));
  ICD_ASSIGN_OR_RETURN(factor, r.Number("partial_rotary_factor", factor));
  if (!(factor > 0 && factor <= 1) || !(a.rotary_base > 0 && std::isfinite(a.rotary_base))) {
    return f.Error("partial_rotary_factor", "or rope_theta out of range");
  }
  a.rotary_dim = static_cast<int64_t>(static_cast<double>(a.head_dim) * factor);
  a.rotary_dim -= a.rotary_dim % 2;
  return absl::OkStatus();
}

absl::Status ParseMambaFields(const Json& root, const Fields& f, const std::string& source,
                              int64_t default_state, ModelConfig& c, bool read_d_ssm) {
  if (read_d_ssm && f.Has("mamba_d_ssm")) {
    ICD_ASSIGN_OR_RETURN(c.d_inner, f.PositiveInt("mamba_d_ssm", std::nullopt));
    if (c.d_inner > kMaxDimension) return f.Error("mamba_d_ssm", "is too large");
  } else {
    ICD_ASSIGN_OR_RETURN(double expand, f.Number("mamba_expand", 2));
    ICD_ASSIGN_OR_RETURN(c.d_inner, InnerWidth(expand, c.d_model, source, "mamba_expand"));
  }
  ICD_ASSIGN_OR_RETURN(c.nheads, f.PositiveInt("mamba_n_heads", 128));
  if (f.Has("mamba_d_head") && !(root.at("mamba_d_head").is_string() &&
                                 root.at("mamba_d_head").get<std::string>() == "auto")) {
    ICD_ASSIGN_OR_RETURN(c.headdim, f.PositiveInt("mamba_d_head", std::nullopt));
  } else {
    if (c.d_inner % c.nheads != 0) {
      return f.Error("mamba_n_heads", absl::StrCat(c.nheads, " does not divide mamba_expand x "
                                                   "hidden_size ", c.d_inner));
    }
    c.headdim = c.d_inner / c.nheads;
  }
  ICD_ASSIGN_OR_RETURN(c.ngroups, f.PositiveInt("mamba_n_groups", 1));
  ICD_ASSIGN_OR_RETURN(c.d_state, f.PositiveInt("mamba_d_state", default_state));
  ICD_ASSIGN_OR_RETURN(c.d_conv, f.PositiveInt("mamba_d_conv", 4));
  ICD_ASSIGN_OR_RETURN(c.chunk_size, f.PositiveInt("mamba_chunk_size", 256));
  ICD_ASSIGN_OR_RETURN(c.conv_bias, f.Bool("mamba_conv_bias", true));
  ICD_ASSIGN_OR_RETURN(c.proj_bias, f.Bool("mamba_proj_bias", false));
  ICD_RETURN_IF_ERROR(ParseTimeStepLimit(root, f, "time_step_limit", c));
  c.gated_norm = true;
  c.norm_before_gate = false;
  return CheckMamba2Shapes(c, source);
}

absl::Status ParseTimeStepLimit(const Json& root, const Fields& f, const char* key,
                                ModelConfig& c) {
  if (!f.Has(key)) return absl::OkStatus();
  const Json& limit = root.at(key);
  if (!limit.is_array() || limit.size() != 2) return f.Error(key, "must be [min, max]");
  ICD_ASSIGN_OR_RETURN(c.dt_min, f.ParseNumber(key, limit[0]));
  ICD_ASSIGN_OR_RETURN(c.dt_max, f.ParseNumber(key, limit[1]));
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> HfHybridBase(const Fields& f, const std::string& source,
                                         const char* architecture, Family family,
                                         int64_t default_vocab, double default_eps, bool tied,
                                         const char* activation) {
  ModelConfig c;
  c.layout = Layout::kHf;
  c.architecture = architecture;
  c.family = family;
  ICD_ASSIGN_OR_RETURN(c.d_model, f.PositiveInt("hidden_size", 4096));
  ICD_ASSIGN_OR_RETURN(c.vocab_size, f.PositiveInt("vocab_size", default_vocab));
  c.vocab_unpadded = c.vocab_size;
  ICD_ASSIGN_OR_RETURN(c.tied, f.Bool("tie_word_embeddings", tied));
  ICD_ASSIGN_OR_RETURN(c.norm_eps, f.Number("rms_norm_eps", default_eps));
  ICD_ASSIGN_OR_RETURN(std::string act, f.String("hidden_act", activation));
  if (act != activation) return Unsupported(source, absl::StrCat("hidden_act '", act, "'"));
  return c;
}

absl::Status ParseSeparateAttention(const Fields& f, int64_t d_model, int64_t default_kv_heads,
                                    std::optional<int64_t> default_head_dim, AttentionConfig& a) {
  a.separate_projections = true;
  ICD_ASSIGN_OR_RETURN(a.heads, f.PositiveInt("num_attention_heads", 32));
  ICD_ASSIGN_OR_RETURN(a.kv_heads, f.PositiveInt("num_key_value_heads", default_kv_heads));
  const bool derived = !default_head_dim.has_value() && !f.Has("head_dim");
  if (a.heads > kMaxDimension || a.heads % a.kv_heads != 0 ||
      (derived && d_model % a.heads != 0)) {
    return f.Error("num_key_value_heads",
                   absl::StrCat(a.kv_heads, " must divide num_attention_heads ", a.heads,
                                ", which must divide hidden_size ", d_model,
                                " when head_dim is not given"));
  }
  ICD_ASSIGN_OR_RETURN(a.head_dim,
                       f.PositiveInt("head_dim", default_head_dim.value_or(d_model / a.heads)));
  if (a.head_dim > kMaxDimension || a.qkv_rows() > kMaxDimension) {
    return f.Error("head_dim", "x the heads is too large");
  }
  ICD_ASSIGN_OR_RETURN(a.qkv_bias, f.Bool("attention_bias", false));
  a.out_bias = a.qkv_bias;
  return absl::OkStatus();
}

}  // namespace icd::config_fields
