// The Mamba-1 mixer's config side (blocks/shapes.h): checks, sizes,
// tensors, state shapes. Its groups and forward: blocks/mamba1.cc.
#include "absl/strings/str_cat.h"
#include "blocks/shapes.h"

namespace icd::blocks {
namespace {

absl::Status Mamba1CheckConfig(const ModelConfig& c) {
  if (c.dt_rank <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("config needs a positive dt_rank; got ", c.dt_rank));
  }
  return absl::OkStatus();
}

void Mamba1Dims(const ModelConfig& c, std::map<std::string, int64_t>& dims) {
  dims["dt_rank"] = c.dt_rank;
}

StateShapes Mamba1StateShapes(const ModelConfig& c, int64_t batch) {
  return {{batch, c.d_inner, c.d_conv - 1}, {batch, c.d_inner, c.d_state}, {}};
}

void Mamba1Tensors(const ModelConfig& c, int64_t layer, TensorShapes& shapes) {
  const int64_t inner = c.d_inner;
  auto name = [layer](const char* suffix) { return LayerTensorName(layer, suffix); };
  AddProjectionTensors(c, layer, 2 * inner, inner, shapes);  // in_proj: x, z
  shapes[name("mixer.x_proj.weight")] = {c.dt_rank + 2 * c.d_state, inner};
  shapes[name("mixer.dt_proj.weight")] = {inner, c.dt_rank};
  shapes[name("mixer.dt_proj.bias")] = {inner};
  shapes[name("mixer.A_log")] = {inner, c.d_state};
  shapes[name("mixer.D")] = {inner};
  if (c.mixer_norm_weights) {
    shapes[name("mixer.dt_layernorm.weight")] = {c.dt_rank};
    shapes[name("mixer.b_layernorm.weight")] = {c.d_state};
    shapes[name("mixer.c_layernorm.weight")] = {c.d_state};
  }
}

}  // namespace

const MixerShapes kMamba1Shapes{"mamba1", Mamba1CheckConfig, Mamba1Dims, Mamba1Tensors,
                                Mamba1StateShapes};

}  // namespace icd::blocks
