// state-spaces/mamba's MambaLMHeadModel layout: its config.json, with its hybrids'
// gated MLP (d_intermediate) and attention (attn_layer_idx, attn_cfg).
#include <algorithm>

#include "io/config_fields.h"

namespace icd::config_fields {

namespace {

// mamba_ssm's hybrid fields: attn_layer_idx (the layers whose mixer is its
// MHA) and attn_cfg (MHA's keyword arguments; MambaLMHeadModel passes them
// as they are, so a key MHA does not take cannot be loaded there either).
absl::Status ParseAttention(const Json& root, const std::string& source, ModelConfig& c) {
  Fields f(root, source);
  if (!f.Has("attn_layer_idx")) return absl::OkStatus();
  const Json& layers = root.at("attn_layer_idx");
  if (!layers.is_array()) return f.Error("attn_layer_idx", "must be a list of layer indices");
  for (const Json& entry : layers) {
    const Json wrapped = {{"attn_layer_idx", entry}};
    ICD_ASSIGN_OR_RETURN(int64_t layer, Fields(wrapped, source).Int("attn_layer_idx", 0));
    if (layer < 0 || layer >= c.n_layer) {
      return f.Error("attn_layer_idx", absl::StrCat("lists layer ", layer, ", but n_layer is ",
                                                    c.n_layer));
    }
    c.attention_layers.push_back(layer);
  }
  std::sort(c.attention_layers.begin(), c.attention_layers.end());
  c.attention_layers.erase(std::unique(c.attention_layers.begin(), c.attention_layers.end()),
                           c.attention_layers.end());
  if (c.attention_layers.empty()) return absl::OkStatus();

  static const Json kEmpty = Json::object();
  const Json& attn_cfg = f.Has("attn_cfg") ? root.at("attn_cfg") : kEmpty;
  if (!attn_cfg.is_object()) return f.Error("attn_cfg", "must be an object");
  static const char* const kKnown[] = {
      "num_heads",     "num_heads_kv",  "head_dim",       "mlp_dim",
      "qkv_proj_bias", "out_proj_bias", "softmax_scale",  "causal",
      "d_conv",        "rotary_emb_dim", "rotary_emb_base", "rotary_emb_interleaved"};
  for (const auto& [key, value] : attn_cfg.items()) {
    if (std::find_if(std::begin(kKnown), std::end(kKnown),
                     [&key = key](const char* known) { return key == known; }) ==
        std::end(kKnown)) {
      return Unsupported(source, absl::StrCat("attn_cfg.", key, " (MHA takes no such argument)"));
    }
  }
  Fields a(attn_cfg, source, "attn_cfg.");
  AttentionConfig& attention = c.attention;
  ICD_ASSIGN_OR_RETURN(attention.heads, a.PositiveInt("num_heads", std::nullopt));
  if (attention.heads > kMaxDimension) return a.Error("num_heads", "is too large");
  ICD_ASSIGN_OR_RETURN(attention.kv_heads, a.PositiveInt("num_heads_kv", attention.heads));
  if (attention.heads % attention.kv_heads != 0) {
    return a.Error("num_heads_kv", absl::StrCat(attention.kv_heads, " does not divide num_heads ",
                                                attention.heads));
  }
  if (!a.Has("head_dim") && c.d_model % attention.heads != 0) {
    return a.Error("num_heads", absl::StrCat(attention.heads, " does not divide d_model ",
                                             c.d_model, " (and head_dim is not given)"));
  }
  ICD_ASSIGN_OR_RETURN(attention.head_dim, a.PositiveInt("head_dim", c.d_model / attention.heads));
  ICD_ASSIGN_OR_RETURN(int64_t mlp_dim, a.Int("mlp_dim", 0));
  if (mlp_dim < 0 || mlp_dim > kMaxDimension) {
    return a.Error("mlp_dim", absl::StrCat("is ", mlp_dim, "; expected 0 to ", kMaxDimension));
  }
  attention.mlp_dim = CeilDiv(mlp_dim, 256) * 256;  // as MHA rounds it
  ICD_ASSIGN_OR_RETURN(attention.qkv_bias, a.Bool("qkv_proj_bias", true));
  ICD_ASSIGN_OR_RETURN(attention.out_bias, a.Bool("out_proj_bias", true));
  ICD_ASSIGN_OR_RETURN(attention.softmax_scale, a.Number("softmax_scale", 0.0));
  if (a.Has("softmax_scale") && !(attention.softmax_scale > 0 &&
                                  std::isfinite(attention.softmax_scale))) {
    return a.Error("softmax_scale", "must be a positive number (or null: 1/sqrt(head_dim))");
  }
  ICD_ASSIGN_OR_RETURN(bool causal, a.Bool("causal", false));
  if (!causal) {
    return Unsupported(source, "attention that is not causal (attn_cfg.causal is false, MHA's "
                               "default): every position would read the ones after it");
  }
  ICD_ASSIGN_OR_RETURN(attention.conv, a.Int("d_conv", 0));
  ICD_ASSIGN_OR_RETURN(attention.rotary_dim, a.Int("rotary_emb_dim", 0));
  ICD_ASSIGN_OR_RETURN(attention.rotary_base, a.Number("rotary_emb_base", 10000.0));
  ICD_ASSIGN_OR_RETURN(attention.rotary_interleaved, a.Bool("rotary_emb_interleaved", false));
  if (attention.head_dim > kMaxDimension || attention.conv < 0 ||
      attention.conv > kMaxDimension) {
    return a.Error("head_dim", absl::StrCat("or d_conv out of range: ", attention.head_dim, ", ",
                                            attention.conv));
  }
  if (attention.qkv_rows() + attention.mlp_dim > kMaxDimension) {
    return a.Error("num_heads", absl::StrCat("x head_dim gives ", attention.qkv_rows(),
                                             " rows of q, k and v; expected at most ",
                                             kMaxDimension));
  }
  if (attention.rotary_dim < 0 || attention.rotary_dim % 2 != 0 ||
      attention.rotary_dim > attention.head_dim) {
    return a.Error("rotary_emb_dim", absl::StrCat(attention.rotary_dim,
                                                  " must be even and at most head_dim ",
                                                  attention.head_dim));
  }
  if (attention.rotary_dim > 0 &&
      !(attention.rotary_base > 0 && std::isfinite(attention.rotary_base))) {
    return a.Error("rotary_emb_base", "must be a positive number");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> ParseMambaSsm(const Json& root, const std::string& source) {
  Fields f(root, source);
  ICD_ASSIGN_OR_RETURN(int64_t d_intermediate, f.Int("d_intermediate", 0));
  if (d_intermediate < 0 || d_intermediate > kMaxDimension) {
    return f.Error("d_intermediate", absl::StrCat("is ", d_intermediate, "; expected 0 (no MLP) to ",
                                                  kMaxDimension));
  }
  static const Json kEmpty = Json::object();
  const Json& ssm_cfg = f.Has("ssm_cfg") ? root.at("ssm_cfg") : kEmpty;
  if (!ssm_cfg.is_object()) return f.Error("ssm_cfg", "must be an object");
  Fields s(ssm_cfg, source, "ssm_cfg.");
  ICD_ASSIGN_OR_RETURN(std::string layer, s.String("layer", "Mamba1"));

  ModelConfig c;
  c.layout = Layout::kMambaSsm;
  c.architecture = "mamba_ssm";
  // As GatedMLP rounds its hidden_features (multiple_of 128).
  c.d_intermediate = CeilDiv(d_intermediate, 128) * 128;
  if (layer == "Mamba1") {
    c.family = Family::kMamba1;
  } else if (layer == "Mamba2") {
    c.family = Family::kMamba2;
  } else {
    return Unsupported(source, absl::StrCat("ssm_cfg.layer '", layer, "'"));
  }
  ICD_ASSIGN_OR_RETURN(c.d_model, f.PositiveInt("d_model", std::nullopt));
  ICD_ASSIGN_OR_RETURN(c.n_layer, f.PositiveInt("n_layer", std::nullopt));
  ICD_ASSIGN_OR_RETURN(c.vocab_unpadded, f.PositiveInt("vocab_size", 50277));
  ICD_ASSIGN_OR_RETURN(int64_t pad_multiple, f.PositiveInt("pad_vocab_size_multiple", 8));
  if (c.vocab_unpadded > kMaxDimension || pad_multiple > kMaxDimension) {
    return f.Error("vocab_size", absl::StrCat(c.vocab_unpadded, " or pad_vocab_size_multiple ",
                                              pad_multiple, " above ", kMaxDimension));
  }
  c.vocab_size = CeilDiv(c.vocab_unpadded, pad_multiple) * pad_multiple;
  ICD_ASSIGN_OR_RETURN(c.tied, f.Bool("tie_embeddings", true));
  ICD_ASSIGN_OR_RETURN(bool rms_norm, f.Bool("rms_norm", true));
  c.layer_norm = !rms_norm;
  ICD_ASSIGN_OR_RETURN(c.norm_eps, f.Number("norm_epsilon", 1e-5));
  ICD_ASSIGN_OR_RETURN(c.d_conv, s.PositiveInt("d_conv", 4));
  ICD_ASSIGN_OR_RETURN(double expand, s.Number("expand", 2));
  ICD_ASSIGN_OR_RETURN(c.d_inner, InnerWidth(expand, c.d_model, source, "ssm_cfg.expand"));
  ICD_ASSIGN_OR_RETURN(c.proj_bias, s.Bool("bias", false));
  ICD_ASSIGN_OR_RETURN(c.conv_bias, s.Bool("conv_bias", true));
  ICD_RETURN_IF_ERROR(ParseAttention(root, source, c));

  if (c.family == Family::kMamba1) {
    ICD_ASSIGN_OR_RETURN(c.d_state, s.PositiveInt("d_state", 16));
    ICD_ASSIGN_OR_RETURN(c.dt_rank, DtRank(s, "dt_rank", c.d_model));
    return c;
  }
  ICD_ASSIGN_OR_RETURN(c.d_state, s.PositiveInt("d_state", 128));
  ICD_ASSIGN_OR_RETURN(c.headdim, s.PositiveInt("headdim", 64));
  ICD_ASSIGN_OR_RETURN(c.ngroups, s.PositiveInt("ngroups", 1));
  ICD_ASSIGN_OR_RETURN(c.chunk_size, s.PositiveInt("chunk_size", 256));
  ICD_ASSIGN_OR_RETURN(c.gated_norm, s.Bool("rmsnorm", true));
  ICD_ASSIGN_OR_RETURN(c.norm_before_gate, s.Bool("norm_before_gate", false));
  ICD_ASSIGN_OR_RETURN(c.d_has_hdim, s.Bool("D_has_hdim", false));
  c.grouped_gated_norm = true;  // mamba_ssm's Mamba2 normalises per group
  ICD_ASSIGN_OR_RETURN(int64_t d_ssm, s.Int("d_ssm", c.d_inner));
  if (d_ssm != c.d_inner) {
    return Unsupported(source, absl::StrCat("ssm_cfg.d_ssm ", d_ssm, " below d_inner ",
                                            c.d_inner, " (a gated-MLP part in the mixer)"));
  }
  if (s.Has("dt_limit")) {
    const Json& limit = ssm_cfg.at("dt_limit");
    if (!limit.is_array() || limit.size() != 2) return s.Error("dt_limit", "must be [min, max]");
    ICD_ASSIGN_OR_RETURN(c.dt_min, s.ParseNumber("dt_limit", limit[0]));
    ICD_ASSIGN_OR_RETURN(c.dt_max, s.ParseNumber("dt_limit", limit[1]));
  }
  if (c.d_inner % c.headdim != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": d_inner ", c.d_inner, " is not a multiple of ssm_cfg.headdim ", c.headdim));
  }
  c.nheads = c.d_inner / c.headdim;
  ICD_RETURN_IF_ERROR(CheckMamba2Shapes(c, source));
  return c;
}

}  // namespace icd::config_fields
