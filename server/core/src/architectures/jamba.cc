// AI21's Jamba: its config.json (docs/hybrid_symmetries.md, "Jamba").
#include <algorithm>

#include "io/config_fields.h"

namespace icd::config_fields {

// AI21's Jamba (transformers' JambaForCausalLM): Mamba-1 layers with weighted
// RMS norms on dt, B and C, and attention (q/k/v/o, no positions, no bias)
// where layer % attn_layer_period == attn_layer_offset; every layer followed
// by pre_ff_layernorm and a SwiGLU MLP, or a mixture of experts (a tensor per
// expert, the top k of the softmax over every expert) where layer %
// expert_layer_period == expert_layer_offset.
absl::StatusOr<ModelConfig> ParseJamba(const Json& root, const std::string& source) {
  Fields f(root, source);
  ICD_ASSIGN_OR_RETURN(ModelConfig c,
                       HfHybridBase(f, source, "jamba", Family::kMamba1, 65536, 1e-6));
  ICD_ASSIGN_OR_RETURN(c.n_layer, f.PositiveInt("num_hidden_layers", 32));
  if (c.n_layer > kMaxLayers) return f.Error("num_hidden_layers", "is too large");
  ICD_ASSIGN_OR_RETURN(int64_t attn_period, f.PositiveInt("attn_layer_period", 8));
  ICD_ASSIGN_OR_RETURN(int64_t attn_offset, f.Int("attn_layer_offset", 4));
  ICD_ASSIGN_OR_RETURN(int64_t expert_period, f.PositiveInt("expert_layer_period", 2));
  ICD_ASSIGN_OR_RETURN(int64_t expert_offset, f.Int("expert_layer_offset", 1));
  ICD_ASSIGN_OR_RETURN(c.moe.experts, f.PositiveInt("num_experts", 16));
  for (int64_t layer = 0; layer < c.n_layer; ++layer) {
    if (layer % attn_period == attn_offset) c.attention_layers.push_back(layer);
    if (c.moe.experts > 1 && layer % expert_period == expert_offset) c.moe.layers.push_back(layer);
  }
  if (c.moe.experts == 1) c.moe.experts = 0;  // one expert: the MLP everywhere
  c.moe.per_expert_tensors = true;

  ICD_ASSIGN_OR_RETURN(double expand, f.Number("mamba_expand", 2));
  ICD_ASSIGN_OR_RETURN(c.d_inner, InnerWidth(expand, c.d_model, source, "mamba_expand"));
  ICD_ASSIGN_OR_RETURN(c.d_state, f.PositiveInt("mamba_d_state", 16));
  ICD_ASSIGN_OR_RETURN(c.d_conv, f.PositiveInt("mamba_d_conv", 4));
  ICD_ASSIGN_OR_RETURN(c.dt_rank, DtRank(f, "mamba_dt_rank", c.d_model));
  ICD_ASSIGN_OR_RETURN(c.conv_bias, f.Bool("mamba_conv_bias", true));
  ICD_ASSIGN_OR_RETURN(c.proj_bias, f.Bool("mamba_proj_bias", false));
  c.mixer_norm_weights = true;

  // Jamba's attention: head_dim is hidden / heads, no bias (LlamaAttention's).
  AttentionConfig& a = c.attention;
  ICD_RETURN_IF_ERROR(ParseSeparateAttention(f, c.d_model, 8, std::nullopt, a));

  ICD_ASSIGN_OR_RETURN(c.d_intermediate, f.PositiveInt("intermediate_size", 14336));
  if (c.d_intermediate > kMaxDimension) return f.Error("intermediate_size", "is too large");
  c.mlp_separate_projections = true;
  c.moe.hidden = c.d_intermediate;
  ICD_ASSIGN_OR_RETURN(c.moe.top_k, f.PositiveInt("num_experts_per_tok", 2));
  if (c.moe.experts > 0 && c.moe.top_k > c.moe.experts) {
    return f.Error("num_experts_per_tok", absl::StrCat(c.moe.top_k, " is above num_experts ",
                                                       c.moe.experts));
  }
  // A tensor per expert: the tensor list stays one a forged config cannot
  // make take seconds to build (as n_layer's bound).
  if (c.moe.experts > 256 ||
      static_cast<int64_t>(c.moe.layers.size()) * c.moe.experts > int64_t{1} << 14) {
    return f.Error("num_experts", absl::StrCat(c.moe.experts, " experts in ", c.moe.layers.size(),
                                               " layers are more than icd takes (256 a layer, "
                                               "16384 in all)"));
  }
  return c;
}

}  // namespace icd::config_fields
