// The engine's in-memory model: a parsed config and the weights under
// canonical (HuggingFace) names. Internal to core: includes LibTorch.
#ifndef ICD_CORE_SRC_MODEL_H_
#define ICD_CORE_SRC_MODEL_H_

#include "torch_api.h"

#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "icd/core/types.h"

namespace icd {

// The kinds of mixer a residual block can hold; blocks/ holds each one's
// tables (shapes.h: config side; mixer.h: groups and forward).
enum class MixerType { kMamba1, kMamba2, kAttention, kMlp, kExperts };

// An MLP that is a layer's mixer (NemotronH's '-' layers; blocks/mlp.cc):
// mixer.up_proj [hidden, d_model], mixer.down_proj [d_model, hidden], and
// mixer.gate_proj [hidden, d_model] where gated; biases where `bias`.
struct MlpConfig {
  enum class Activation { kSilu, kRelu2 };  // relu2: relu(x)^2
  int64_t hidden = 0;
  bool gated = false;  // down(act(gate(x)) * up(x)); else down(act(up(x)))
  Activation activation = Activation::kSilu;
  bool bias = false;
};

// An attention mixer (blocks/attention.cc, docs/hybrid_symmetries.md):
// mamba_ssm's MHA (at the layers attn_layer_idx lists, configured by
// attn_cfg), whose in_proj rows are [q: heads·head_dim | k: kv_heads·head_dim
// | v: kv_heads·head_dim | mlp_dim: values, then gate] and out_proj columns
// [heads·head_dim | mlp_dim / 2]; or HuggingFace's, with q_proj, k_proj,
// v_proj and o_proj of their own (separate_projections; no conv, no MLP).
struct AttentionConfig {
  bool separate_projections = false;
  // The module its tensors live under in a layer ("mixer"; "attn" where it
  // sits beside a Mamba mixer, parallel_attention), and its groups'
  // prefix there ("layers.{i}.attn.heads").
  std::string module = "mixer";
  double key_multiplier = 1.0;  // Falcon-H1: k times it, before the rotary
  int64_t heads = 0;
  int64_t kv_heads = 0;  // query head h reads kv head h / (heads / kv_heads)
  int64_t head_dim = 0;
  int64_t rotary_dim = 0;  // the first rotary_dim of each q and k head; 0: none
  double rotary_base = 10000.0;
  bool rotary_interleaved = false;  // pairs (2i, 2i+1) instead of (i, i + rotary_dim/2)
  int64_t conv = 0;     // depthwise causal conv over q, k, v of this width; 0: none
  int64_t mlp_dim = 0;  // a gated MLP inside the mixer (rounded up to 256 as MHA does)
  bool qkv_bias = true;
  bool out_bias = true;
  double softmax_scale = 0.0;  // 0: 1 / sqrt(head_dim)

  int64_t qkv_rows() const { return head_dim * (heads + 2 * kv_heads); }
  int64_t context_width() const { return head_dim * heads; }
};

// Canonical names of the embedding and the head; a tied head is the embedding.
inline constexpr char kEmbeddingTensor[] = "backbone.embeddings.weight";
inline constexpr char kHeadTensor[] = "lm_head.weight";

// Everything the forward and the symmetry specs need, parsed once from either
// layout's config.json. Field names follow mamba_symmetries.md §1.1.
struct ModelConfig {
  Family family = Family::kMamba1;
  Layout layout = Layout::kHf;
  int64_t d_model = 0;
  int64_t n_layer = 0;
  int64_t vocab_size = 0;      // rows of the embedding (mamba_ssm: padded)
  int64_t vocab_unpadded = 0;  // config's vocab_size before padding
  int64_t d_inner = 0;
  int64_t d_state = 0;
  int64_t d_conv = 0;
  bool proj_bias = false;  // in_proj / out_proj bias
  bool conv_bias = true;
  bool tied = true;         // lm_head is the embedding tensor
  bool layer_norm = false;  // mamba_ssm rms_norm: false -> LayerNorm with bias
  double norm_eps = 1e-5;

  // Mamba-1 / FalconMamba
  int64_t dt_rank = 0;
  double mixer_rms_eps = 1e-6;  // FalconMamba's weightless RMS on B, C, dt
  // Jamba's RMS norms with weights on dt, B and C (mixer.dt_layernorm [dt_rank],
  // b_layernorm and c_layernorm [d_state]; eps norm_eps), where FalconMamba's
  // have none.
  bool mixer_norm_weights = false;

  // Mamba-2
  int64_t nheads = 0;
  int64_t headdim = 0;
  int64_t ngroups = 1;
  int64_t chunk_size = 256;
  double dt_min = 0.0;
  double dt_max = std::numeric_limits<double>::infinity();
  bool gated_norm = true;          // mixer.norm present (mamba_ssm rmsnorm)
  bool norm_before_gate = false;   // mamba_ssm only
  bool grouped_gated_norm = false;  // mamba_ssm: per group; HF: whole d_inner
  bool d_has_hdim = false;         // D is [d_inner] instead of [nheads]

  // mamba_ssm's gated MLP after each layer's mixer (d_intermediate > 0): a
  // second residual block per layer, norm2 -> mlp -> add (blocks/gated_mlp.cc);
  // 0: none.
  int64_t d_intermediate = 0;
  // Its projections as HuggingFace's (Bamba's feed_forward): mlp.gate_proj,
  // mlp.up_proj [d_intermediate, d_model], mlp.down_proj, instead of
  // mamba_ssm's fc1 (values, then gate) and fc2.
  bool mlp_separate_projections = false;
  // fc1's halves the other way round: the gate, then the values (Granite
  // 4.0's shared_mlp.input_linear).
  bool mlp_gate_first = false;

  // A mixture of experts beside that MLP (Granite 4.0's block_sparse_moe;
  // blocks/moe.cc): moe.router [experts, d_model], moe.fc1 [experts,
  // 2·hidden, d_model] (gate, then values), moe.fc2 [experts, d_model,
  // hidden]; each position takes its top_k experts by router logit, weighted
  // by the softmax of those k logits. experts 0: none.
  struct Experts {
    int64_t experts = 0;
    int64_t top_k = 0;
    int64_t hidden = 0;
    // Jamba's: at `layers` only, in place of the MLP; a tensor per expert
    // (mlp.experts.{e}.gate_proj, up_proj [hidden, d_model], down_proj) and
    // mlp.router [experts, d_model]; the top_k of the softmax over every
    // expert, not renormalised.
    bool per_expert_tensors = false;
    std::vector<int64_t> layers;
    // Nemotron-H's, as a layer's mixer (MixerType::kExperts, its 'E' layers;
    // blocks/moe.cc): mixer.gate [experts, d_model] and its
    // e_score_correction_bias [experts], mixer.experts.{e}.up_proj [hidden,
    // d_model] and down_proj (ReLU², no gate), mixer.shared_experts.up_proj
    // [shared_hidden, d_model] and down_proj; the top_k of sigmoid(logits) +
    // bias, weighted by their sigmoids (divided by their sum where
    // normalize), times scaling, plus the shared expert.
    int64_t shared_hidden = 0;
    bool normalize = true;
    double scaling = 1.0;
    std::vector<int64_t> mixer_layers;
  } moe;

  // Granite 4.0's scalars: the embedding's output times
  // embedding_multiplier, every block's output times residual_multiplier
  // before it is added, the logits divided by logits_scaling.
  double embedding_multiplier = 1.0;
  double residual_multiplier = 1.0;
  double logits_scaling = 1.0;

  // Falcon-H1: every layer holds attention (module "attn") beside its Mamba
  // mixer, both reading the block's norm: mixer(x · ssm_in) · ssm_out +
  // attention(x · attention_in) · attention_out; the Mamba-2 in_proj's
  // output slices [z | x | B | C | dt] times ssm_multipliers (five, or
  // none); the gated MLP's gate pre-activation and output times its two
  // multipliers; the logits times logits_multiplier.
  bool parallel_attention = false;
  double attention_in_multiplier = 1.0;
  double attention_out_multiplier = 1.0;
  double ssm_in_multiplier = 1.0;
  double ssm_out_multiplier = 1.0;
  std::vector<double> ssm_multipliers;
  double mlp_gate_multiplier = 1.0;
  double mlp_down_multiplier = 1.0;
  double logits_multiplier = 1.0;

  // Zamba2's shared transformer blocks (blocks/shared_block.cc): at each of
  // `layers` (ascending; its j-th runs block j mod `blocks`), attention and
  // then a gated MLP (GELU) read the norm of [residual, embeddings]; their
  // output, through the layer's own `linear`, joins the layer's Mamba mixer's
  // input only (h + mixer(norm(h + linear(block)))). A block's weights are
  // stored once, under its first layer; LoRA adapters, one per layer it runs
  // at, add to q, k, v (with `attention_adapters`) and to the MLP's gate_up.
  // The attention is `attention`'s (its input 2·d_model wide).
  struct SharedBlocks {
    int64_t blocks = 0;  // 0: none
    std::vector<int64_t> layers;
    int64_t hidden = 0;        // the MLP's intermediate_size
    int64_t adapter_rank = 0;
    bool attention_adapters = false;
    bool bias = false;  // gate_up_proj and down_proj biases (add_bias_linear)
  } shared;
  // The Mamba-2 gated norm's eps where it is not norm_eps (Zamba2 fixes it at
  // 1e-5); 0: norm_eps.
  double gated_norm_eps = 0.0;

  // Hybrids: the layers whose mixer is attention (mamba_ssm's attn_layer_idx,
  // NemotronH's '*'), ascending, all with `attention`'s shape; those whose
  // mixer is an MLP (NemotronH's '-'), with `mlp`'s. Every other layer's is
  // the family's Mamba mixer (blocks::PlanBlocks).
  std::vector<int64_t> attention_layers;
  AttentionConfig attention;
  std::vector<int64_t> mlp_layers;
  MlpConfig mlp;
  // The architecture config.json names ("mamba", "mamba2", "falcon_mamba",
  // "nemotron_h", or "mamba_ssm" for MambaLMHeadModel's layout).
  std::string architecture;

  // The model as a list of residual blocks (docs/blocks.md): block i is
  // norm -> mixers[i] -> add. Planned by the config parser (blocks::
  // PlanBlocks); every block of today's families has the family's kind.
  std::vector<MixerType> mixers;
};

// Canonical tensor names: HuggingFace's ("backbone.embeddings.weight",
// "backbone.layers.{i}.mixer.in_proj.weight", "backbone.norm_f.weight",
// "lm_head.weight" only when untied). The loader and the exporter translate
// from and to the mamba_ssm names.
using Weights = std::map<std::string, torch::Tensor>;

// "backbone.layers.{layer}.{suffix}".
inline std::string LayerTensorName(int64_t layer, const std::string& suffix) {
  return "backbone.layers." + std::to_string(layer) + "." + suffix;
}

// The layer of a canonical tensor name; -1 for the embedding, the final norm
// and the head.
inline int64_t LayerOfTensor(const std::string& name) {
  constexpr char kPrefix[] = "backbone.layers.";
  constexpr size_t kLength = sizeof(kPrefix) - 1;
  if (name.compare(0, kLength, kPrefix) != 0) return -1;
  int64_t layer = 0;
  size_t at = kLength;
  for (; at < name.size() && name[at] >= '0' && name[at] <= '9'; ++at) {
    layer = layer * 10 + (name[at] - '0');
  }
  return at > kLength && at < name.size() && name[at] == '.' ? layer : -1;
}

}  // namespace icd

#endif  // ICD_CORE_SRC_MODEL_H_
