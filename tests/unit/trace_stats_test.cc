// Streaming statistics against a direct computation on the same rows.
#include "traces/stats.h"

#include <gtest/gtest.h>
#include "torch_api.h"

#include <vector>

namespace icd::traces {
namespace {

double RelDiff(const torch::Tensor& a, const torch::Tensor& b) {
  return ((a - b).norm() / b.norm().clamp_min(1e-300)).item<double>();
}

// Rows with some correlation between channels, float32 as a client sends.
torch::Tensor MakeRows(int64_t rows, int64_t channels, uint64_t seed) {
  torch::Tensor keys = UniformKeys(rows, channels + 1, seed).to(torch::kFloat32);
  torch::Tensor values = keys.narrow(1, 0, channels) - 0.5;
  return values + 0.7 * keys.narrow(1, channels, 1);  // a shared component
}

StatsOptions Options(int64_t channels, bool correlation) {
  StatsOptions options;
  options.channels = channels;
  options.outer_products = correlation;
  options.coactivation = !correlation;
  options.activation_quantile = 0.8;
  options.block_rows = 256;
  return options;
}

TraceStats Stream(const torch::Tensor& rows, const std::vector<int64_t>& chunk_sizes,
                  StatsOptions options) {
  TraceStats stats(options);
  int64_t at = 0;
  size_t next = 0;
  while (at < rows.size(0)) {
    const int64_t size = std::min(chunk_sizes[next++ % chunk_sizes.size()], rows.size(0) - at);
    stats.Add(rows.narrow(0, at, size));
    at += size;
  }
  stats.Finish();
  return stats;
}

TEST(TraceStatsTest, StreamingEqualsDirectComputation) {
  const torch::Tensor rows = MakeRows(1000, 24, 7);
  const torch::Tensor wide = rows.to(torch::kFloat64);
  TraceStats correlation = Stream(rows, {1, 7, 300, 64}, Options(24, true));
  EXPECT_EQ(correlation.rows(), 1000);
  EXPECT_LT(RelDiff(correlation.sum(), wide.sum(0)), 1e-12);
  EXPECT_LT(RelDiff(correlation.sum_squares(), wide.square().sum(0)), 1e-12);
  EXPECT_LT(RelDiff(correlation.outer(), wide.t().mm(wide)), 1e-12);

  // Thresholds: the channel's quantile of |a| over the first block.
  const torch::Tensor first = wide.narrow(0, 0, 256).abs();
  const auto k = static_cast<int64_t>(0.8 * 255);
  const torch::Tensor thresholds = std::get<0>(first.sort(0)).select(0, k);
  EXPECT_TRUE(torch::equal(correlation.thresholds(), thresholds));
  TraceStats coactivation = Stream(rows, {1000}, Options(24, false));
  const torch::Tensor active = (wide.abs() > thresholds).to(torch::kFloat64);
  EXPECT_TRUE(torch::equal(coactivation.active_count(), active.sum(0)));
  EXPECT_TRUE(torch::equal(coactivation.coactive(), active.t().mm(active)));
}

TEST(TraceStatsTest, ChunkingDoesNotChangeTheResult) {
  const torch::Tensor rows = MakeRows(777, 16, 3);
  for (bool correlation : {true, false}) {
    TraceStats one = Stream(rows, {777}, Options(16, correlation));
    TraceStats many = Stream(rows, {1, 2, 3, 5, 8, 13, 100}, Options(16, correlation));
    EXPECT_TRUE(torch::equal(one.sum(), many.sum()));
    EXPECT_TRUE(torch::equal(one.active_count(), many.active_count()));
    if (correlation) {
      EXPECT_TRUE(torch::equal(one.outer(), many.outer()));
      EXPECT_TRUE(torch::equal(one.null_outer(), many.null_outer()));
    } else {
      EXPECT_TRUE(torch::equal(one.coactive(), many.coactive()));
      EXPECT_TRUE(torch::equal(one.null_coactive(), many.null_coactive()));
    }
  }
}

TEST(TraceStatsTest, OneSequenceGivesANonZeroCovariance) {
  // Batch 1, 12 tokens: per-token rows, never a per-sequence mean.
  const torch::Tensor rows = MakeRows(12, 8, 11);
  TraceStats stats = Stream(rows, {12}, Options(8, true));
  const torch::Tensor mean = stats.sum() / 12.0;
  const torch::Tensor covariance = stats.outer() / 12.0 - mean.unsqueeze(1) * mean.unsqueeze(0);
  EXPECT_GT(covariance.abs().min().item<double>(), 0.0);
}

TEST(TraceStatsTest, NullKeepsEachChannelAndBreaksPairs) {
  // Channel 1 is channel 0: perfectly correlated; the null must not be.
  torch::Tensor rows = MakeRows(2048, 4, 5);
  rows.select(1, 1).copy_(rows.select(1, 0));
  TraceStats stats = Stream(rows, {2048}, Options(4, true));
  EXPECT_LT(RelDiff(stats.null_outer().diagonal(), stats.outer().diagonal()), 1e-12);
  auto correlation = [&](const torch::Tensor& outer) {
    const torch::Tensor mean = stats.sum() / 2048.0;
    const torch::Tensor cov = outer / 2048.0 - mean.unsqueeze(1) * mean.unsqueeze(0);
    return (cov[0][1] / (cov[0][0] * cov[1][1]).sqrt()).item<double>();
  };
  EXPECT_NEAR(correlation(stats.outer()), 1.0, 1e-9);
  EXPECT_LT(std::abs(correlation(stats.null_outer())), 0.1);
}

TEST(TraceStatsTest, HoldoutTailKeepsTheLastRowsInOrder) {
  const torch::Tensor rows = torch::arange(50, torch::kFloat32).reshape({50, 1});
  HoldoutTail tail(10);
  std::vector<float> released;
  auto sink = [&](const torch::Tensor& part) {
    for (int64_t i = 0; i < part.size(0); ++i) released.push_back(part[i][0].item<float>());
  };
  const std::vector<std::pair<int64_t, int64_t>> chunks = {{0, 3}, {3, 1}, {4, 26}, {30, 20}};
  for (const auto& [start, count] : chunks) tail.Add(rows.narrow(0, start, count), sink);
  const torch::Tensor kept = tail.Finish(5, 1, sink);
  ASSERT_EQ(released.size(), 45u);
  for (size_t i = 0; i < released.size(); ++i) EXPECT_EQ(released[i], static_cast<float>(i));
  ASSERT_EQ(kept.size(0), 5);
  EXPECT_EQ(kept[0][0].item<float>(), 45.0f);
  EXPECT_EQ(kept[4][0].item<float>(), 49.0f);
}

}  // namespace
}  // namespace icd::traces
