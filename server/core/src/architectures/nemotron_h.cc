// NVIDIA's Nemotron-H: its config.json (docs/hybrid_symmetries.md, "Nemotron-H").
#include <algorithm>

#include "io/config_fields.h"

namespace icd::config_fields {

// NVIDIA's Nemotron-H (transformers' NemotronHForCausalLM): one mixer per
// layer, by hybrid_override_pattern ('M' Mamba-2, '*' attention without a
// positional encoding, '-' a ReLU² MLP, 'E' a mixture of experts) or
// layers_block_type; tensors under backbone.layers.{i}.mixer, as icd's
// canonical names; the Mamba-2 gated norm per group; no bias in attention.
absl::StatusOr<ModelConfig> ParseNemotronH(const Json& root, const std::string& source) {
  Fields f(root, source);
  ModelConfig c;
  c.layout = Layout::kHf;
  c.architecture = "nemotron_h";
  c.family = Family::kMamba2;
  std::vector<char> pattern;
  if (f.Has("hybrid_override_pattern")) {
    ICD_ASSIGN_OR_RETURN(std::string text, f.String("hybrid_override_pattern", ""));
    pattern.assign(text.begin(), text.end());
  } else if (f.Has("layers_block_type")) {
    const Json& types = root.at("layers_block_type");
    if (!types.is_array()) return f.Error("layers_block_type", "must be a list of layer kinds");
    for (const Json& type : types) {
      const std::string kind = type.is_string() ? type.get<std::string>() : type.dump();
      if (kind == "mamba" || kind == "linear_attention") {
        pattern.push_back('M');
      } else if (kind == "attention" || kind == "full_attention") {
        pattern.push_back('*');
      } else if (kind == "mlp") {
        pattern.push_back('-');
      } else if (kind == "moe") {
        pattern.push_back('E');
      } else {
        return f.Error("layers_block_type", absl::StrCat("lists an unknown layer kind ", kind));
      }
    }
  } else {
    return f.Error("hybrid_override_pattern", "is missing (and so is layers_block_type)");
  }
  c.n_layer = static_cast<int64_t>(pattern.size());
  if (c.n_layer == 0) return f.Error("hybrid_override_pattern", "lists no layer");
  for (int64_t layer = 0; layer < c.n_layer; ++layer) {
    switch (pattern[static_cast<size_t>(layer)]) {
      case 'M': break;
      case '*': c.attention_layers.push_back(layer); break;
      case '-': c.mlp_layers.push_back(layer); break;
      case 'E': c.moe.mixer_layers.push_back(layer); break;
      default:
        return f.Error("hybrid_override_pattern",
                       absl::StrCat("has '", std::string(1, pattern[static_cast<size_t>(layer)]),
                                    "' at layer ", layer, "; expected M, *, - or E"));
    }
  }
  ICD_ASSIGN_OR_RETURN(c.d_model, f.PositiveInt("hidden_size", std::nullopt));
  ICD_ASSIGN_OR_RETURN(c.vocab_size, f.PositiveInt("vocab_size", 131072));
  c.vocab_unpadded = c.vocab_size;
  c.tied = false;  // NemotronH ties nothing, whatever tie_word_embeddings says
  ICD_ASSIGN_OR_RETURN(c.norm_eps, f.Number("layer_norm_epsilon", 1e-5));

  ICD_ASSIGN_OR_RETURN(std::string mamba_act, f.String("mamba_hidden_act", "silu"));
  if (mamba_act != "silu") {
    return Unsupported(source, absl::StrCat("mamba_hidden_act '", mamba_act, "'"));
  }
  ICD_ASSIGN_OR_RETURN(c.nheads, f.PositiveInt("mamba_num_heads", 128));
  ICD_ASSIGN_OR_RETURN(c.headdim, f.PositiveInt("mamba_head_dim", 64));
  if (c.nheads > kMaxDimension || c.headdim > kMaxDimension) {
    return f.Error("mamba_num_heads", "or mamba_head_dim is too large");
  }
  c.d_inner = c.nheads * c.headdim;  // NemotronH ignores expand
  ICD_ASSIGN_OR_RETURN(c.ngroups, f.PositiveInt(FirstPresent(f, {"n_groups", "mamba_n_groups"}), 8));
  ICD_ASSIGN_OR_RETURN(c.d_state, f.PositiveInt("ssm_state_size", 128));
  ICD_ASSIGN_OR_RETURN(c.d_conv, f.PositiveInt(FirstPresent(f, {"conv_kernel", "mamba_d_conv"}), 4));
  ICD_ASSIGN_OR_RETURN(c.conv_bias, f.Bool(FirstPresent(f, {"use_conv_bias", "mamba_conv_bias"}), true));
  ICD_ASSIGN_OR_RETURN(c.proj_bias, f.Bool("use_bias", false));
  ICD_ASSIGN_OR_RETURN(c.chunk_size,
                       f.PositiveInt(FirstPresent(f, {"chunk_size", "mamba_chunk_size"}), 128));
  ICD_RETURN_IF_ERROR(ParseTimeStepLimit(
      root, f, FirstPresent(f, {"time_step_limit", "mamba_dt_limit"}), c));
  c.gated_norm = true;
  c.grouped_gated_norm = true;  // Zamba2RMSNormGated, groups of d_inner / n_groups
  c.norm_before_gate = false;
  ICD_RETURN_IF_ERROR(CheckMamba2Shapes(c, source));

  // transformers' NemotronHAttention has no bias whatever attention_bias
  // says; NVIDIA's own code reads it: the files say which (a bias present
  // where the config says none is an unexpected tensor, named).
  ICD_RETURN_IF_ERROR(ParseSeparateAttention(f, c.d_model, 8, int64_t{128}, c.attention));
  ICD_ASSIGN_OR_RETURN(c.mlp.hidden, f.PositiveInt("intermediate_size", 21504));
  if (c.mlp.hidden > kMaxDimension) return f.Error("intermediate_size", "is too large");
  ICD_ASSIGN_OR_RETURN(std::string mlp_act, f.String("mlp_hidden_act", "relu2"));
  if (mlp_act != "relu2") {
    return Unsupported(source, absl::StrCat("mlp_hidden_act '", mlp_act, "' (relu2 only)"));
  }
  c.mlp.activation = MlpConfig::Activation::kRelu2;
  ICD_ASSIGN_OR_RETURN(c.mlp.bias, f.Bool("mlp_bias", false));
  if (!c.moe.mixer_layers.empty()) {
    // The experts' layers: ReLU² experts and a shared one, routed by
    // sigmoid scores plus a correction bias (transformers' NemotronHMoE).
    auto& e = c.moe;
    ICD_ASSIGN_OR_RETURN(e.experts, f.PositiveInt("n_routed_experts", 8));
    ICD_ASSIGN_OR_RETURN(e.top_k, f.PositiveInt("num_experts_per_tok", 2));
    ICD_ASSIGN_OR_RETURN(e.hidden, f.PositiveInt("moe_intermediate_size", 7688));
    ICD_ASSIGN_OR_RETURN(e.shared_hidden,
                         f.PositiveInt("moe_shared_expert_intermediate_size", 7688));
    ICD_ASSIGN_OR_RETURN(e.normalize, f.Bool("norm_topk_prob", true));
    ICD_ASSIGN_OR_RETURN(e.scaling, f.Number("routed_scaling_factor", 1.0));
    ICD_ASSIGN_OR_RETURN(int64_t n_group, f.PositiveInt("n_group", 1));
    if (f.Has("moe_latent_size")) {
      return Unsupported(source, "NemotronH experts with latent projections (moe_latent_size)");
    }
    if (n_group != 1) {
      return Unsupported(source, absl::StrCat("NemotronH's group-limited routing (n_group ",
                                              n_group, ")"));
    }
    if (c.mlp.bias) return Unsupported(source, "NemotronH experts with biases (mlp_bias)");
    if (e.top_k > e.experts || e.experts > 256 ||
        static_cast<int64_t>(e.mixer_layers.size()) * e.experts > int64_t{1} << 14 ||
        e.hidden > kMaxDimension || e.shared_hidden > kMaxDimension ||
        !(std::isfinite(e.scaling) && e.scaling > 0)) {
      return f.Error("n_routed_experts",
                     absl::StrCat(e.experts, " experts, top ", e.top_k, ", hidden ", e.hidden,
                                  ": out of what icd takes (at most 256 experts a layer, 16384 "
                                  "in all, top_k at most the experts, a positive scaling)"));
    }
  }
  return c;
}

}  // namespace icd::config_fields
