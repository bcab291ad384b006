// Zyphra's Zamba2: its config.json (docs/hybrid_symmetries.md, "Zamba2").
#include <cmath>

#include "io/config_fields.h"

namespace icd::config_fields {

// transformers' Zamba2ForCausalLM: a Mamba-2 mixer in every layer (its gated
// norm per group, eps fixed at 1e-5; Δ clamped below at time_step_min), and
// at the "hybrid" layers of layers_block_type a shared transformer block
// (model.h SharedBlocks) whose output, through the layer's linear, joins the
// mixer's input. Tensors under model.*: a Mamba layer's mamba and
// input_layernorm, a hybrid layer's mamba_decoder.{mamba,input_layernorm},
// linear and, at a block's first layer, shared_transformer.*
// (io/checkpoint.cc maps them to icd's canonical names).
absl::StatusOr<ModelConfig> ParseZamba2(const Json& root, const std::string& source) {
  Fields f(root, source);
  ICD_ASSIGN_OR_RETURN(ModelConfig c, HfHybridBase(f, source, "zamba2", Family::kMamba2, 32000,
                                                   1e-5, /*tied=*/true, "gelu"));
  if (!f.Has("hidden_size")) c.d_model = 2560;  // Zamba2Config's default
  // Bounded here: the attention reads 2 x hidden_size.
  if (c.d_model > kMaxDimension) return f.Error("hidden_size", "is too large");
  ICD_ASSIGN_OR_RETURN(c.n_layer, f.PositiveInt("num_hidden_layers", 54));
  if (c.n_layer > kMaxLayers) return f.Error("num_hidden_layers", "is too large");

  // The layers' kinds: "mamba" (transformers 5.x's newer name:
  // "linear_attention") or "hybrid".
  const char* kinds = FirstPresent(f, {"layer_types", "layers_block_type"});
  if (!f.Has(kinds)) return f.Error("layers_block_type", "is missing");
  const Json& list = root.at(kinds);
  if (!list.is_array() || static_cast<int64_t>(list.size()) != c.n_layer) {
    return f.Error(kinds, absl::StrCat("must list num_hidden_layers (", c.n_layer, ") kinds"));
  }
  for (int64_t i = 0; i < c.n_layer; ++i) {
    const Json& kind = list[static_cast<size_t>(i)];
    const std::string name = kind.is_string() ? kind.get<std::string>() : kind.dump();
    if (name == "hybrid") {
      c.shared.layers.push_back(i);
    } else if (name != "mamba" && name != "linear_attention") {
      return f.Error(kinds, absl::StrCat("names layer ", i, " '", name,
                                         "'; expected mamba, linear_attention or hybrid"));
    }
  }

  // Every layer's Mamba-2 mixer.
  ICD_ASSIGN_OR_RETURN(double expand, f.Number("mamba_expand", 2));
  ICD_ASSIGN_OR_RETURN(c.d_inner, InnerWidth(expand, c.d_model, source, "mamba_expand"));
  ICD_ASSIGN_OR_RETURN(c.nheads, f.PositiveInt("n_mamba_heads", 8));
  if (c.d_inner % c.nheads != 0) {
    return f.Error("n_mamba_heads", absl::StrCat(c.nheads, " does not divide mamba_expand x "
                                                 "hidden_size ", c.d_inner));
  }
  ICD_ASSIGN_OR_RETURN(c.headdim, f.PositiveInt("mamba_headdim", c.d_inner / c.nheads));
  ICD_ASSIGN_OR_RETURN(c.ngroups, f.PositiveInt("mamba_ngroups", 1));
  ICD_ASSIGN_OR_RETURN(c.d_state, f.PositiveInt("mamba_d_state", 64));
  ICD_ASSIGN_OR_RETURN(c.d_conv, f.PositiveInt("mamba_d_conv", 4));
  ICD_ASSIGN_OR_RETURN(c.chunk_size, f.PositiveInt("chunk_size", 256));
  ICD_ASSIGN_OR_RETURN(c.proj_bias, f.Bool("add_bias_linear", false));
  c.conv_bias = true;  // built with a bias whatever use_conv_bias says
  ICD_ASSIGN_OR_RETURN(c.dt_min, f.Number("time_step_min", 1e-3));
  if (!(c.dt_min >= 0) || !std::isfinite(c.dt_min)) {
    return f.Error("time_step_min", "must be a finite number >= 0");
  }
  c.gated_norm = true;
  c.norm_before_gate = false;
  c.grouped_gated_norm = true;  // Zamba2RMSNormGated: groups of d_inner / ngroups
  c.gated_norm_eps = 1e-5;
  ICD_RETURN_IF_ERROR(CheckMamba2Shapes(c, source));

  // The shared blocks.
  auto& s = c.shared;
  ICD_ASSIGN_OR_RETURN(s.blocks, f.PositiveInt("num_mem_blocks", 1));
  if (s.layers.empty()) s.blocks = 0;  // no hybrid layer: a plain Mamba-2 model
  if (s.blocks > static_cast<int64_t>(s.layers.size())) {
    return f.Error("num_mem_blocks", absl::StrCat(s.blocks, " blocks, but only ", s.layers.size(),
                                                  " hybrid layers run them"));
  }
  ICD_ASSIGN_OR_RETURN(s.hidden, f.PositiveInt("intermediate_size", 4 * c.d_model));
  ICD_ASSIGN_OR_RETURN(s.adapter_rank, f.PositiveInt("adapter_rank", 128));
  if (s.hidden > kMaxDimension || s.adapter_rank > kMaxDimension) {
    return f.Error("intermediate_size", "or adapter_rank is too large");
  }
  ICD_ASSIGN_OR_RETURN(s.attention_adapters, f.Bool("use_shared_attention_adapter", false));
  s.bias = c.proj_bias;

  AttentionConfig& a = c.attention;
  ICD_ASSIGN_OR_RETURN(int64_t heads, f.PositiveInt("num_attention_heads", 32));
  // Its input is [residual, embeddings]: 2·hidden_size wide, head_dim
  // 2·hidden_size / heads.
  ICD_RETURN_IF_ERROR(ParseSeparateAttention(f, 2 * c.d_model, heads, std::nullopt, a));
  if (f.Has("attention_head_dim")) {
    ICD_ASSIGN_OR_RETURN(int64_t head_dim, f.PositiveInt("attention_head_dim", std::nullopt));
    if (head_dim != a.head_dim) {
      return f.Error("attention_head_dim", absl::StrCat("is ", head_dim, "; transformers uses ",
                                                        a.head_dim, " (2 x hidden_size / heads)"));
    }
  }
  a.qkv_bias = a.out_bias = false;
  a.softmax_scale = 1.0 / std::sqrt(static_cast<double>(a.head_dim) / 2.0);
  ICD_ASSIGN_OR_RETURN(bool rope, f.Bool("use_mem_rope", false));
  if (rope) {
    ICD_RETURN_IF_ERROR(ParseRope(root, f, source, 1.0, a));
  } else {
    a.rotary_dim = 0;
  }
  if (s.attention_adapters && (a.kv_heads != a.heads || a.context_width() != 2 * c.d_model)) {
    return f.Error("use_shared_attention_adapter",
                   absl::StrCat("needs num_key_value_heads equal to num_attention_heads (",
                                a.kv_heads, " and ", a.heads, "): its adapters add 2 x "
                                "hidden_size values to q, k and v"));
  }
  return c;
}

}  // namespace icd::config_fields
