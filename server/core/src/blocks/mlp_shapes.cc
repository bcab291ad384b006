// The config side of an MLP that is a layer's mixer (blocks/shapes.h). Its
// groups and forward: blocks/mlp.cc.
#include "absl/strings/str_cat.h"
#include "blocks/shapes.h"

namespace icd::blocks {
namespace {

absl::Status MlpCheckConfig(const ModelConfig& c) {
  if (c.mlp.hidden <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("an MLP layer needs a positive hidden width; got ", c.mlp.hidden));
  }
  return absl::OkStatus();
}

void MlpDims(const ModelConfig& c, std::map<std::string, int64_t>& dims) {
  dims["mlp_layers"] = static_cast<int64_t>(c.mlp_layers.size());
  dims["mlp_hidden"] = c.mlp.hidden;
}

StateShapes MlpStateShapes(const ModelConfig&, int64_t) { return {}; }

void MlpTensors(const ModelConfig& c, int64_t layer, TensorShapes& shapes) {
  auto name = [layer](const char* suffix) { return LayerTensorName(layer, suffix); };
  std::vector<const char*> inputs{"mixer.up_proj"};
  if (c.mlp.gated) inputs.push_back("mixer.gate_proj");
  for (const char* module : inputs) {
    shapes[name(module) + ".weight"] = {c.mlp.hidden, c.d_model};
    if (c.mlp.bias) shapes[name(module) + ".bias"] = {c.mlp.hidden};
  }
  shapes[name("mixer.down_proj.weight")] = {c.d_model, c.mlp.hidden};
  if (c.mlp.bias) shapes[name("mixer.down_proj.bias")] = {c.d_model};
}

}  // namespace

const MixerShapes kMlpShapes{"mlp", MlpCheckConfig, MlpDims, MlpTensors, MlpStateShapes};

}  // namespace icd::blocks
