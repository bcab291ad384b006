#include "blocks/mixer.h"

namespace icd::blocks {

const MixerKind& MixerAt(const ModelConfig& config, int64_t layer) {
  switch (config.mixers.at(static_cast<size_t>(layer))) {
    case MixerType::kMamba1: return kMamba1Mixer;
    case MixerType::kMamba2: return kMamba2Mixer;
    case MixerType::kAttention: return kAttentionMixer;
    case MixerType::kMlp: return kMlpMixer;
    case MixerType::kExperts: return kExpertsMixer;
  }
  return kMamba1Mixer;
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
