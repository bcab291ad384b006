// HuggingFace's hybrids (io/config.cc ParseNemotronH, ParseBamba,
// ParseGranite): their configs as transformers reads them, their tensor names
// (io/checkpoint.cc), Nemotron-H's MLP layer (blocks/mlp.cc), Granite 4.0's
// and Jamba's mixtures of experts (blocks/moe.cc) and Jamba's weighted norms
// in its Mamba-1 mixer. Every group alone and all
// together are exact on random ones in symmetry_test (RandomConfigTest
// nemotron_h_odd, bamba_odd); loading, applying and exporting under their own
// tensor names in engine_test.
#include <gtest/gtest.h>

#include <algorithm>

#include "blocks/mixer.h"
#include "io/checkpoint.h"
#include "apply/symmetry.h"
#include "forward/forward.h"
#include "io/config.h"
#include "test_util.h"

// A namespace of its own: model_test compiles its files as one unit.
namespace icd::hf_hybrids_test {
namespace {

std::string Config(const std::string& fields) {
  return R"({"model_type": "nemotron_h", "hidden_size": 16, "vocab_size": 40,
             "mamba_num_heads": 8, "mamba_head_dim": 4, "ssm_state_size": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 6,
             "intermediate_size": 20, )" +
         fields + "}";
}

TEST(NemotronHConfigTest, ThePatternPlansTheLayers) {
  auto config = ParseConfig(Config(R"("hybrid_override_pattern": "M-*M", "n_groups": 2)"), "n");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->n_layer, 4);
  EXPECT_EQ(config->mixers, (std::vector<MixerType>{MixerType::kMamba2, MixerType::kMlp,
                                                     MixerType::kAttention, MixerType::kMamba2}));
  EXPECT_EQ(config->architecture, "nemotron_h");
  EXPECT_EQ(config->d_inner, 32);  // heads x head_dim; expand is not read
  EXPECT_EQ(config->ngroups, 2);
  EXPECT_TRUE(config->grouped_gated_norm);
  EXPECT_FALSE(config->tied);
  EXPECT_TRUE(config->attention.separate_projections);
  EXPECT_EQ(config->attention.rotary_dim, 0);
  EXPECT_FALSE(config->attention.qkv_bias || config->attention.out_bias);
  EXPECT_EQ(config->mlp.activation, MlpConfig::Activation::kRelu2);
  EXPECT_FALSE(config->mlp.gated);
  const auto shapes = ExpectedShapes(*config);
  EXPECT_EQ(shapes.at("backbone.layers.1.mixer.up_proj.weight"), (std::vector<int64_t>{20, 16}));
  EXPECT_EQ(shapes.at("backbone.layers.2.mixer.q_proj.weight"), (std::vector<int64_t>{24, 16}));
  EXPECT_EQ(shapes.at("backbone.layers.0.mixer.in_proj.weight"),
            (std::vector<int64_t>{2 * 32 + 2 * 2 * 4 + 8, 16}));
  EXPECT_EQ(shapes.count("lm_head.weight"), 1u);

  // transformers 5's layers_block_type, in both spellings, and the older
  // field names (mamba_n_groups, mamba_d_conv).
  auto listed = ParseConfig(
      Config(R"("layers_block_type": ["linear_attention", "mlp", "attention", "mamba"],
                "mamba_n_groups": 2, "mamba_d_conv": 3)"),
      "n");
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_EQ(listed->mixers, config->mixers);
  EXPECT_EQ(listed->d_conv, 3);
}

TEST(NemotronHConfigTest, RefusesWhatItCannotComputeAndSaysWhy) {
  const auto refused = [](const std::string& fields, const std::string& needle) {
    auto config = ParseConfig(Config(fields), "x/config.json");
    ASSERT_FALSE(config.ok()) << fields;
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(config.status().message().find(needle), std::string::npos) << config.status();
  };
  refused(R"("hybrid_override_pattern": "M-E*", "n_groups": 2, "n_group": 2)",
          "group-limited routing (n_group 2)");
  refused(R"("hybrid_override_pattern": "E", "n_groups": 2, "moe_latent_size": 8)",
          "latent projections");
  refused(R"("hybrid_override_pattern": "M+")", "has '+' at layer 1");
  refused(R"("hybrid_override_pattern": "")", "lists no layer");
  refused(R"("n_groups": 3)", "is missing");  // no pattern at all
  refused(R"("hybrid_override_pattern": "M", "n_groups": 3)", "multiple of n_groups");
  refused(R"("hybrid_override_pattern": "-", "mlp_hidden_act": "gelu")", "'gelu' (relu2 only)");
  refused(R"("layers_block_type": ["mamba", "conv"])", "unknown layer kind conv");
}

// Layer 0's mixer of `config` on random normed inputs [2, 5, d_model], in
// float64: {the inputs, its output}.
std::pair<torch::Tensor, torch::Tensor> MixerOnRandomInputs(const ModelConfig& config,
                                                            const Weights& weights) {
  torch::manual_seed(3);
  const torch::Tensor normed = torch::randn({2, 5, config.d_model}, torch::kFloat64);
  forward_internal::Precision precision;
  precision.compute = precision.accumulate = torch::kFloat64;
  return {normed, blocks::MixerAt(config, 0).forward(config, weights, 0, precision, normed,
                                                     forward_internal::Capture(nullptr), nullptr,
                                                     CallContext{})};
}

// The MLP layer computes down(relu(up(x))^2), with its biases.
TEST(MlpMixerTest, ComputesDownOfSquaredRelu) {
  auto config = ParseConfig(Config(R"("hybrid_override_pattern": "-", "mlp_bias": true)"), "n");
  ASSERT_TRUE(config.ok()) << config.status();
  const Weights weights = testing::RandomWeights(*config, 7, torch::kFloat64);
  const auto [normed, out] = MixerOnRandomInputs(*config, weights);
  auto w = [&weights](const char* name) {
    return weights.at(std::string("backbone.layers.0.mixer.") + name);
  };
  const torch::Tensor hidden = torch::relu(normed.matmul(w("up_proj.weight").t()) + w("up_proj.bias"));
  const torch::Tensor expected =
      (hidden * hidden).matmul(w("down_proj.weight").t()) + w("down_proj.bias");
  EXPECT_LE(testing::RelL2(out, expected), 1e-14);
}

// Nemotron-H's experts layer: the top 2 of sigmoid(logits) + correction
// bias, weighted by their sigmoids normalised and scaled, ReLU² experts, plus
// the shared expert; against every expert computed for every position.
TEST(NemotronHExpertsTest, MatchTheDenseSumAndTheSharedExpert) {
  auto config = ParseConfig(Config(R"("hybrid_override_pattern": "E", "n_groups": 2,
      "n_routed_experts": 5, "num_experts_per_tok": 2, "moe_intermediate_size": 7,
      "moe_shared_expert_intermediate_size": 9, "routed_scaling_factor": 1.5)"), "n");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->mixers, (std::vector<MixerType>{MixerType::kExperts}));
  const Weights weights = testing::RandomWeights(*config, 71, torch::kFloat64);
  const auto [normed, out] = MixerOnRandomInputs(*config, weights);
  auto w = [&weights](const std::string& name) { return weights.at("backbone.layers.0.mixer." + name); };
  const torch::Tensor x = normed.reshape({-1, 16});
  const torch::Tensor scores = torch::sigmoid(x.matmul(w("gate.weight").t()));
  const torch::Tensor chosen = std::get<1>((scores + w("gate.e_score_correction_bias")).topk(2, -1));
  torch::Tensor top = scores.gather(-1, chosen);
  top = top / top.sum(-1, true) * 1.5;
  const torch::Tensor gates = torch::zeros_like(scores).scatter(-1, chosen, top);
  torch::Tensor expected = torch::relu(x.matmul(w("shared_experts.up_proj.weight").t())).pow(2)
                               .matmul(w("shared_experts.down_proj.weight").t());
  for (int64_t e = 0; e < 5; ++e) {
    const std::string p = "experts." + std::to_string(e) + ".";
    expected += torch::relu(x.matmul(w(p + "up_proj.weight").t())).pow(2)
                    .matmul(w(p + "down_proj.weight").t()) * gates.select(-1, e).unsqueeze(-1);
  }
  EXPECT_LE(testing::RelL2(out.reshape({-1, 16}), expected), 1e-13);
  // The experts' order moves the gate's rows, its bias and each expert's
  // tensors whole: the mixer's output stays; left without the bias, the
  // permuted router picks other experts.
  const FamilySpec spec = BuildSpec(*config);
  EXPECT_TRUE(CheckSpec(spec, weights).ok());
  const auto order = std::find_if(spec.begin(), spec.end(), [](const GroupInfo& g) {
    return g.name == "layers.0.experts";
  });
  ASSERT_NE(order, spec.end());
  EXPECT_EQ(order->members.size(), 4u);  // gate, its bias, up_proj's and down_proj's lists
  const std::vector<int64_t> index = {3, 0, 4, 2, 1};
  Weights moved = testing::Clone(weights);
  ApplyGather(*order, index, moved);
  EXPECT_NE(moved.at("backbone.layers.0.mixer.experts.0.up_proj.weight").data_ptr(),
            weights.at("backbone.layers.0.mixer.experts.0.up_proj.weight").data_ptr());
  EXPECT_TRUE(torch::equal(moved.at("backbone.layers.0.mixer.experts.0.up_proj.weight"),
                           weights.at("backbone.layers.0.mixer.experts.3.up_proj.weight")));
  EXPECT_LE(testing::RelL2(MixerOnRandomInputs(*config, moved).second, out), 1e-13);
  GroupInfo without_bias = *order;
  without_bias.members.erase(without_bias.members.begin() + 1);
  Weights broken = testing::Clone(weights);
  ApplyGather(without_bias, index, broken);
  EXPECT_GT(testing::RelL2(MixerOnRandomInputs(*config, broken).second, out), 1e-3);
}

constexpr char kBamba[] = R"({"model_type": "bamba", "hidden_size": 20, "num_hidden_layers": 4,
    "vocab_size": 33, "attn_layer_indices": [2, 1], "num_attention_heads": 4,
    "num_key_value_heads": 2, "mamba_n_heads": 8, "mamba_d_head": "auto", "mamba_n_groups": 2,
    "mamba_d_state": 6, "mamba_expand": 2, "intermediate_size": 14,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}})";

TEST(BambaConfigTest, ReadsTheLayersTheRotaryAndTheFeedForward) {
  auto config = ParseConfig(kBamba, "b");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->mixers, (std::vector<MixerType>{MixerType::kMamba2, MixerType::kAttention,
                                                     MixerType::kAttention, MixerType::kMamba2}));
  EXPECT_EQ(config->headdim, 5);  // "auto": expand x hidden / heads
  EXPECT_FALSE(config->grouped_gated_norm);  // over all of d_inner, as HF's Mamba-2
  EXPECT_EQ(config->attention.head_dim, 5);
  EXPECT_EQ(config->attention.rotary_dim, 2);  // int(5 x 0.5), even
  EXPECT_DOUBLE_EQ(config->attention.rotary_base, 500.0);
  EXPECT_TRUE(config->mlp_separate_projections);
  EXPECT_EQ(config->d_intermediate, 14);
  const auto shapes = ExpectedShapes(*config);
  EXPECT_EQ(shapes.at("backbone.layers.3.mlp.gate_proj.weight"), (std::vector<int64_t>{14, 20}));
  EXPECT_EQ(shapes.at("backbone.layers.1.mixer.k_proj.weight"), (std::vector<int64_t>{10, 20}));
  EXPECT_EQ(shapes.count("backbone.layers.1.norm2.weight"), 1u);
  auto refused = ParseConfig(R"({"model_type": "bamba", "hidden_size": 20, "hidden_act": "gelu"})",
                             "b");
  EXPECT_FALSE(refused.ok());
  refused = ParseConfig(R"({"model_type": "bamba", "hidden_size": 20, "num_hidden_layers": 2,
                            "attn_layer_indices": [2]})", "b");
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("lists layer 2, but num_hidden_layers is 2"),
            std::string::npos) << refused.status();
}

// Bamba's and transformers' module names read as icd's canonical ones.
TEST(HfHybridNamesTest, BambaAndModelPrefixedNamesAreCanonical) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"model.embed_tokens.weight", "backbone.embeddings.weight"},
      {"model.final_layernorm.weight", "backbone.norm_f.weight"},
      {"model.layers.12.input_layernorm.weight", "backbone.layers.12.norm.weight"},
      {"model.layers.3.pre_ff_layernorm.weight", "backbone.layers.3.norm2.weight"},
      {"model.layers.0.mamba.in_proj.weight", "backbone.layers.0.mixer.in_proj.weight"},
      {"model.layers.1.self_attn.q_proj.weight", "backbone.layers.1.mixer.q_proj.weight"},
      {"model.layers.1.feed_forward.down_proj.weight", "backbone.layers.1.mlp.down_proj.weight"},
      {"model.layers.4.mixer.D", "backbone.layers.4.mixer.D"},  // NemotronH under model.
      {"model.embeddings.weight", "backbone.embeddings.weight"},
      {"backbone.embedding.weight", "backbone.embeddings.weight"},  // mamba_ssm
      {"lm_head.weight", "lm_head.weight"}};
  for (const auto& [stored, canonical] : cases) EXPECT_EQ(CanonicalTensorName(stored), canonical);
}

constexpr char kGranite[] = R"({"model_type": "granitemoehybrid", "hidden_size": 16,
    "vocab_size": 27, "layer_types": ["mamba", "attention"], "num_attention_heads": 4,
    "num_key_value_heads": 2, "position_embedding_type": "rope", "attention_multiplier": 0.3,
    "mamba_n_heads": 4, "mamba_n_groups": 2, "mamba_d_state": 5, "shared_intermediate_size": 9,
    "num_local_experts": 5, "num_experts_per_tok": 2, "intermediate_size": 7,
    "embedding_multiplier": 3.0, "residual_multiplier": 0.4, "logits_scaling": 2.5})";

TEST(GraniteConfigTest, ReadsLayersMultipliersAndExperts) {
  auto config = ParseConfig(kGranite, "g");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->mixers, (std::vector<MixerType>{MixerType::kMamba2, MixerType::kAttention}));
  EXPECT_FALSE(config->grouped_gated_norm);  // over all of d_inner, as transformers 5.17
  EXPECT_EQ(config->attention.rotary_dim, 4);  // the whole head
  EXPECT_DOUBLE_EQ(config->attention.softmax_scale, 0.3);
  EXPECT_TRUE(config->mlp_gate_first);
  EXPECT_EQ(config->d_intermediate, 9);
  EXPECT_EQ(config->moe.experts, 5);
  EXPECT_EQ(config->moe.top_k, 2);
  EXPECT_DOUBLE_EQ(config->embedding_multiplier, 3.0);
  EXPECT_DOUBLE_EQ(config->residual_multiplier, 0.4);
  EXPECT_DOUBLE_EQ(config->logits_scaling, 2.5);
  const auto shapes = ExpectedShapes(*config);
  EXPECT_EQ(shapes.at("backbone.layers.1.moe.fc1.weight"), (std::vector<int64_t>{5, 14, 16}));
  EXPECT_EQ(shapes.at("backbone.layers.1.moe.fc2.weight"), (std::vector<int64_t>{5, 16, 7}));
  EXPECT_EQ(shapes.at("backbone.layers.0.moe.router.weight"), (std::vector<int64_t>{5, 16}));
  EXPECT_EQ(CanonicalTensorName("model.layers.1.block_sparse_moe.router.layer.weight"),
            "backbone.layers.1.moe.router.weight");
  EXPECT_EQ(CanonicalTensorName("model.layers.0.shared_mlp.input_linear.weight"),
            "backbone.layers.0.mlp.fc1.weight");
  EXPECT_EQ(CanonicalTensorName("model.layers.0.post_attention_layernorm.weight"),
            "backbone.layers.0.norm2.weight");
  EXPECT_EQ(CanonicalTensorName("model.norm.weight"), "backbone.norm_f.weight");
  for (const std::string& bad :
       {std::string(R"("num_local_experts": 2, "num_experts_per_tok": 3)"),
        std::string(R"("position_embedding_type": "alibi")"),
        std::string(R"("logits_scaling": 0)")}) {
    auto refused = ParseConfig(R"({"model_type": "granitemoehybrid", "hidden_size": 16,
        "num_attention_heads": 4, "mamba_n_heads": 4, )" + bad + "}", "g");
    EXPECT_FALSE(refused.ok()) << bad;
  }
}

// The mixture of experts against every expert computed for every position,
// weighted by the softmax of its top two logits (zero elsewhere), and the
// controls of its groups: the router's rows moved without the experts, or
// the experts' hidden channels moved in fc1 but not in fc2, move the logits.
TEST(MixtureOfExpertsTest, MatchesTheDenseSumAndItsControlsBite) {
  auto config = ParseConfig(kGranite, "g");
  ASSERT_TRUE(config.ok()) << config.status();
  const Weights weights = testing::RandomWeights(*config, 61, torch::kFloat64);
  torch::manual_seed(5);
  const torch::Tensor normed = torch::randn({2, 6, 16}, torch::kFloat64);
  const torch::Tensor moe =
      blocks::MixtureOfExperts(*config, weights, 1, normed, forward_internal::Capture(nullptr));
  const torch::Tensor x = normed.reshape({-1, 16});
  const torch::Tensor logits = x.matmul(weights.at("backbone.layers.1.moe.router.weight").t());
  const auto [top, chosen] = logits.topk(2, -1);
  const torch::Tensor gates =
      torch::zeros_like(logits).scatter(-1, chosen, torch::softmax(top, -1));  // [T, E]
  torch::Tensor expected = torch::zeros_like(x);
  for (int64_t e = 0; e < 5; ++e) {
    const torch::Tensor h = x.matmul(weights.at("backbone.layers.1.moe.fc1.weight")[e].t());
    const torch::Tensor act = torch::silu(h.narrow(-1, 0, 7)) * h.narrow(-1, 7, 7);
    expected += act.matmul(weights.at("backbone.layers.1.moe.fc2.weight")[e].t()) *
                gates.select(-1, e).unsqueeze(-1);
  }
  EXPECT_LE(testing::RelL2(moe.reshape({-1, 16}), expected), 1e-13);

  const torch::Tensor ids = torch::randint(27, {2, 9}, torch::kInt64);
  const torch::Tensor reference = *Forward(*config, weights, ids);
  const FamilySpec spec = BuildSpec(*config);
  auto moved = [&](GroupInfo group, const std::vector<int64_t>& index, size_t keep) {
    group.members.resize(std::min(keep, group.members.size()));
    Weights permuted = testing::Clone(weights);
    ApplyGather(group, index, permuted);
    return testing::RelL2(*Forward(*config, permuted, ids), reference);
  };
  int checked = 0;
  for (const GroupInfo& group : spec) {
    if (group.name == "layers.1.experts") {
      ++checked;
      EXPECT_LE(moved(group, {4, 2, 0, 3, 1}, 3), 1e-12);
      EXPECT_GT(moved(group, {4, 2, 0, 3, 1}, 1), 1e-3);  // the router alone
    } else if (group.name.rfind("layers.1.expert_hidden.", 0) == 0) {
      // Each expert's own hidden channels: its slice of fc1 (both halves) and
      // of fc2; fc2's slice left behind moves the logits.
      ++checked;
      EXPECT_LE(moved(group, {6, 5, 4, 3, 2, 1, 0}, 3), 1e-12) << group.name;
      EXPECT_GT(moved(group, {6, 5, 4, 3, 2, 1, 0}, 2), 1e-3) << group.name;
    }
  }
  EXPECT_EQ(checked, 1 + 5);
}

constexpr char kJamba[] = R"({"model_type": "jamba", "hidden_size": 18, "num_hidden_layers": 4,
    "vocab_size": 29, "attn_layer_period": 4, "attn_layer_offset": 2, "expert_layer_period": 2,
    "expert_layer_offset": 1, "num_experts": 3, "num_experts_per_tok": 2,
    "num_attention_heads": 6, "num_key_value_heads": 3, "mamba_d_state": 5,
    "mamba_expand": 2, "intermediate_size": 11})";

TEST(JambaConfigTest, PeriodsPlanTheLayersAndTheExperts) {
  auto config = ParseConfig(kJamba, "j");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->mixers, (std::vector<MixerType>{MixerType::kMamba1, MixerType::kMamba1,
                                                     MixerType::kAttention, MixerType::kMamba1}));
  EXPECT_EQ(config->moe.layers, (std::vector<int64_t>{1, 3}));
  EXPECT_EQ(config->dt_rank, 2);  // "auto": ceil(18 / 16)
  EXPECT_EQ(config->attention.head_dim, 3);
  EXPECT_EQ(config->attention.rotary_dim, 0);
  const auto shapes = ExpectedShapes(*config);
  EXPECT_EQ(shapes.at("backbone.layers.0.mixer.dt_layernorm.weight"), (std::vector<int64_t>{2}));
  EXPECT_EQ(shapes.at("backbone.layers.3.mixer.b_layernorm.weight"), (std::vector<int64_t>{5}));
  EXPECT_EQ(shapes.at("backbone.layers.1.mlp.experts.2.down_proj.weight"),
            (std::vector<int64_t>{18, 11}));
  EXPECT_EQ(shapes.at("backbone.layers.1.mlp.router.weight"), (std::vector<int64_t>{3, 18}));
  EXPECT_EQ(shapes.count("backbone.layers.1.mlp.gate_proj.weight"), 0u);  // experts instead
  EXPECT_EQ(shapes.at("backbone.layers.2.mlp.gate_proj.weight"), (std::vector<int64_t>{11, 18}));
  EXPECT_EQ(CanonicalTensorName("model.layers.1.feed_forward.experts.2.up_proj.weight"),
            "backbone.layers.1.mlp.experts.2.up_proj.weight");
  auto refused = ParseConfig(R"({"model_type": "jamba", "num_experts": 300})", "j");
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("300 experts"), std::string::npos)
      << refused.status();
}

// Jamba's experts: the top 2 of the softmax over all experts, not
// renormalised, against every expert computed for every position; and the
// controls of the groups Jamba adds: an expert's down_proj left behind, the
// weighted norms on dt and B left out of their groups.
TEST(JambaGroupsTest, ExpertsMatchTheDenseSumAndTheControlsBite) {
  auto config = ParseConfig(kJamba, "j");
  ASSERT_TRUE(config.ok()) << config.status();
  const Weights weights = testing::RandomWeights(*config, 67, torch::kFloat64);
  torch::manual_seed(9);
  const torch::Tensor normed = torch::randn({2, 5, 18}, torch::kFloat64);
  const torch::Tensor moe =
      blocks::PerExpertMixture(*config, weights, 1, normed, forward_internal::Capture(nullptr));
  const torch::Tensor x = normed.reshape({-1, 18});
  auto w = [&weights](const std::string& name) { return weights.at("backbone.layers.1.mlp." + name); };
  const torch::Tensor probabilities = torch::softmax(x.matmul(w("router.weight").t()), -1);
  const auto [top, chosen] = probabilities.topk(2, -1);
  const torch::Tensor gates = torch::zeros_like(probabilities).scatter(-1, chosen, top);
  torch::Tensor expected = torch::zeros_like(x);
  for (int64_t e = 0; e < 3; ++e) {
    const std::string p = "experts." + std::to_string(e) + ".";
    const torch::Tensor act = torch::silu(x.matmul(w(p + "gate_proj.weight").t())) *
                              x.matmul(w(p + "up_proj.weight").t());
    expected += act.matmul(w(p + "down_proj.weight").t()) * gates.select(-1, e).unsqueeze(-1);
  }
  EXPECT_LE(testing::RelL2(moe.reshape({-1, 18}), expected), 1e-13);

  const torch::Tensor ids = torch::randint(29, {2, 9}, torch::kInt64);
  const torch::Tensor reference = *Forward(*config, weights, ids);
  const FamilySpec spec = BuildSpec(*config);
  ASSERT_TRUE(CheckSpec(spec, weights).ok()) << CheckSpec(spec, weights);
  auto moved = [&](const std::string& name, const std::string& left_out) {
    for (const GroupInfo& found : spec) {
      if (found.name != name) continue;
      GroupInfo group = found;
      group.members.erase(std::remove_if(group.members.begin(), group.members.end(),
                                         [&](const GroupMember& m) { return m.tensor == left_out; }),
                          group.members.end());
      std::vector<int64_t> index(static_cast<size_t>(group.size));
      for (int64_t j = 0; j < group.size; ++j) index[static_cast<size_t>(j)] = group.size - 1 - j;
      Weights permuted = testing::Clone(weights);
      ApplyGather(group, index, permuted);
      return testing::RelL2(*Forward(*config, permuted, ids), reference);
    }
    ADD_FAILURE() << "no group " << name;
    return 0.0;
  };
  EXPECT_LE(moved("layers.1.expert_hidden.2", ""), 1e-12);
  EXPECT_GT(moved("layers.1.expert_hidden.2", "backbone.layers.1.mlp.experts.2.down_proj.weight"),
            1e-3);
  EXPECT_LE(moved("layers.0.dt_rank", ""), 1e-12);
  EXPECT_GT(moved("layers.0.dt_rank", "backbone.layers.0.mixer.dt_layernorm.weight"), 1e-4);
  EXPECT_LE(moved("layers.3.state", ""), 1e-12);
  EXPECT_GT(moved("layers.3.state", "backbone.layers.3.mixer.b_layernorm.weight"), 1e-4);
}

// Falcon-H1's multipliers act where transformers applies them: each equals
// scaling the weights it stands next to (the model with every multiplier 1
// and those weights scaled gives the same logits): ssm_in on in_proj's
// input (not its bias), ssm_multipliers on in_proj's output slices [z | x |
// B | C | dt], ssm_out on the mixer's output, attention_in on q/k/v's input,
// key_multiplier on k, attention_out on o_proj's output, the MLP's on the
// gate's pre-activation and on down_proj's output, embedding and lm_head.
TEST(FalconH1Test, MultipliersActWhereTransformersAppliesThem) {
  const std::string sizes = R"("model_type": "falcon_h1", "hidden_size": 16,
      "num_hidden_layers": 2, "vocab_size": 27, "num_attention_heads": 4,
      "num_key_value_heads": 2, "head_dim": 6, "mamba_d_ssm": 24, "mamba_n_heads": 4,
      "mamba_n_groups": 2, "mamba_d_state": 5, "mamba_rms_norm": true, "mamba_proj_bias": true,
      "projectors_bias": true, "intermediate_size": 11)";
  auto with = ParseConfig("{" + sizes + R"(, "embedding_multiplier": 2.0,
      "lm_head_multiplier": 0.5, "attention_in_multiplier": 0.7, "attention_out_multiplier": 1.3,
      "key_multiplier": 0.4, "ssm_in_multiplier": 1.25, "ssm_out_multiplier": 0.6,
      "ssm_multipliers": [0.5, 2.0, 0.8, 1.5, 0.9], "mlp_multipliers": [0.7, 1.4]})", "f");
  auto plain = ParseConfig("{" + sizes + "}", "f");
  ASSERT_TRUE(with.ok() && plain.ok()) << with.status() << plain.status();
  EXPECT_EQ(with->mixers, (std::vector<MixerType>{MixerType::kMamba2, MixerType::kMamba2}));
  EXPECT_TRUE(with->parallel_attention);
  const Weights weights = testing::RandomWeights(*with, 73, torch::kFloat64);
  Weights scaled = testing::Clone(weights);
  auto scale = [&scaled](const std::string& name, double by) {
    scaled.at(name) = scaled.at(name) * by;
  };
  const int64_t inner = 24, bc = 2 * 5, heads = 4;
  const std::vector<double> slices = {0.5, 2.0, 0.8, 1.5, 0.9};
  const torch::Tensor rows = torch::cat(
      {torch::full({inner}, slices[0], torch::kFloat64), torch::full({inner}, slices[1], torch::kFloat64),
       torch::full({bc}, slices[2], torch::kFloat64), torch::full({bc}, slices[3], torch::kFloat64),
       torch::full({heads}, slices[4], torch::kFloat64)});
  scale("backbone.embeddings.weight", 2.0);
  scale("lm_head.weight", 0.5);  // untied: the head is its own tensor
  for (int64_t i = 0; i < 2; ++i) {
    auto t = [i](const std::string& suffix) { return LayerTensorName(i, suffix); };
    scaled.at(t("mixer.in_proj.weight")) = scaled.at(t("mixer.in_proj.weight")) * rows.unsqueeze(1) * 1.25;
    scaled.at(t("mixer.in_proj.bias")) = scaled.at(t("mixer.in_proj.bias")) * rows;
    scale(t("mixer.out_proj.weight"), 0.6);
    scale(t("mixer.out_proj.bias"), 0.6);
    scale(t("attn.q_proj.weight"), 0.7);
    scale(t("attn.k_proj.weight"), 0.7 * 0.4);
    scale(t("attn.v_proj.weight"), 0.7);
    scale(t("attn.o_proj.weight"), 1.3);
    scale(t("mlp.gate_proj.weight"), 0.7);
    scale(t("mlp.down_proj.weight"), 1.4);
  }
  const torch::Tensor ids = torch::randint(27, {2, 9}, torch::kInt64);
  const torch::Tensor multiplied = *Forward(*with, weights, ids);
  EXPECT_LE(testing::RelL2(*Forward(*plain, scaled, ids), multiplied), 1e-12);
  // The check bites: the multipliers left out are another function.
  EXPECT_GT(testing::RelL2(*Forward(*plain, weights, ids), multiplied), 1e-2);
}


// Zyphra's Zamba2 (architectures/zamba2.cc, blocks/shared_block.cc).
constexpr char kZamba2[] =
    R"({"model_type": "zamba2", "hidden_size": 8, "num_hidden_layers": 6, "vocab_size": 31,
        "layers_block_type": ["mamba", "hybrid", "hybrid", "linear_attention", "hybrid",
                              "hybrid"],
        "num_mem_blocks": 2, "mamba_d_state": 4, "mamba_expand": 2, "n_mamba_heads": 4,
        "mamba_ngroups": 2, "num_attention_heads": 4, "intermediate_size": 6,
        "adapter_rank": 3, "use_shared_attention_adapter": true, "use_mem_rope": true,
        "rope_theta": 100.0, "rms_norm_eps": 1e-6})";

TEST(Zamba2ConfigTest, ReadsTheLayersTheBlocksAndTheirAdapters) {
  auto config = ParseConfig(kZamba2, "zamba2");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->architecture, "zamba2");
  EXPECT_EQ(config->family, Family::kMamba2);
  EXPECT_EQ(config->shared.layers, (std::vector<int64_t>{1, 2, 4, 5}));
  EXPECT_EQ(config->shared.blocks, 2);
  EXPECT_TRUE(config->tied);
  // Attention on [residual, embeddings]: head_dim 2 x 8 / 4, scale (4/2)^-1/2,
  // the rotary over whole heads; the Mamba norm's eps is its own.
  EXPECT_EQ(config->attention.head_dim, 4);
  EXPECT_EQ(config->attention.kv_heads, 4);
  EXPECT_EQ(config->attention.rotary_dim, 4);
  EXPECT_DOUBLE_EQ(config->attention.softmax_scale, 1.0 / std::sqrt(2.0));
  EXPECT_DOUBLE_EQ(config->norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(config->gated_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(config->dt_min, 1e-3);
  EXPECT_TRUE(config->grouped_gated_norm);
  // The hybrid layers take turns: slot j runs block j mod 2.
  const std::vector<std::pair<int64_t, int64_t>> uses = {{-1, -1}, {0, 0}, {1, 1},
                                                         {-1, -1}, {0, 2}, {1, 3}};
  for (int64_t layer = 0; layer < 6; ++layer) {
    const blocks::SharedBlockUse use = blocks::SharedBlockAt(*config, layer);
    EXPECT_EQ(std::pair(use.block, use.slot), uses[static_cast<size_t>(layer)]) << layer;
  }
  // Block 1 lives under layer 2 and holds the adapters of slots 1 and 3 only.
  const auto shapes = ExpectedShapes(*config);
  EXPECT_EQ(shapes.at("backbone.layers.2.shared_transformer.self_attn.q_proj.weight"),
            (std::vector<int64_t>{16, 16}));
  EXPECT_EQ(shapes.at("backbone.layers.2.shared_transformer.self_attn.linear_k_adapter_list.3."
                      "1.weight"),
            (std::vector<int64_t>{16, 3}));
  EXPECT_EQ(shapes.at("backbone.layers.2.shared_transformer.feed_forward.gate_up_proj_adapter_"
                      "list.1.0.weight"),
            (std::vector<int64_t>{3, 8}));
  EXPECT_EQ(shapes.count("backbone.layers.2.shared_transformer.feed_forward.gate_up_proj_"
                         "adapter_list.0.0.weight"),
            0u);
  EXPECT_EQ(shapes.count("backbone.layers.4.shared_transformer.input_layernorm.weight"), 0u);
  EXPECT_EQ(shapes.at("backbone.layers.4.linear.weight"), (std::vector<int64_t>{8, 8}));
  EXPECT_EQ(shapes.count("backbone.layers.3.linear.weight"), 0u);
  // Its module names.
  EXPECT_EQ(CanonicalTensorName("model.layers.4.mamba_decoder.mamba.in_proj.weight"),
            "backbone.layers.4.mixer.in_proj.weight");
  EXPECT_EQ(CanonicalTensorName("model.layers.4.mamba_decoder.input_layernorm.weight"),
            "backbone.layers.4.norm.weight");
  EXPECT_EQ(CanonicalTensorName("model.layers.3.input_layernorm.weight"),
            "backbone.layers.3.norm.weight");
  EXPECT_EQ(CanonicalTensorName("model.layers.2.shared_transformer.self_attn.o_proj.weight"),
            "backbone.layers.2.shared_transformer.self_attn.o_proj.weight");
}

TEST(Zamba2ConfigTest, RefusesWhatItCannotComputeAndSaysWhy) {
  const auto refused = [](const std::string& json, const std::string& needle) {
    auto config = ParseConfig(json, "x/config.json");
    ASSERT_FALSE(config.ok()) << json;
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(config.status().message().find(needle), std::string::npos) << config.status();
  };
  const std::string base = R"({"model_type": "zamba2", "hidden_size": 8, "vocab_size": 31,
      "mamba_d_state": 4, "n_mamba_heads": 4, "intermediate_size": 6, )";
  refused(base + R"("num_hidden_layers": 2, "layers_block_type": ["mamba", "attention"]})",
          "names layer 1 'attention'");
  refused(base + R"("num_hidden_layers": 2, "layers_block_type": ["mamba"]})",
          "must list num_hidden_layers (2) kinds");
  refused(base + R"("num_hidden_layers": 2})", "'layers_block_type' is missing");
  refused(base + R"("num_hidden_layers": 2, "layers_block_type": ["hybrid", "mamba"],
                    "num_mem_blocks": 2})",
          "2 blocks, but only 1 hybrid layers");
  refused(base + R"("num_hidden_layers": 1, "layers_block_type": ["hybrid"],
                    "num_attention_heads": 4, "num_key_value_heads": 2,
                    "use_shared_attention_adapter": true})",
          "needs num_key_value_heads equal to num_attention_heads");
  refused(base + R"("num_hidden_layers": 1, "layers_block_type": ["hybrid"],
                    "hidden_act": "silu"})",
          "hidden_act 'silu'");
}

// The shared block computed from its definition (transformers' Zamba2
// AttentionDecoderLayer, float64 LibTorch ops written here) against icd's, at
// a layer of each block; and its output joins the mixer's input only: with
// that layer's mixer silenced (out_proj zero) the block's weights do not
// reach the logits.
TEST(Zamba2SharedBlockTest, IsItsDefinitionAndFeedsOnlyTheMixer) {
  auto config = ParseConfig(kZamba2, "zamba2");
  ASSERT_TRUE(config.ok()) << config.status();
  const Weights weights = testing::RandomWeights(*config, 29, torch::kFloat64);
  torch::manual_seed(5);
  const int64_t batch = 2, length = 7, width = 8;
  const torch::Tensor residual = torch::randn({batch, length, width}, torch::kFloat64);
  const torch::Tensor embedded = torch::randn({batch, length, width}, torch::kFloat64);
  forward_internal::Precision precision;
  precision.compute = precision.accumulate = torch::kFloat64;
  const AttentionConfig& a = config->attention;
  const auto norm = [](const torch::Tensor& x, const torch::Tensor& w) {
    return x * torch::rsqrt(x.pow(2).mean(-1, true) + 1e-6) * w;
  };
  // rotate_half over whole heads, cos and sin of position / 100^(2i / d).
  const auto rotary = [&](const torch::Tensor& x) {  // [B, H, L, d]
    const int64_t d = x.size(-1);
    const torch::Tensor frequencies =
        torch::pow(100.0, torch::arange(0, d, 2, torch::kFloat64) / static_cast<double>(d))
            .reciprocal();
    const torch::Tensor angles =
        torch::outer(torch::arange(length, torch::kFloat64), frequencies).repeat({1, 2});
    const torch::Tensor half = torch::cat({-x.narrow(-1, d / 2, d / 2), x.narrow(-1, 0, d / 2)}, -1);
    return x * angles.cos() + half * angles.sin();
  };
  for (const int64_t layer : {int64_t{2}, int64_t{4}}) {
    const blocks::SharedBlockUse use = blocks::SharedBlockAt(*config, layer);
    const auto w = [&](const std::string& suffix) {
      return weights.at(blocks::SharedTensorName(*config, use.block, suffix));
    };
    const auto adapter = [&](const std::string& list, const torch::Tensor& x) {
      return torch::matmul(
          torch::matmul(x, weights.at(blocks::AdapterTensorName(*config, use.block, list, use.slot,
                                                                0)).t()),
          weights.at(blocks::AdapterTensorName(*config, use.block, list, use.slot, 1)).t());
    };
    const torch::Tensor u =
        norm(torch::cat({residual, embedded}, -1), w("input_layernorm.weight"));
    auto heads = [&](const torch::Tensor& x) {
      return x.reshape({batch, length, a.heads, a.head_dim}).transpose(1, 2);
    };
    const torch::Tensor q = rotary(heads(torch::matmul(u, w("self_attn.q_proj.weight").t()) +
                                         adapter("self_attn.linear_q_adapter_list", u)));
    const torch::Tensor k = rotary(heads(torch::matmul(u, w("self_attn.k_proj.weight").t()) +
                                         adapter("self_attn.linear_k_adapter_list", u)));
    const torch::Tensor v = heads(torch::matmul(u, w("self_attn.v_proj.weight").t()) +
                                  adapter("self_attn.linear_v_adapter_list", u));
    const torch::Tensor scores = torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(2.0) +
                                 torch::full({length, length}, -1e300, torch::kFloat64).triu(1);
    const torch::Tensor context = torch::matmul(torch::softmax(scores, -1), v)
                                      .transpose(1, 2)
                                      .reshape({batch, length, a.heads * a.head_dim});
    const torch::Tensor attended =
        norm(torch::matmul(context, w("self_attn.o_proj.weight").t()), w("pre_ff_layernorm.weight"));
    const torch::Tensor gate_up =
        torch::matmul(attended, w("feed_forward.gate_up_proj.weight").t()) +
        adapter("feed_forward.gate_up_proj_adapter_list", attended);
    const torch::Tensor hidden =
        torch::gelu(gate_up.narrow(-1, 0, 6)) * gate_up.narrow(-1, 6, 6);
    const torch::Tensor expected = torch::matmul(
        torch::matmul(hidden, w("feed_forward.down_proj.weight").t()),
        weights.at(LayerTensorName(layer, "linear.weight")).t());
    const torch::Tensor got =
        blocks::SharedBlock(*config, weights, layer, precision, residual, embedded,
                            forward_internal::Capture(nullptr), nullptr);
    EXPECT_LE(testing::RelL2(got, expected), 1e-12) << "layer " << layer;
  }

  // Silence every hybrid layer's mixer: the blocks then reach nothing.
  Weights silent = testing::Clone(weights);
  for (const int64_t layer : config->shared.layers) {
    silent.at(LayerTensorName(layer, "mixer.out_proj.weight")).zero_();
  }
  Weights other_blocks = testing::Clone(silent);
  for (auto& [name, tensor] : other_blocks) {
    if (name.find("shared_transformer") != std::string::npos) tensor.normal_();
  }
  torch::manual_seed(9);
  const torch::Tensor ids = torch::randint(0, config->vocab_size, {2, 6}, torch::kLong);
  const auto logits = [&](const Weights& w) { return *Forward(*config, w, ids); };
  EXPECT_LE(testing::RelL2(logits(other_blocks), logits(silent)), 1e-12);
  // The control: with the mixers live, the same change moves the logits.
  Weights live = testing::Clone(weights);
  for (auto& [name, tensor] : live) {
    if (name.find("shared_transformer") != std::string::npos) tensor.normal_();
  }
  EXPECT_GT(testing::RelL2(logits(live), logits(weights)), 1e-3);
}


// transformers 5.17 with two shared blocks saves a copy of each at every
// hybrid layer, untied (its fixture, zamba2-blocks-untied, as
// make_hybrid_goldens.py first wrote it): refused, naming the tensor and why.
TEST(Zamba2ConfigTest, UntiedCopiesOfTheBlocksAreRefusedWithTheReason) {
  auto checkpoint =
      ReadCheckpoint(testing::GoldenDir("zamba2-blocks-untied") / "hf");
  ASSERT_FALSE(checkpoint.ok());
  EXPECT_EQ(checkpoint.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string message(checkpoint.status().message());
  EXPECT_NE(message.find("model.layers.4.shared_transformer."), std::string::npos) << message;
  EXPECT_NE(message.find("huggingface/transformers#47994"), std::string::npos) << message;
  EXPECT_NE(message.find("under their first layers (1, 2)"), std::string::npos) << message;
}

}  // namespace
}  // namespace icd::hf_hybrids_test
