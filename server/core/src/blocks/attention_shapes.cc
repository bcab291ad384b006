// mamba_ssm's attention mixer's config side (blocks/shapes.h): checks, sizes,
// tensors, state shapes. Its groups and forward: blocks/attention.cc.
#include "absl/strings/str_cat.h"
#include "blocks/shapes.h"

namespace icd::blocks {
namespace {

absl::Status AttentionCheckConfig(const ModelConfig& c) {
  const AttentionConfig& a = c.attention;
  if (a.heads <= 0 || a.kv_heads <= 0 || a.head_dim <= 0 || a.heads % a.kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "attention needs positive heads, kv_heads and head_dim, heads a multiple of kv_heads; "
        "got ", a.heads, ", ", a.kv_heads, ", ", a.head_dim));
  }
  if (a.separate_projections && (a.conv != 0 || a.mlp_dim != 0)) {
    return absl::InvalidArgumentError("attention with separate q, k, v projections has no conv "
                                      "and no MLP of its own");
  }
  if (a.rotary_dim < 0 || a.rotary_dim % 2 != 0 || a.rotary_dim > a.head_dim ||
      a.conv < 0 || a.mlp_dim < 0 || a.mlp_dim % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "attention needs an even rotary_dim of at most head_dim (", a.head_dim,
        "), conv >= 0 and an even mlp_dim >= 0; got ", a.rotary_dim, ", ", a.conv, ", ",
        a.mlp_dim));
  }
  return absl::OkStatus();
}

void AttentionDims(const ModelConfig& c, std::map<std::string, int64_t>& dims) {
  const AttentionConfig& a = c.attention;
  dims["attention_layers"] = static_cast<int64_t>(c.attention_layers.size());
  dims["attention_heads"] = a.heads;
  dims["attention_kv_heads"] = a.kv_heads;
  dims["attention_head_dim"] = a.head_dim;
  dims["attention_rotary_dim"] = a.rotary_dim;
  if (a.mlp_dim > 0) dims["attention_mlp_dim"] = a.mlp_dim;
}

StateShapes AttentionStateShapes(const ModelConfig& c, int64_t batch) {
  const AttentionConfig& a = c.attention;
  StateShapes shapes;
  if (a.conv > 0) shapes.conv_history = {batch, a.qkv_rows(), a.conv - 1};
  shapes.attention_cache = {batch, a.kv_heads, kAnyLength, a.head_dim};
  return shapes;
}

void AttentionTensors(const ModelConfig& c, int64_t layer, TensorShapes& shapes) {
  const AttentionConfig& a = c.attention;
  auto name = [layer, &a](const std::string& suffix) {
    return LayerTensorName(layer, a.module + "." + suffix);
  };
  if (a.separate_projections) {
    const int64_t kv_width = a.kv_heads * a.head_dim;
    const std::pair<const char*, int64_t> inputs[] = {
        {"q_proj", a.context_width()}, {"k_proj", kv_width}, {"v_proj", kv_width}};
    for (const auto& [module, rows] : inputs) {
      shapes[name(module) + ".weight"] = {rows, c.d_model};
      if (a.qkv_bias) shapes[name(module) + ".bias"] = {rows};
    }
    shapes[name("o_proj.weight")] = {c.d_model, a.context_width()};
    if (a.out_bias) shapes[name("o_proj.bias")] = {c.d_model};
    return;
  }
  shapes[name("in_proj.weight")] = {a.qkv_rows() + a.mlp_dim, c.d_model};
  if (a.qkv_bias) shapes[name("in_proj.bias")] = {a.qkv_rows() + a.mlp_dim};
  if (a.conv > 0) {
    // nn.Conv1d's bias is on by default, and MHA does not turn it off.
    shapes[name("conv1d.weight")] = {a.qkv_rows(), 1, a.conv};
    shapes[name("conv1d.bias")] = {a.qkv_rows()};
  }
  shapes[name("out_proj.weight")] = {c.d_model, a.context_width() + a.mlp_dim / 2};
  if (a.out_bias) shapes[name("out_proj.bias")] = {c.d_model};
}

}  // namespace

const MixerShapes kAttentionShapes{"attention", AttentionCheckConfig, AttentionDims,
                                   AttentionTensors, AttentionStateShapes};

}  // namespace icd::blocks
