// The gated MLP's config side (blocks/shapes.h). Its groups and forward:
// blocks/gated_mlp.cc.
#include "blocks/shapes.h"

#include <algorithm>

namespace icd::blocks {

bool HasMlp(const ModelConfig& config) { return config.d_intermediate > 0; }

bool HasExperts(const ModelConfig& config) {
  return config.moe.experts > 0 && !config.moe.per_expert_tensors;
}

bool PerExpertLayer(const ModelConfig& config, int64_t layer) {
  return config.moe.experts > 0 && config.moe.per_expert_tensors &&
         std::find(config.moe.layers.begin(), config.moe.layers.end(), layer) !=
             config.moe.layers.end();
}

void AddMlpTensors(const ModelConfig& c, int64_t layer, TensorShapes& shapes) {
  auto name = [layer](const char* suffix) { return LayerTensorName(layer, suffix); };
  shapes[name("norm2.weight")] = {c.d_model};
  if (c.layer_norm) shapes[name("norm2.bias")] = {c.d_model};
  if (PerExpertLayer(c, layer)) {
    shapes[name("mlp.router.weight")] = {c.moe.experts, c.d_model};
    for (int64_t expert = 0; expert < c.moe.experts; ++expert) {
      const std::string prefix = name("mlp.experts.") + std::to_string(expert);
      shapes[prefix + ".gate_proj.weight"] = {c.moe.hidden, c.d_model};
      shapes[prefix + ".up_proj.weight"] = {c.moe.hidden, c.d_model};
      shapes[prefix + ".down_proj.weight"] = {c.d_model, c.moe.hidden};
    }
    return;
  }
  if (c.mlp_separate_projections) {
    shapes[name("mlp.gate_proj.weight")] = {c.d_intermediate, c.d_model};
    shapes[name("mlp.up_proj.weight")] = {c.d_intermediate, c.d_model};
    shapes[name("mlp.down_proj.weight")] = {c.d_model, c.d_intermediate};
    return;
  }
  shapes[name("mlp.fc1.weight")] = {2 * c.d_intermediate, c.d_model};
  shapes[name("mlp.fc2.weight")] = {c.d_model, c.d_intermediate};
  if (HasExperts(c)) {
    shapes[name("moe.router.weight")] = {c.moe.experts, c.d_model};
    shapes[name("moe.fc1.weight")] = {c.moe.experts, 2 * c.moe.hidden, c.d_model};
    shapes[name("moe.fc2.weight")] = {c.moe.experts, c.d_model, c.moe.hidden};
  }
}

}  // namespace icd::blocks
