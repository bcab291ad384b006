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

absl::Status ExpertsCheckConfig(const ModelConfig& c) {
  const auto& e = c.moe;
  if (e.experts <= 0 || e.top_k <= 0 || e.top_k > e.experts || e.hidden <= 0 ||
      e.shared_hidden < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "an experts layer needs experts, top_k (at most experts) and a hidden width; got ",
        e.experts, ", ", e.top_k, ", ", e.hidden));
  }
  return absl::OkStatus();
}

void ExpertsDims(const ModelConfig& c, std::map<std::string, int64_t>& dims) {
  dims["experts_layers"] = static_cast<int64_t>(c.moe.mixer_layers.size());
  dims["experts"] = c.moe.experts;
  dims["experts_per_token"] = c.moe.top_k;
}

void ExpertsTensors(const ModelConfig& c, int64_t layer, TensorShapes& shapes) {
  auto name = [layer](const std::string& suffix) { return LayerTensorName(layer, suffix); };
  shapes[name("mixer.gate.weight")] = {c.moe.experts, c.d_model};
  shapes[name("mixer.gate.e_score_correction_bias")] = {c.moe.experts};
  for (int64_t expert = 0; expert < c.moe.experts; ++expert) {
    const std::string prefix = "mixer.experts." + std::to_string(expert);
    shapes[name(prefix + ".up_proj.weight")] = {c.moe.hidden, c.d_model};
    shapes[name(prefix + ".down_proj.weight")] = {c.d_model, c.moe.hidden};
  }
  if (c.moe.shared_hidden > 0) {
    shapes[name("mixer.shared_experts.up_proj.weight")] = {c.moe.shared_hidden, c.d_model};
    shapes[name("mixer.shared_experts.down_proj.weight")] = {c.d_model, c.moe.shared_hidden};
  }
}

}  // namespace

const MixerShapes kMlpShapes{"mlp", MlpCheckConfig, MlpDims, MlpTensors, MlpStateShapes};
const MixerShapes kExpertsShapes{"experts", ExpertsCheckConfig, ExpertsDims, ExpertsTensors,
                                 MlpStateShapes};

}  // namespace icd::blocks
