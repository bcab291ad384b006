// mamba_ssm's attention mixer (blocks/attention.cc): its config, its forward
// against a reference written here from MHA's definition, decoding through
// its cache, and a negative control for each of its groups. Every group alone
// and all together are exact on random hybrids in symmetry_test
// (RandomConfigTest, the ssm_*_attention cases).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "apply/symmetry.h"
#include "forward/forward.h"
#include "io/config.h"
#include "test_util.h"

// A namespace of its own: model_test compiles its files as one unit.
namespace icd::attention_test {
namespace {

using testing::Clone;
using testing::RandomWeights;
using testing::RelL2;

ModelConfig Parse(const std::string& json) {
  auto config = ParseConfig(json, "attention.json");
  EXPECT_TRUE(config.ok()) << config.status();
  return config.ok() ? *config : ModelConfig{};
}

torch::Tensor Logits(const ModelConfig& config, const Weights& weights, const torch::Tensor& ids) {
  auto logits = Forward(config, weights, ids);
  EXPECT_TRUE(logits.ok()) << logits.status();
  return logits.ok() ? *logits : torch::Tensor();
}

torch::Tensor Ids(const ModelConfig& config, int64_t length) {
  torch::manual_seed(23);
  return torch::randint(config.vocab_size, {2, length}, torch::kInt64);
}

// Grouped KV heads (2 query heads a KV head), a conv, a partial rotary, the
// mixer's own MLP (mlp_dim 10, which MHA rounds to 256), biases; attention at
// layers 1 and 2 of 3, a Mamba-1 mixer at 0.
constexpr char kHybrid[] = R"({"d_model": 20, "n_layer": 3, "vocab_size": 29,
    "attn_layer_idx": [2, 1],
    "attn_cfg": {"causal": true, "num_heads": 4, "num_heads_kv": 2, "head_dim": 6,
                 "rotary_emb_dim": 4, "d_conv": 3, "mlp_dim": 10},
    "ssm_cfg": {"d_state": 4, "dt_rank": 2}})";

TEST(AttentionConfigTest, ParsesMhaArgumentsAndPlansTheLayers) {
  const ModelConfig config = Parse(kHybrid);
  EXPECT_EQ(config.attention_layers, (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(config.mixers, (std::vector<MixerType>{MixerType::kMamba1, MixerType::kAttention,
                                                    MixerType::kAttention}));
  const AttentionConfig& a = config.attention;
  EXPECT_EQ(a.heads, 4);
  EXPECT_EQ(a.kv_heads, 2);
  EXPECT_EQ(a.head_dim, 6);
  EXPECT_EQ(a.rotary_dim, 4);
  EXPECT_EQ(a.conv, 3);
  EXPECT_EQ(a.mlp_dim, 256);  // MHA: ceil(mlp_dim / 256) * 256
  EXPECT_TRUE(a.qkv_bias && a.out_bias);  // MHA's defaults
  const auto shapes = ExpectedShapes(config);
  EXPECT_EQ(shapes.at("backbone.layers.1.mixer.in_proj.weight"),
            (std::vector<int64_t>{6 * (4 + 2 * 2) + 256, 20}));
  EXPECT_EQ(shapes.at("backbone.layers.1.mixer.conv1d.weight"), (std::vector<int64_t>{48, 1, 3}));
  EXPECT_EQ(shapes.at("backbone.layers.2.mixer.out_proj.weight"),
            (std::vector<int64_t>{20, 24 + 128}));
  EXPECT_EQ(shapes.count("backbone.layers.0.mixer.x_proj.weight"), 1u);
  EXPECT_EQ(shapes.count("backbone.layers.1.mixer.x_proj.weight"), 0u);
  const auto dims = ConfigDims(config);
  EXPECT_EQ(dims.at("attention_layers"), 2);
  EXPECT_EQ(dims.at("attention_kv_heads"), 2);
  // head_dim defaults to d_model / num_heads, num_heads_kv to num_heads.
  const ModelConfig plain = Parse(R"({"d_model": 12, "n_layer": 2, "attn_layer_idx": [0],
      "attn_cfg": {"causal": true, "num_heads": 3}})");
  EXPECT_EQ(plain.attention.head_dim, 4);
  EXPECT_EQ(plain.attention.kv_heads, 3);
}

TEST(AttentionConfigTest, RefusesWhatMhaWouldNotComputeAndSaysWhy) {
  const auto refused = [](const std::string& attn, const std::string& needle,
                          const std::string& layers = "[1]") {
    auto config = ParseConfig(R"({"d_model": 12, "n_layer": 2, "attn_layer_idx": )" + layers +
                                  R"(, "attn_cfg": )" + attn + "}",
                              "x/config.json");
    ASSERT_FALSE(config.ok()) << attn;
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(config.status().message().find(needle), std::string::npos) << config.status();
    EXPECT_NE(config.status().message().find("x/config.json"), std::string::npos);
  };
  refused(R"({"num_heads": 3})", "attention that is not causal");
  refused(R"({"num_heads": 3, "causal": false})", "attention that is not causal");
  refused(R"({"causal": true})", "field 'attn_cfg.num_heads' is missing");
  refused(R"({"causal": true, "num_heads": 4, "num_heads_kv": 3})",
          "field 'attn_cfg.num_heads_kv' 3 does not divide num_heads 4");
  refused(R"({"causal": true, "num_heads": 5})", "5 does not divide d_model 12");
  refused(R"({"causal": true, "num_heads": 3, "rotary_emb_dim": 3})", "rotary_emb_dim");
  refused(R"({"causal": true, "num_heads": 3, "rotary_emb_dim": 6})", "at most head_dim 4");
  refused(R"({"causal": true, "num_heads": 3, "window_size": 8})", "attn_cfg.window_size");
  refused(R"({"causal": true, "num_heads": 3})", "lists layer 2, but n_layer is 2", "[0, 2]");
  refused(R"({"causal": true, "num_heads": 3})", "must be a list", "3");
  refused(R"([1])", "field 'attn_cfg' must be an object");
}

// RMSNorm as mamba_ssm's, in float64.
torch::Tensor RmsNorm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  return x * torch::rsqrt(x.pow(2).mean(-1, true) + eps) * weight;
}

// x [L, d] at positions 0..L-1, its first `rotary` turned pair by pair.
torch::Tensor RotateReference(const torch::Tensor& x, int64_t rotary, double base,
                              bool interleaved) {
  torch::Tensor out = x.clone();
  for (int64_t t = 0; t < x.size(0); ++t) {
    for (int64_t i = 0; i < rotary / 2; ++i) {
      const double angle = static_cast<double>(t) /
                           std::pow(base, 2.0 * static_cast<double>(i) / static_cast<double>(rotary));
      const int64_t a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + rotary / 2;
      const double first = x[t][a].item<double>(), second = x[t][b].item<double>();
      out[t][a] = first * std::cos(angle) - second * std::sin(angle);
      out[t][b] = first * std::sin(angle) + second * std::cos(angle);
    }
  }
  return out;
}

// The logits of a one-layer model whose layer is MHA, written from
// mamba_ssm's definition position by position and head by head (float64).
torch::Tensor ReferenceLogits(const ModelConfig& c, const Weights& w, const torch::Tensor& ids) {
  const AttentionConfig& a = c.attention;
  auto get = [&w](const std::string& name) {
    auto it = w.find(name);
    return it == w.end() ? torch::Tensor() : it->second;
  };
  auto mixer = [&](const char* suffix) { return get(LayerTensorName(0, std::string("mixer.") + suffix)); };
  const int64_t length = ids.size(1), d = a.head_dim, per_kv = a.heads / a.kv_heads;
  const double scale = a.softmax_scale > 0 ? a.softmax_scale : 1 / std::sqrt(static_cast<double>(d));
  std::vector<torch::Tensor> rows;
  for (int64_t b = 0; b < ids.size(0); ++b) {
    const torch::Tensor x = get(kEmbeddingTensor).index_select(0, ids[b]);  // [L, D]
    const torch::Tensor h = RmsNorm(x, get(LayerTensorName(0, "norm.weight")), c.norm_eps);
    torch::Tensor projected = h.matmul(mixer("in_proj.weight").t());
    if (mixer("in_proj.bias").defined()) projected = projected + mixer("in_proj.bias");
    torch::Tensor qkv = projected.narrow(1, 0, a.qkv_rows()).clone();
    if (a.conv > 0) {
      const torch::Tensor taps = mixer("conv1d.weight").squeeze(1);  // [C, K]
      torch::Tensor conv = mixer("conv1d.bias").unsqueeze(0).repeat({length, 1});
      for (int64_t t = 0; t < length; ++t) {
        for (int64_t k = 0; k < a.conv; ++k) {
          const int64_t source = t - (a.conv - 1) + k;
          if (source >= 0) conv[t] += taps.select(1, k) * qkv[source];
        }
      }
      qkv = conv;
    }
    torch::Tensor context = torch::zeros({length, a.heads * d}, x.options());
    for (int64_t head = 0; head < a.heads; ++head) {
      const int64_t kv = head / per_kv;
      torch::Tensor q = qkv.narrow(1, head * d, d);
      torch::Tensor k = qkv.narrow(1, a.heads * d + kv * d, d);
      const torch::Tensor v = qkv.narrow(1, (a.heads + a.kv_heads) * d + kv * d, d);
      q = RotateReference(q, a.rotary_dim, a.rotary_base, a.rotary_interleaved);
      k = RotateReference(k, a.rotary_dim, a.rotary_base, a.rotary_interleaved);
      for (int64_t t = 0; t < length; ++t) {
        const torch::Tensor scores = k.narrow(0, 0, t + 1).matmul(q[t]) * scale;  // [t + 1]
        context[t].narrow(0, head * d, d) = torch::softmax(scores, 0).matmul(v.narrow(0, 0, t + 1));
      }
    }
    torch::Tensor mixed = context;
    if (a.mlp_dim > 0) {
      const int64_t hidden = a.mlp_dim / 2;
      const torch::Tensor up = projected.narrow(1, a.qkv_rows(), hidden);
      const torch::Tensor gate = projected.narrow(1, a.qkv_rows() + hidden, hidden);
      mixed = torch::cat({context, up * gate * torch::sigmoid(gate)}, 1);
    }
    torch::Tensor out = mixed.matmul(mixer("out_proj.weight").t());
    if (mixer("out_proj.bias").defined()) out = out + mixer("out_proj.bias");
    const torch::Tensor normed = RmsNorm(x + out, get("backbone.norm_f.weight"), c.norm_eps);
    rows.push_back(normed.matmul(get(kEmbeddingTensor).t()));
  }
  return torch::stack(rows).to(torch::kFloat32);
}

TEST(AttentionForwardTest, MatchesMhaWrittenOutPositionByPosition) {
  const std::vector<std::string> configs = {
      // GQA 2, conv, partial rotary, the mixer's MLP, biases.
      R"({"d_model": 20, "n_layer": 1, "vocab_size": 29, "attn_layer_idx": [0],
          "attn_cfg": {"causal": true, "num_heads": 4, "num_heads_kv": 2, "head_dim": 6,
                       "rotary_emb_dim": 4, "d_conv": 3, "mlp_dim": 10}})",
      // Multi-query (one KV head), full interleaved rotary, no biases, a scale.
      R"({"d_model": 16, "n_layer": 1, "vocab_size": 23, "attn_layer_idx": [0],
          "attn_cfg": {"causal": true, "num_heads": 3, "num_heads_kv": 1, "head_dim": 4,
                       "rotary_emb_dim": 4, "rotary_emb_interleaved": true,
                       "rotary_emb_base": 100.0, "qkv_proj_bias": false,
                       "out_proj_bias": false, "softmax_scale": 0.3}})",
      // Plain multi-head attention without rotary.
      R"({"d_model": 12, "n_layer": 1, "vocab_size": 17, "attn_layer_idx": [0],
          "attn_cfg": {"causal": true, "num_heads": 2}})"};
  for (const std::string& json : configs) {
    const ModelConfig config = Parse(json);
    const Weights weights = RandomWeights(config, 41, torch::kFloat64);
    const torch::Tensor ids = Ids(config, 9);
    const torch::Tensor logits = Logits(config, weights, ids);
    const torch::Tensor reference = ReferenceLogits(config, weights, ids);
    ASSERT_TRUE(logits.defined());
    EXPECT_LE(RelL2(logits, reference), 1e-6) << json;
    // The check bites: without the causal mask's effect (the last position
    // alone) the logits differ.
    EXPECT_GT(RelL2(Logits(config, weights, ids.narrow(1, 8, 1)), reference.narrow(1, 8, 1)),
              1e-3);
  }
}

// Prefill then one token a call, through the cache (keys after rotary at
// their positions, the conv's history), is the forward over the sequence.
TEST(AttentionForwardTest, DecodingThroughTheCacheIsOneForward) {
  const ModelConfig config = Parse(kHybrid);
  const Weights weights = RandomWeights(config, 43, torch::kFloat64);
  const torch::Tensor ids = Ids(config, 10);
  const torch::Tensor whole = Logits(config, weights, ids);
  for (const int64_t prefill : {int64_t{1}, int64_t{4}}) {
    RecurrentState state;
    std::vector<torch::Tensor> pieces;
    auto first = Forward(config, weights, ids.narrow(1, 0, prefill), {}, nullptr, &state);
    ASSERT_TRUE(first.ok()) << first.status();
    pieces.push_back(*first);
    for (int64_t position = prefill; position < ids.size(1); ++position) {
      auto step = Forward(config, weights, ids.narrow(1, position, 1), {}, nullptr, &state);
      ASSERT_TRUE(step.ok()) << step.status();
      pieces.push_back(*step);
    }
    EXPECT_LE(RelL2(torch::cat(pieces, 1), whole), 1e-10) << "prefill " << prefill;
    EXPECT_EQ(state.layers[1].attention_keys.sizes().vec(),
              (std::vector<int64_t>{2, 2, 10, 6}));
    EXPECT_FALSE(state.layers[0].attention_keys.defined());
    // The steps appended in place: the cache still views the storage its
    // prefill allocated, which has room beyond the 10 positions.
    EXPECT_EQ(state.layers[1].attention_keys.data_ptr(),
              state.layers[1].attention_key_storage.data_ptr());
    EXPECT_GT(state.layers[1].attention_key_storage.size(2), 10);
  }
  {
    // A state cloned (as a decode session copies one) and continued beside
    // the original: each continues its own sequence, neither writes into the
    // other's cache.
    RecurrentState original;
    ASSERT_TRUE(Forward(config, weights, ids.narrow(1, 0, 6), {}, nullptr, &original).ok());
    RecurrentState fork = original;
    for (LayerState& layer : fork.layers) {
      if (!layer.attention_keys.defined()) continue;
      layer.attention_keys = layer.attention_keys.clone();
      layer.attention_values = layer.attention_values.clone();
    }
    // Interleaved, two steps each: a shared storage would hand each the
    // other's position 6 at step 7.
    const torch::Tensor other_ids =
        torch::cat({ids.narrow(1, 0, 6), (ids.narrow(1, 6, 2) + 1).remainder(config.vocab_size)},
                   1);
    const torch::Tensor other_whole = Logits(config, weights, other_ids);
    for (const int64_t position : {int64_t{6}, int64_t{7}}) {
      auto forked = Forward(config, weights, other_ids.narrow(1, position, 1), {}, nullptr, &fork);
      auto continued = Forward(config, weights, ids.narrow(1, position, 1), {}, nullptr, &original);
      ASSERT_TRUE(forked.ok() && continued.ok());
      EXPECT_LE(RelL2(*continued, whole.narrow(1, position, 1)), 1e-10) << position;
      EXPECT_LE(RelL2(*forked, other_whole.narrow(1, position, 1)), 1e-10) << position;
    }
  }
  // A state of another shape is refused, naming the layer and the tensor.
  RecurrentState state;
  ASSERT_TRUE(Forward(config, weights, ids.narrow(1, 0, 3), {}, nullptr, &state).ok());
  state.layers[2].attention_values = state.layers[2].attention_values.narrow(2, 0, 2);
  auto refused = Forward(config, weights, ids.narrow(1, 3, 1), {}, nullptr, &state);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("layer 2 holds 3 positions of keys and 2 of values"),
            std::string::npos)
      << refused.status();
}

const GroupInfo& Find(const FamilySpec& spec, const std::string& name) {
  auto it = std::find_if(spec.begin(), spec.end(),
                         [&name](const GroupInfo& g) { return g.name == name; });
  EXPECT_NE(it, spec.end()) << name;
  return *it;
}

// The groups of layer 1 (kHybrid) as GetSymmetries lists them, and a
// negative control for each: the same permutation with a member left out
// (or a dimension the rotary turns) moves the logits, while the group as
// icd builds it does not.
TEST(AttentionGroupsTest, EachGroupIsExactAndItsControlMovesTheLogits) {
  const ModelConfig config = Parse(kHybrid);
  const Weights weights = RandomWeights(config, 47, torch::kFloat64);
  const torch::Tensor ids = Ids(config, 8);
  const torch::Tensor reference = Logits(config, weights, ids);
  const FamilySpec spec = BuildSpec(config);
  ASSERT_TRUE(CheckSpec(spec, weights).ok()) << CheckSpec(spec, weights);
  const GroupInfo& heads = Find(spec, "layers.1.heads");
  EXPECT_EQ(heads.size, 4);
  EXPECT_EQ(heads.whole, 2);
  const GroupInfo& values = Find(spec, "layers.1.value_dims");
  EXPECT_EQ(values.size, 12);
  EXPECT_EQ(values.block, 6);
  const GroupInfo& keys = Find(spec, "layers.1.key_dims");
  EXPECT_EQ(keys.size, 4);  // 2 KV heads x the 2 dimensions no rotary turns
  EXPECT_EQ(keys.block, 2);
  EXPECT_EQ(Find(spec, "layers.1.mixer_mlp").size, 128);

  auto moved = [&](const GroupInfo& group, const std::vector<int64_t>& index) {
    Weights permuted = Clone(weights);
    ApplyGather(group, index, permuted);
    return RelL2(Logits(config, permuted, ids), reference);
  };
  auto without = [](const GroupInfo& group, const std::string& left_out_expand, int axis) {
    GroupInfo partial = group;
    partial.members.erase(
        std::remove_if(partial.members.begin(), partial.members.end(),
                       [&](const GroupMember& m) {
                         return m.expand == left_out_expand && m.axis == axis;
                       }),
        partial.members.end());
    EXPECT_LT(partial.members.size(), group.members.size());
    return partial;
  };
  // Heads: swap the two KV groups and the heads inside the first.
  const std::vector<int64_t> head_index{3, 2, 0, 1};
  EXPECT_LE(moved(heads, head_index), 1e-12);
  EXPECT_GT(moved(without(heads, "per_group:6", 0), head_index), 1e-3);  // k, v left behind
  // Value dimensions: one swap in each KV head.
  const std::vector<int64_t> value_index{1, 0, 2, 3, 4, 5, 6, 7, 8, 9, 11, 10};
  EXPECT_LE(moved(values, value_index), 1e-12);
  EXPECT_GT(moved(without(values, "segments:2:6:0", 1), value_index), 1e-3);  // out_proj left
  // Key dimensions past the rotary: swapping them is exact; the same swap
  // moved into the rotary part (offset 0 instead of 4), or on k alone, is not.
  const std::vector<int64_t> key_index{1, 0, 3, 2};
  EXPECT_LE(moved(keys, key_index), 1e-12);
  GroupInfo rotary = keys;
  for (GroupMember& member : rotary.members) {
    member.expand = member.expand == "segments:2:6:4" ? "segments:2:6:0" : "segments:1:6:0";
  }
  EXPECT_GT(moved(rotary, key_index), 1e-3);
  EXPECT_GT(moved(without(keys, "segments:2:6:4", 0), key_index), 1e-3);  // q left behind
  // The mixer's MLP: its gate half alone.
  const GroupInfo& mlp = Find(spec, "layers.1.mixer_mlp");
  std::vector<int64_t> mlp_index(128);
  for (int64_t j = 0; j < 128; ++j) mlp_index[static_cast<size_t>(j)] = 127 - j;
  EXPECT_LE(moved(mlp, mlp_index), 1e-12);
  GroupInfo gate_only = mlp;
  gate_only.members = {mlp.members[1]};
  EXPECT_GT(moved(gate_only, mlp_index), 1e-3);
}

// Without rotary the key dimensions are all of head_dim; with a full rotary
// there is no such group.
TEST(AttentionGroupsTest, RotaryDecidesTheKeyDimensions) {
  auto key_group_size = [](const std::string& rotary) {
    const ModelConfig config = Parse(R"({"d_model": 12, "n_layer": 1, "attn_layer_idx": [0],
        "attn_cfg": {"causal": true, "num_heads": 3, "rotary_emb_dim": )" + rotary + "}}");
    for (const GroupInfo& group : BuildSpec(config)) {
      if (group.name == "layers.0.key_dims") return group.size;
    }
    return int64_t{0};
  };
  EXPECT_EQ(key_group_size("0"), 12);
  EXPECT_EQ(key_group_size("2"), 6);
  EXPECT_EQ(key_group_size("4"), 0);
}

}  // namespace
}  // namespace icd::attention_test

namespace icd::attention_test {
namespace {

// HuggingFace's layout of the same attention (q_proj, k_proj, v_proj, o_proj):
// the same function as mamba_ssm's fused in_proj cut into its three parts,
// and every group exact on it.
TEST(AttentionSeparateProjectionsTest, SameFunctionAsTheFusedOneAndExact) {
  const ModelConfig fused = Parse(R"({"d_model": 20, "n_layer": 2, "vocab_size": 29,
      "attn_layer_idx": [1], "attn_cfg": {"causal": true, "num_heads": 6, "num_heads_kv": 2,
                                          "head_dim": 4, "rotary_emb_dim": 2}})");
  ModelConfig separate = fused;
  separate.attention.separate_projections = true;
  const Weights weights = RandomWeights(fused, 53, torch::kFloat64);
  Weights split;
  for (const auto& [name, tensor] : weights) {
    const std::string mixer = "backbone.layers.1.mixer.";
    if (name.rfind(mixer, 0) != 0) {
      split[name] = tensor;
      continue;
    }
    const std::string part = name.substr(mixer.size());  // "in_proj.weight", ...
    const std::string kind = part.substr(part.find('.'));  // ".weight" or ".bias"
    if (part.rfind("in_proj", 0) == 0) {
      split[mixer + "q_proj" + kind] = tensor.narrow(0, 0, 24);
      split[mixer + "k_proj" + kind] = tensor.narrow(0, 24, 8);
      split[mixer + "v_proj" + kind] = tensor.narrow(0, 32, 8);
    } else {
      split[mixer + "o_proj" + kind] = tensor;
    }
  }
  const auto expected = ExpectedShapes(separate);
  ASSERT_EQ(expected.size(), split.size());
  for (const auto& [name, shape] : expected) {
    ASSERT_EQ(split.count(name), 1u) << name;
    EXPECT_EQ(split.at(name).sizes().vec(), shape) << name;
  }
  const torch::Tensor ids = Ids(fused, 7);
  const torch::Tensor reference = Logits(fused, weights, ids);
  EXPECT_LE(RelL2(Logits(separate, split, ids), reference), 1e-12);

  const FamilySpec spec = BuildSpec(separate);
  ASSERT_TRUE(CheckSpec(spec, split).ok()) << CheckSpec(spec, split);
  std::mt19937_64 rng(3);
  Weights all = Clone(split);
  for (const GroupInfo& group : spec) {
    const std::vector<int64_t> index = testing::RandomPermutation(group, rng);
    Weights permuted = Clone(split);
    ApplyGather(group, index, permuted);
    EXPECT_LE(RelL2(Logits(separate, permuted, ids), reference), 1e-10) << group.name;
    ApplyGather(group, index, all);
  }
  EXPECT_LE(RelL2(Logits(separate, all, ids), reference), 1e-10);
  EXPECT_GT(RelL2(all.at("backbone.layers.1.mixer.q_proj.weight"),
                  split.at("backbone.layers.1.mixer.q_proj.weight")), 0.1);
}

}  // namespace
}  // namespace icd::attention_test
