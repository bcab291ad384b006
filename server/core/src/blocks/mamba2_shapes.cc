// The Mamba-2 mixer's config side (blocks/shapes.h): checks, sizes,
// tensors, state shapes. Its groups and forward: blocks/mamba2.cc.
#include "absl/strings/str_cat.h"
#include "blocks/shapes.h"

namespace icd::blocks {
namespace {

absl::Status Mamba2CheckConfig(const ModelConfig& c) {
  if (c.nheads <= 0 || c.headdim <= 0 || c.ngroups <= 0 || c.nheads * c.headdim != c.d_inner ||
      c.nheads % c.ngroups != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Mamba-2 config needs nheads*headdim == d_inner and ngroups dividing nheads; got nheads ",
        c.nheads, ", headdim ", c.headdim, ", ngroups ", c.ngroups, ", d_inner ", c.d_inner));
  }
  return absl::OkStatus();
}

void Mamba2Dims(const ModelConfig& c, std::map<std::string, int64_t>& dims) {
  dims["nheads"] = c.nheads;
  dims["headdim"] = c.headdim;
  dims["ngroups"] = c.ngroups;
}

StateShapes Mamba2StateShapes(const ModelConfig& c, int64_t batch) {
  return {{batch, c.d_inner + 2 * c.ngroups * c.d_state, c.d_conv - 1},
          {batch, c.nheads, c.headdim, c.d_state},
          {}};
}

void Mamba2Tensors(const ModelConfig& c, int64_t layer, TensorShapes& shapes) {
  const int64_t inner = c.d_inner;
  const int64_t bc = c.ngroups * c.d_state;
  const int64_t in_rows = 2 * inner + 2 * bc + c.nheads;  // z, x, B, C, dt
  const int64_t conv_channels = inner + 2 * bc;           // x, B, C
  auto name = [layer](const char* suffix) { return LayerTensorName(layer, suffix); };
  AddProjectionTensors(c, layer, in_rows, conv_channels, shapes);
  shapes[name("mixer.dt_bias")] = {c.nheads};
  shapes[name("mixer.A_log")] = {c.nheads};
  shapes[name("mixer.D")] = {c.d_has_hdim ? inner : c.nheads};
  if (c.gated_norm) shapes[name("mixer.norm.weight")] = {inner};
}

}  // namespace

const MixerShapes kMamba2Shapes{"mamba2", Mamba2CheckConfig, Mamba2Dims, Mamba2Tensors,
                                Mamba2StateShapes};

}  // namespace icd::blocks
