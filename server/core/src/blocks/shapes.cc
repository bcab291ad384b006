#include "blocks/shapes.h"

#include <algorithm>

namespace icd::blocks {

void PlanBlocks(ModelConfig& config) {
  const MixerType type = config.family == Family::kMamba2 ? MixerType::kMamba2 : MixerType::kMamba1;
  config.mixers.assign(static_cast<size_t>(std::max<int64_t>(config.n_layer, 0)), type);
  for (const auto& [layers, kind] : {std::pair{&config.attention_layers, MixerType::kAttention},
                                     std::pair{&config.mlp_layers, MixerType::kMlp},
                                     std::pair{&config.moe.mixer_layers, MixerType::kExperts}}) {
    for (const int64_t layer : *layers) {
      if (layer >= 0 && layer < config.n_layer) config.mixers[static_cast<size_t>(layer)] = kind;
    }
  }
}

void AddProjectionTensors(const ModelConfig& c, int64_t layer, int64_t in_rows,
                          int64_t conv_channels, TensorShapes& shapes) {
  auto name = [layer](const char* suffix) { return LayerTensorName(layer, suffix); };
  shapes[name("mixer.in_proj.weight")] = {in_rows, c.d_model};
  if (c.proj_bias) shapes[name("mixer.in_proj.bias")] = {in_rows};
  shapes[name("mixer.conv1d.weight")] = {conv_channels, 1, c.d_conv};
  if (c.conv_bias) shapes[name("mixer.conv1d.bias")] = {conv_channels};
  shapes[name("mixer.out_proj.weight")] = {c.d_model, c.d_inner};
  if (c.proj_bias) shapes[name("mixer.out_proj.bias")] = {c.d_model};
}

const MixerShapes& ShapesOf(MixerType type) {
  switch (type) {
    case MixerType::kMamba1: return kMamba1Shapes;
    case MixerType::kMamba2: return kMamba2Shapes;
    case MixerType::kAttention: return kAttentionShapes;
    case MixerType::kMlp: return kMlpShapes;
    case MixerType::kExperts: return kExpertsShapes;
  }
  return kMamba1Shapes;
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
