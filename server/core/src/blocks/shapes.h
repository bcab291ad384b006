// The config-side half of each kind of mixer (docs/blocks.md): the checks of
// its config fields, its sizes as ModelInfo reports them, its tensors and
// their shapes, its recurrent state's shapes. Plain config arithmetic, so that
// the config parser (and the parsers' fuzz build) uses it without the
// forward; the groups and the forward are blocks/mixer.h's. Internal to core.
#ifndef ICD_CORE_SRC_BLOCKS_SHAPES_H_
#define ICD_CORE_SRC_BLOCKS_SHAPES_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "model.h"

namespace icd::blocks {

// Canonical tensor name -> shape.
using TensorShapes = std::map<std::string, std::vector<int64_t>>;

// A layer's recurrent state for a batch (forward.h LayerState): each
// tensor's shape, empty where the kind holds no such tensor, kAnyLength on
// the time axis of an attention cache (it grows with every token seen).
inline constexpr int64_t kAnyLength = -1;
struct StateShapes {
  std::vector<int64_t> conv_history;
  std::vector<int64_t> ssm_state;
  std::vector<int64_t> attention_cache;  // keys, and values alike
};

struct MixerShapes {
  const char* name;
  // The config's fields of this kind, checked (positive, consistent).
  absl::Status (*check_config)(const ModelConfig& config);
  // Its sizes as ModelInfo reports them (io/config.h ConfigDims), added.
  void (*dims)(const ModelConfig& config, std::map<std::string, int64_t>& dims);
  // Layer `layer`'s mixer tensors and their shapes, added to `shapes`.
  void (*tensors)(const ModelConfig& config, int64_t layer, TensorShapes& shapes);
  // The shapes of a layer's recurrent state for `batch` rows.
  StateShapes (*state_shapes)(const ModelConfig& config, int64_t batch);
};

extern const MixerShapes kMamba1Shapes;  // Mamba-1 and FalconMamba (blocks/mamba1_shapes.cc)
extern const MixerShapes kMamba2Shapes;  // blocks/mamba2_shapes.cc
extern const MixerShapes kAttentionShapes;  // blocks/attention_shapes.cc
extern const MixerShapes kMlpShapes;        // an MLP as a mixer (blocks/mlp_shapes.cc)
extern const MixerShapes kExpertsShapes;    // experts as a mixer (blocks/mlp_shapes.cc)

// The tensors both Mamba kinds hold around their own: in_proj [in_rows,
// d_model], conv1d [conv_channels, 1, d_conv], out_proj [d_model, d_inner],
// with the biases the config has.
void AddProjectionTensors(const ModelConfig& config, int64_t layer, int64_t in_rows,
                          int64_t conv_channels, TensorShapes& shapes);

// mamba_ssm's gated MLP after each layer's mixer (config.d_intermediate > 0;
// its groups and forward: blocks/mixer.h, blocks/gated_mlp.cc): norm2 [d_model]
// (and its bias with LayerNorm), mlp.fc1 [2·d_intermediate, d_model] (its
// halves: the values, then the gate), mlp.fc2 [d_model, d_intermediate], no
// biases (mamba_ssm's GatedMLP as MambaLMHeadModel builds it).
bool HasMlp(const ModelConfig& config);
// A mixture of experts beside it (config.moe; blocks/moe.cc): moe.router,
// moe.fc1, moe.fc2 with their shapes (model.h).
bool HasExperts(const ModelConfig& config);
// Jamba's: layer `layer`'s feed-forward is a mixture of experts with a tensor
// per expert, in place of the MLP (config.moe.per_expert_tensors).
bool PerExpertLayer(const ModelConfig& config, int64_t layer);
void AddMlpTensors(const ModelConfig& config, int64_t layer, TensorShapes& shapes);

// Zamba2's shared transformer blocks (config.shared; their groups and
// forward: blocks/mixer.h, blocks/shared_block.cc). Block k's tensors live
// under its first layer, config.shared.layers[k]:
// backbone.layers.{that}.shared_transformer.{input_layernorm [2·d_model],
// self_attn.{q,k,v,o}_proj, pre_ff_layernorm [d_model],
// feed_forward.{gate_up_proj [2·hidden, d_model], down_proj}} and the
// adapters of every layer that runs it (slot j: the layer's place in
// config.shared.layers), self_attn.linear_{q,k,v}_adapter_list.{j}.{0,1} and
// feed_forward.gate_up_proj_adapter_list.{j}.{0,1} (down [rank, in], up
// [out, rank]); each hybrid layer's own linear [d_model, d_model].
bool HasSharedBlocks(const ModelConfig& config);
struct SharedBlockUse {
  int64_t block = -1;  // -1: the layer runs none
  int64_t slot = -1;   // its adapters' index
};
SharedBlockUse SharedBlockAt(const ModelConfig& config, int64_t layer);
// "backbone.layers.{first layer of block}.shared_transformer.{suffix}".
std::string SharedTensorName(const ModelConfig& config, int64_t block, const std::string& suffix);
// An adapter's tensor: `list` "self_attn.linear_q_adapter_list" (k, v) or
// "feed_forward.gate_up_proj_adapter_list"; part 0 (down) or 1 (up).
std::string AdapterTensorName(const ModelConfig& config, int64_t block, const std::string& list,
                              int64_t slot, int part);
// The adapter slots of block k: the hybrid layers' places j with j mod blocks = k.
std::vector<int64_t> AdapterSlots(const ModelConfig& config, int64_t block);
void AddSharedBlockTensors(const ModelConfig& config, TensorShapes& shapes);
// Why a checkpoint may hold `canonical`, a tensor the config does not
// expect, where a known cause explains it (else empty): a Zamba2 block saved
// again under a later hybrid layer.
std::string WhyUnexpected(const ModelConfig& config, const std::string& canonical);
void SharedBlockDims(const ModelConfig& config, std::map<std::string, int64_t>& dims);

// Whether layer `layer` holds an attention cache beside its mixer's state
// (Falcon-H1's parallel attention, Zamba2's shared block), and whether any
// layer of the model attends.
bool AttentionBeside(const ModelConfig& config, int64_t layer);
bool Attends(const ModelConfig& config);

// The list of blocks of `config`'s model: config.mixers, one per layer: the
// family's Mamba kind, attention at config.attention_layers, an MLP at
// config.mlp_layers (the parsers call it).
void PlanBlocks(ModelConfig& config);

// Layer `layer`'s mixer's shapes (config.mixers must be planned: every
// parsed config is).
const MixerShapes& ShapesAt(const ModelConfig& config, int64_t layer);

// The distinct kinds of the model's mixers, in order of first appearance.
std::vector<MixerType> MixerTypes(const ModelConfig& config);
const MixerShapes& ShapesOf(MixerType type);

}  // namespace icd::blocks

#endif  // ICD_CORE_SRC_BLOCKS_SHAPES_H_
