// IBM's Granite 4.0: its config.json (docs/hybrid_symmetries.md, "Granite 4.0").
#include <algorithm>

#include "io/config_fields.h"

namespace icd::config_fields {

// IBM's Granite 4.0 (transformers' GraniteMoeHybridForCausalLM): Mamba-2
// (the gated norm over all of d_inner) and attention layers by layer_types ("mamba" or
// "linear_attention"; "attention" or "full_attention": q/k/v/o, a full rotary
// with position_embedding_type "rope", none otherwise; the softmax scale is attention_multiplier),
// each followed by post_attention_layernorm and a shared gated MLP (its
// input_linear's halves the gate, then the values) plus, with
// num_local_experts > 0, a mixture of experts; embedding_multiplier,
// residual_multiplier and logits_scaling scale the stream.
absl::StatusOr<ModelConfig> ParseGranite(const Json& root, const std::string& source) {
  Fields f(root, source);
  ICD_ASSIGN_OR_RETURN(ModelConfig c, HfHybridBase(f, source, "granitemoehybrid",
                                                   Family::kMamba2, 32000, 1e-6));
  const char* types_key = FirstPresent(f, {"layer_types", "layers_block_type"});
  if (f.Has(types_key)) {
    const Json& types = root.at(types_key);
    if (!types.is_array()) return f.Error(types_key, "must be a list of layer kinds");
    c.n_layer = static_cast<int64_t>(types.size());
    for (int64_t layer = 0; layer < c.n_layer; ++layer) {
      const Json& type = types[static_cast<size_t>(layer)];
      if (!type.is_string()) return f.Error(types_key, absl::StrCat("lists ", type.dump()));
      // transformers 5 writes the kinds as linear_attention and full_attention.
      const std::string kind = type.get<std::string>();
      if (kind == "attention" || kind == "full_attention") {
        c.attention_layers.push_back(layer);
      } else if (kind != "mamba" && kind != "linear_attention") {
        return f.Error(types_key, absl::StrCat("names layer ", layer, " '", kind,
                                               "'; expected mamba, attention, linear_attention "
                                               "or full_attention"));
      }
    }
  } else {
    ICD_ASSIGN_OR_RETURN(c.n_layer, f.PositiveInt("num_hidden_layers", 32));
  }
  if (c.n_layer < 1 || c.n_layer > kMaxLayers) return f.Error(types_key, "lists no layer, or too many");
  ICD_RETURN_IF_ERROR(ParseMambaFields(root, f, source, 256, c));
  // transformers 5.17's gated norm over all of d_inner, as its golden
  // (granite4-dense-nope, two groups) showed: per group it is 0.22 away.
  c.grouped_gated_norm = false;

  AttentionConfig& a = c.attention;
  ICD_ASSIGN_OR_RETURN(const int64_t default_kv_heads, f.PositiveInt("num_attention_heads", 32));
  ICD_RETURN_IF_ERROR(ParseSeparateAttention(f, c.d_model, default_kv_heads, std::nullopt, a));
  ICD_ASSIGN_OR_RETURN(std::string positions, f.String("position_embedding_type", ""));
  if (positions == "rope") {
    ICD_RETURN_IF_ERROR(ParseRope(root, f, source, 1.0, a));
  } else if (!positions.empty() && positions != "nope") {
    return Unsupported(source, absl::StrCat("position_embedding_type '", positions, "'"));
  }
  ICD_ASSIGN_OR_RETURN(a.softmax_scale, f.Number("attention_multiplier", 1.0));
  ICD_ASSIGN_OR_RETURN(c.embedding_multiplier, f.Number("embedding_multiplier", 1.0));
  ICD_ASSIGN_OR_RETURN(c.residual_multiplier, f.Number("residual_multiplier", 1.0));
  ICD_ASSIGN_OR_RETURN(c.logits_scaling, f.Number("logits_scaling", 1.0));
  for (const auto& [key, value] : {std::pair{"attention_multiplier", a.softmax_scale},
                                   std::pair{"embedding_multiplier", c.embedding_multiplier},
                                   std::pair{"residual_multiplier", c.residual_multiplier},
                                   std::pair{"logits_scaling", c.logits_scaling}}) {
    if (!(value > 0 && std::isfinite(value))) return f.Error(key, "must be a positive number");
  }

  ICD_ASSIGN_OR_RETURN(c.d_intermediate, f.PositiveInt("shared_intermediate_size", 1024));
  c.mlp_gate_first = true;
  ICD_ASSIGN_OR_RETURN(c.moe.experts, f.Int("num_local_experts", 8));
  // At most 256, as the other architectures' experts: the forward visits
  // every expert of a layer, and a forged count must not hang a load.
  if (c.moe.experts < 0 || c.moe.experts > 256) {
    return f.Error("num_local_experts", absl::StrCat(c.moe.experts, ": expected 0 (no experts) "
                                                     "to 256"));
  }
  if (c.moe.experts > 0) {
    ICD_ASSIGN_OR_RETURN(c.moe.top_k, f.PositiveInt("num_experts_per_tok", 2));
    ICD_ASSIGN_OR_RETURN(c.moe.hidden, f.PositiveInt("intermediate_size", 11008));
    if (c.moe.top_k > c.moe.experts) {
      return f.Error("num_experts_per_tok", absl::StrCat(c.moe.top_k, " is above num_local_experts ",
                                                         c.moe.experts));
    }
  }
  if (c.d_intermediate > kMaxDimension || c.moe.hidden > kMaxDimension) {
    return f.Error("shared_intermediate_size", "or intermediate_size is too large");
  }
  return c;
}

}  // namespace icd::config_fields
