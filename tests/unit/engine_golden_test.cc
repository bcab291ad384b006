// Exactness against HuggingFace's own logits: every golden fixture, in every
// layout it ships, before and after random valid permutations of every group
// alone and of all groups together.
#include <gtest/gtest.h>

#include <cstdio>
#include <map>
#include <mutex>
#include <random>

#include "icd/core/engine.h"
#include "test_util.h"

namespace icd {
namespace {

using testing::ReadGolden;
using testing::RelL2;

using Case = testing::GoldenCase;

using testing::kGoldenTolerance;

// Largest relative L2 seen against the goldens after a permutation, per
// architecture.
std::map<std::string, double>& Worst() {
  static std::map<std::string, double> worst;
  return worst;
}

class GoldenTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    golden_ = ReadGolden(GetParam().fixture);
    auto info = engine_.Load("m", (testing::GoldenDir(GetParam().fixture) / GetParam().layout).string());
    ASSERT_TRUE(info.ok()) << info.status();
    info_ = *info;
  }

  torch::Tensor Logits() {
    EvaluateRequest request{golden_.input_ids, golden_.batch, /*return_logits=*/true};
    auto result = engine_.Evaluate("m", request);
    EXPECT_TRUE(result.ok()) << result.status();
    if (!result.ok()) return {};
    return torch::tensor(result->logits).reshape(result->shape);
  }

  std::map<std::string, std::string> AllBytes() { return testing::TensorBytes(engine_, "m"); }

  // Applies, checks the report, the moved weights and the golden logits.
  void ApplyAndCheck(const std::vector<Permutation>& perms, const std::string& what) {
    const auto before = AllBytes();
    auto report = engine_.Apply("m", perms);
    ASSERT_TRUE(report.ok()) << what << ": " << report.status();
    EXPECT_TRUE(report->verified);
    EXPECT_TRUE(report->correctness.ok) << what << " rel " << report->correctness.rel_l2;
    EXPECT_EQ(report->correctness.top1_agreement, 1.0) << what;
    EXPECT_EQ(report->version, ++expected_version_);
    bool identity = true;
    for (const auto& perm : perms) identity = identity && testing::IsIdentity(perm.index);
    if (!identity) {
      EXPECT_NE(AllBytes(), before) << what << ": no weight moved";
    }
    const double rel = RelL2(Logits(), golden_.logits);
    EXPECT_LE(rel, kGoldenTolerance) << what;
    // Per architecture (a hybrid's own name; the pure families' names).
    std::string family = info_.architecture.empty() ? std::string(FamilyName(info_.family))
                                                    : info_.architecture;
    Worst()[family] = std::max(Worst()[family], rel);
  }

  Engine engine_;
  testing::Golden golden_;
  ModelInfo info_;
  uint64_t expected_version_ = 1;
};

TEST_P(GoldenTest, ForwardMatchesHuggingFace) {
  const double rel = RelL2(Logits(), golden_.logits);
  EXPECT_LE(rel, kGoldenTolerance);
  std::printf("[golden] %s/%s forward rel_l2 %.3g\n", GetParam().fixture.c_str(),
              GetParam().layout.c_str(), rel);
  auto verify = engine_.Verify("m");
  ASSERT_TRUE(verify.ok()) << verify.status();
  EXPECT_TRUE(verify->ok);
  EXPECT_EQ(verify->rel_l2, 0.0);  // same weights, same kernels: bit-identical
}

TEST_P(GoldenTest, EveryGroupAloneIsASymmetry) {
  auto groups = engine_.Symmetries("m");
  ASSERT_TRUE(groups.ok()) << groups.status();
  for (uint64_t seed : {1u, 2u, 3u}) {
    std::mt19937_64 rng(seed);
    for (const GroupInfo& group : *groups) {
      ApplyAndCheck({{group.name, testing::RandomPermutation(group, rng)}},
                    group.name + " seed " + std::to_string(seed));
    }
  }
}

TEST_P(GoldenTest, AllGroupsTogetherAreASymmetry) {
  auto groups = engine_.Symmetries("m");
  ASSERT_TRUE(groups.ok()) << groups.status();
  for (uint64_t seed : {4u, 5u, 6u}) {
    std::mt19937_64 rng(seed);
    std::vector<Permutation> perms;
    for (const GroupInfo& group : *groups) {
      perms.push_back({group.name, testing::RandomPermutation(group, rng)});
    }
    ApplyAndCheck(perms, "all groups seed " + std::to_string(seed));
  }
}

// The pure Mamba fixtures' groups, as the design lists them (the hybrids':
// engine_test's *LoadsAppliesAndExports* tests).
class MambaGoldenTest : public GoldenTest {};

TEST_P(MambaGoldenTest, GroupsAreThoseOfTheDesign) {
  auto groups = engine_.Symmetries("m");
  ASSERT_TRUE(groups.ok());
  const auto& dims = info_.dims;
  std::map<std::string, const GroupInfo*> by_name;
  for (const GroupInfo& g : *groups) by_name[g.name] = &g;
  ASSERT_TRUE(by_name.count("residual"));
  EXPECT_EQ(by_name["residual"]->size, dims.at("d_model"));
  const int64_t layers = dims.at("n_layer");
  if (info_.family == Family::kMamba2) {
    EXPECT_EQ(groups->size(), static_cast<size_t>(1 + 3 * layers));
    const GroupInfo* heads = by_name.at("layers.0.heads");
    EXPECT_EQ(heads->size, dims.at("nheads"));
    EXPECT_EQ(heads->whole, dims.at("nheads") / dims.at("ngroups"));
    const GroupInfo* headdim = by_name.at("layers.1.headdim");
    EXPECT_EQ(headdim->size, dims.at("d_inner"));
    EXPECT_EQ(headdim->block, dims.at("headdim"));
    const GroupInfo* state = by_name.at("layers.1.state");
    EXPECT_EQ(state->size, dims.at("ngroups") * dims.at("d_state"));
    EXPECT_EQ(state->block, dims.at("d_state"));
  } else {
    EXPECT_EQ(groups->size(), static_cast<size_t>(1 + 3 * layers));
    EXPECT_EQ(by_name.at("layers.0.inner")->size, dims.at("d_inner"));
    EXPECT_EQ(by_name.at("layers.1.state")->size, dims.at("d_state"));
    EXPECT_EQ(by_name.at("layers.1.dt_rank")->size, dims.at("dt_rank"));
  }
  // The layout's own names: mamba_ssm calls the embedding "embedding".
  const std::string embedding = GetParam().layout == "mamba_ssm" ? "backbone.embedding.weight"
                                                                 : "backbone.embeddings.weight";
  EXPECT_EQ(by_name["residual"]->members.front().tensor, embedding);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GoldenTest, ::testing::ValuesIn(testing::GoldenCases()),
                         [](const auto& param_info) {
                           return testing::GoldenCaseLabel(param_info.param);
                         });
INSTANTIATE_TEST_SUITE_P(Hybrids, GoldenTest, ::testing::ValuesIn(testing::HybridGoldenCases()),
                         [](const auto& param_info) {
                           return testing::GoldenCaseLabel(param_info.param);
                         });
INSTANTIATE_TEST_SUITE_P(Fixtures, MambaGoldenTest, ::testing::ValuesIn(testing::GoldenCases()),
                         [](const auto& param_info) {
                           return testing::GoldenCaseLabel(param_info.param);
                         });

// Reports the largest relative difference seen per family (closing note).
class WorstReporter : public ::testing::Environment {
 public:
  void TearDown() override {
    for (const auto& [family, rel] : Worst()) {
      std::printf("[golden] largest rel_l2 after permutation, %s: %.3g\n", family.c_str(), rel);
    }
  }
};
const auto* const kReporter = ::testing::AddGlobalTestEnvironment(new WorstReporter);

}  // namespace
}  // namespace icd
