// NVIDIA's Nemotron-H (io/config.cc ParseNemotronH): its config as
// transformers reads it, and its MLP layer (blocks/mlp.cc). Every group alone
// and all together are exact on a random Nemotron-H in symmetry_test
// (RandomConfigTest nemotron_h_odd); loading, applying and exporting under
// its own tensor names in engine_test.
#include <gtest/gtest.h>

#include "blocks/mixer.h"
#include "io/config.h"
#include "test_util.h"

// A namespace of its own: model_test compiles its files as one unit.
namespace icd::nemotron_h_test {
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
  refused(R"("hybrid_override_pattern": "M-E*")", "mixture-of-experts layers (layer 2, 'E')");
  refused(R"("hybrid_override_pattern": "M+")", "has '+' at layer 1");
  refused(R"("hybrid_override_pattern": "")", "lists no layer");
  refused(R"("n_groups": 3)", "is missing");  // no pattern at all
  refused(R"("hybrid_override_pattern": "M", "n_groups": 3)", "multiple of n_groups");
  refused(R"("hybrid_override_pattern": "-", "mlp_hidden_act": "gelu")", "'gelu' (relu2 only)");
  refused(R"("layers_block_type": ["mamba", "conv"])", "unknown layer kind conv");
}

// The MLP layer computes down(relu(up(x))^2), with its biases.
TEST(MlpMixerTest, ComputesDownOfSquaredRelu) {
  auto config = ParseConfig(Config(R"("hybrid_override_pattern": "-", "mlp_bias": true)"), "n");
  ASSERT_TRUE(config.ok()) << config.status();
  const Weights weights = testing::RandomWeights(*config, 7, torch::kFloat64);
  torch::manual_seed(3);
  const torch::Tensor normed = torch::randn({2, 5, 16}, torch::kFloat64);
  forward_internal::Precision precision;
  precision.compute = precision.accumulate = torch::kFloat64;
  const torch::Tensor out =
      blocks::MixerAt(*config, 0)
          .forward(*config, weights, 0, precision, normed, forward_internal::Capture(nullptr),
                   nullptr, CallContext{});
  auto w = [&weights](const char* name) {
    return weights.at(std::string("backbone.layers.0.mixer.") + name);
  };
  const torch::Tensor hidden = torch::relu(normed.matmul(w("up_proj.weight").t()) + w("up_proj.bias"));
  const torch::Tensor expected =
      (hidden * hidden).matmul(w("down_proj.weight").t()) + w("down_proj.bias");
  EXPECT_LE(testing::RelL2(out, expected), 1e-14);
}

}  // namespace
}  // namespace icd::nemotron_h_test
