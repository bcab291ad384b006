// MeasureLatency: the order statistics it reports (latency_stats.h) on known
// samples, and the engine call on golden models on the CPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "icd/core/engine.h"
#include "forward/latency.h"
#include "forward/latency_stats.h"
#include "counters/hardware_counters.h"
#include "test_util.h"

namespace icd {
namespace {

using latency::MedianInterval95;
using latency::Quantile;
using latency::Summarize;

// ---------------------------------------------------------------- counters

// Launches summed by kernel in order of first launch; bytes and sectors add,
// the hit rate is weighted by sectors.
TEST(HardwareCountersTest, SumsByKernelAndWeighsTheHitRateBySectors) {
  const std::vector<KernelCounters> launches = {
      {"gemm", 1, 100, 10, 1000, 0.5, 2000},
      {"scan", 1, 50, 5, 3000, 0.9, 1000},
      {"gemm", 1, 300, 30, 1000, 0.7, 4000},
  };
  const std::vector<KernelCounters> kernels = counters::ByKernel(launches);
  ASSERT_EQ(kernels.size(), 2u);
  EXPECT_EQ(kernels[0].kernel, "gemm");
  EXPECT_EQ(kernels[0].launches, 2);
  EXPECT_DOUBLE_EQ(kernels[0].dram_read_bytes, 400);
  EXPECT_DOUBLE_EQ(kernels[0].dram_write_bytes, 40);
  EXPECT_DOUBLE_EQ(kernels[0].l2_sectors, 2000);
  EXPECT_DOUBLE_EQ(kernels[0].l2_hit_rate, 0.6);
  EXPECT_DOUBLE_EQ(kernels[0].duration_ns, 6000);
  EXPECT_EQ(kernels[1].kernel, "scan");
  const KernelCounters total = counters::Total(launches);
  EXPECT_EQ(total.kernel, "total");
  EXPECT_EQ(total.launches, 3);
  EXPECT_DOUBLE_EQ(total.dram_read_bytes, 450);
  EXPECT_DOUBLE_EQ(total.l2_sectors, 5000);
  EXPECT_DOUBLE_EQ(total.l2_hit_rate, (0.5 * 1000 + 0.9 * 3000 + 0.7 * 1000) / 5000);
  EXPECT_EQ(counters::Total({}).launches, 0);
  EXPECT_EQ(counters::Total({}).l2_hit_rate, 0);
  EXPECT_EQ(counters::MetricNames().size(), 5u);
}

// Without a device the collection is refused with its reason; the work never
// runs, and nothing is returned as if counted.
TEST(HardwareCountersTest, RefusedWithoutADevice) {
  if (torch::cuda::is_available()) GTEST_SKIP() << "a CUDA device is present (cuda_test counts)";
  bool ran = false;
  auto counted = counters::Collect(0, [&ran] {
    ran = true;
    return absl::OkStatus();
  });
  ASSERT_FALSE(counted.ok());
  EXPECT_EQ(counted.status().code(), absl::StatusCode::kFailedPrecondition) << counted.status();
  EXPECT_NE(counted.status().message().find("hardware counters"), std::string::npos);
  EXPECT_FALSE(ran);
}

// ---------------------------------------------------------------- statistics

TEST(LatencyStatsTest, QuantilesInterpolateBetweenRanks) {
  const std::vector<double> sorted = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  EXPECT_DOUBLE_EQ(Quantile(sorted, 0.5), 5.5);
  EXPECT_DOUBLE_EQ(Quantile(sorted, 0.1), 1.9);  // position 0.9
  EXPECT_DOUBLE_EQ(Quantile(sorted, 0.9), 9.1);  // position 8.1
  EXPECT_DOUBLE_EQ(Quantile(sorted, 0.0), 1);
  EXPECT_DOUBLE_EQ(Quantile(sorted, 1.0), 10);
  EXPECT_DOUBLE_EQ(Quantile({4.0}, 0.9), 4.0);
}

// The ranks of standard tables of the order-statistic interval (1-based
// ranks 2 and 9 for n = 10, 6 and 15 for n = 20, 40 and 61 for n = 100).
TEST(LatencyStatsTest, MedianIntervalRanks) {
  struct Ranks {
    size_t n, low, high;
  };
  for (const Ranks& c : {Ranks{1, 0, 0}, Ranks{2, 0, 1}, Ranks{5, 0, 4}, Ranks{6, 0, 5},
                         Ranks{8, 0, 7}, Ranks{9, 1, 7}, Ranks{10, 1, 8}, Ranks{20, 5, 14},
                         Ranks{100, 39, 60}, Ranks{1000, 468, 531}}) {
    const latency::RankInterval ranks = MedianInterval95(c.n);
    EXPECT_EQ(ranks.low, c.low) << "n = " << c.n;
    EXPECT_EQ(ranks.high, c.high) << "n = " << c.n;
  }
}

// From n = 6 on, the interval covers the median with probability >= 95%
// (exact binomial sums), and the next narrower one would not.
TEST(LatencyStatsTest, MedianIntervalCoversAndIsTightest) {
  for (size_t n = 6; n <= 60; ++n) {
    std::vector<double> pmf(n + 1);  // Binomial(n, 1/2)
    double coefficient = 1;
    for (size_t j = 0; j <= n; ++j) {
      pmf[j] = coefficient * std::pow(0.5, static_cast<double>(n));
      coefficient = coefficient * static_cast<double>(n - j) / static_cast<double>(j + 1);
    }
    auto below = [&pmf](size_t count) {  // P(B < count)
      double p = 0;
      for (size_t j = 0; j < count; ++j) p += pmf[j];
      return p;
    };
    const latency::RankInterval ranks = MedianInterval95(n);
    EXPECT_EQ(ranks.low + ranks.high, n - 1) << "symmetric, n = " << n;
    EXPECT_GE(1 - 2 * below(ranks.low + 1), 0.95) << "n = " << n;
    EXPECT_LT(1 - 2 * below(ranks.low + 2), 0.95) << "n = " << n;
  }
}

TEST(LatencyStatsTest, SummaryOfUnsortedSamples) {
  const latency::SampleSummary few = Summarize({5, 1, 4, 2, 3});
  EXPECT_EQ(few.samples, 5);
  EXPECT_DOUBLE_EQ(few.median, 3);
  EXPECT_DOUBLE_EQ(few.p10, 1.4);
  EXPECT_DOUBLE_EQ(few.p90, 4.6);
  EXPECT_DOUBLE_EQ(few.ci95_low, 1);  // n < 6: [min, max]
  EXPECT_DOUBLE_EQ(few.ci95_high, 5);

  std::vector<double> twenty;
  for (int i = 1; i <= 20; ++i) twenty.push_back(10.0 * i);
  std::shuffle(twenty.begin(), twenty.end(), std::mt19937_64(3));
  const latency::SampleSummary many = Summarize(twenty);
  EXPECT_EQ(many.samples, 20);
  EXPECT_DOUBLE_EQ(many.median, 105);
  EXPECT_DOUBLE_EQ(many.p10, 29);   // position 1.9
  EXPECT_DOUBLE_EQ(many.p90, 181);  // position 17.1
  EXPECT_DOUBLE_EQ(many.ci95_low, 60);  // ranks 6 and 15
  EXPECT_DOUBLE_EQ(many.ci95_high, 150);
}

// A comparison's ratio: the same summary over per-round ratios t_A / t_B.
TEST(LatencyStatsTest, RatioOfPairedRounds) {
  const std::vector<double> model_ms = {2.0, 4.4, 2.2, 6.0, 3.0, 2.1, 5.0, 4.0, 2.0, 3.3};
  const std::vector<double> compare_ms = {1.0, 2.0, 1.0, 3.0, 1.0, 1.0, 2.0, 2.0, 1.0, 1.1};
  std::vector<double> ratios;
  for (size_t i = 0; i < model_ms.size(); ++i) ratios.push_back(model_ms[i] / compare_ms[i]);
  // Sorted: 2, 2, 2, 2, 2.1, 2.2, 2.2, 2.5, 3, 3.
  const latency::SampleSummary ratio = Summarize(ratios);
  EXPECT_DOUBLE_EQ(ratio.median, 2.15);
  EXPECT_DOUBLE_EQ(ratio.ci95_low, 2.0);   // rank 2
  EXPECT_DOUBLE_EQ(ratio.ci95_high, 3.0);  // rank 9
}

// ---------------------------------------------------------------- engine

class LatencyEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const auto& [name, fixture] : {std::make_pair("a", "mamba1-small"),
                                        std::make_pair("b", "mamba1-bias-untied"),
                                        std::make_pair("m2", "mamba2-groups")}) {
      auto info = engine_.Load(name, (testing::GoldenDir(fixture) / "hf").string());
      ASSERT_TRUE(info.ok()) << info.status();
    }
  }

  static LatencyOptions Options(const std::string& mode, const std::string& compare = "") {
    LatencyOptions options;
    options.model = "a";
    options.compare_model = compare;
    options.mode = mode;
    options.batch = 2;
    options.seq_len = 16;
    options.warmup = 1;
    options.iters = 8;
    return options;
  }

  static void ExpectConsistent(const LatencyTiming& timing, int64_t samples) {
    EXPECT_EQ(timing.samples, samples);
    EXPECT_GT(timing.median_ms, 0);
    EXPECT_LE(timing.p10_ms, timing.median_ms);
    EXPECT_LE(timing.median_ms, timing.p90_ms);
    EXPECT_LE(timing.ci95_low_ms, timing.median_ms);
    EXPECT_LE(timing.median_ms, timing.ci95_high_ms);
    EXPECT_EQ(timing.device, "cpu");
    EXPECT_EQ(timing.method, "steady_clock");
    EXPECT_EQ(timing.execution, "eager");  // CUDA graphs only on a GPU
  }

  void ExpectError(const LatencyOptions& options, absl::StatusCode code,
                   const std::string& needle) {
    auto report = engine_.MeasureLatency(options);
    ASSERT_FALSE(report.ok()) << "expected " << absl::StatusCodeToString(code);
    EXPECT_EQ(report.status().code(), code) << report.status();
    EXPECT_NE(report.status().message().find(needle), std::string::npos) << report.status();
  }

  Engine engine_;
};

TEST_F(LatencyEngineTest, PrefillAndDecodeAlone) {
  for (const char* mode : {"prefill", "decode"}) {
    auto report = engine_.MeasureLatency(Options(mode));
    ASSERT_TRUE(report.ok()) << mode << ": " << report.status();
    ExpectConsistent(report->timing, 8);
    auto info = engine_.Info("a");
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_EQ(report->timing.version, info->version);
    EXPECT_GT(report->timing.version, 0u);
    EXPECT_FALSE(report->compare.has_value());
    EXPECT_EQ(report->ratio, 0);
    std::printf("[latency] %s batch 2 x 16: median %.3f ms [%.3f, %.3f]\n", mode,
                report->timing.median_ms, report->timing.ci95_low_ms,
                report->timing.ci95_high_ms);
  }
}

// With itself and with another model of the same vocabulary, in both modes:
// each side gets its own report, and the ratio its interval.
TEST_F(LatencyEngineTest, CompareInInterleavedRounds) {
  for (const char* mode : {"prefill", "decode"}) {
    for (const char* compare : {"a", "b"}) {
      auto report = engine_.MeasureLatency(Options(mode, compare));
      ASSERT_TRUE(report.ok()) << mode << " vs " << compare << ": " << report.status();
      ExpectConsistent(report->timing, 8);
      ASSERT_TRUE(report->compare.has_value());
      ExpectConsistent(*report->compare, 8);
      EXPECT_GT(report->ratio, 0);
      EXPECT_LE(report->ratio_ci95_low, report->ratio);
      EXPECT_LE(report->ratio, report->ratio_ci95_high);
    }
  }
}

TEST_F(LatencyEngineTest, BadOptionsNameTheField) {
  auto with = [](void (*change)(LatencyOptions&)) {
    LatencyOptions options = Options("prefill");
    change(options);
    return options;
  };
  using Code = absl::StatusCode;
  ExpectError(with([](LatencyOptions& o) { o.mode = "generate"; }), Code::kInvalidArgument,
              "mode");
  ExpectError(with([](LatencyOptions& o) { o.mode = ""; }), Code::kInvalidArgument, "mode");
  ExpectError(with([](LatencyOptions& o) { o.batch = 0; }), Code::kInvalidArgument, "batch");
  ExpectError(with([](LatencyOptions& o) { o.seq_len = -3; }), Code::kInvalidArgument, "seq_len");
  ExpectError(with([](LatencyOptions& o) { o.iters = 0; }), Code::kInvalidArgument, "iters");
  ExpectError(with([](LatencyOptions& o) { o.warmup = -1; }), Code::kInvalidArgument, "warmup");
  ExpectError(with([](LatencyOptions& o) { o.iters = latency::kMaxIters + 1; }),
              Code::kResourceExhausted, "iters");
  ExpectError(with([](LatencyOptions& o) { o.warmup = latency::kMaxIters + 1; }),
              Code::kResourceExhausted, "warmup");
  ExpectError(with([](LatencyOptions& o) {
                o.batch = 1024;
                o.seq_len = 1025;
              }),
              Code::kResourceExhausted, "batch·seq_len");
  ExpectError(with([](LatencyOptions& o) { o.counter_repeats = -1; }), Code::kInvalidArgument,
              "counter_repeats");
  ExpectError(with([](LatencyOptions& o) { o.counter_repeats = latency::kMaxCounterRepeats + 1; }),
              Code::kResourceExhausted, "counter_repeats");
  // Counters are read on a GPU: on the CPU the call says so, before any
  // sample, and never answers zeros.
  ExpectError(with([](LatencyOptions& o) { o.counter_repeats = 1; }),
              Code::kFailedPrecondition, "hardware counters are read on a CUDA device");
  ExpectError(with([](LatencyOptions& o) { o.model = "nope"; }), Code::kNotFound, "nope");
  ExpectError(with([](LatencyOptions& o) { o.compare_model = "nope"; }), Code::kNotFound, "nope");
  ExpectError(with([](LatencyOptions& o) { o.compare_model = "m2"; }), Code::kInvalidArgument,
              "vocab_size");
  // At the token limit exactly, only the options are checked here: no run.
  LatencyOptions limit = Options("prefill");
  limit.batch = 1024;
  limit.seq_len = 1024;
  EXPECT_TRUE(latency::ValidateOptions(limit).ok());
}

TEST_F(LatencyEngineTest, CancelledOrPastDeadline) {
  auto report = engine_.MeasureLatency(Options("decode", "b"), testing::CancelledContext());
  ASSERT_FALSE(report.ok());
  EXPECT_EQ(report.status().code(), absl::StatusCode::kCancelled) << report.status();

  report = engine_.MeasureLatency(Options("prefill"), testing::PastDeadlineContext());
  ASSERT_FALSE(report.ok());
  EXPECT_EQ(report.status().code(), absl::StatusCode::kDeadlineExceeded) << report.status();

  // Cancelled after some samples: polled between samples, not only at entry.
  int polls = 0;
  CallContext later;
  later.cancelled = [&polls] { return ++polls > 20; };
  report = engine_.MeasureLatency(Options("prefill"), later);
  ASSERT_FALSE(report.ok());
  EXPECT_EQ(report.status().code(), absl::StatusCode::kCancelled) << report.status();
}

}  // namespace
}  // namespace icd
