// The forward of each family against HuggingFace's logits (golden fixtures).
#include "forward.h"

#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>

#include "config.h"
#include "io/safetensors.h"
#include "model.h"
#include "test_util.h"

namespace icd {
namespace {

// Tensors of a safetensors file by name; a read failure fails the test.
std::map<std::string, torch::Tensor> ReadTensors(const std::filesystem::path& file) {
  auto tensors = io::ReadSafetensors(file);
  if (!tensors.ok()) throw std::runtime_error(std::string(tensors.status().message()));
  std::map<std::string, torch::Tensor> by_name;
  for (const auto& [name, tensor] : *tensors) by_name[name] = tensor;
  return by_name;
}

struct Fixture {
  ModelConfig config;
  Weights weights;
  torch::Tensor input_ids;  // int64 [2, 17]
  torch::Tensor logits;     // float32 [2, 17, V]
};

Fixture LoadFixture(const std::string& name) {
  Fixture fixture;
  auto config = ReadConfigFile(testing::GoldenDir(name) / "hf" / "config.json");
  if (!config.ok()) throw std::runtime_error(std::string(config.status().message()));
  fixture.config = *config;
  fixture.weights = ReadTensors(testing::GoldenDir(name) / "hf" / "model.safetensors");
  auto golden = ReadTensors(testing::GoldenDir(name) / "golden.safetensors");
  fixture.input_ids = golden.at("input_ids");
  fixture.logits = golden.at("logits");
  return fixture;
}

Weights CastWeights(const Weights& weights, torch::ScalarType dtype) {
  Weights cast;
  for (const auto& [name, tensor] : weights) cast[name] = tensor.to(dtype);
  return cast;
}

torch::Tensor RunOrFail(const ModelConfig& config, const Weights& weights,
                        const torch::Tensor& input_ids) {
  auto logits = Forward(config, weights, input_ids);
  EXPECT_TRUE(logits.ok()) << logits.status();
  if (!logits.ok()) return torch::Tensor();
  EXPECT_EQ(logits->scalar_type(), torch::kFloat32);
  return *logits;
}

class GoldenForwardTest : public ::testing::TestWithParam<std::string> {};

// gtest names allow no '-': "mamba1-small" -> "mamba1_small".
std::string FixtureTestName(const ::testing::TestParamInfo<std::string>& param_info) {
  std::string name = param_info.param;
  for (char& c : name) {
    if (c == '-') c = '_';
  }
  return name;
}

TEST_P(GoldenForwardTest, Float32MatchesHf) {
  Fixture fixture = LoadFixture(GetParam());
  torch::Tensor logits = RunOrFail(fixture.config, fixture.weights, fixture.input_ids);
  ASSERT_TRUE(logits.defined());
  ASSERT_EQ(logits.sizes(), fixture.logits.sizes());
  const double rel = testing::RelL2(logits, fixture.logits);
  std::cout << GetParam() << " float32 rel L2 " << rel << "\n";
  EXPECT_LE(rel, 1e-4);
}

TEST_P(GoldenForwardTest, Float64MatchesHf) {
  Fixture fixture = LoadFixture(GetParam());
  torch::Tensor logits = RunOrFail(fixture.config, CastWeights(fixture.weights, torch::kFloat64),
                                   fixture.input_ids);
  ASSERT_TRUE(logits.defined());
  const double rel = testing::RelL2(logits, fixture.logits);
  std::cout << GetParam() << " float64 rel L2 " << rel << "\n";
  EXPECT_LE(rel, 1e-4);
}

TEST_P(GoldenForwardTest, BFloat16CloseToFloat32) {
  Fixture fixture = LoadFixture(GetParam());
  torch::Tensor reference = RunOrFail(fixture.config, fixture.weights, fixture.input_ids);
  torch::Tensor logits = RunOrFail(fixture.config, CastWeights(fixture.weights, torch::kBFloat16),
                                   fixture.input_ids);
  ASSERT_TRUE(reference.defined() && logits.defined());
  const double rel = testing::RelL2(logits, reference);
  std::cout << GetParam() << " bfloat16 rel L2 " << rel << "\n";
  EXPECT_LE(rel, 2e-2);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GoldenForwardTest,
                         ::testing::Values("mamba1-small", "mamba1-bias-untied", "mamba2-groups",
                                           "mamba2-one-group", "falcon-mamba-small"),
                         FixtureTestName);

TEST(ForwardTest, MissingTensorIsNamed) {
  Fixture fixture = LoadFixture("mamba1-small");
  const std::string name = "backbone.layers.1.mixer.x_proj.weight";
  fixture.weights.erase(name);
  auto logits = Forward(fixture.config, fixture.weights, fixture.input_ids);
  ASSERT_FALSE(logits.ok());
  EXPECT_EQ(logits.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(logits.status().message().find(name), std::string::npos) << logits.status();
}

TEST(ForwardTest, MisShapedTensorIsNamed) {
  Fixture fixture = LoadFixture("mamba2-groups");
  const std::string name = "backbone.layers.0.mixer.dt_bias";
  fixture.weights[name] = torch::zeros({3});
  auto logits = Forward(fixture.config, fixture.weights, fixture.input_ids);
  ASSERT_FALSE(logits.ok());
  EXPECT_EQ(logits.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(logits.status().message().find(name), std::string::npos) << logits.status();
}

TEST(ForwardTest, ExpiredDeadline) {
  Fixture fixture = LoadFixture("mamba1-small");
  CallContext ctx;
  ctx.deadline = std::chrono::steady_clock::now() - std::chrono::seconds(1);
  auto logits = Forward(fixture.config, fixture.weights, fixture.input_ids, ctx);
  ASSERT_FALSE(logits.ok());
  EXPECT_EQ(logits.status().code(), absl::StatusCode::kDeadlineExceeded);
}

TEST(ForwardTest, CancelledBetweenLayers) {
  Fixture fixture = LoadFixture("mamba1-small");
  CallContext ctx;
  int polls = 0;
  // Cancelled once the first layer has run.
  ctx.cancelled = [&polls] { return ++polls > 2; };
  auto logits = Forward(fixture.config, fixture.weights, fixture.input_ids, ctx);
  ASSERT_FALSE(logits.ok());
  EXPECT_EQ(logits.status().code(), absl::StatusCode::kCancelled);
}

TEST(ForwardTest, TokenOutOfRange) {
  Fixture fixture = LoadFixture("mamba1-small");
  torch::Tensor ids = fixture.input_ids.clone();
  ids[0][0] = fixture.config.vocab_size;
  auto logits = Forward(fixture.config, fixture.weights, ids);
  ASSERT_FALSE(logits.ok());
  EXPECT_EQ(logits.status().code(), absl::StatusCode::kInvalidArgument);
}

// With one group, mamba_ssm's per-group gated norm is HF's whole-d_inner one.
TEST(ForwardTest, GroupedGatedNormMatchesHfWithOneGroup) {
  Fixture fixture = LoadFixture("mamba2-one-group");
  fixture.config.grouped_gated_norm = true;
  torch::Tensor logits = RunOrFail(fixture.config, fixture.weights, fixture.input_ids);
  ASSERT_TRUE(logits.defined());
  EXPECT_LE(testing::RelL2(logits, fixture.logits), 1e-4);
}

// With two groups the flag changes the function.
TEST(ForwardTest, GroupedGatedNormDiffersWithTwoGroups) {
  Fixture fixture = LoadFixture("mamba2-groups");
  torch::Tensor whole = RunOrFail(fixture.config, fixture.weights, fixture.input_ids);
  fixture.config.grouped_gated_norm = true;
  torch::Tensor grouped = RunOrFail(fixture.config, fixture.weights, fixture.input_ids);
  ASSERT_TRUE(whole.defined() && grouped.defined());
  const double rel = testing::RelL2(grouped, whole);
  std::cout << "mamba2-groups grouped vs whole gated norm rel L2 " << rel << "\n";
  EXPECT_GT(rel, 1e-3);
}

// mamba_ssm's D_has_hdim: D per channel, here each head's D repeated.
TEST(ForwardTest, PerChannelSkipMatchesPerHead) {
  Fixture fixture = LoadFixture("mamba2-groups");
  fixture.config.d_has_hdim = true;
  for (int64_t layer = 0; layer < fixture.config.n_layer; ++layer) {
    const std::string name = "backbone.layers." + std::to_string(layer) + ".mixer.D";
    fixture.weights[name] = fixture.weights[name].repeat_interleave(fixture.config.headdim);
  }
  torch::Tensor logits = RunOrFail(fixture.config, fixture.weights, fixture.input_ids);
  ASSERT_TRUE(logits.defined());
  EXPECT_LE(testing::RelL2(logits, fixture.logits), 1e-4);
}

// mamba_ssm rmsnorm=False: no mixer.norm, the output is y * silu(z).
TEST(ForwardTest, UngatedNormRunsWithoutNormWeight) {
  Fixture fixture = LoadFixture("mamba2-one-group");
  fixture.config.gated_norm = false;
  auto rejected = Forward(fixture.config, fixture.weights, fixture.input_ids);
  ASSERT_FALSE(rejected.ok());  // the unused norm weight is named, not ignored
  EXPECT_NE(rejected.status().message().find("mixer.norm.weight"), std::string::npos);
  for (int64_t layer = 0; layer < fixture.config.n_layer; ++layer) {
    fixture.weights.erase("backbone.layers." + std::to_string(layer) + ".mixer.norm.weight");
  }
  torch::Tensor logits = RunOrFail(fixture.config, fixture.weights, fixture.input_ids);
  ASSERT_TRUE(logits.defined());
  EXPECT_GT(testing::RelL2(logits, fixture.logits), 1e-3);
}

}  // namespace
}  // namespace icd
