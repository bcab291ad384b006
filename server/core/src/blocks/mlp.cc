// An MLP that is a layer's mixer (NemotronH's '-' layers: down(relu(up(x))^2);
// gated: down(act(gate(x)) * up(x))). Its hidden channels are free
// (docs/hybrid_symmetries.md, "Gated MLP"; without a gate the same argument
// with the activation alone): every operation between up and down acts
// channel by channel.
#include "absl/strings/str_cat.h"
#include "blocks/mixer.h"

namespace icd::blocks {
namespace {

std::vector<std::string> InputModules(const ModelConfig& c) {
  std::vector<std::string> modules{"mixer.up_proj"};
  if (c.mlp.gated) modules.push_back("mixer.gate_proj");
  return modules;
}

void MlpMixerGroups(const ModelConfig& c, int64_t i, FamilySpec& spec) {
  const int64_t hidden = c.mlp.hidden;
  GroupInfo group = NewGroup(absl::StrCat("layers.", i, ".mlp"), hidden);
  for (const std::string& module : InputModules(c)) {
    AddRowBlocks(group.members, i, module, c.mlp.bias, {0}, hidden);
  }
  group.members.push_back(Member(LayerTensorName(i, "mixer.down_proj.weight"), 1, 0, hidden));
  spec.push_back(std::move(group));
}

void MlpMixerResidualMembers(const ModelConfig& c, int64_t i, std::vector<GroupMember>& members) {
  const int64_t width = c.d_model;
  for (const std::string& module : InputModules(c)) {
    members.push_back(Member(LayerTensorName(i, module + ".weight"), 1, 0, width));
  }
  members.push_back(Member(LayerTensorName(i, "mixer.down_proj.weight"), 0, 0, width));
  if (c.mlp.bias) members.push_back(Member(LayerTensorName(i, "mixer.down_proj.bias"), 0, 0, width));
}

torch::Tensor Activate(const torch::Tensor& x, MlpConfig::Activation activation) {
  if (activation == MlpConfig::Activation::kRelu2) return torch::relu(x).pow(2);
  return torch::silu(x);
}

torch::Tensor MlpMixer(const ModelConfig& c, const Weights& weights, int64_t layer,
                       const forward_internal::Precision& precision, const torch::Tensor& normed,
                       const forward_internal::Capture& capture, LayerState*, const CallContext&) {
  const torch::ScalarType compute = precision.compute;
  auto linear = [&](const torch::Tensor& x, const char* module) {
    const std::string prefix = LayerTensorName(layer, std::string("mixer.") + module);
    return forward_internal::Linear(
        x, forward_internal::TensorAs(weights, prefix + ".weight", compute),
        forward_internal::OptionalTensorAs(weights, prefix + ".bias", compute));
  };
  const torch::Tensor up = linear(normed, "up_proj");  // [B, L, hidden]
  const torch::Tensor activations =
      c.mlp.gated ? Activate(linear(normed, "gate_proj"), c.mlp.activation) * up
                  : Activate(up, c.mlp.activation);
  capture.Add(forward_internal::LayerGroupName(layer, "mlp"), activations);
  return linear(activations, "down_proj");
}

}  // namespace

const MixerKind kMlpMixer{"mlp", kMlpShapes, MlpMixerGroups, MlpMixerResidualMembers, MlpMixer};

}  // namespace icd::blocks
