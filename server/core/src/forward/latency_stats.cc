#include "forward/latency_stats.h"

#include <algorithm>
#include <cmath>

namespace icd::latency {

double Quantile(const std::vector<double>& sorted, double q) {
  const double position = static_cast<double>(sorted.size() - 1) * q;
  const auto below = static_cast<std::size_t>(std::floor(position));
  const std::size_t above = std::min(below + 1, sorted.size() - 1);
  const double fraction = position - static_cast<double>(below);
  return sorted[below] + fraction * (sorted[above] - sorted[below]);
}

RankInterval MedianInterval95(std::size_t n) {
  constexpr std::size_t kSmallest = 6;
  constexpr double kTail = 0.025;  // each side
  if (n < kSmallest) return {0, n - 1};
  // P(B = j) for B ~ Binomial(n, 1/2), in logs so that n up to the iteration
  // cap (1e5) neither overflows the binomial coefficient nor underflows 2^-n
  // before the terms that matter.
  const auto count = static_cast<double>(n);
  const double log_total = std::lgamma(count + 1) - count * std::log(2.0);
  double below = 0;  // P(B <= j - 1)
  std::size_t rank = 0;  // k, 1-based
  for (std::size_t j = 0; j < n / 2; ++j) {
    const auto successes = static_cast<double>(j);
    below += std::exp(log_total - std::lgamma(successes + 1) - std::lgamma(count - successes + 1));
    if (below > kTail) break;
    rank = j + 1;  // P(B <= rank - 1) <= kTail
  }
  // n >= 6: P(B <= 0) = 2^-n <= 1/64, so rank >= 1.
  return {rank - 1, n - rank};
}

SampleSummary Summarize(std::vector<double> samples) {
  std::sort(samples.begin(), samples.end());
  SampleSummary summary;
  summary.samples = static_cast<int64_t>(samples.size());
  summary.median = Quantile(samples, 0.5);
  summary.p10 = Quantile(samples, 0.1);
  summary.p90 = Quantile(samples, 0.9);
  const RankInterval ranks = MedianInterval95(samples.size());
  summary.ci95_low = samples[ranks.low];
  summary.ci95_high = samples[ranks.high];
  return summary;
}

}  // namespace icd::latency
