// One place per kind of mixer (docs/blocks.md): what icd knows of a Mamba-1
// (and FalconMamba) or a Mamba-2 mixer, as a table of functions over the
// model's config and a layer: its config side (blocks/shapes.h: checks,
// tensors, state), the symmetry groups inside it, the members it gives the
// residual group, and its forward.
// ExpectedShapes (io/config.cc), BuildSpec and ResidualGroup (apply/
// symmetry.cc) and RunForward (forward/forward.cc) go through the table of
// each layer's mixer (ModelConfig::mixers, the model as a list of blocks), so
// that a new kind of block (attention, a gated MLP) is a new table, not a
// new branch in each of them. Internal to core.
#ifndef ICD_CORE_SRC_BLOCKS_MIXER_H_
#define ICD_CORE_SRC_BLOCKS_MIXER_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "apply/symmetry.h"
#include "blocks/shapes.h"
#include "forward/forward_internal.h"
#include "model.h"

namespace icd::blocks {

struct MixerKind {
  const char* name;
  // Its config side: checks, sizes, tensors, state shapes.
  const MixerShapes& shapes;
  // The symmetry groups inside layer `layer`'s mixer, appended to `spec` in
  // the order GetSymmetries lists them.
  void (*groups)(const ModelConfig& config, int64_t layer, FamilySpec& spec);
  // The residual group's members in layer `layer`'s mixer (its input
  // projection's columns, its output projection's rows), appended.
  void (*residual_members)(const ModelConfig& config, int64_t layer,
                           std::vector<GroupMember>& members);
  // normed [B, L, d_model] -> [B, L, d_model] (forward_internal.h).
  decltype(&forward_internal::Mamba1Mixer) forward;
};

extern const MixerKind kMamba1Mixer;  // Mamba-1 and FalconMamba (blocks/mamba1.cc)
extern const MixerKind kMamba2Mixer;  // blocks/mamba2.cc
extern const MixerKind kAttentionMixer;  // blocks/attention.cc
extern const MixerKind kMlpMixer;        // an MLP as a layer's mixer (blocks/mlp.cc)
extern const MixerKind kExpertsMixer;    // Nemotron-H's experts as a mixer (blocks/moe.cc)

// Layer `layer`'s mixer (config.mixers must be planned: every parsed config is).
const MixerKind& MixerAt(const ModelConfig& config, int64_t layer);

// The gated MLP after a layer's mixer (blocks/shapes.h HasMlp), a residual
// block of its own (docs/hybrid_symmetries.md):
// its hidden channels, one group per layer: fc1's two halves' rows by one
// permutation, fc2's columns;
void MlpGroups(const ModelConfig& config, int64_t layer, FamilySpec& spec);
// the residual group's members in it: norm2's weight (and bias), fc1's
// columns, fc2's rows;
void MlpResidualMembers(const ModelConfig& config, int64_t layer,
                        std::vector<GroupMember>& members);
// its forward: normed [B, L, d_model] (norm2's output) -> fc2(values ·
// silu(gate)), [B, L, d_model], in the compute dtype as mamba_ssm's GatedMLP;
// the hidden activations go to capture as the layer's "mlp" group.
torch::Tensor GatedMlp(const ModelConfig& config, const Weights& weights, int64_t layer,
                       const torch::Tensor& normed, const forward_internal::Capture& capture);

// A mixture of experts beside that MLP (blocks/moe.cc, config.moe): its
// groups (the experts' order, each expert's hidden channels), its residual members
// (the router's and the experts' d_model axes) and its forward, normed
// [B, L, d_model] -> [B, L, d_model], added to the MLP's.
void ExpertGroups(const ModelConfig& config, int64_t layer, FamilySpec& spec);
void ExpertResidualMembers(const ModelConfig& config, int64_t layer,
                           std::vector<GroupMember>& members);
torch::Tensor MixtureOfExperts(const ModelConfig& config, const Weights& weights, int64_t layer,
                               const torch::Tensor& normed,
                               const forward_internal::Capture& capture);
// Jamba's mixture (blocks/shapes.h PerExpertLayer), in place of the MLP: the
// experts' order ("layers.{i}.experts": the router's rows and each expert's
// tensors moved whole between names) and a group of hidden channels per
// expert ("layers.{i}.expert_hidden.{e}").
void PerExpertGroups(const ModelConfig& config, int64_t layer, FamilySpec& spec);
void PerExpertResidualMembers(const ModelConfig& config, int64_t layer,
                              std::vector<GroupMember>& members);
torch::Tensor PerExpertMixture(const ModelConfig& config, const Weights& weights, int64_t layer,
                               const torch::Tensor& normed,
                               const forward_internal::Capture& capture);

// Zamba2's shared transformer blocks (blocks/shapes.h HasSharedBlocks;
// blocks/shared_block.cc): each block's groups ("shared.{k}.": heads,
// value_dims, key_dims without a rotary, attention_output, mlp, output, and
// each adapter's rank, adapters.{slot}.{q,k,v,gate_up}), one set for every
// layer that runs it;
void SharedBlockGroups(const ModelConfig& config, FamilySpec& spec);
// the residual group's members in them: every hybrid layer's linear's rows;
// each block's input norm, q, k, v's columns and the attention adapters'
// down columns, both halves of their [residual, embeddings] input;
void SharedBlockResidualMembers(const ModelConfig& config, std::vector<GroupMember>& members);
// its forward at hybrid layer `layer`: residual and embedded [B, L, d_model]
// (the embeddings' output) -> linear(block(...)) [B, L, d_model] in the
// compute dtype, added to the layer's mixer's input; `state` (optional)
// holds the block's attention cache at this layer.
torch::Tensor SharedBlock(const ModelConfig& config, const Weights& weights, int64_t layer,
                          const forward_internal::Precision& precision,
                          const torch::Tensor& residual, const torch::Tensor& embedded,
                          const forward_internal::Capture& capture, LayerState* state);

// The members both Mamba kinds give the residual group: in_proj's columns,
// out_proj's rows (and its bias).
void ProjectionResidualMembers(const ModelConfig& config, int64_t layer,
                               std::vector<GroupMember>& members);

}  // namespace icd::blocks

#endif  // ICD_CORE_SRC_BLOCKS_MIXER_H_
