// 16 client threads, started together, each apply and evaluate a fixed
// number of times on one model: no unexpected failure, versions strictly
// increasing per thread and unique overall, every Evaluate (shared lock)
// sees a function-equal model, and the final logits equal the golden ones.
// A fixed count, not a duration: the counts asserted below are exact on a
// machine of any speed (issue 15, finding 7).
#include <atomic>
#include <cstdio>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "harness.h"

namespace icd::testing {
namespace {

constexpr int kThreads = 16;
constexpr int kRounds = 8;  // per thread: one apply and one evaluate each

TEST(ConcurrencyTest, SixteenThreadsApplyAndEvaluate) {
  Harness harness;
  const Golden golden = LoadGolden("mamba1-small");
  ASSERT_TRUE(harness.client().LoadModel("m", "mamba1-small/hf").ok());
  auto syms = harness.client().GetSymmetries("m");
  ASSERT_TRUE(syms.ok()) << syms.status();

  std::mutex mu;
  std::set<uint64_t> versions;  // every version an Apply returned
  std::vector<std::string> failures;
  std::atomic<int> applies{0}, evaluates{0}, stale{0};
  // Every thread connects, then waits for all the others: the rounds overlap.
  std::atomic<int> ready{0};

  auto worker = [&](int id) {
    auto client = harness.NewClient("");
    ++ready;
    while (ready.load() < kThreads) std::this_thread::yield();
    std::mt19937_64 rng(static_cast<uint64_t>(id) * 7919 + 1);
    uint64_t last = 0;
    auto fail = [&](const std::string& what) {
      std::lock_guard<std::mutex> lock(mu);
      failures.push_back("thread " + std::to_string(id) + ": " + what);
    };
    for (int i = 0; i < kRounds; ++i) {
      // Every third apply names the version it last saw: it may be stale.
      const uint64_t expected = (i % 3 == 2) ? last : 0;
      auto report = client->ApplyPermutation(
          "m", RandomPermutations(*syms, rng), expected, /*skip_verify=*/i % 2 == 0);
      if (report.ok()) {
        if (report->version() <= last) {
          fail("version " + std::to_string(report->version()) + " after " +
               std::to_string(last));
        }
        last = report->version();
        ++applies;
        std::lock_guard<std::mutex> lock(mu);
        if (!versions.insert(last).second) {
          failures.push_back("version " + std::to_string(last) + " twice");
        }
      } else if (expected != 0 &&
                 report.status().code() == absl::StatusCode::kFailedPrecondition) {
        ++stale;
      } else {
        fail("apply: " + report.status().ToString());
      }
      auto eval = EvaluateGolden(*client, "m", golden);
      if (!eval.ok()) {
        fail("evaluate: " + eval.status().ToString());
        continue;
      }
      ++evaluates;
      const double rel = RelL2({eval->logits().begin(), eval->logits().end()},
                               golden.logits);
      if (!(rel <= 1e-4)) fail("evaluate rel_l2 " + std::to_string(rel));
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
  for (auto& t : threads) t.join();

  for (const auto& f : failures) ADD_FAILURE() << f;
  // Every apply either succeeded or was stale (only those naming a version
  // may be), and every evaluate succeeded.
  EXPECT_EQ(applies.load() + stale.load(), kThreads * kRounds);
  EXPECT_LE(stale.load(), kThreads * (kRounds / 3));
  EXPECT_GE(applies.load(), kThreads * (kRounds - kRounds / 3));
  EXPECT_EQ(evaluates.load(), kThreads * kRounds);
  auto list = harness.client().ListModels();
  ASSERT_TRUE(list.ok()) << list.status();
  ASSERT_EQ(list->size(), 1u);
  const uint64_t final_version = (*list)[0].version();
  EXPECT_EQ(final_version, 1u + static_cast<uint64_t>(applies.load()));
  EXPECT_EQ(versions.size(), static_cast<std::size_t>(applies.load()));
  if (!versions.empty()) {
    EXPECT_EQ(*versions.begin(), 2u);
    EXPECT_EQ(*versions.rbegin(), final_version);
  }
  auto eval = EvaluateGolden(harness.client(), "m", golden);
  ASSERT_TRUE(eval.ok()) << eval.status();
  EXPECT_LE(RelL2({eval->logits().begin(), eval->logits().end()}, golden.logits),
            1e-4);
  auto verify = harness.client().Verify("m");
  ASSERT_TRUE(verify.ok()) << verify.status();
  EXPECT_TRUE(verify->ok());
  std::printf("applies=%d evaluates=%d stale=%d final_version=%llu\n",
              applies.load(), evaluates.load(), stale.load(),
              static_cast<unsigned long long>(final_version));
}

}  // namespace
}  // namespace icd::testing
