// One model's layers over several devices on a GPU machine (issue 23): split
// over the GPU and the CPU (every GPU machine has both), and over two GPUs
// where there are two (skipped below that). The split model's logits match
// the model on one GPU; every group applied to both leaves the same bytes,
// the check passes, the export reloads to the same logits; capture, a decode
// session and latency run on it, the latency with its transfer cost. Part of
// cuda_test (label gpu).
#include <gtest/gtest.h>

#include <cstdio>
#include <random>
#include <string>

#include "icd/core/engine.h"
#include "test_util.h"

namespace icd {
namespace {

using testing::GoldenDir;

double RelL2(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff += (a[i] - b[i]) * static_cast<double>(a[i] - b[i]);
    norm += b[i] * static_cast<double>(b[i]);
  }
  return std::sqrt(diff / norm);
}

// `placement` of `fixture` in float32 against the same on cuda:0 alone.
void PlacedMatchesOneGpu(const std::string& fixture, const std::string& placement,
                         size_t expected_ranges, double bound) {
  Engine engine{EngineOptions{"cuda:0"}};
  const std::string source = (GoldenDir(fixture) / "hf").string();
  LoadOptions whole;
  whole.dtype = "float32";
  ASSERT_TRUE(engine.Load("whole", source, whole).ok());
  LoadOptions split = whole;
  split.placement = placement;
  auto info = engine.Load("split", source, split);
  ASSERT_TRUE(info.ok()) << info.status();
  ASSERT_EQ(info->placement.size(), expected_ranges) << placement;
  int64_t bytes = 0;
  for (const LayerRange& range : info->placement) bytes += range.bytes;
  EXPECT_EQ(bytes, info->device_bytes);

  const testing::Golden golden = testing::ReadGolden(fixture);
  const EvaluateRequest request{golden.input_ids, golden.batch, /*return_logits=*/true};
  auto logits = [&](const std::string& model) {
    auto result = engine.Evaluate(model, request);
    EXPECT_TRUE(result.ok()) << result.status();
    return result.ok() ? result->logits : std::vector<float>{};
  };
  const double before = RelL2(logits("split"), logits("whole"));
  EXPECT_LE(before, bound) << placement;

  testing::ApplySamePermutations(engine, {"split", "whole"}, 11);
  EXPECT_EQ(testing::TensorBytes(engine, "split"), testing::TensorBytes(engine, "whole"));
  auto verify = engine.Verify("split");
  ASSERT_TRUE(verify.ok()) << verify.status();
  EXPECT_TRUE(verify->ok) << verify->rel_l2;
  const double permuted = RelL2(logits("split"), logits("whole"));
  EXPECT_LE(permuted, bound);

  const testing::TempDir temp;
  ASSERT_TRUE(engine.Export("split", (temp.path() / "export").string()).ok());
  ASSERT_TRUE(engine.Load("reloaded", (temp.path() / "export").string(), whole).ok());
  EXPECT_LE(RelL2(logits("reloaded"), logits("whole")), 1e-6);

  CaptureRequest capture;
  capture.model = "split";
  capture.input_ids = golden.input_ids;
  capture.batch = golden.batch;
  auto captured = engine.Capture(capture);
  EXPECT_TRUE(captured.ok()) << captured.status();
  // N:M's saliency reads the weights of every layer that reads the residual
  // stream: on a placed model, from every device.
  capture.groups = {"residual"};
  capture.solver.objective = "nm_sparsity";
  auto nm = engine.Capture(capture);
  EXPECT_TRUE(nm.ok()) << nm.status();

  LatencyOptions latency;
  latency.model = "split";
  latency.mode = "decode";
  latency.seq_len = 16;
  latency.iters = 5;
  auto timed = engine.MeasureLatency(latency);
  ASSERT_TRUE(timed.ok()) << timed.status();
  EXPECT_EQ(timed->timing.execution, "eager");
  EXPECT_EQ(timed->timing.method, "steady_clock");
  EXPECT_GT(timed->timing.transfer_ms, 0);
  latency.counter_repeats = 1;
  testing::ExpectError(engine.MeasureLatency(latency).status(),
                       absl::StatusCode::kFailedPrecondition, "placed over several");
  std::printf("[placement] %s over %s: logits vs one GPU rel_l2 %.3g, after every group %.3g; "
              "decode step %.3f ms of which transfers %.4f ms\n",
              fixture.c_str(), placement.c_str(), before, permuted, timed->timing.median_ms,
              timed->timing.transfer_ms);
}

TEST(CudaPlacementTest, SplitOverTheGpuAndTheCpuMatchesOneGpu) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  PlacedMatchesOneGpu("mamba1-bias-untied", "cuda:0=0-0,cpu=1-1", 2, 1e-5);
  PlacedMatchesOneGpu("mamba2-groups", "cpu=0-0,cuda:0=1-1", 2, 1e-5);
}

TEST(CudaPlacementTest, SplitOverTwoGpusMatchesOneGpu) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  if (torch::cuda::device_count() < 2) GTEST_SKIP() << "fewer than two CUDA devices";
  PlacedMatchesOneGpu("mamba1-bias-untied", "auto", 2, 1e-6);
  PlacedMatchesOneGpu("mamba2-groups", "cuda:1=0-0,cuda:0=1-1", 2, 1e-6);
}

}  // namespace
}  // namespace icd
