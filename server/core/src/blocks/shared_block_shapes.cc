// Zamba2's shared transformer blocks, config side (blocks/shapes.h): which
// layer runs which block, the tensors' names and shapes. Their groups and
// forward: blocks/shared_block.cc.
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "blocks/shapes.h"

namespace icd::blocks {

bool HasSharedBlocks(const ModelConfig& config) {
  return config.shared.blocks > 0 && !config.shared.layers.empty();
}

SharedBlockUse SharedBlockAt(const ModelConfig& config, int64_t layer) {
  if (!HasSharedBlocks(config)) return {};
  const std::vector<int64_t>& layers = config.shared.layers;
  const auto it = std::find(layers.begin(), layers.end(), layer);
  if (it == layers.end()) return {};
  const int64_t slot = it - layers.begin();
  return {slot % config.shared.blocks, slot};
}

std::string SharedTensorName(const ModelConfig& config, int64_t block,
                             const std::string& suffix) {
  return LayerTensorName(config.shared.layers.at(static_cast<size_t>(block)),
                         "shared_transformer." + suffix);
}

std::string AdapterTensorName(const ModelConfig& config, int64_t block, const std::string& list,
                              int64_t slot, int part) {
  return SharedTensorName(config, block, absl::StrCat(list, ".", slot, ".", part, ".weight"));
}

std::vector<int64_t> AdapterSlots(const ModelConfig& config, int64_t block) {
  std::vector<int64_t> slots;
  for (int64_t slot = block; slot < static_cast<int64_t>(config.shared.layers.size());
       slot += config.shared.blocks) {
    slots.push_back(slot);
  }
  return slots;
}

void AddSharedBlockTensors(const ModelConfig& c, TensorShapes& shapes) {
  if (!HasSharedBlocks(c)) return;
  const auto& s = c.shared;
  const AttentionConfig& a = c.attention;
  const int64_t width = c.d_model, input = 2 * c.d_model, kv_width = a.kv_heads * a.head_dim;
  for (const int64_t layer : s.layers) shapes[LayerTensorName(layer, "linear.weight")] = {width, width};
  for (int64_t block = 0; block < s.blocks; ++block) {
    auto name = [&](const std::string& suffix) { return SharedTensorName(c, block, suffix); };
    shapes[name("input_layernorm.weight")] = {input};
    shapes[name("self_attn.q_proj.weight")] = {a.context_width(), input};
    shapes[name("self_attn.k_proj.weight")] = {kv_width, input};
    shapes[name("self_attn.v_proj.weight")] = {kv_width, input};
    shapes[name("self_attn.o_proj.weight")] = {width, a.context_width()};
    shapes[name("pre_ff_layernorm.weight")] = {width};
    shapes[name("feed_forward.gate_up_proj.weight")] = {2 * s.hidden, width};
    shapes[name("feed_forward.down_proj.weight")] = {width, s.hidden};
    if (s.bias) {
      shapes[name("feed_forward.gate_up_proj.bias")] = {2 * s.hidden};
      shapes[name("feed_forward.down_proj.bias")] = {width};
    }
    for (const int64_t slot : AdapterSlots(c, block)) {
      if (s.attention_adapters) {
        for (const char* list : {"self_attn.linear_q_adapter_list", "self_attn.linear_k_adapter_list",
                                 "self_attn.linear_v_adapter_list"}) {
          shapes[AdapterTensorName(c, block, list, slot, 0)] = {s.adapter_rank, input};
          shapes[AdapterTensorName(c, block, list, slot, 1)] = {input, s.adapter_rank};
        }
      }
      const std::string list = "feed_forward.gate_up_proj_adapter_list";
      shapes[AdapterTensorName(c, block, list, slot, 0)] = {s.adapter_rank, width};
      shapes[AdapterTensorName(c, block, list, slot, 1)] = {2 * s.hidden, s.adapter_rank};
    }
  }
}

std::string WhyUnexpected(const ModelConfig& c, const std::string& canonical) {
  if (!HasSharedBlocks(c) || canonical.find(".shared_transformer.") == std::string::npos) return "";
  std::vector<std::string> firsts;
  for (int64_t block = 0; block < c.shared.blocks; ++block) {
    firsts.push_back(std::to_string(c.shared.layers[static_cast<size_t>(block)]));
  }
  return absl::StrCat(
      "a shared block saved again under another hybrid layer. transformers 5 builds a copy of "
      "each block at every hybrid layer when num_mem_blocks > 1 and saves them untied "
      "(huggingface/transformers#47994); icd reads Zamba2's blocks stored once, under their "
      "first layers (", absl::StrJoin(firsts, ", "), "), as Zyphra's checkpoints hold them");
}

void SharedBlockDims(const ModelConfig& c, std::map<std::string, int64_t>& dims) {
  if (!HasSharedBlocks(c)) return;
  dims["shared_blocks"] = c.shared.blocks;
  dims["shared_block_layers"] = static_cast<int64_t>(c.shared.layers.size());
  dims["shared_mlp_hidden"] = c.shared.hidden;
  dims["adapter_rank"] = c.shared.adapter_rank;
  dims["attention_heads"] = c.attention.heads;
  dims["attention_kv_heads"] = c.attention.kv_heads;
  dims["attention_head_dim"] = c.attention.head_dim;
  dims["attention_rotary_dim"] = c.attention.rotary_dim;
}

bool AttentionBeside(const ModelConfig& config, int64_t layer) {
  return config.parallel_attention || SharedBlockAt(config, layer).block >= 0;
}

bool Attends(const ModelConfig& config) {
  return !config.attention_layers.empty() || config.parallel_attention ||
         HasSharedBlocks(config);
}

}  // namespace icd::blocks
