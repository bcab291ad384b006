#include "blocks/mixer.h"

#include <algorithm>

namespace icd::blocks {

void PlanBlocks(ModelConfig& config) {
  const MixerKind* kind = config.family == Family::kMamba2 ? &kMamba2Mixer : &kMamba1Mixer;
  config.mixers.assign(static_cast<size_t>(std::max<int64_t>(config.n_layer, 0)), kind);
}

const MixerKind& MixerAt(const ModelConfig& config, int64_t layer) {
  return *config.mixers.at(static_cast<size_t>(layer));
}

std::vector<const MixerKind*> MixerKinds(const ModelConfig& config) {
  std::vector<const MixerKind*> kinds;
  for (const MixerKind* kind : config.mixers) {
    if (std::find(kinds.begin(), kinds.end(), kind) == kinds.end()) kinds.push_back(kind);
  }
  return kinds;
}

void ProjectionResidualMembers(const ModelConfig& config, int64_t layer,
                               std::vector<GroupMember>& members) {
  const int64_t width = config.d_model;
  members.push_back(Member(LayerTensorName(layer, "mixer.in_proj.weight"), 1, 0, width));
  members.push_back(Member(LayerTensorName(layer, "mixer.out_proj.weight"), 0, 0, width));
  if (config.proj_bias) {
    members.push_back(Member(LayerTensorName(layer, "mixer.out_proj.bias"), 0, 0, width));
  }
}

}  // namespace icd::blocks
