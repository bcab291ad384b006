// IBM's Bamba: its config.json (docs/hybrid_symmetries.md, "Bamba").
#include <algorithm>

#include "io/config_fields.h"

namespace icd::config_fields {

// IBM's Bamba (transformers' BambaForCausalLM): HF Mamba-2 layers (the gated
// norm over all of d_inner) and attention at attn_layer_indices (q/k/v/o
// projections, a partial rotary), each layer followed by pre_ff_layernorm and
// a gated MLP (feed_forward); tensors under model.* with Bamba's module names
// (io/checkpoint.cc maps them to icd's canonical ones).
absl::StatusOr<ModelConfig> ParseBamba(const Json& root, const std::string& source) {
  Fields f(root, source);
  ICD_ASSIGN_OR_RETURN(ModelConfig c,
                       HfHybridBase(f, source, "bamba", Family::kMamba2, 128000, 1e-5));
  ICD_ASSIGN_OR_RETURN(c.n_layer, f.PositiveInt("num_hidden_layers", 32));
  if (c.n_layer > kMaxLayers) return f.Error("num_hidden_layers", "is too large");
  if (f.Has("attn_layer_indices")) {
    const Json& layers = root.at("attn_layer_indices");
    if (!layers.is_array()) return f.Error("attn_layer_indices", "must be a list of layer indices");
    for (const Json& entry : layers) {
      const Json wrapped = {{"attn_layer_indices", entry}};
      ICD_ASSIGN_OR_RETURN(int64_t layer, Fields(wrapped, source).Int("attn_layer_indices", 0));
      if (layer < 0 || layer >= c.n_layer) {
        return f.Error("attn_layer_indices", absl::StrCat("lists layer ", layer,
                                                          ", but num_hidden_layers is ", c.n_layer));
      }
      c.attention_layers.push_back(layer);
    }
    std::sort(c.attention_layers.begin(), c.attention_layers.end());
    c.attention_layers.erase(std::unique(c.attention_layers.begin(), c.attention_layers.end()),
                             c.attention_layers.end());
  }

  ICD_RETURN_IF_ERROR(ParseMambaFields(root, f, source, 256, c));
  c.grouped_gated_norm = false;  // MambaRMSNormGated over all of d_inner

  AttentionConfig& a = c.attention;
  ICD_RETURN_IF_ERROR(ParseSeparateAttention(f, c.d_model, 8, std::nullopt, a));
  // Bamba's config fixes partial_rotary_factor at 0.5.
  ICD_RETURN_IF_ERROR(ParseRope(root, f, source, 0.5, a));

  ICD_ASSIGN_OR_RETURN(c.d_intermediate, f.PositiveInt("intermediate_size", 14336));
  if (c.d_intermediate > kMaxDimension) return f.Error("intermediate_size", "is too large");
  c.mlp_separate_projections = true;
  return c;
}

}  // namespace icd::config_fields
