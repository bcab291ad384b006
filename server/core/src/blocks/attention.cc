// mamba_ssm's attention mixer (its MHA, at the layers attn_layer_idx lists):
// in_proj -> [optional depthwise causal conv over q, k, v] -> rotary on the
// first rotary_dim of each q and k head -> causal softmax attention, query
// head h reading KV head h / (heads / kv_heads) -> [context | values ·
// silu(gate) of the mixer's own MLP] -> out_proj. Its groups are derived in
// docs/hybrid_symmetries.md ("Attention with grouped KV heads").
#include <algorithm>
#include <cmath>
#include <optional>

#include "absl/strings/str_cat.h"
#include "blocks/attention_parts.h"
#include "blocks/mixer.h"

namespace icd::blocks {
namespace {

using forward_internal::Capture;
using forward_internal::Precision;

// Where q, k and v come from: each a slice of rows of one or more tensors
// (mamba_ssm: in_proj and its bias, and the conv's weight and bias, at the
// same rows; HuggingFace: q_proj, k_proj, v_proj and their biases), and the
// output projection whose columns read the context.
struct Projections {
  std::vector<std::string> query, key, value;  // tensor names (canonical)
  int64_t query_row = 0, key_row = 0, value_row = 0;
  std::string output;  // its weight
};

Projections ProjectionsOf(const ModelConfig& c, int64_t i) {
  const AttentionConfig& a = c.attention;
  auto t = [i, &a](const std::string& suffix) {
    return LayerTensorName(i, a.module + "." + suffix);
  };
  Projections p;
  if (a.separate_projections) {
    for (auto [list, module] : {std::pair{&p.query, "q_proj"}, std::pair{&p.key, "k_proj"},
                                std::pair{&p.value, "v_proj"}}) {
      list->push_back(t(std::string(module) + ".weight"));
      if (a.qkv_bias) list->push_back(t(std::string(module) + ".bias"));
    }
    p.output = t("o_proj.weight");
    return p;
  }
  std::vector<std::string> fused{t("in_proj.weight")};
  if (a.qkv_bias) fused.push_back(t("in_proj.bias"));
  if (a.conv > 0) {
    fused.push_back(t("conv1d.weight"));
    fused.push_back(t("conv1d.bias"));
  }
  p.query = p.key = p.value = fused;
  p.key_row = a.context_width();
  p.value_row = a.context_width() + a.kv_heads * a.head_dim;
  p.output = t("out_proj.weight");
  return p;
}

// "layers.{i}." (or "layers.{i}.attn." beside a Mamba mixer): its groups'
// and capture points' prefix.
std::string GroupPrefix(const ModelConfig& c, int64_t i) {
  return c.attention.module == "mixer" ? absl::StrCat("layers.", i, ".")
                                       : absl::StrCat("layers.", i, ".", c.attention.module, ".");
}


// The q, k and v rows of every tensor they come from, each part with its own
// expansion; an empty expansion leaves that part out.
void AddQkvMembers(const ModelConfig& c, int64_t i, const std::string& query_expand,
                   const std::string& key_expand, const std::string& value_expand,
                   std::vector<GroupMember>& members) {
  const AttentionConfig& a = c.attention;
  const Projections p = ProjectionsOf(c, i);
  const int64_t kv_width = a.kv_heads * a.head_dim;
  auto add = [&members](const std::vector<std::string>& tensors, int64_t row, int64_t rows,
                        const std::string& expand) {
    if (expand.empty()) return;
    for (const std::string& tensor : tensors) members.push_back(Member(tensor, 0, row, rows, expand));
  };
  add(p.query, p.query_row, a.context_width(), query_expand);
  add(p.key, p.key_row, kv_width, key_expand);
  add(p.value, p.value_row, kv_width, value_expand);
}

void AttentionGroups(const ModelConfig& c, int64_t i, FamilySpec& spec) {
  const AttentionConfig& a = c.attention;
  const int64_t head_dim = a.head_dim, per_kv = a.heads / a.kv_heads;
  const std::string layer = GroupPrefix(c, i);
  const std::string out_proj = ProjectionsOf(c, i).output;

  // Query heads move inside the run that reads one KV head, or whole runs
  // move with their KV head's k and v rows.
  GroupInfo heads = NewGroup(layer + "heads", a.heads);
  heads.whole = per_kv;
  const std::string per_head = absl::StrCat("per_head:", head_dim);
  const std::string per_group = absl::StrCat("per_group:", head_dim);
  AddQkvMembers(c, i, per_head, per_group, per_group, heads.members);
  heads.members.push_back(Member(out_proj, 1, 0, a.context_width(), per_head));
  spec.push_back(std::move(heads));

  // The value dimensions of each KV head: its v rows and out_proj's columns
  // of every query head that reads it.
  GroupInfo values = NewGroup(layer + "value_dims", a.kv_heads * head_dim);
  values.block = head_dim;
  AddQkvMembers(c, i, "", "", "identity", values.members);
  values.members.push_back(
      Member(out_proj, 1, 0, a.context_width(), Segments(per_kv, head_dim, 0, head_dim)));
  spec.push_back(std::move(values));

  // The query / key dimensions no rotary embedding turns: k's rows and the
  // q rows of every query head that reads them.
  const int64_t free_dims = head_dim - a.rotary_dim;
  if (free_dims > 0) {
    GroupInfo keys = NewGroup(layer + "key_dims", a.kv_heads * free_dims);
    keys.block = free_dims;
    AddQkvMembers(c, i, Segments(per_kv, head_dim, a.rotary_dim, free_dims),
                  Segments(1, head_dim, a.rotary_dim, free_dims), "", keys.members);
    spec.push_back(std::move(keys));
  }

  // The mixer's own gated MLP: hidden channels, free.
  if (a.mlp_dim > 0) {
    const int64_t hidden = a.mlp_dim / 2;
    GroupInfo mlp = NewGroup(layer + "mixer_mlp", hidden);
    const int64_t first = a.qkv_rows();
    AddRowBlocks(mlp.members, i, a.module + ".in_proj", a.qkv_bias, {first, first + hidden},
                 hidden);
    mlp.members.push_back(Member(out_proj, 1, a.context_width(), hidden));
    spec.push_back(std::move(mlp));
  }
}

void AttentionResidualMembers(const ModelConfig& c, int64_t i, std::vector<GroupMember>& members) {
  const int64_t width = c.d_model;
  const Projections p = ProjectionsOf(c, i);
  // Each input projection's weight once (mamba_ssm's q, k and v share one).
  std::vector<std::string> inputs;
  for (const auto* list : {&p.query, &p.key, &p.value}) {
    const std::string& weight = list->front();
    if (std::find(inputs.begin(), inputs.end(), weight) == inputs.end()) inputs.push_back(weight);
  }
  for (const std::string& weight : inputs) members.push_back(Member(weight, 1, 0, width));
  members.push_back(Member(p.output, 0, 0, width));
  if (c.attention.out_bias) {
    const std::string bias = p.output.substr(0, p.output.size() - 6) + "bias";  // "weight"
    members.push_back(Member(bias, 0, 0, width));
  }
}

}  // namespace

// x [B, heads, L, head_dim] at positions first.. -> the same with its first
// rotary_dim turned, as flash_attn's RotaryEmbedding (which MHA uses): angle
// position / base^(2i / rotary_dim) for pair i, the angles' cos and sin in
// the weights' dtype, the rotation computed wide.
torch::Tensor Rotate(const torch::Tensor& x, int64_t first, const AttentionConfig& a,
                     const Precision& precision) {
  const int64_t rotary = a.rotary_dim, half = rotary / 2, length = x.size(2);
  const auto wide = torch::TensorOptions().dtype(precision.accumulate).device(x.device());
  const torch::Tensor positions = torch::arange(first, first + length, wide);
  const torch::Tensor frequencies =
      torch::pow(a.rotary_base, torch::arange(0, rotary, 2, wide) / static_cast<double>(rotary))
          .reciprocal();
  const torch::Tensor angles = torch::outer(positions, frequencies);  // [L, rotary / 2]
  const torch::Tensor cos = angles.cos().to(precision.compute).to(precision.accumulate);
  const torch::Tensor sin = angles.sin().to(precision.compute).to(precision.accumulate);
  const torch::Tensor turned = x.narrow(-1, 0, rotary).to(precision.accumulate);
  torch::Tensor rotated;
  if (a.rotary_interleaved) {
    const torch::Tensor pairs = turned.unflatten(-1, {half, 2});
    const torch::Tensor even = pairs.select(-1, 0), odd = pairs.select(-1, 1);
    rotated = torch::stack({even * cos - odd * sin, even * sin + odd * cos}, -1).flatten(-2);
  } else {
    const torch::Tensor low = turned.narrow(-1, 0, half), high = turned.narrow(-1, half, half);
    rotated = torch::cat({low * cos - high * sin, low * sin + high * cos}, -1);
  }
  if (rotary == x.size(-1)) return rotated.to(precision.compute);
  return torch::cat({rotated.to(precision.compute), x.narrow(-1, rotary, x.size(-1) - rotary)},
                    -1);
}

namespace {

// CausalDepthwiseConv's contract (forward_internal.h) as K shifted
// multiply-adds, for CUDA: conv1d there goes through cuDNN, which may
// compute float32 in TF32; these are plain float32 (or wider) products.
torch::Tensor ShiftedSumConv(const torch::Tensor& values, const torch::Tensor& weight,
                             const torch::Tensor& bias, const torch::Tensor& history,
                             torch::Tensor* next_history) {
  const int64_t batch = values.size(0), length = values.size(1), channels = values.size(2);
  const int64_t kernel = weight.size(2);
  const torch::Tensor past =
      history.defined() ? history.to(values.scalar_type()).transpose(1, 2)  // [B, K-1, C]
                        : torch::zeros({batch, kernel - 1, channels}, values.options());
  const torch::Tensor padded = torch::cat({past, values}, 1);  // [B, K-1+L, C]
  if (next_history != nullptr) {
    *next_history = padded.narrow(1, length, kernel - 1).transpose(1, 2).contiguous();
  }
  const torch::Tensor taps = weight.reshape({channels, kernel});  // [C, K]
  torch::Tensor out = bias.defined() ? bias.expand({batch, length, channels}).clone()
                                     : torch::zeros({batch, length, channels}, values.options());
  for (int64_t k = 0; k < kernel; ++k) out += padded.narrow(1, k, length) * taps.select(1, k);
  return out;
}

}  // namespace

std::string Segments(int64_t copies, int64_t stride, int64_t offset, int64_t block) {
  if (copies == 1 && offset == 0 && stride == block) return "identity";
  return absl::StrCat("segments:", copies, ":", stride, ":", offset);
}

torch::Tensor SplitHeads(const torch::Tensor& x, int64_t heads) {
  return x.reshape({x.size(0), x.size(1), heads, -1}).transpose(1, 2);
}

// Appends [B, KV, L, d] to a cache of T positions, `cache` a view of the
// first T positions of `storage`, and returns the new view of T + L. The
// storage keeps room to grow, so a decode step writes its one position
// instead of copying all T; it is reused only while `cache` still views it
// (a cache cloned or replaced by its holder gets storage of its own).
torch::Tensor Append(const torch::Tensor& added, torch::Tensor* cache, torch::Tensor* storage) {
  const int64_t past = cache->defined() ? cache->size(2) : 0;
  const int64_t positions = past + added.size(2);
  const bool room = storage->defined() && cache->defined() &&
                    storage->size(2) >= positions && cache->data_ptr() == storage->data_ptr() &&
                    cache->strides() == storage->strides() &&
                    cache->size(0) == storage->size(0) && cache->size(1) == storage->size(1) &&
                    cache->size(3) == storage->size(3);
  if (!room) {
    // Half again what is needed, at least 64 positions: amortised O(1) a step.
    const int64_t capacity = positions + std::max<int64_t>(64, positions / 2);
    torch::Tensor grown =
        torch::empty({added.size(0), added.size(1), capacity, added.size(3)}, added.options());
    if (past > 0) grown.narrow(2, 0, past).copy_(*cache);
    *storage = grown;
  }
  storage->narrow(2, past, added.size(2)).copy_(added);
  *cache = storage->narrow(2, 0, positions);
  return *cache;
}

// Causal softmax attention of L queries at positions past .. past + L - 1
// over the T = past + L keys; query head h reads KV head h / per_kv.
torch::Tensor Attend(const torch::Tensor& query, const torch::Tensor& key,
                     const torch::Tensor& value, int64_t past, int64_t per_kv, double scale,
                     const Precision& precision) {
  const int64_t length = query.size(2);
  const torch::TensorOptions flags = query.options().dtype(torch::kBool);
#if TORCH_VERSION_MAJOR >= 2
  if (query.is_cuda()) {
    // PyTorch's fused kernels (flash, memory-efficient) in the model's dtype,
    // as HuggingFace's default "sdpa" attention computes it. is_causal aligns
    // the mask top-left, right only without a past; a continued chunk gets
    // its mask spelled out (true: attended).
    std::optional<torch::Tensor> attended;
    if (past > 0 && length > 1) attended = torch::ones({length, past + length}, flags).tril(past);
    return at::scaled_dot_product_attention(query, key, value, attended, 0.0,
                                            /*is_causal=*/past == 0 && length > 1, scale,
                                            /*enable_gqa=*/per_kv > 1);
  }
#endif
  // Scores and softmax wide (CPU: the goldens' float32 and float64).
  const torch::Tensor keys = key.repeat_interleave(per_kv, 1);      // [B, H, T, d]
  const torch::Tensor values = value.repeat_interleave(per_kv, 1);  // [B, H, T, d]
  torch::Tensor scores = torch::matmul(query.to(precision.accumulate),
                                       keys.to(precision.accumulate).transpose(-2, -1)) *
                         scale;  // [B, H, L, T]
  if (length > 1) {
    // Query i (position past + i) reads keys 0 .. past + i.
    const torch::Tensor later = torch::ones({length, past + length}, flags).triu(past + 1);
    scores = scores.masked_fill(later, -std::numeric_limits<double>::infinity());
  }
  const torch::Tensor weights_of_keys = torch::softmax(scores, -1).to(precision.compute);
  return torch::matmul(weights_of_keys, values);  // [B, H, L, d]
}

namespace {

torch::Tensor AttentionMixer(const ModelConfig& c, const Weights& weights, int64_t layer,
                             const Precision& precision, const torch::Tensor& normed,
                             const Capture& capture, LayerState* state,
                             const CallContext& ctx) {
  const AttentionConfig& a = c.attention;
  const torch::ScalarType compute = precision.compute;
  auto weight = [&](const char* suffix) {
    return forward_internal::TensorAs(weights, LayerTensorName(layer, a.module + "." + suffix),
                                      compute);
  };
  auto optional = [&](const char* suffix) {
    return forward_internal::OptionalTensorAs(
        weights, LayerTensorName(layer, a.module + "." + suffix), compute);
  };
  const int64_t batch = normed.size(0), length = normed.size(1);
  const int64_t kv_width = a.kv_heads * a.head_dim, per_kv = a.heads / a.kv_heads;
  const int64_t key_row = a.context_width(), value_row = key_row + kv_width;

  // [B, L, q | k | v], then the mixer's MLP part where mamba_ssm has one.
  torch::Tensor projected;
  if (a.separate_projections) {
    projected = torch::cat({forward_internal::Linear(normed, weight("q_proj.weight"),
                                                     optional("q_proj.bias")),
                            forward_internal::Linear(normed, weight("k_proj.weight"),
                                                     optional("k_proj.bias")),
                            forward_internal::Linear(normed, weight("v_proj.weight"),
                                                     optional("v_proj.bias"))},
                           -1);
  } else {
    projected = forward_internal::Linear(normed, weight("in_proj.weight"),
                                         optional("in_proj.bias"));  // [B, L, qkv + mlp]
  }
  torch::Tensor qkv = projected.narrow(-1, 0, a.qkv_rows());
  if (a.conv > 0) {
    torch::Tensor next_history;
    const torch::Tensor history = state != nullptr ? state->conv_history : torch::Tensor();
    qkv = qkv.is_cuda()
              ? ShiftedSumConv(qkv, weight("conv1d.weight"), optional("conv1d.bias"), history,
                               state != nullptr ? &next_history : nullptr)
              : forward_internal::CausalDepthwiseConv(
                    qkv, weight("conv1d.weight"), optional("conv1d.bias"), history,
                    state != nullptr ? &next_history : nullptr, ctx, layer);
    if (state != nullptr) state->conv_history = next_history;
  }
  const torch::Tensor value_rows = qkv.narrow(-1, value_row, kv_width);  // [B, L, KV·d]
  capture.Add(GroupPrefix(c, layer) + "value_dims", value_rows);
  torch::Tensor query = SplitHeads(qkv.narrow(-1, 0, a.context_width()), a.heads);
  torch::Tensor key = SplitHeads(qkv.narrow(-1, key_row, kv_width), a.kv_heads);
  if (a.key_multiplier != 1.0) key = key * a.key_multiplier;
  torch::Tensor value = SplitHeads(value_rows, a.kv_heads);  // [B, KV, L, d]

  // Positions seen before this call: the cache's length.
  const bool cached = state != nullptr && state->attention_keys.defined();
  const int64_t past = cached ? state->attention_keys.size(2) : 0;
  if (a.rotary_dim > 0) {
    query = Rotate(query, past, a, precision);
    key = Rotate(key, past, a, precision);
  }
  const int64_t free_dims = a.head_dim - a.rotary_dim;
  if (free_dims > 0 && capture.Wants(GroupPrefix(c, layer) + "key_dims")) {
    capture.Add(GroupPrefix(c, layer) + "key_dims",
                key.narrow(-1, a.rotary_dim, free_dims).transpose(1, 2).reshape(
                    {batch, length, a.kv_heads * free_dims}));
  }
  if (state != nullptr) {
    key = Append(key.to(compute), &state->attention_keys, &state->attention_key_storage);
    value = Append(value, &state->attention_values, &state->attention_value_storage);
  }
  const double scale =
      a.softmax_scale > 0 ? a.softmax_scale : 1.0 / std::sqrt(static_cast<double>(a.head_dim));
  const torch::Tensor context =
      Attend(query, key, value, past, per_kv, scale, precision);  // [B, H, L, d]
  if (capture.Wants(GroupPrefix(c, layer) + "heads")) {
    capture.Add(GroupPrefix(c, layer) + "heads",
                context.to(precision.accumulate).pow(2).mean(-1).sqrt().transpose(1, 2));
  }
  torch::Tensor mixed = context.transpose(1, 2).reshape({batch, length, a.context_width()});
  if (a.mlp_dim > 0) {
    const int64_t hidden = a.mlp_dim / 2;
    const torch::Tensor activations =
        projected.narrow(-1, a.qkv_rows(), hidden) *
        torch::silu(projected.narrow(-1, a.qkv_rows() + hidden, hidden));
    capture.Add(GroupPrefix(c, layer) + "mixer_mlp", activations);
    mixed = torch::cat({mixed, activations}, -1);
  }
  return a.separate_projections
             ? forward_internal::Linear(mixed, weight("o_proj.weight"), optional("o_proj.bias"))
             : forward_internal::Linear(mixed, weight("out_proj.weight"), optional("out_proj.bias"));
}

}  // namespace

const MixerKind kAttentionMixer{"attention", kAttentionShapes, AttentionGroups,
                                AttentionResidualMembers, AttentionMixer};

}  // namespace icd::blocks
