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
    "JambaForCausalLM ('jamba'), FalconH1ForCausalLM ('falcon_h1')";

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
                              int64_t default_state, ModelConfig& c) {
  ICD_ASSIGN_OR_RETURN(double expand, f.Number("mamba_expand", 2));
  ICD_ASSIGN_OR_RETURN(c.d_inner, InnerWidth(expand, c.d_model, source, "mamba_expand"));
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
  if (f.Has("time_step_limit")) {
    const Json& limit = root.at("time_step_limit");
    if (!limit.is_array() || limit.size() != 2) {
      return f.Error("time_step_limit", "must be [min, max]");
    }
    ICD_ASSIGN_OR_RETURN(c.dt_min, f.ParseNumber("time_step_limit", limit[0]));
    ICD_ASSIGN_OR_RETURN(c.dt_max, f.ParseNumber("time_step_limit", limit[1]));
  }
  c.gated_norm = true;
  c.norm_before_gate = false;
  return CheckMamba2Shapes(c, source);
}

}  // namespace icd::config_fields
