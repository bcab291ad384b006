// mamba_ssm's gated MLP (its GatedMLP, as MambaLMHeadModel puts one after
// each mixer when d_intermediate > 0): y, gate = fc1(x).chunk(2);
// fc2(y · silu(gate)). Its hidden channels are free (docs/hybrid_symmetries.md,
// "Gated MLP"): silu and the product act channel by channel.
#include "absl/strings/str_cat.h"
#include "blocks/mixer.h"

namespace icd::blocks {

void MlpGroups(const ModelConfig& c, int64_t i, FamilySpec& spec) {
  if (PerExpertLayer(c, i)) {
    PerExpertGroups(c, i, spec);
    return;
  }
  const int64_t hidden = c.d_intermediate;
  GroupInfo group = NewGroup(absl::StrCat("layers.", i, ".mlp"), hidden);
  if (c.mlp_separate_projections) {
    AddRowBlocks(group.members, i, "mlp.gate_proj", false, {0}, hidden);
    AddRowBlocks(group.members, i, "mlp.up_proj", false, {0}, hidden);
    group.members.push_back(Member(LayerTensorName(i, "mlp.down_proj.weight"), 1, 0, hidden));
  } else {
    AddRowBlocks(group.members, i, "mlp.fc1", false, {0, hidden}, hidden);
    group.members.push_back(Member(LayerTensorName(i, "mlp.fc2.weight"), 1, 0, hidden));
  }
  spec.push_back(std::move(group));
  if (HasExperts(c)) ExpertGroups(c, i, spec);
}

void MlpResidualMembers(const ModelConfig& c, int64_t i, std::vector<GroupMember>& members) {
  const int64_t width = c.d_model;
  members.push_back(Member(LayerTensorName(i, "norm2.weight"), 0, 0, width));
  if (c.layer_norm) members.push_back(Member(LayerTensorName(i, "norm2.bias"), 0, 0, width));
  if (PerExpertLayer(c, i)) {
    PerExpertResidualMembers(c, i, members);
    return;
  }
  if (c.mlp_separate_projections) {
    members.push_back(Member(LayerTensorName(i, "mlp.gate_proj.weight"), 1, 0, width));
    members.push_back(Member(LayerTensorName(i, "mlp.up_proj.weight"), 1, 0, width));
    members.push_back(Member(LayerTensorName(i, "mlp.down_proj.weight"), 0, 0, width));
    return;
  }
  members.push_back(Member(LayerTensorName(i, "mlp.fc1.weight"), 1, 0, width));
  members.push_back(Member(LayerTensorName(i, "mlp.fc2.weight"), 0, 0, width));
  if (HasExperts(c)) ExpertResidualMembers(c, i, members);
}

torch::Tensor GatedMlp(const ModelConfig& c, const Weights& weights, int64_t i,
                       const torch::Tensor& normed, const forward_internal::Capture& capture) {
  const torch::ScalarType compute = normed.scalar_type();
  if (PerExpertLayer(c, i)) return PerExpertMixture(c, weights, i, normed, capture);
  if (c.mlp_separate_projections) {  // down(silu(gate(x)) * up(x))
    auto weight = [&](const char* name) {
      return forward_internal::TensorAs(weights, LayerTensorName(i, name), compute);
    };
    torch::Tensor gate = forward_internal::Linear(normed, weight("mlp.gate_proj.weight"));
    if (c.mlp_gate_multiplier != 1.0) gate = gate * c.mlp_gate_multiplier;  // Falcon-H1
    const torch::Tensor activations =
        torch::silu(gate) * forward_internal::Linear(normed, weight("mlp.up_proj.weight"));
    capture.Add(absl::StrCat("layers.", i, ".mlp"), activations);
    const torch::Tensor out = forward_internal::Linear(activations, weight("mlp.down_proj.weight"));
    return c.mlp_down_multiplier != 1.0 ? out * c.mlp_down_multiplier : out;
  }
  const torch::Tensor fc1 =
      forward_internal::TensorAs(weights, LayerTensorName(i, "mlp.fc1.weight"), compute);
  const torch::Tensor fc2 =
      forward_internal::TensorAs(weights, LayerTensorName(i, "mlp.fc2.weight"), compute);
  const torch::Tensor projected = forward_internal::Linear(normed, fc1, torch::Tensor());
  const int64_t hidden = c.d_intermediate;
  const int64_t values_at = c.mlp_gate_first ? hidden : 0;
  const torch::Tensor values = projected.narrow(-1, values_at, hidden);  // [B, L, H]
  const torch::Tensor gate = projected.narrow(-1, hidden - values_at, hidden);
  const torch::Tensor activations = values * torch::silu(gate);  // [B, L, H]
  capture.Add(absl::StrCat("layers.", i, ".mlp"), activations);
  const torch::Tensor shared = forward_internal::Linear(activations, fc2, torch::Tensor());
  return HasExperts(c) ? shared + MixtureOfExperts(c, weights, i, normed, capture) : shared;
}

}  // namespace icd::blocks
