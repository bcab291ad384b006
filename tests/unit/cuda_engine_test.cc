// The engine on a CUDA device, as a GPU node runs it (issue 20): each
// model's calls on a stream of its own (engine/model_stream.h), so a call
// does not queue behind the default stream nor behind another model's calls,
// and concurrent calls on two models stay exact; a CUDA out-of-memory during a
// call is RESOURCE_EXHAUSTED and leaves the model as it was; a memory budget
// below a model refuses its load before anything reaches the device. Part of
// cuda_test (label gpu): skipped without a device.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <cstdint>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "icd/core/engine.h"
#include "icd/core/memory_budget.h"
#include "test_util.h"

#ifdef ICD_HAVE_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Sleep.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace icd {
namespace {

using testing::GoldenDir;
using testing::ReadGolden;

#define ICD_SKIP_WITHOUT_CUDA_HEADERS()                                         \
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();                                              \
  if (!kHaveCudaHeaders) GTEST_SKIP() << "built without CUDA's headers (ICD_HAVE_CUDA)"

#ifdef ICD_HAVE_CUDA
constexpr bool kHaveCudaHeaders = true;
#else
constexpr bool kHaveCudaHeaders = false;
#endif

EngineOptions WithModelStreams() {
  EngineOptions options{"cuda:0"};
  options.model_streams = true;
  return options;
}

std::string Fixture(const std::string& name) { return (GoldenDir(name) / "hf").string(); }

void LoadFloat32(Engine& engine, const std::string& name, const std::string& fixture) {
  LoadOptions options;
  options.dtype = "float32";
  auto info = engine.Load(name, Fixture(fixture), options);
  ASSERT_TRUE(info.ok()) << info.status();
  ASSERT_EQ(info->device.rfind("cuda", 0), 0u) << info->device;
}

#ifdef ICD_HAVE_CUDA
double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

// Spins device 0's default stream for at least `seconds`: clock64 cycles
// counted at the SM clock's peak.
void SpinDefaultStream(double seconds) {
  int kilohertz = 0;
  ASSERT_EQ(cudaDeviceGetAttribute(&kilohertz, cudaDevAttrClockRate, 0), cudaSuccess);
  const c10::cuda::CUDAStreamGuard guard(c10::cuda::getDefaultCUDAStream(0));
  at::cuda::sleep(static_cast<int64_t>(seconds * kilohertz * 1e3));
}
#endif

TEST(ModelStreamTest, CallsDoNotWaitForTheDefaultStream) {
  ICD_SKIP_WITHOUT_CUDA_HEADERS();
#ifdef ICD_HAVE_CUDA
  Engine engine(WithModelStreams());
  LoadFloat32(engine, "m", "mamba1-small");
  ASSERT_TRUE(engine.Verify("m").ok());  // first-use costs (cuBLAS handles) out of the way
  const c10::cuda::CUDAStream default_stream = c10::cuda::getDefaultCUDAStream(0);

  // The control: work queued on the default stream does wait for the spin.
  SpinDefaultStream(1.0);
  auto start = std::chrono::steady_clock::now();
  {
    const c10::cuda::CUDAStreamGuard guard(default_stream);
    (void)torch::ones({8}, torch::Device("cuda:0")).sum().item<float>();
  }
  const double on_default = Seconds(start);
  EXPECT_GT(on_default, 0.5) << "the spin did not hold the default stream";

  // A call on the model runs on the model's stream: it ends while the spin
  // still holds the default stream.
  SpinDefaultStream(2.0);
  start = std::chrono::steady_clock::now();
  auto verified = engine.Verify("m");
  const double verify_seconds = Seconds(start);
  const bool default_still_busy = !default_stream.query();
  default_stream.synchronize();
  ASSERT_TRUE(verified.ok()) << verified.status();
  EXPECT_TRUE(verified->ok);
  EXPECT_TRUE(default_still_busy) << "Verify took " << verify_seconds
                                  << " s: it waited for the default stream's spin";
  EXPECT_LT(verify_seconds, 1.0);
#endif
}

// Applies on one model, evaluates and latency runs on another, at once: all
// exact, with model streams or without (every call on the default stream).
void ConcurrentCallsStayExact(bool model_streams) {
  EngineOptions engine_options = WithModelStreams();
  engine_options.model_streams = model_streams;
  Engine engine(engine_options);
  LoadFloat32(engine, "applied", "mamba1-small");
  LoadFloat32(engine, "read", "mamba2-one-group");
  const testing::Golden golden = ReadGolden("mamba2-one-group");
  const EvaluateRequest request{golden.input_ids, golden.batch, /*return_logits=*/true};
  auto reference = engine.Evaluate("read", request);
  ASSERT_TRUE(reference.ok()) << reference.status();
  auto groups = engine.Symmetries("applied");
  ASSERT_TRUE(groups.ok()) << groups.status();

  constexpr int kRounds = 6;
  int applied = 0;
  int evaluated_equal = 0;
  int timed = 0;
  std::thread applier([&] {
    std::mt19937_64 rng(20);
    for (int round = 0; round < kRounds; ++round) {
      auto report = engine.Apply("applied", testing::RandomPermutations(*groups, rng));
      if (report.ok() && report->verified && report->correctness.ok) ++applied;
    }
  });
  std::thread reader([&] {
    for (int round = 0; round < 3 * kRounds; ++round) {
      auto result = engine.Evaluate("read", request);
      if (result.ok() && result->logits == reference->logits) ++evaluated_equal;
    }
  });
  std::thread timer([&] {
    LatencyOptions options;
    options.model = "read";
    options.iters = 5;
    for (int round = 0; round < kRounds; ++round) {
      if (engine.MeasureLatency(options).ok()) ++timed;
    }
  });
  applier.join();
  reader.join();
  timer.join();
  EXPECT_EQ(applied, kRounds);
  EXPECT_EQ(evaluated_equal, 3 * kRounds) << "an Evaluate beside the applies changed its logits";
  EXPECT_EQ(timed, kRounds);
  auto verified = engine.Verify("applied");
  ASSERT_TRUE(verified.ok()) << verified.status();
  EXPECT_TRUE(verified->ok) << verified->rel_l2;
  EXPECT_EQ(engine.Info("applied")->version, 1u + kRounds);  // both loaded at version 1
}

TEST(ModelStreamTest, ConcurrentCallsOnTwoModelsStayExact) {
  ICD_SKIP_WITHOUT_CUDA_HEADERS();
  ConcurrentCallsStayExact(/*model_streams=*/true);
}

TEST(ModelStreamTest, ConcurrentCallsOnTheDefaultStreamStayExact) {
  ICD_SKIP_WITHOUT_CUDA_HEADERS();
  ConcurrentCallsStayExact(/*model_streams=*/false);
}

TEST(CudaMemoryTest, OutOfMemoryIsResourceExhaustedAndLeavesTheModel) {
  ICD_SKIP_WITHOUT_CUDA_HEADERS();
#ifdef ICD_HAVE_CUDA
  Engine engine{EngineOptions{"cuda:0"}};
  LoadFloat32(engine, "m", "mamba1-small");
  auto before = engine.Verify("m");
  ASSERT_TRUE(before.ok()) << before.status();
  const auto tensors_before = testing::TensorsByName(engine, "m");
  const uint64_t version = engine.Info("m")->version;

  // The allocator may hold what it holds now and 32 MiB more: a real CUDA
  // out-of-memory from LibTorch's allocator, not a budget's refusal.
  c10::cuda::CUDACachingAllocator::emptyCache();
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(0);
  const double total = static_cast<double>(at::cuda::getDeviceProperties(0)->totalGlobalMem);
  const double allowed = static_cast<double>(stats.reserved_bytes[0].current + (32 << 20));
  c10::cuda::CUDACachingAllocator::setMemoryFraction(allowed / total, 0);
  // 8 x 16384 tokens: the forward's activations alone are far past 32 MiB.
  const EvaluateRequest large{std::vector<int64_t>(8 * 16384, 1), 8, /*return_logits=*/false};
  auto refused = engine.Evaluate("m", large);
  c10::cuda::CUDACachingAllocator::setMemoryFraction(1.0, 0);

  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  EXPECT_NE(refused.status().message().find("out of memory on the model's device"),
            std::string::npos)
      << refused.status();
  auto after = engine.Verify("m");
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_TRUE(after->ok);
  EXPECT_EQ(after->rel_l2, before->rel_l2);
  EXPECT_EQ(after->max_abs, before->max_abs);
  EXPECT_EQ(engine.Info("m")->version, version);
  const auto tensors_after = testing::TensorsByName(engine, "m");
  ASSERT_EQ(tensors_after.size(), tensors_before.size());
  for (const auto& [name, tensor] : tensors_before) {
    EXPECT_EQ(tensors_after.at(name).data, tensor.data) << name;
  }
  // The control: with the allocator's whole device back, the same request
  // runs. The refusal was the memory, not the request.
  auto unlimited = engine.Evaluate("m", large);
  EXPECT_TRUE(unlimited.ok()) << unlimited.status();
#endif
}

TEST(CudaMemoryTest, ABudgetBelowTheModelRefusesItsLoadBeforeItAllocates) {
  ICD_SKIP_WITHOUT_CUDA_HEADERS();
#ifdef ICD_HAVE_CUDA
  EngineOptions options{"cuda:0"};
  ASSERT_TRUE(AddMemoryBudget("cuda:0=1", options.memory_budget).ok());  // 1 MiB
  Engine engine(options);
  (void)torch::zeros({1}, torch::Device("cuda:0"));  // the allocator initialised
  const int64_t allocated =
      c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].current;
  LoadOptions load;
  load.dtype = "float32";
  // A trained reference model: 4 MB in float32, over the 1 MiB budget (the
  // golden fixtures are smaller than that).
  const std::string reference = testing::ReferenceModelDir("mamba1-pydoc");
  auto refused = engine.Load("m", reference, load);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  EXPECT_NE(refused.status().message().find("cuda:0"), std::string::npos) << refused.status();
  EXPECT_EQ(c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].current,
            allocated);
  EXPECT_TRUE(engine.List().empty());
  for (const DeviceMemory& memory : engine.Memory()) {
    EXPECT_EQ(memory.model_bytes, 0) << memory.device;
  }
  // The control: without the budget the same load succeeds.
  Engine unlimited{EngineOptions{"cuda:0"}};
  auto loaded = unlimited.Load("m", reference, load);
  EXPECT_TRUE(loaded.ok()) << loaded.status();
#endif
}

}  // namespace
}  // namespace icd
