// GPU smoke test: the public engine API on "cuda" against HF's goldens.
// Every golden fixture (every layout) is loaded on cuda in float32, checked
// against the golden logits, permuted in all groups, verified, checked again,
// exported and reloaded on cuda; bfloat16 on cuda applies and verifies.
// Skipped (never failed) where torch::cuda::is_available() is false (CI).
#include <gtest/gtest.h>

#include <cstdio>
#include <random>

#include "icd/core/engine.h"
#include "test_util.h"

namespace icd {
namespace {

using testing::GoldenDir;
using testing::ReadGolden;
using testing::RelL2;

using Case = testing::GoldenCase;

constexpr double kGoldenTolerance = 1e-4;  // design.md: vs HF goldens in float32

class CudaTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
    golden_ = ReadGolden(GetParam().fixture);
    source_ = (GoldenDir(GetParam().fixture) / GetParam().layout).string();
  }

  torch::Tensor Logits(const std::string& model) {
    EvaluateRequest request{golden_.input_ids, golden_.batch, /*return_logits=*/true};
    auto result = engine_.Evaluate(model, request);
    EXPECT_TRUE(result.ok()) << result.status();
    if (!result.ok()) return torch::zeros_like(golden_.logits);
    return torch::tensor(result->logits).reshape(result->shape);
  }

  std::string Name() const { return GetParam().fixture + "/" + GetParam().layout; }

  Engine engine_{EngineOptions{"cuda"}};
  testing::Golden golden_;
  std::string source_;
  testing::TempDir temp_;
};

TEST_P(CudaTest, Float32GoldenApplyVerifyExport) {
  LoadOptions options;
  options.dtype = "float32";
  auto info = engine_.Load("m", source_, options);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->device.rfind("cuda", 0), 0u) << info->device;
  EXPECT_EQ(info->dtype, DType::kFloat32);

  const double forward = RelL2(Logits("m"), golden_.logits);
  EXPECT_LE(forward, kGoldenTolerance);
  auto verify = engine_.Verify("m");
  ASSERT_TRUE(verify.ok()) << verify.status();
  EXPECT_TRUE(verify->ok) << verify->rel_l2;

  auto groups = engine_.Symmetries("m");
  ASSERT_TRUE(groups.ok()) << groups.status();
  std::mt19937_64 rng(7);
  auto report = engine_.Apply("m", testing::RandomPermutations(*groups, rng));
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->verified);
  EXPECT_TRUE(report->correctness.ok) << report->correctness.rel_l2;
  auto verify_after = engine_.Verify("m");
  ASSERT_TRUE(verify_after.ok()) << verify_after.status();
  EXPECT_TRUE(verify_after->ok) << verify_after->rel_l2;
  const double permuted = RelL2(Logits("m"), golden_.logits);
  EXPECT_LE(permuted, kGoldenTolerance);

  const auto target = temp_.path() / "export";
  auto exported = engine_.Export("m", target.string());
  ASSERT_TRUE(exported.ok()) << exported.status();
  auto reloaded = engine_.Load("r", target.string(), options);
  ASSERT_TRUE(reloaded.ok()) << reloaded.status();
  EXPECT_EQ(reloaded->device.rfind("cuda", 0), 0u) << reloaded->device;
  const double reload = RelL2(Logits("r"), golden_.logits);
  EXPECT_LE(reload, kGoldenTolerance);

  std::printf("[cuda] %s device %s groups %zu forward rel_l2 %.3g, apply check rel_l2 %.3g, "
              "permuted rel_l2 %.3g, reloaded rel_l2 %.3g\n",
              Name().c_str(), info->device.c_str(), groups->size(), forward,
              report->correctness.rel_l2, permuted, reload);
}

TEST_P(CudaTest, BFloat16ApplyVerify) {
  LoadOptions options;
  options.dtype = "bfloat16";
  auto info = engine_.Load("b", source_, options);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->dtype, DType::kBFloat16);
  auto groups = engine_.Symmetries("b");
  ASSERT_TRUE(groups.ok()) << groups.status();
  std::mt19937_64 rng(8);
  auto report = engine_.Apply("b", testing::RandomPermutations(*groups, rng));
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->verified);
  EXPECT_TRUE(report->correctness.ok) << report->correctness.rel_l2;
  auto verify = engine_.Verify("b");
  ASSERT_TRUE(verify.ok()) << verify.status();
  EXPECT_TRUE(verify->ok) << verify->rel_l2;
  const double vs_golden = RelL2(Logits("b"), golden_.logits);
  std::printf("[cuda] %s bfloat16 apply check rel_l2 %.3g (tol %.3g), verify rel_l2 %.3g, "
              "vs float32 golden rel_l2 %.3g (informative)\n",
              Name().c_str(), report->correctness.rel_l2, report->correctness.tolerance,
              verify->rel_l2, vs_golden);
}

// Traces on the GPU: capture every group on cuda (statistics on the device),
// solve, apply all together: still HF's function.
TEST_P(CudaTest, CaptureSolvesEveryGroupAndAppliesExactly) {
  for (const char* dtype : {"float32", "bfloat16"}) {
    LoadOptions options;
    options.dtype = dtype;
    const std::string name = std::string("capture-") + dtype;
    ASSERT_TRUE(engine_.Load(name, source_, options).ok());
    CaptureRequest request;
    request.model = name;
    request.input_ids = golden_.input_ids;
    request.batch = golden_.batch;
    auto results = engine_.Capture(request);
    ASSERT_TRUE(results.ok()) << dtype << ": " << results.status();
    std::vector<Permutation> permutations;
    for (const PermutationResult& result : *results) permutations.push_back(result.permutation);
    auto report = engine_.Apply(name, permutations);
    ASSERT_TRUE(report.ok()) << report.status();
    EXPECT_TRUE(report->correctness.ok) << dtype << " rel_l2 " << report->correctness.rel_l2;
    if (std::string(dtype) == "float32") {
      EXPECT_LE(RelL2(Logits(name), golden_.logits), kGoldenTolerance);
    }
    std::printf("[cuda] %s %s capture: %zu groups solved, apply check rel_l2 %.3g\n",
                Name().c_str(), dtype, results->size(), report->correctness.rel_l2);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaTest, ::testing::ValuesIn(testing::GoldenCases()),
                         [](const auto& param_info) {
                           std::string name = param_info.param.fixture + "_" + param_info.param.layout;
                           for (char& c : name) {
                             if (c == '-') c = '_';
                           }
                           return name;
                         });

}  // namespace
}  // namespace icd
