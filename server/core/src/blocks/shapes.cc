#include "blocks/shapes.h"

#include <algorithm>

namespace icd::blocks {

void PlanBlocks(ModelConfig& config) {
  const MixerType type = config.family == Family::kMamba2 ? MixerType::kMamba2 : MixerType::kMamba1;
  config.mixers.assign(static_cast<size_t>(std::max<int64_t>(config.n_layer, 0)), type);
}

const MixerShapes& ShapesOf(MixerType type) {
  return type == MixerType::kMamba2 ? kMamba2Shapes : kMamba1Shapes;
}

const MixerShapes& ShapesAt(const ModelConfig& config, int64_t layer) {
  return ShapesOf(config.mixers.at(static_cast<size_t>(layer)));
}

std::vector<MixerType> MixerTypes(const ModelConfig& config) {
  std::vector<MixerType> types;
  for (const MixerType type : config.mixers) {
    if (std::find(types.begin(), types.end(), type) == types.end()) types.push_back(type);
  }
  return types;
}

}  // namespace icd::blocks
