// traces/nm_sparsity: the N:M-aware channel permutation search.
#include "traces/nm_sparsity.h"

#include <gtest/gtest.h>
#include "torch_api.h"

#include <algorithm>
#include <chrono>
#include <functional>
#include <numeric>
#include <random>
#include <vector>

#include "test_util.h"

namespace icd::traces {
namespace {

torch::Tensor AbsNormal(int64_t rows, int64_t channels, uint64_t seed,
                        torch::ScalarType dtype = torch::kFloat32) {
  torch::manual_seed(seed);
  return torch::randn({rows, channels}, torch::dtype(dtype)).abs();
}

std::vector<int64_t> RandomOrder(int64_t size, uint64_t seed) {
  std::vector<int64_t> order(static_cast<size_t>(size));
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(seed);
  std::shuffle(order.begin(), order.end(), rng);
  return order;
}

bool IsPermutation(std::vector<int64_t> order, int64_t size) {
  if (static_cast<int64_t>(order.size()) != size) return false;
  std::sort(order.begin(), order.end());
  for (int64_t i = 0; i < size; ++i) {
    if (order[static_cast<size_t>(i)] != i) return false;
  }
  return true;
}

// Kept saliency by plain loops: per row, per stripe, sort and add the n largest.
double BruteForceKept(const torch::Tensor& saliency, const std::vector<int64_t>& order, int64_t n,
                      int64_t m) {
  const torch::Tensor s = saliency.to(torch::kFloat64).contiguous();
  const auto accessor = s.accessor<double, 2>();
  double kept = 0;
  for (int64_t row = 0; row < s.size(0); ++row) {
    for (int64_t first = 0; first < s.size(1); first += m) {
      std::vector<double> stripe;
      for (int64_t j = first; j < first + m; ++j) {
        stripe.push_back(accessor[row][order[static_cast<size_t>(j)]]);
      }
      std::sort(stripe.rbegin(), stripe.rend());
      for (int64_t k = 0; k < n; ++k) kept += stripe[static_cast<size_t>(k)];
    }
  }
  return kept;
}

// Per row, the largest channels·n/m entries, by sorting.
double BruteForceBound(const torch::Tensor& saliency, int64_t n, int64_t m) {
  const torch::Tensor s = saliency.to(torch::kFloat64).contiguous();
  const auto accessor = s.accessor<double, 2>();
  double bound = 0;
  for (int64_t row = 0; row < s.size(0); ++row) {
    std::vector<double> values;
    for (int64_t c = 0; c < s.size(1); ++c) values.push_back(accessor[row][c]);
    std::sort(values.rbegin(), values.rend());
    for (int64_t k = 0; k < s.size(1) / m * n; ++k) bound += values[static_cast<size_t>(k)];
  }
  return bound;
}

// Fewer rounds than the default, for tests that check properties, not quality.
NmOptions Quick(uint64_t seed, int64_t block = 0) {
  NmOptions options;
  options.block = block;
  options.seed = seed;
  options.rounds = 300;
  return options;
}

NmSolution SolveOrDie(const torch::Tensor& saliency, const NmOptions& options) {
  absl::StatusOr<NmSolution> solution = SolveNmPermutation(saliency, options);
  EXPECT_TRUE(solution.ok()) << solution.status();
  return solution.ok() ? *solution : NmSolution{};
}

TEST(NmSparsity, KeptSaliencyAndBoundMatchBruteForce) {
  for (uint64_t seed : {1u, 2u, 3u}) {
    const torch::Tensor saliency = AbsNormal(7, 24, seed, torch::kFloat64);
    for (auto [n, m] : {std::pair<int64_t, int64_t>{2, 4}, {1, 4}, {3, 8}, {1, 2}}) {
      const std::vector<int64_t> order = RandomOrder(24, seed);
      EXPECT_NEAR(KeptSaliency(saliency, order, n, m), BruteForceKept(saliency, order, n, m),
                  1e-9);
      EXPECT_NEAR(NmUpperBound(saliency, n, m), BruteForceBound(saliency, n, m), 1e-9);
    }
  }
}

TEST(NmSparsity, NmMaskKeepsTheLargestOfEachGroup) {
  const torch::Tensor values =
      torch::tensor({{0.5, -3.0, 2.0, 1.0, 4.0, 4.0, 4.0, -4.0}}, torch::kFloat64);
  const torch::Tensor mask = NmMask(values, 2, 4);
  // Ties keep the lower index.
  const torch::Tensor expected = torch::tensor({{0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0}},
                                               torch::kFloat64);
  EXPECT_TRUE(torch::equal(mask, expected)) << mask;
  // Any leading shape; exactly n ones per group.
  const torch::Tensor batch = torch::randn({3, 5, 16});
  const torch::Tensor batch_mask = NmMask(batch, 1, 4);
  EXPECT_EQ(batch_mask.sizes(), batch.sizes());
  EXPECT_TRUE(torch::equal(batch_mask.reshape({3, 5, 4, 4}).sum(-1),
                           torch::ones({3, 5, 4})));
}

TEST(NmSparsity, OrderIsAPermutationAndNeverKeepsLessThanIdentity) {
  struct Shape {
    int64_t rows, channels, n, m;
    torch::ScalarType dtype;
  };
  const std::vector<Shape> shapes = {{16, 32, 2, 4, torch::kFloat32},
                                     {64, 128, 2, 4, torch::kFloat32},
                                     {33, 64, 2, 4, torch::kFloat64},
                                     {5, 48, 1, 4, torch::kFloat32},
                                     {20, 64, 4, 8, torch::kFloat32},
                                     {8, 32, 1, 2, torch::kFloat64},
                                     {6, 96, 8, 16, torch::kFloat32},
                                     {9, 8, 2, 4, torch::kFloat32}};
  uint64_t seed = 10;
  for (const Shape& shape : shapes) {
    const torch::Tensor saliency = AbsNormal(shape.rows, shape.channels, ++seed, shape.dtype);
    NmOptions options = Quick(seed);
    options.n = shape.n;
    options.m = shape.m;
    const NmSolution solution = SolveOrDie(saliency, options);
    SCOPED_TRACE(::testing::Message() << shape.rows << "x" << shape.channels << " " << shape.n
                                      << ":" << shape.m);
    ASSERT_TRUE(IsPermutation(solution.order, shape.channels));
    EXPECT_GE(solution.kept_solved, solution.kept_identity);
    EXPECT_LE(solution.kept_solved, solution.upper_bound * (1 + 1e-12));
    EXPECT_NEAR(solution.kept_solved,
                BruteForceKept(saliency, solution.order, shape.n, shape.m),
                1e-9 * solution.upper_bound);
    EXPECT_GE(solution.efficacy, 0.0);
    EXPECT_LE(solution.efficacy, 1.0 + 1e-9);
  }
}

TEST(NmSparsity, MaskOfThePermutedWeightIsNm) {
  torch::manual_seed(7);
  const torch::Tensor weight = torch::randn({24, 64});
  const NmSolution solution = SolveOrDie(weight.abs(), Quick(7));
  ASSERT_TRUE(IsPermutation(solution.order, 64));
  const torch::Tensor permuted = weight.index_select(1, torch::tensor(solution.order));
  const torch::Tensor pruned = permuted * NmMask(permuted, 2, 4);
  const torch::Tensor nonzeros = pruned.ne(0).reshape({24, 16, 4}).sum(-1);
  EXPECT_LE(nonzeros.max().item<int64_t>(), 2);
  EXPECT_NEAR(pruned.abs().sum().item<double>(), solution.kept_solved,
              1e-5 * solution.kept_solved);
  // The solved order keeps strictly more than the identity on random data.
  EXPECT_GT(solution.kept_solved, solution.kept_identity);
}

// Pool & Yu's and Apex's reference: Apex's default search (stripe groups of
// 8 columns) reaches 35.5% on a random matrix of 64 channels.
TEST(NmSparsity, EfficacyOnRandom64x128) {
  for (uint64_t seed : {1u, 2u, 3u}) {
    const NmSolution solution = SolveOrDie(AbsNormal(64, 128, seed), NmOptions{2, 4, 0, seed});
    EXPECT_GE(solution.efficacy, 0.355) << "seed " << seed;
  }
  // Apex's own setup (128 rows, 64 channels, U[0,1)) is harder: 33-37% over
  // seeds (bench/nm_sparsity_bench), Apex's 35.5% being one matrix.
  for (uint64_t seed : {1u, 2u}) {
    torch::manual_seed(seed);
    const NmSolution solution = SolveOrDie(torch::rand({128, 64}), NmOptions{2, 4, 0, seed});
    EXPECT_GE(solution.efficacy, 0.30) << "seed " << seed;
  }
}

TEST(NmSparsity, BlockIsRespected) {
  const torch::Tensor saliency = AbsNormal(32, 128, 5);
  NmOptions options = Quick(5, /*block=*/16);
  const NmSolution solution = SolveOrDie(saliency, options);
  ASSERT_TRUE(IsPermutation(solution.order, 128));
  for (int64_t j = 0; j < 128; ++j) {
    EXPECT_EQ(solution.order[static_cast<size_t>(j)] / 16, j / 16) << "position " << j;
  }
  EXPECT_GT(solution.efficacy, 0.2);
  // The block-aware bound is the sum of each block's own bound, and below the
  // unconstrained one.
  double blocks_bound = 0;
  for (int64_t first = 0; first < 128; first += 16) {
    blocks_bound += NmUpperBound(saliency.narrow(1, first, 16), 2, 4);
  }
  EXPECT_NEAR(solution.upper_bound, blocks_bound, 1e-9 * blocks_bound);
  EXPECT_LE(solution.upper_bound, NmUpperBound(saliency, 2, 4) * (1 + 1e-12));

  // block == m: nothing can move.
  options.block = 4;
  const NmSolution frozen = SolveOrDie(saliency, options);
  std::vector<int64_t> identity(128);
  std::iota(identity.begin(), identity.end(), 0);
  EXPECT_EQ(frozen.order, identity);
}

TEST(NmSparsity, DeterministicForASeed) {
  const torch::Tensor saliency = AbsNormal(48, 96, 11);
  const NmSolution first = SolveOrDie(saliency, Quick(42));
  const NmSolution second = SolveOrDie(saliency, Quick(42));
  EXPECT_EQ(first.order, second.order);
  EXPECT_EQ(first.kept_solved, second.kept_solved);
  EXPECT_EQ(first.rounds, second.rounds);
  NmOptions fixed_rounds = Quick(42);
  fixed_rounds.rounds = 6;
  const NmSolution short_run = SolveOrDie(saliency, fixed_rounds);
  EXPECT_LE(short_run.rounds, 6);
  EXPECT_EQ(short_run.order, SolveOrDie(saliency, fixed_rounds).order);
}

// Columns of four types t; rows in four groups g. A column is large
// (U[1,2]) in the rows of groups t and t+1 (mod 4), small (U[0,0.1])
// elsewhere, so every row has exactly half of its entries large. An order
// whose stripes each hold one column of every type keeps exactly the large
// entries, i.e. reaches the upper bound. The columns are shuffled; the
// search has to find such an order again.
TEST(NmSparsity, PlantedOptimumIsFound) {
  const int64_t rows = 16, channels = 96, n = 2, m = 4, types = 4;
  for (uint64_t seed : {3u, 4u, 5u}) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<double> large(1.0, 2.0), small(0.0, 0.1);
    const std::vector<int64_t> shuffle = RandomOrder(channels, seed + 100);
    torch::Tensor saliency = torch::zeros({rows, channels}, torch::kFloat64);
    auto accessor = saliency.accessor<double, 2>();
    std::vector<int64_t> planted(static_cast<size_t>(channels));  // an optimal order
    for (int64_t j = 0; j < channels; ++j) {
      const int64_t column = shuffle[static_cast<size_t>(j)], type = j % types;
      planted[static_cast<size_t>(j)] = column;
      for (int64_t row = 0; row < rows; ++row) {
        const int64_t group = row * types / rows;
        const bool is_large = group == type || group == (type + 1) % types;
        accessor[row][column] = is_large ? large(rng) : small(rng);
      }
    }
    const NmSolution solution = SolveOrDie(saliency, NmOptions{n, m, 0, seed});
    EXPECT_NEAR(KeptSaliency(saliency, planted, n, m), solution.upper_bound,
                1e-9 * solution.upper_bound);
    EXPECT_LT(solution.kept_identity, 0.95 * solution.upper_bound);
    EXPECT_GE(solution.efficacy, 0.99) << "seed " << seed;
  }
}

TEST(NmSparsity, BadInputsAreInvalidArgument) {
  const torch::Tensor saliency = AbsNormal(4, 16, 1);
  const auto code = [](const torch::Tensor& s, NmOptions options) {
    return SolveNmPermutation(s, options).status().code();
  };
  const auto invalid = absl::StatusCode::kInvalidArgument;
  EXPECT_EQ(code(saliency, NmOptions{0, 4}), invalid);            // n < 1
  EXPECT_EQ(code(saliency, NmOptions{4, 4}), invalid);            // m <= n
  EXPECT_EQ(code(AbsNormal(4, 18, 1), NmOptions{}), invalid);     // channels % m
  EXPECT_EQ(code(saliency, NmOptions{2, 4, 6}), invalid);         // block % m
  EXPECT_EQ(code(AbsNormal(4, 24, 1), NmOptions{2, 4, 16}), invalid);  // block ∤ channels
  EXPECT_EQ(code(saliency, NmOptions{2, 4, -4}), invalid);
  NmOptions negative_rounds;
  negative_rounds.rounds = -1;
  EXPECT_EQ(code(saliency, negative_rounds), invalid);
  torch::Tensor negative = saliency.clone();
  negative[1][2] = -0.5;
  EXPECT_EQ(code(negative, NmOptions{}), invalid);
  torch::Tensor nan = saliency.clone();
  nan[0][0] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(code(nan, NmOptions{}), invalid);
  torch::Tensor inf = saliency.clone();
  inf[3][15] = std::numeric_limits<float>::infinity();
  EXPECT_EQ(code(inf, NmOptions{}), invalid);
  EXPECT_EQ(code(saliency.flatten(), NmOptions{}), invalid);               // not 2-D
  EXPECT_EQ(code(saliency.to(torch::kInt32), NmOptions{}), invalid);      // dtype
  EXPECT_EQ(code(saliency.to(torch::kBFloat16), NmOptions{}), invalid);
  EXPECT_EQ(code(torch::zeros({0, 16}), NmOptions{}), invalid);            // empty
  EXPECT_EQ(code(torch::Tensor(), NmOptions{}), invalid);                  // undefined
  const absl::Status message = SolveNmPermutation(AbsNormal(4, 18, 1), NmOptions{}).status();
  EXPECT_NE(message.message().find("multiple of m"), std::string_view::npos) << message;
}

TEST(NmSparsity, CancellationAndDeadline) {
  const torch::Tensor saliency = AbsNormal(16, 64, 2);
  auto code = [&](const CallContext& ctx) {
    return SolveNmPermutation(saliency, NmOptions{}, ctx).status().code();
  };
  EXPECT_EQ(code(testing::CancelledContext()), absl::StatusCode::kCancelled);
  EXPECT_EQ(code(testing::PastDeadlineContext()), absl::StatusCode::kDeadlineExceeded);
}

TEST(NmSparsity, ZeroSaliencyKeepsIdentity) {
  const NmSolution solution = SolveOrDie(torch::zeros({8, 32}), NmOptions{});
  std::vector<int64_t> identity(32);
  std::iota(identity.begin(), identity.end(), 0);
  EXPECT_EQ(solution.order, identity);
  EXPECT_EQ(solution.kept_solved, 0.0);
  EXPECT_EQ(solution.efficacy, 1.0);
}

TEST(NmSparsity, RunsOnCuda) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  const torch::Tensor saliency = AbsNormal(64, 128, 1);
  const NmSolution cpu = SolveOrDie(saliency, NmOptions{2, 4, 0, 1});
  const NmSolution cuda = SolveOrDie(saliency.to(torch::kCUDA), NmOptions{2, 4, 0, 1});
  ASSERT_TRUE(IsPermutation(cuda.order, 128));
  EXPECT_NEAR(cuda.kept_identity, cpu.kept_identity, 1e-6 * cpu.kept_identity);
  EXPECT_GE(cuda.efficacy, 0.355);
  NmOptions blocked{2, 4, 32, 1};
  const NmSolution cuda_blocked = SolveOrDie(saliency.to(torch::kCUDA), blocked);
  for (int64_t j = 0; j < 128; ++j) {
    EXPECT_EQ(cuda_blocked.order[static_cast<size_t>(j)] / 32, j / 32);
  }
}

}  // namespace
}  // namespace icd::traces
