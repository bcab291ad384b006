// The forward of each family against HuggingFace's logits (golden fixtures),
// and its capture points for trace statistics.
#include "forward/forward.h"
#include "forward/decode.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "blocks/shapes.h"
#include "io/checkpoint.h"
#include "io/config.h"
#include "io/safetensors.h"
#include "model.h"
#include "apply/symmetry.h"
#include "forward/forward_internal.h"
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

// The forward of `fixture` is refused (InvalidArgument) naming `tensor`.
void ExpectRefusedNaming(const Fixture& fixture, const std::string& tensor) {
  auto logits = Forward(fixture.config, fixture.weights, fixture.input_ids);
  ASSERT_FALSE(logits.ok());
  EXPECT_EQ(logits.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(logits.status().message().find(tensor), std::string::npos) << logits.status();
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

// What a decode projection may read before the kernel ahead of it ends
// (fused::FewRowsLinear's weight_settled): the map's own tensor, never a
// copy made for the call (a dtype conversion, Falcon-H1's scaled in_proj).
TEST(ForwardTest, OnlyTheModelsOwnTensorIsSettled) {
  Weights weights;
  weights["w"] = torch::randn({4, 8});
  const torch::Tensor& own = weights.at("w");
  EXPECT_TRUE(forward_internal::IsModelTensor(weights, "w", own));
  EXPECT_TRUE(forward_internal::IsModelTensor(
      weights, "w", forward_internal::TensorAs(weights, "w", torch::kFloat32)));  // no copy
  EXPECT_FALSE(forward_internal::IsModelTensor(
      weights, "w", forward_internal::TensorAs(weights, "w", torch::kFloat64)));
  EXPECT_FALSE(forward_internal::IsModelTensor(weights, "w", own * 2.0));
  EXPECT_FALSE(forward_internal::IsModelTensor(weights, "w", own.clone()));
  EXPECT_FALSE(forward_internal::IsModelTensor(weights, "v", own));  // not in the map
}

TEST(ForwardTest, MissingTensorIsNamed) {
  Fixture fixture = LoadFixture("mamba1-small");
  const std::string name = "backbone.layers.1.mixer.x_proj.weight";
  fixture.weights.erase(name);
  ExpectRefusedNaming(fixture, name);
}

TEST(ForwardTest, MisShapedTensorIsNamed) {
  Fixture fixture = LoadFixture("mamba2-groups");
  const std::string name = "backbone.layers.0.mixer.dt_bias";
  fixture.weights[name] = torch::zeros({3});
  ExpectRefusedNaming(fixture, name);
}

TEST(ForwardTest, ExpiredDeadline) {
  Fixture fixture = LoadFixture("mamba1-small");
  auto logits = Forward(fixture.config, fixture.weights, fixture.input_ids,
                        testing::PastDeadlineContext());
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

// The CPU's float32 gated norm is one native pass (forward_mamba2.cc's
// GatedNormLoop), and the conv's silu is taken inside the conv's own pass
// (forward.cc's ConvRows): against the float64 forward (LibTorch's ops) within
// float32's rounding, for norms over all of d_inner and over groups, the
// gate after and before the norm, group widths with and without a whole
// vector of lanes (a group of 20 channels: a tail of 4); its result does not depend on the
// number of threads (bitwise), and the check bites (the gate's order swapped
// is another function).
TEST(ForwardTest, NativeGatedNormMatchesFloat64) {
  for (const int64_t head_dim : {int64_t{5}, int64_t{6}}) {
    for (const bool grouped : {false, true}) {
      for (const bool norm_first : {false, true}) {
        auto config = ParseConfig(
            R"({"model_type": "mamba2", "num_hidden_layers": 2, "vocab_size": 64,
                "state_size": 8, "expand": 2, "num_heads": 8, "n_groups": 2, "conv_kernel": 4,
                "use_bias": false, "use_conv_bias": true, "chunk_size": 16,
                "tie_word_embeddings": false, "head_dim": )" +
                std::to_string(head_dim) + R"(, "hidden_size": )" + std::to_string(4 * head_dim) +
                "}",
            "config");
        ASSERT_TRUE(config.ok()) << config.status();
        config->grouped_gated_norm = grouped;
        config->norm_before_gate = norm_first;
        const Weights wide = testing::RandomWeights(*config, 41, torch::kFloat64);
        const torch::Tensor ids = torch::randint(0, 64, {2, 37}, torch::kInt64);
        const std::string what = "head_dim " + std::to_string(head_dim) +
                                 (grouped ? " grouped" : " whole") + (norm_first ? " norm first" : "");
        const torch::Tensor reference = RunOrFail(*config, wide, ids);
        const Weights narrow = CastWeights(wide, torch::kFloat32);
        const int threads = at::get_num_threads();
        at::set_num_threads(1);
        const torch::Tensor one_thread = RunOrFail(*config, narrow, ids);
        at::set_num_threads(3);
        const torch::Tensor three_threads = RunOrFail(*config, narrow, ids);
        at::set_num_threads(threads);
        ASSERT_TRUE(reference.defined() && one_thread.defined() && three_threads.defined()) << what;
        EXPECT_LE(testing::RelL2(one_thread.to(torch::kFloat64), reference), 1e-5) << what;
        EXPECT_TRUE(torch::equal(one_thread, three_threads)) << what;
        ModelConfig swapped = *config;
        swapped.norm_before_gate = !norm_first;
        const torch::Tensor other = RunOrFail(swapped, narrow, ids);
        ASSERT_TRUE(other.defined()) << what;
        EXPECT_GT(testing::RelL2(other.to(torch::kFloat64), reference), 1e-3) << what;
      }
    }
  }
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


// ---------------------------------------------------------------------------
// Capture points (forward.h CaptureSink).

// Every row set handed out, copied, by group; wants exactly `wanted`.
class RecordingSink final : public CaptureSink {
 public:
  explicit RecordingSink(std::set<std::string> wanted) : wanted_(std::move(wanted)) {}
  bool Wants(const std::string& group) const override { return wanted_.count(group) > 0; }
  void Add(const std::string& group, const torch::Tensor& rows) override {
    rows_[group].push_back(rows.clone());
  }
  const std::map<std::string, std::vector<torch::Tensor>>& rows() const { return rows_; }

 private:
  std::set<std::string> wanted_;
  std::map<std::string, std::vector<torch::Tensor>> rows_;
};

using RowSets = std::map<std::string, std::vector<torch::Tensor>>;

std::set<std::string> GroupNames(const FamilySpec& spec) {
  std::set<std::string> names;
  for (const GroupInfo& group : spec) names.insert(group.name);
  return names;
}

// Rows of every group in the config's spec; the logits go to `logits`.
RowSets CaptureEveryGroup(const ModelConfig& config, const Weights& weights,
                          const torch::Tensor& input_ids, torch::Tensor* logits = nullptr) {
  RecordingSink sink(GroupNames(BuildSpec(config)));
  auto result = Forward(config, weights, input_ids, {}, &sink);
  EXPECT_TRUE(result.ok()) << result.status();
  if (result.ok() && logits != nullptr) *logits = *result;
  return sink.rows();
}

struct Model {
  ModelConfig config;
  Weights weights;
  torch::Tensor input_ids;  // the golden ids, int64 [2, 17]
};

// A golden fixture in one layout, through the checkpoint reader.
Model LoadModel(const std::string& fixture, const std::string& layout) {
  auto checkpoint = ReadCheckpoint(testing::GoldenDir(fixture) / layout);
  if (!checkpoint.ok()) throw std::runtime_error(std::string(checkpoint.status().message()));
  Model model{checkpoint->config, checkpoint->weights, torch::Tensor()};
  model.input_ids = ReadTensors(testing::GoldenDir(fixture) / "golden.safetensors").at("input_ids");
  return model;
}

std::string GoldenCaseName(const ::testing::TestParamInfo<testing::GoldenCase>& param_info) {
  return testing::GoldenCaseLabel(param_info.param);
}

class CaptureGoldenTest : public ::testing::TestWithParam<testing::GoldenCase> {};

TEST_P(CaptureGoldenTest, LogitsBitwiseUnchanged) {
  const Model model = LoadModel(GetParam().fixture, GetParam().layout);
  torch::Tensor plain = RunOrFail(model.config, model.weights, model.input_ids);
  torch::Tensor captured;
  const RowSets rows = CaptureEveryGroup(model.config, model.weights, model.input_ids, &captured);
  ASSERT_TRUE(plain.defined() && captured.defined());
  EXPECT_FALSE(rows.empty());
  EXPECT_TRUE(torch::equal(plain, captured));
}

// Every group gets [B·L, group size] rows: n_layer + 1 sets for the residual
// stream, B and C for a state group, one set otherwise; nothing else arrives
// (pure Mamba models; the hybrids' groups are captured in engine_test).
class MambaCaptureGoldenTest : public CaptureGoldenTest {};

TEST_P(MambaCaptureGoldenTest, EveryGroupGetsRowsOfItsWidth) {
  const Model model = LoadModel(GetParam().fixture, GetParam().layout);
  const FamilySpec spec = BuildSpec(model.config);
  const RowSets rows = CaptureEveryGroup(model.config, model.weights, model.input_ids);
  const int64_t tokens = model.input_ids.numel();
  EXPECT_EQ(rows.size(), spec.size());
  for (const GroupInfo& group : spec) {
    const bool is_state = group.name.size() > 6 &&
                          group.name.compare(group.name.size() - 6, 6, ".state") == 0;
    const size_t expected_sets = group.name == "residual"
                                     ? static_cast<size_t>(model.config.n_layer + 1)
                                     : (is_state ? 2u : 1u);
    auto found = rows.find(group.name);
    ASSERT_NE(found, rows.end()) << "no rows for " << group.name;
    ASSERT_EQ(found->second.size(), expected_sets) << group.name;
    for (const torch::Tensor& set : found->second) {
      EXPECT_EQ(set.sizes(), (std::vector<int64_t>{tokens, group.size})) << group.name;
      EXPECT_TRUE(set.is_floating_point()) << group.name;
      EXPECT_EQ(set.device(), model.weights.at("backbone.embeddings.weight").device());
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CaptureGoldenTest, ::testing::ValuesIn(testing::GoldenCases()),
                         GoldenCaseName);
INSTANTIATE_TEST_SUITE_P(Hybrids, CaptureGoldenTest,
                         ::testing::ValuesIn(testing::HybridGoldenCases()), GoldenCaseName);
INSTANTIATE_TEST_SUITE_P(Fixtures, MambaCaptureGoldenTest,
                         ::testing::ValuesIn(testing::GoldenCases()), GoldenCaseName);

// A sink that wants one group gets that group only, and no sink at all
// (the default) is what the golden tests run.
TEST(CaptureTest, OnlyWantedGroupsArrive) {
  const Model model = LoadModel("mamba2-groups", "hf");
  RecordingSink sink({"layers.1.heads"});
  auto logits = Forward(model.config, model.weights, model.input_ids, {}, &sink);
  ASSERT_TRUE(logits.ok()) << logits.status();
  ASSERT_EQ(sink.rows().size(), 1u);
  EXPECT_EQ(sink.rows().begin()->first, "layers.1.heads");
  RecordingSink nothing({});
  ASSERT_TRUE(Forward(model.config, model.weights, model.input_ids, {}, &nothing).ok());
  EXPECT_TRUE(nothing.rows().empty());
}

// Equivariance: permuting group g's weights by p moves g's rows to
// old_rows[:, p]. Other groups' rows stay put, except where g's permutation
// acts on their coordinates too: a Mamba-2 head move carries the head's
// headdim channels and, moving whole groups, their B/C state rows.
std::vector<int64_t> ColumnsAfter(const ModelConfig& config, const GroupInfo& permuted,
                                  const std::vector<int64_t>& index, const GroupInfo& observed) {
  if (observed.name == permuted.name) return index;
  std::vector<int64_t> columns(static_cast<size_t>(observed.size));
  for (int64_t j = 0; j < observed.size; ++j) columns[static_cast<size_t>(j)] = j;
  const std::string suffix = ".heads";
  const bool heads = permuted.name.size() > suffix.size() &&
                     permuted.name.compare(permuted.name.size() - suffix.size(), suffix.size(),
                                           suffix) == 0;
  if (!heads) return columns;
  const std::string layer = permuted.name.substr(0, permuted.name.size() - suffix.size());
  if (observed.name == layer + ".headdim") {
    const int64_t head_dim = config.headdim;
    for (int64_t c = 0; c < observed.size; ++c) {
      const int64_t old_head = index[static_cast<size_t>(c / head_dim)];
      columns[static_cast<size_t>(c)] = old_head * head_dim + c % head_dim;
    }
  } else if (observed.name == layer + ".state") {
    const int64_t heads_per_group = config.nheads / config.ngroups;
    const int64_t state = config.d_state;
    for (int64_t c = 0; c < observed.size; ++c) {
      const int64_t old_group =
          index[static_cast<size_t>(c / state * heads_per_group)] / heads_per_group;
      columns[static_cast<size_t>(c)] = old_group * state + c % state;
    }
  }
  return columns;
}

// A golden model in float64, optionally under other config options; the
// tensors the options add or reshape are drawn at random, those they drop go.
struct EquivarianceCase {
  std::string name;
  std::string fixture;
  std::string layout;
  void (*adjust)(ModelConfig&) = nullptr;
};

void PrintTo(const EquivarianceCase& c, std::ostream* os) { *os << c.name; }

Model LoadFloat64(const EquivarianceCase& c) {
  Model model = LoadModel(c.fixture, c.layout);
  if (c.adjust != nullptr) c.adjust(model.config);
  const auto expected = ExpectedShapes(model.config);
  torch::manual_seed(5);
  Weights conformed;
  for (const auto& [name, shape] : expected) {
    auto found = model.weights.find(name);
    conformed[name] = found != model.weights.end() && found->second.sizes().vec() == shape
                          ? found->second.to(torch::kFloat64)
                          : 0.5 * torch::randn(shape, torch::kFloat64);
  }
  model.weights = std::move(conformed);
  return model;
}

class CaptureEquivarianceTest : public ::testing::TestWithParam<EquivarianceCase> {};

TEST_P(CaptureEquivarianceTest, RowsFollowEachGroupsPermutation) {
  const Model model = LoadFloat64(GetParam());
  const FamilySpec spec = BuildSpec(model.config);
  const RowSets before = CaptureEveryGroup(model.config, model.weights, model.input_ids);
  ASSERT_EQ(before.size(), spec.size());
  std::mt19937_64 rng(21);
  double worst = 0;
  for (const GroupInfo& group : spec) {
    std::vector<int64_t> index = testing::RandomPermutation(group, rng);
    for (int attempt = 0; attempt < 100 && testing::IsIdentity(index); ++attempt) {
      index = testing::RandomPermutation(group, rng);
    }
    ASSERT_FALSE(testing::IsIdentity(index)) << group.name;
    Weights permuted;
    for (const auto& [name, tensor] : model.weights) permuted[name] = tensor.clone();
    ApplyGather(group, index, permuted);
    const RowSets after = CaptureEveryGroup(model.config, permuted, model.input_ids);
    ASSERT_EQ(after.size(), spec.size());
    for (const GroupInfo& observed : spec) {
      const std::vector<int64_t> columns = ColumnsAfter(model.config, group, index, observed);
      const torch::Tensor column_index = torch::tensor(columns, torch::kInt64);
      const auto& old_sets = before.at(observed.name);
      const auto& new_sets = after.at(observed.name);
      ASSERT_EQ(old_sets.size(), new_sets.size());
      for (size_t k = 0; k < old_sets.size(); ++k) {
        const double rel = testing::RelL2(new_sets[k], old_sets[k].index_select(1, column_index));
        EXPECT_LE(rel, 1e-10) << "permuting " << group.name << ": " << observed.name << " set "
                              << k;
        worst = std::max(worst, rel);
      }
    }
    // The check bites: the permuted group's own rows did move.
    EXPECT_GT(testing::RelL2(after.at(group.name)[0], before.at(group.name)[0]), 1e-3)
        << group.name;
  }
  std::printf("[capture] %s: %zu groups, worst rel L2 %.3g\n", GetParam().name.c_str(),
              spec.size(), worst);
}

INSTANTIATE_TEST_SUITE_P(
    Models, CaptureEquivarianceTest,
    ::testing::Values(
        EquivarianceCase{"mamba1_small", "mamba1-small", "hf"},
        EquivarianceCase{"mamba1_small_mamba_ssm", "mamba1-small", "mamba_ssm"},
        EquivarianceCase{"mamba1_bias_untied", "mamba1-bias-untied", "hf"},
        EquivarianceCase{"mamba1_layernorm", "mamba1-small", "hf",
                         [](ModelConfig& c) { c.layer_norm = true; }},
        EquivarianceCase{"falcon_mamba_small", "falcon-mamba-small", "hf"},
        EquivarianceCase{"mamba2_groups", "mamba2-groups", "hf"},
        EquivarianceCase{"mamba2_groups_grouped_norm_before_gate", "mamba2-groups", "hf",
                         [](ModelConfig& c) {
                           c.grouped_gated_norm = true;
                           c.norm_before_gate = true;
                         }},
        EquivarianceCase{"mamba2_groups_hdim_ungated", "mamba2-groups", "hf",
                         [](ModelConfig& c) {
                           c.d_has_hdim = true;
                           c.gated_norm = false;
                         }},
        EquivarianceCase{"mamba2_one_group_mamba_ssm", "mamba2-one-group", "mamba_ssm"}),
    [](const auto& param_info) { return param_info.param.name; });


// ---------------------------------------------------------------------------
// Recurrent state (forward.h RecurrentState): prefill, then one token per
// call, is the same function as one forward over the whole sequence.

// Logits of Forward over the first `prefill` tokens into a fresh state, then
// of one call per remaining token, concatenated over time [B, L, V].
torch::Tensor DecodeLogits(const ModelConfig& config, const Weights& weights,
                           const torch::Tensor& input_ids, int64_t prefill) {
  RecurrentState state;
  std::vector<torch::Tensor> pieces;
  auto first = Forward(config, weights, input_ids.narrow(1, 0, prefill), {}, nullptr, &state);
  EXPECT_TRUE(first.ok()) << first.status();
  if (!first.ok()) return torch::Tensor();
  pieces.push_back(*first);
  for (int64_t position = prefill; position < input_ids.size(1); ++position) {
    auto step =
        Forward(config, weights, input_ids.narrow(1, position, 1), {}, nullptr, &state);
    EXPECT_TRUE(step.ok()) << "position " << position << ": " << step.status();
    if (!step.ok()) return torch::Tensor();
    pieces.push_back(*step);
  }
  return torch::cat(pieces, 1);
}

class DecodeGoldenTest : public ::testing::TestWithParam<testing::GoldenCase> {};

// Prefill lengths below and above d_conv - 1 (the fixtures' d_conv is 3 or
// 4), so the conv history is carried both part-zero and whole; the hybrids'
// attention caches grow from 1, 2 and 9 positions.
TEST_P(DecodeGoldenTest, PrefillThenStepsMatchesOneForward) {
  const Model model = LoadModel(GetParam().fixture, GetParam().layout);
  ASSERT_GE(model.config.d_conv, 3);
  // float64: only the summation order of matmuls over L vs 1 rows differs.
  for (const auto& [dtype, tolerance] :
       {std::make_pair(torch::kFloat64, 1e-10), std::make_pair(torch::kFloat32, 1e-5)}) {
    const Weights weights = CastWeights(model.weights, dtype);
    const torch::Tensor whole = RunOrFail(model.config, weights, model.input_ids);
    ASSERT_TRUE(whole.defined());
    for (const int64_t prefill : {int64_t{1}, int64_t{2}, int64_t{9}}) {
      const torch::Tensor decoded = DecodeLogits(model.config, weights, model.input_ids, prefill);
      ASSERT_TRUE(decoded.defined());
      ASSERT_EQ(decoded.sizes(), whole.sizes());
      const double rel = testing::RelL2(decoded, whole);
      std::printf("[decode] %s/%s %s prefill %ld: rel L2 %.3g\n", GetParam().fixture.c_str(),
                  GetParam().layout.c_str(), c10::toString(dtype), static_cast<long>(prefill),
                  rel);
      EXPECT_LE(rel, tolerance) << c10::toString(dtype) << " prefill " << prefill;
    }
    // The check bites: the last token without the state is another function.
    const int64_t last = model.input_ids.size(1) - 1;
    const torch::Tensor alone =
        RunOrFail(model.config, weights, model.input_ids.narrow(1, last, 1));
    ASSERT_TRUE(alone.defined());
    EXPECT_GT(testing::RelL2(alone, whole.narrow(1, last, 1)), 1e-3);
  }
}

// An empty state changes nothing in the logits (bitwise), and afterwards
// holds one layer state per layer with forward.h's shapes (a pure Mamba
// model's: a Mamba state in every layer).
class MambaDecodeGoldenTest : public DecodeGoldenTest {};

TEST_P(MambaDecodeGoldenTest, EmptyStateIsTheStatelessForward) {
  const Model model = LoadModel(GetParam().fixture, GetParam().layout);
  const ModelConfig& config = model.config;
  const torch::Tensor plain = RunOrFail(config, model.weights, model.input_ids);
  RecurrentState state;
  auto logits = Forward(config, model.weights, model.input_ids, {}, nullptr, &state);
  ASSERT_TRUE(logits.ok()) << logits.status();
  EXPECT_TRUE(torch::equal(*logits, plain));
  const int64_t batch = model.input_ids.size(0);
  const bool mamba2 = config.family == Family::kMamba2;
  const std::vector<int64_t> conv_shape = {
      batch, mamba2 ? config.d_inner + 2 * config.ngroups * config.d_state : config.d_inner,
      config.d_conv - 1};
  const std::vector<int64_t> ssm_shape =
      mamba2 ? std::vector<int64_t>{batch, config.nheads, config.headdim, config.d_state}
             : std::vector<int64_t>{batch, config.d_inner, config.d_state};
  ASSERT_EQ(static_cast<int64_t>(state.layers.size()), config.n_layer);
  for (const LayerState& layer : state.layers) {
    EXPECT_EQ(layer.conv_history.sizes().vec(), conv_shape);
    EXPECT_EQ(layer.ssm_state.sizes().vec(), ssm_shape);
    EXPECT_EQ(layer.ssm_state.scalar_type(), torch::kFloat32);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, DecodeGoldenTest, ::testing::ValuesIn(testing::GoldenCases()),
                         GoldenCaseName);
INSTANTIATE_TEST_SUITE_P(Hybrids, DecodeGoldenTest,
                         ::testing::ValuesIn(testing::HybridGoldenCases()), GoldenCaseName);
INSTANTIATE_TEST_SUITE_P(Fixtures, MambaDecodeGoldenTest,
                         ::testing::ValuesIn(testing::GoldenCases()), GoldenCaseName);

// A state of another batch is refused by name; a refused or cancelled call
// leaves the state as it was.
TEST(DecodeTest, RefusedOrCancelledCallLeavesStateUnchanged) {
  const Model model = LoadModel("mamba2-groups", "hf");
  RecurrentState state;
  ASSERT_TRUE(
      Forward(model.config, model.weights, model.input_ids.narrow(1, 0, 5), {}, nullptr, &state)
          .ok());
  const RecurrentState before = state;
  auto check_unchanged = [&] {
    ASSERT_EQ(state.layers.size(), before.layers.size());
    for (size_t i = 0; i < state.layers.size(); ++i) {
      EXPECT_TRUE(state.layers[i].conv_history.is_same(before.layers[i].conv_history));
      EXPECT_TRUE(state.layers[i].ssm_state.is_same(before.layers[i].ssm_state));
    }
  };
  const torch::Tensor one_row = model.input_ids.narrow(0, 0, 1).narrow(1, 5, 1);  // batch 1
  auto refused = Forward(model.config, model.weights, one_row, {}, nullptr, &state);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("conv_history"), std::string::npos)
      << refused.status();
  check_unchanged();

  CallContext ctx;
  int polls = 0;
  ctx.cancelled = [&polls] { return ++polls > 2; };  // after the first layer ran
  auto cancelled =
      Forward(model.config, model.weights, model.input_ids.narrow(1, 5, 1), ctx, nullptr, &state);
  ASSERT_FALSE(cancelled.ok());
  EXPECT_EQ(cancelled.status().code(), absl::StatusCode::kCancelled);
  check_unchanged();
}

// Issue 14: a long forward checks its context inside a layer (at most every
// 256 scan steps for Mamba-1, 1024 for Mamba-2), not only between layers; sequences over 4096 tokens
// run in chunks of time whose logits are those of one pass (rounding aside).
class WantsNothing : public CaptureSink {
 public:
  bool Wants(const std::string&) const override { return false; }
  void Add(const std::string&, const torch::Tensor&) override {}
};

TEST(ForwardTest, LongSequencesStopInsideALayerAndChunkFaithfully) {
  for (const char* name : {"mamba1-small", "mamba2-groups"}) {
    SCOPED_TRACE(name);
    const Fixture fixture = LoadFixture(name);
    torch::manual_seed(14);
    const torch::Tensor ids =
        torch::randint(fixture.config.vocab_size, {2, 5000}, torch::dtype(torch::kInt64));
    // Batch 2 goes in chunks of 2048 tokens, each row alone in chunks of 4096:
    // two chunkings of the same function.
    auto chunked = Forward(fixture.config, fixture.weights, ids);
    ASSERT_TRUE(chunked.ok());
    for (int64_t row = 0; row < 2; ++row) {
      auto alone = Forward(fixture.config, fixture.weights, ids.narrow(0, row, 1));
      ASSERT_TRUE(alone.ok());
      const torch::Tensor mine = chunked->narrow(0, row, 1);
      const double rel = ((mine - *alone).norm() / alone->norm()).item<double>();
      EXPECT_LT(rel, 1e-5) << "row " << row;
    }
    // Capturing leaves the logits bitwise unchanged, chunks and all.
    WantsNothing sink;
    auto captured = Forward(fixture.config, fixture.weights, ids, {}, &sink);
    ASSERT_TRUE(captured.ok());
    EXPECT_TRUE(torch::equal(*captured, *chunked));

    // Polls: before the forward (1), before layer 0 (2), then inside layer
    // 0's scan (3): the stop comes from within the layer.
    CallContext ctx;
    int polls = 0;
    ctx.cancelled = [&polls] { return ++polls > 2; };
    auto stopped = Forward(fixture.config, fixture.weights, ids, ctx);
    ASSERT_FALSE(stopped.ok());
    EXPECT_EQ(stopped.status().code(), absl::StatusCode::kCancelled);
    EXPECT_NE(stopped.status().message().find("in layer 0"), std::string::npos)
        << stopped.status();
  }
}

// ForwardPrechecked is Forward without the input checks: same logits.
TEST(DecodeTest, PrecheckedForwardIsForward) {
  const Model model = LoadModel("mamba1-small", "hf");
  ASSERT_TRUE(CheckForwardInputs(model.config, model.weights, model.input_ids).ok());
  auto plain = Forward(model.config, model.weights, model.input_ids);
  auto prechecked = ForwardPrechecked(model.config, model.weights, model.input_ids);
  ASSERT_TRUE(plain.ok() && prechecked.ok());
  EXPECT_TRUE(torch::equal(*plain, *prechecked));
  torch::Tensor bad = model.input_ids.clone();
  bad[0][0] = model.config.vocab_size;
  EXPECT_EQ(CheckForwardInputs(model.config, model.weights, bad).code(),
            absl::StatusCode::kInvalidArgument);
}

// ---- Decode sessions: Mark and Rewind ----------------------------------------

// The hardware counters' user replay runs a decode step once per pass from
// the same state (latency.cc): after Rewind the steps after Mark repeat bit
// for bit, for a Mamba layer's recurrent state, an attention layer's growing
// cache and experts chosen by value; without Rewind the same token gives
// other logits (the check can fail).
TEST(DecodeSessionTest, RewindRepeatsTheStepsAfterMark) {
  for (const auto& [fixture, execution] :
       std::vector<std::pair<const char*, decode::Execution>>{
           {"mamba1-small", decode::Execution::kEager},
           {"mamba2-groups", decode::Execution::kEager},
           {"jamba-small", decode::Execution::kEager},
           {"nemotron_h-experts", decode::Execution::kEager},
           {"mamba1-small", decode::Execution::kInPlace},
           {"mamba2-groups", decode::Execution::kInPlace}}) {
    SCOPED_TRACE(std::string(fixture) + " " + decode::ExecutionName(execution));
    const Model model = LoadModel(fixture, "hf");
    const torch::Tensor& ids = model.input_ids;
    auto token = [&](int64_t position) { return ids.narrow(1, position, 1).contiguous(); };
    auto session = decode::Session::Start(model.config, model.weights, ids.narrow(1, 0, 10),
                                          execution, {});
    ASSERT_TRUE(session.ok()) << session.status();
    decode::Session& steps = **session;
    testing::ExpectError(steps.Rewind(), absl::StatusCode::kFailedPrecondition, "no marked state");
    ASSERT_TRUE(steps.Step(token(10), {}).ok());
    ASSERT_TRUE(steps.Mark().ok());
    auto first = steps.Step(token(11), {});
    auto second = steps.Step(token(12), {});
    ASSERT_TRUE(first.ok() && second.ok());
    for (int rewinds = 0; rewinds < 2; ++rewinds) {
      ASSERT_TRUE(steps.Rewind().ok());
      auto again = steps.Step(token(11), {});
      auto second_again = steps.Step(token(12), {});
      ASSERT_TRUE(again.ok() && second_again.ok());
      EXPECT_TRUE(torch::equal(*again, *first)) << "rewind " << rewinds;
      EXPECT_TRUE(torch::equal(*second_again, *second)) << "rewind " << rewinds;
    }
    auto unrewound = steps.Step(token(11), {});
    ASSERT_TRUE(unrewound.ok());
    EXPECT_FALSE(torch::equal(*unrewound, *first));
  }
}

// Steps both sessions through ids[:, from:], one token at a time, and
// expects the same logits bit for bit at every position.
void ExpectTheSameSteps(decode::Session& expected_session, decode::Session& session,
                        const torch::Tensor& ids, int64_t from) {
  for (int64_t position = from; position < ids.size(1); ++position) {
    const torch::Tensor token = ids.narrow(1, position, 1).contiguous();
    auto expected = expected_session.Step(token, {});
    auto got = session.Step(token, {});
    ASSERT_TRUE(expected.ok() && got.ok()) << "position " << position;
    EXPECT_TRUE(torch::equal(*got, *expected))
        << "position " << position << ": rel " << testing::RelL2(*got, *expected);
  }
}

// The in-place session (the graph's step, one launch each: what the hardware
// counters count) writes its state in place and computes the scan's
// constants once, and gives the eager session's logits bit for bit, step by
// step; a model that cannot be captured (attention, experts) decodes eagerly.
TEST(DecodeSessionTest, InPlaceStepsAreTheEagerSteps) {
  for (const char* fixture : {"mamba1-small", "mamba2-groups", "mamba_ssm-mamba2-gate-first",
                              "jamba-small", "nemotron_h-experts"}) {
    SCOPED_TRACE(fixture);
    const std::string layout =
        std::string(fixture).rfind("mamba_ssm-", 0) == 0 ? "mamba_ssm" : "hf";
    const Model model = LoadModel(fixture, layout);
    const torch::Tensor& ids = model.input_ids;
    const torch::Tensor prefill = ids.narrow(1, 0, 6);
    auto eager = decode::Session::Start(model.config, model.weights, prefill,
                                        decode::Execution::kEager, {});
    auto in_place = decode::Session::Start(model.config, model.weights, prefill,
                                           decode::Execution::kInPlace, {});
    ASSERT_TRUE(eager.ok() && in_place.ok());
    const bool capturable = !blocks::Attends(model.config) && model.config.moe.experts == 0;
    EXPECT_EQ((*in_place)->execution(),
              capturable ? decode::Execution::kInPlace : decode::Execution::kEager);
    ExpectTheSameSteps(**eager, **in_place, ids, 6);
  }
}

// The same in float64 (the scan's cached constants must keep float64: a
// dt_bias cached in float32 moved Mamba-2's steps by ~1e-9 rel), and a Mark
// taken before the first step, whose Rewind also forgets the constants that
// step computed (the step after Rewind launches what the step after Mark did).
TEST(DecodeSessionTest, InPlaceStepsInFloat64AndFromAMarkBeforeTheFirstStep) {
  const char* configs[] = {
      R"({"model_type": "mamba", "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 50,
          "state_size": 8, "expand": 2, "time_step_rank": 4, "use_bias": true,
          "use_conv_bias": true, "tie_word_embeddings": false})",
      R"({"model_type": "mamba2", "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 50,
          "state_size": 16, "expand": 2, "head_dim": 8, "num_heads": 8, "n_groups": 2,
          "conv_kernel": 4, "chunk_size": 8, "tie_word_embeddings": false})"};
  torch::manual_seed(33);
  const torch::Tensor ids = torch::randint(0, 50, {2, 12}, torch::kInt64);
  for (const char* json : configs) {
    auto config = ParseConfig(json, "config");
    ASSERT_TRUE(config.ok()) << config.status();
    SCOPED_TRACE(config->family == Family::kMamba2 ? "mamba2" : "mamba1");
    const Weights weights = testing::RandomWeights(*config, 34, torch::kFloat64);
    const torch::Tensor prefill = ids.narrow(1, 0, 4);
    auto eager = decode::Session::Start(*config, weights, prefill, decode::Execution::kEager, {});
    auto in_place =
        decode::Session::Start(*config, weights, prefill, decode::Execution::kInPlace, {});
    ASSERT_TRUE(eager.ok() && in_place.ok());
    ASSERT_EQ((*in_place)->execution(), decode::Execution::kInPlace);
    ASSERT_TRUE((*in_place)->Mark().ok());  // before any step
    const torch::Tensor first_token = ids.narrow(1, 4, 1).contiguous();
    auto first = (*in_place)->Step(first_token, {});
    ASSERT_TRUE(first.ok());
    ASSERT_TRUE((*in_place)->Rewind().ok());
    auto again = (*in_place)->Step(first_token, {});
    ASSERT_TRUE(again.ok());
    EXPECT_TRUE(torch::equal(*again, *first));
    ASSERT_TRUE((*eager)->Step(first_token, {}).ok());
    ExpectTheSameSteps(**eager, **in_place, ids, 5);
  }
}

}  // namespace
}  // namespace icd
