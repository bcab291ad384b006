// The Hungarian method (traces/assignment.h) against every permutation of
// small random matrices, and on the cases that trip naive versions.
#include "traces/assignment.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

namespace icd::traces {
namespace {

double Cost(const std::vector<double>& cost, int64_t size, const std::vector<int64_t>& assign) {
  double total = 0;
  for (int64_t row = 0; row < size; ++row) total += cost[static_cast<size_t>(row * size + assign[row])];
  return total;
}

double BruteForceMinimum(const std::vector<double>& cost, int64_t size) {
  std::vector<int64_t> order(static_cast<size_t>(size));
  std::iota(order.begin(), order.end(), 0);
  double best = std::numeric_limits<double>::infinity();
  do {
    best = std::min(best, Cost(cost, size, order));
  } while (std::next_permutation(order.begin(), order.end()));
  return best;
}

bool IsPermutationOf(std::vector<int64_t> assign, int64_t size) {
  std::sort(assign.begin(), assign.end());
  for (int64_t i = 0; i < size; ++i) {
    if (assign[static_cast<size_t>(i)] != i) return false;
  }
  return static_cast<int64_t>(assign.size()) == size;
}

TEST(AssignmentTest, MinimumOfEveryPermutationOnRandomMatrices) {
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<double> uniform(-5.0, 5.0);
  std::uniform_int_distribution<int> small(0, 3);  // many ties
  for (int64_t size = 1; size <= 7; ++size) {
    for (int trial = 0; trial < 30; ++trial) {
      std::vector<double> cost(static_cast<size_t>(size * size));
      for (double& c : cost) c = trial % 2 == 0 ? uniform(rng) : small(rng);
      const std::vector<int64_t> assign = MinCostAssignment(cost, size);
      ASSERT_TRUE(IsPermutationOf(assign, size)) << "size " << size;
      EXPECT_NEAR(Cost(cost, size, assign), BruteForceMinimum(cost, size), 1e-9)
          << "size " << size << " trial " << trial;
    }
  }
}

// A maximum-gain deal (what the N:M search asks) is the minimum of the
// negated gains: the diagonal here, worth 3 + 3 + 3.
TEST(AssignmentTest, NegatedGainsGiveTheBestDeal) {
  const std::vector<double> gains = {3, 1, 0,  //
                                     2, 3, 1,  //
                                     0, 2, 3};
  std::vector<double> cost(gains.size());
  std::transform(gains.begin(), gains.end(), cost.begin(), [](double g) { return -g; });
  EXPECT_EQ(MinCostAssignment(cost, 3), (std::vector<int64_t>{0, 1, 2}));
}

}  // namespace
}  // namespace icd::traces
