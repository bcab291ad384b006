// Order statistics of latency samples: percentiles and a distribution-free
// 95% interval of the median. Pure functions of the samples (no LibTorch),
// shared by the per-model times and the per-round ratios of a comparison.
#ifndef ICD_CORE_SRC_LATENCY_STATS_H_
#define ICD_CORE_SRC_LATENCY_STATS_H_

#include <cstddef>
#include <cstdint>
#include <vector>

namespace icd::latency {

// The q-quantile (0 <= q <= 1) of `sorted` (ascending, non-empty) by linear
// interpolation between the closest ranks: position h = (n-1)·q, value
// x[floor h] + (h - floor h)·(x[floor h + 1] - x[floor h]) (numpy's default).
double Quantile(const std::vector<double>& sorted, double q);

// 0-based ranks into n sorted samples.
struct RankInterval {
  std::size_t low = 0;
  std::size_t high = 0;
};

// The ranks [low, high] of a 95% confidence interval of the median that
// holds for any continuous distribution of i.i.d. samples (the order-statistic
// interval, e.g. Conover, Practical Nonparametric Statistics, §3.2): the
// number of samples below the median is Binomial(n, 1/2), so with k the
// largest rank (1-based) such that P(Binomial(n, 1/2) <= k-1) <= 0.025,
// x_(k) <= median <= x_(n+1-k) with probability >= 1 - 2·0.025.
// Below n = 6 no pair of ranks reaches 95% (n = 5: min and max cover
// 1 - 2/32 = 93.75%); the interval is then [min, max], ranks [0, n-1].
// n >= 1.
RankInterval MedianInterval95(std::size_t n);

struct SampleSummary {
  double median = 0;
  double p10 = 0;
  double p90 = 0;
  double ci95_low = 0;  // the samples at MedianInterval95's ranks
  double ci95_high = 0;
  int64_t samples = 0;
};

// `samples` in any order, non-empty.
SampleSummary Summarize(std::vector<double> samples);

}  // namespace icd::latency

#endif  // ICD_CORE_SRC_LATENCY_STATS_H_
