// Zamba2's shared transformer blocks (model.h SharedBlocks): at a hybrid
// layer, u = RMSNorm([residual, embeddings]) (2·d_model wide); attention with
// q, k, v = proj(u) + adapter(u) (the adapters of this layer's slot), the
// rotary over whole heads where use_mem_rope, softmax scale (head_dim / 2)^-½,
// o_proj -> pre_ff_layernorm -> gate_up_proj(·) + adapter(·) -> GELU(gate) ·
// up -> down_proj; the layer's own linear takes that to the residual's basis.
// No residual add inside the block. Its groups are derived in
// docs/hybrid_symmetries.md ("Zamba2"): one set per block, shared by every
// layer that runs it.
#include "absl/strings/str_cat.h"
#include "blocks/attention_parts.h"
#include "blocks/mixer.h"

namespace icd::blocks {
namespace {

using forward_internal::Capture;
using forward_internal::Precision;

constexpr char kQueryAdapters[] = "self_attn.linear_q_adapter_list";
constexpr char kKeyAdapters[] = "self_attn.linear_k_adapter_list";
constexpr char kValueAdapters[] = "self_attn.linear_v_adapter_list";
constexpr char kMlpAdapters[] = "feed_forward.gate_up_proj_adapter_list";

std::string SharedGroupPrefix(int64_t block) { return absl::StrCat("shared.", block, "."); }

// The up (part 1) tensors of block k's adapters of one list, one a slot;
// none where the block has no such adapters.
std::vector<std::string> AdapterUps(const ModelConfig& c, int64_t block, const char* list) {
  std::vector<std::string> names;
  if (list != kMlpAdapters && !c.shared.attention_adapters) return names;
  for (const int64_t slot : AdapterSlots(c, block)) {
    names.push_back(AdapterTensorName(c, block, list, slot, 1));
  }
  return names;
}

void BlockGroups(const ModelConfig& c, int64_t k, FamilySpec& spec) {
  const AttentionConfig& a = c.attention;
  const int64_t head_dim = a.head_dim, per_kv = a.heads / a.kv_heads;
  const int64_t kv_width = a.kv_heads * head_dim, width = c.d_model, hidden = c.shared.hidden;
  const std::string prefix = SharedGroupPrefix(k);
  auto t = [&](const std::string& suffix) { return SharedTensorName(c, k, suffix); };
  const std::string q = t("self_attn.q_proj.weight"), kk = t("self_attn.k_proj.weight"),
                    v = t("self_attn.v_proj.weight"), o = t("self_attn.o_proj.weight");
  // q, k and v rows come from the projection and every slot's adapter up.
  auto rows = [&](const std::string& projection, const char* list, int64_t length,
                  const std::string& expand, std::vector<GroupMember>& members) {
    members.push_back(Member(projection, 0, 0, length, expand));
    for (const std::string& up : AdapterUps(c, k, list)) {
      members.push_back(Member(up, 0, 0, length, expand));
    }
  };

  // Query heads inside the run that reads one KV head, or whole runs with
  // their KV head.
  GroupInfo heads = NewGroup(prefix + "heads", a.heads);
  heads.whole = per_kv;
  const std::string per_head = absl::StrCat("per_head:", head_dim);
  const std::string per_group = absl::StrCat("per_group:", head_dim);
  rows(q, kQueryAdapters, a.context_width(), per_head, heads.members);
  rows(kk, kKeyAdapters, kv_width, per_group, heads.members);
  rows(v, kValueAdapters, kv_width, per_group, heads.members);
  heads.members.push_back(Member(o, 1, 0, a.context_width(), per_head));
  spec.push_back(std::move(heads));

  // Each KV head's value dimensions: its v rows, o_proj's columns of every
  // query head that reads it.
  GroupInfo values = NewGroup(prefix + "value_dims", kv_width);
  values.block = head_dim;
  rows(v, kValueAdapters, kv_width, "identity", values.members);
  values.members.push_back(
      Member(o, 1, 0, a.context_width(), Segments(per_kv, head_dim, 0, head_dim)));
  spec.push_back(std::move(values));

  // Query / key dimensions, where no rotary turns them.
  if (a.rotary_dim == 0) {
    GroupInfo keys = NewGroup(prefix + "key_dims", kv_width);
    keys.block = head_dim;
    rows(q, kQueryAdapters, a.context_width(), Segments(per_kv, head_dim, 0, head_dim),
         keys.members);
    rows(kk, kKeyAdapters, kv_width, "identity", keys.members);
    spec.push_back(std::move(keys));
  }

  // The attention's output basis: o_proj's rows, and what reads them (the
  // pre-MLP norm, gate_up's and its adapters' down columns).
  GroupInfo output = NewGroup(prefix + "attention_output", width);
  output.members.push_back(Member(o, 0, 0, width));
  output.members.push_back(Member(t("pre_ff_layernorm.weight"), 0, 0, width));
  output.members.push_back(Member(t("feed_forward.gate_up_proj.weight"), 1, 0, width));
  for (const int64_t slot : AdapterSlots(c, k)) {
    output.members.push_back(Member(AdapterTensorName(c, k, kMlpAdapters, slot, 0), 1, 0, width));
  }
  spec.push_back(std::move(output));

  // The MLP's hidden channels: gate and up rows (both halves of gate_up, its
  // bias and every adapter up) by one permutation, down_proj's columns.
  GroupInfo mlp = NewGroup(prefix + "mlp", hidden);
  std::vector<std::string> fused{t("feed_forward.gate_up_proj.weight")};
  if (c.shared.bias) fused.push_back(t("feed_forward.gate_up_proj.bias"));
  for (const std::string& up : AdapterUps(c, k, kMlpAdapters)) fused.push_back(up);
  for (const std::string& tensor : fused) {
    mlp.members.push_back(Member(tensor, 0, 0, hidden));
    mlp.members.push_back(Member(tensor, 0, hidden, hidden));
  }
  mlp.members.push_back(Member(t("feed_forward.down_proj.weight"), 1, 0, hidden));
  spec.push_back(std::move(mlp));

  // The block's output basis: down_proj's rows, and the columns of every
  // layer's linear that reads this block.
  GroupInfo block_output = NewGroup(prefix + "output", width);
  block_output.members.push_back(Member(t("feed_forward.down_proj.weight"), 0, 0, width));
  if (c.shared.bias) {
    block_output.members.push_back(Member(t("feed_forward.down_proj.bias"), 0, 0, width));
  }
  for (const int64_t layer : c.shared.layers) {
    if (SharedBlockAt(c, layer).block != k) continue;
    block_output.members.push_back(Member(LayerTensorName(layer, "linear.weight"), 1, 0, width));
  }
  spec.push_back(std::move(block_output));

  // Each adapter's rank: its down's rows, its up's columns.
  const int64_t rank = c.shared.adapter_rank;
  for (const int64_t slot : AdapterSlots(c, k)) {
    for (const auto& [list, name] : {std::pair{kQueryAdapters, "q"}, std::pair{kKeyAdapters, "k"},
                                     std::pair{kValueAdapters, "v"},
                                     std::pair{kMlpAdapters, "gate_up"}}) {
      if (list != kMlpAdapters && !c.shared.attention_adapters) continue;
      spec.push_back(NewGroup(absl::StrCat(prefix, "adapters.", slot, ".", name), rank,
                              {Member(AdapterTensorName(c, k, list, slot, 0), 0, 0, rank),
                               Member(AdapterTensorName(c, k, list, slot, 1), 1, 0, rank)}));
    }
  }
}

torch::Tensor ScaledRmsNorm(const torch::Tensor& x, const torch::Tensor& weight, double eps,
                      const Precision& precision) {
  return forward_internal::RmsNormalize(x, eps, precision.accumulate).to(precision.compute) *
         weight;
}

}  // namespace

void SharedBlockGroups(const ModelConfig& config, FamilySpec& spec) {
  if (!HasSharedBlocks(config)) return;
  for (int64_t block = 0; block < config.shared.blocks; ++block) BlockGroups(config, block, spec);
}

void SharedBlockResidualMembers(const ModelConfig& c, std::vector<GroupMember>& members) {
  if (!HasSharedBlocks(c)) return;
  const int64_t width = c.d_model;
  for (const int64_t layer : c.shared.layers) {
    members.push_back(Member(LayerTensorName(layer, "linear.weight"), 0, 0, width));
  }
  // The block reads [residual, embeddings]: both halves are in the
  // residual's basis, so each takes the same permutation.
  for (int64_t k = 0; k < c.shared.blocks; ++k) {
    std::vector<std::string> inputs{SharedTensorName(c, k, "input_layernorm.weight")};
    for (const char* projection : {"self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                   "self_attn.v_proj.weight"}) {
      inputs.push_back(SharedTensorName(c, k, projection));
    }
    if (c.shared.attention_adapters) {
      for (const int64_t slot : AdapterSlots(c, k)) {
        for (const char* list : {kQueryAdapters, kKeyAdapters, kValueAdapters}) {
          inputs.push_back(AdapterTensorName(c, k, list, slot, 0));
        }
      }
    }
    for (const std::string& tensor : inputs) {
      const int axis = tensor == inputs.front() ? 0 : 1;
      members.push_back(Member(tensor, axis, 0, width));
      members.push_back(Member(tensor, axis, width, width));
    }
  }
}

torch::Tensor SharedBlock(const ModelConfig& c, const Weights& weights, int64_t layer,
                          const Precision& precision, const torch::Tensor& residual,
                          const torch::Tensor& embedded, const Capture& capture,
                          LayerState* state) {
  const SharedBlockUse use = SharedBlockAt(c, layer);
  const int64_t k = use.block, slot = use.slot;
  const AttentionConfig& a = c.attention;
  const torch::ScalarType compute = precision.compute;
  auto weight = [&](const std::string& suffix) {
    return forward_internal::TensorAs(weights, SharedTensorName(c, k, suffix), compute);
  };
  auto optional = [&](const std::string& suffix) {
    return forward_internal::OptionalTensorAs(weights, SharedTensorName(c, k, suffix), compute);
  };
  const std::string prefix = SharedGroupPrefix(k);
  // x -> up(down(x)), its rank's activations captured.
  auto adapter = [&](const char* list, const char* name, const torch::Tensor& x) {
    const torch::Tensor low = forward_internal::Linear(
        x, forward_internal::TensorAs(weights, AdapterTensorName(c, k, list, slot, 0), compute));
    capture.Add(absl::StrCat(prefix, "adapters.", slot, ".", name), low);
    return forward_internal::Linear(
        low, forward_internal::TensorAs(weights, AdapterTensorName(c, k, list, slot, 1), compute));
  };
  const int64_t batch = residual.size(0), length = residual.size(1);

  const torch::Tensor joined = torch::cat({residual, embedded.to(residual.scalar_type())}, -1);
  const torch::Tensor normed =
      ScaledRmsNorm(joined, weight("input_layernorm.weight"), c.norm_eps, precision);  // [B, L, 2D]
  torch::Tensor query = forward_internal::Linear(normed, weight("self_attn.q_proj.weight"));
  torch::Tensor key = forward_internal::Linear(normed, weight("self_attn.k_proj.weight"));
  torch::Tensor value = forward_internal::Linear(normed, weight("self_attn.v_proj.weight"));
  if (c.shared.attention_adapters) {
    query = query + adapter(kQueryAdapters, "q", normed);
    key = key + adapter(kKeyAdapters, "k", normed);
    value = value + adapter(kValueAdapters, "v", normed);
  }
  capture.Add(prefix + "value_dims", value);
  if (a.rotary_dim == 0) capture.Add(prefix + "key_dims", key);
  query = SplitHeads(query, a.heads);
  key = SplitHeads(key, a.kv_heads);
  value = SplitHeads(value, a.kv_heads);  // [B, KV, L, d]
  const int64_t past =
      state != nullptr && state->attention_keys.defined() ? state->attention_keys.size(2) : 0;
  if (a.rotary_dim > 0) {
    query = Rotate(query, past, a, precision);
    key = Rotate(key, past, a, precision);
  }
  if (state != nullptr) {
    key = Append(key.to(compute), &state->attention_keys, &state->attention_key_storage);
    value = Append(value, &state->attention_values, &state->attention_value_storage);
  }
  const torch::Tensor context = Attend(query, key, value, past, a.heads / a.kv_heads,
                                       a.softmax_scale, precision);  // [B, H, L, d]
  if (capture.Wants(prefix + "heads")) {
    capture.Add(prefix + "heads",
                context.to(precision.accumulate).pow(2).mean(-1).sqrt().transpose(1, 2));
  }
  const torch::Tensor attended = forward_internal::Linear(
      context.transpose(1, 2).reshape({batch, length, a.context_width()}),
      weight("self_attn.o_proj.weight"));  // [B, L, D]
  capture.Add(prefix + "attention_output", attended);

  const torch::Tensor mlp_in =
      ScaledRmsNorm(attended, weight("pre_ff_layernorm.weight"), c.norm_eps, precision);
  const torch::Tensor gate_up =
      forward_internal::Linear(mlp_in, weight("feed_forward.gate_up_proj.weight"),
                               optional("feed_forward.gate_up_proj.bias")) +
      adapter(kMlpAdapters, "gate_up", mlp_in);  // [B, L, 2I]
  const int64_t hidden = c.shared.hidden;
  const torch::Tensor activations =
      torch::gelu(gate_up.narrow(-1, 0, hidden)) * gate_up.narrow(-1, hidden, hidden);
  capture.Add(prefix + "mlp", activations);
  const torch::Tensor out = forward_internal::Linear(
      activations, weight("feed_forward.down_proj.weight"), optional("feed_forward.down_proj.bias"));
  capture.Add(prefix + "output", out);
  return forward_internal::Linear(
      out, forward_internal::TensorAs(weights, LayerTensorName(layer, "linear.weight"), compute));
}

}  // namespace icd::blocks
