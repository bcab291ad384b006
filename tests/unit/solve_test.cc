// Traces -> π through the engine: planted structure, the null, constraints,
// bad streams, capture, and exactness of every permutation it returns.
#include <gtest/gtest.h>
#include "torch_api.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "icd/core/engine.h"
#include "test_util.h"
#include "traces/graph.h"
#include "traces/stats.h"

namespace icd {
namespace {

using testing::GoldenDir;

std::string Bytes(const torch::Tensor& rows) {
  const torch::Tensor host = rows.to(torch::kFloat32).contiguous();
  return std::string(reinterpret_cast<const char*>(host.data_ptr<float>()),
                     static_cast<size_t>(host.numel()) * 4);
}

class SolveTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(engine_.Load("m", (GoldenDir("mamba1-small") / "hf").string()).ok());
  }

  absl::StatusOr<PermutationResult> Compute(const std::string& group, const torch::Tensor& rows,
                                            int64_t holdout_rows, SolverOptions solver,
                                            int64_t chunk = 100) {
    TraceHeader header{"m", group, rows.size(1), holdout_rows, std::move(solver)};
    auto session = engine_.BeginTraces(header);
    if (!session.ok()) return session.status();
    for (int64_t at = 0; at < rows.size(0); at += chunk) {
      const int64_t count = std::min(chunk, rows.size(0) - at);
      absl::Status added = (*session)->AddRows(Bytes(rows.narrow(0, at, count)), count);
      if (!added.ok()) return added;
    }
    return (*session)->Finish();
  }

  Engine engine_;
};

// 128 channels in 8 hidden clusters of 16 (channel c in cluster label[c]);
// every row switches exactly two clusters on (values in [1, 2)), the rest 0.
struct PlantedTraces {
  torch::Tensor rows;
  std::vector<int64_t> label;
};

PlantedTraces MakePlanted(int64_t rows, uint64_t seed) {
  const int64_t channels = 128;
  const torch::Tensor label =
      torch::div(traces::UniformKeys(1, channels, seed).argsort(int64_t{1}).squeeze(0), 16, "floor");
  const torch::Tensor keys = traces::UniformKeys(rows, 8, seed + 1);
  const torch::Tensor chosen = keys.argsort(int64_t{1}).narrow(1, 0, 2);  // two distinct clusters per row
  torch::Tensor on = torch::zeros({rows, 8}, torch::kFloat64).scatter_(1, chosen, 1.0);
  const torch::Tensor magnitude = 1 + traces::UniformKeys(rows, channels, seed + 2);
  PlantedTraces planted;
  planted.rows = (on.index_select(1, label) * magnitude).to(torch::kFloat32);
  planted.label.assign(label.data_ptr<int64_t>(), label.data_ptr<int64_t>() + channels);
  return planted;
}

TEST_F(SolveTest, RecoversPlantedClustersAndTheirBlocks) {
  const PlantedTraces planted = MakePlanted(3000, 5);
  SolverOptions solver;
  solver.activation_quantile = 0.5;  // active <=> switched on
  solver.seeds = 3;
  auto result = Compute("layers.0.inner", planted.rows, 500, solver);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->clusters, 8);
  EXPECT_TRUE(result->structure_found);
  EXPECT_GT(result->modularity, 2 * result->modularity_null);
  EXPECT_DOUBLE_EQ(result->ari, 1.0);
  EXPECT_EQ(result->tokens, 2500);
  EXPECT_EQ(result->holdout_tokens, 500);
  // Each aligned block of 16 positions holds one planted cluster.
  const std::vector<int64_t>& order = result->permutation.index;
  for (size_t j = 0; j < order.size(); ++j) {
    EXPECT_EQ(planted.label[static_cast<size_t>(order[j])], planted.label[static_cast<size_t>(order[j / 16 * 16])]);
  }
  ASSERT_EQ(result->blocks.size(), 2u);
  EXPECT_EQ(result->blocks[0].block, 16);
  EXPECT_DOUBLE_EQ(result->blocks[0].solved, 2.0);  // the planted optimum: two clusters per row
  EXPECT_GT(result->blocks[0].identity, 7.0);
  EXPECT_LE(result->blocks[1].solved, result->blocks[1].identity);

  // The permutation is a symmetry: the model computes the same function.
  auto applied = engine_.Apply("m", {result->permutation});
  ASSERT_TRUE(applied.ok()) << applied.status();
  EXPECT_TRUE(applied->correctness.ok);
  EXPECT_LT(applied->correctness.rel_l2, 1e-5);
}

TEST_F(SolveTest, UnstructuredTracesClaimNoGain) {
  for (uint64_t seed : {1, 2, 3}) {
    const torch::Tensor rows =
        (traces::UniformKeys(3000, 128, seed) - 0.5).to(torch::kFloat32);
    SolverOptions solver;
    solver.seed = seed;
    solver.seeds = 2;
    auto result = Compute("layers.0.inner", rows, 500, solver, 333);
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_FALSE(result->structure_found) << "Q " << result->modularity << " null " << result->modularity_null;
    EXPECT_NEAR(result->modularity / result->modularity_null, 1.0, 0.2);
    EXPECT_LT(result->ari, 0.5);  // seed noise, not clusters
    for (const BlocksTouched& blocks : result->blocks) {
      EXPECT_NEAR(blocks.solved / blocks.identity, 1.0, 0.02) << "block " << blocks.block;
    }
  }
}

TEST_F(SolveTest, OtherStatisticsFindThePlantedClustersToo) {
  const PlantedTraces planted = MakePlanted(2000, 8);
  for (const char* statistic : {"coactivation", "pmi"}) {
    SolverOptions solver;
    solver.statistic = statistic;
    solver.activation_quantile = 0.5;
    auto result = Compute("layers.0.inner", planted.rows, 400, solver);
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_EQ(result->clusters, 8) << statistic;
    EXPECT_TRUE(result->structure_found) << statistic;
    EXPECT_DOUBLE_EQ(result->blocks[0].solved, 2.0) << statistic;
  }
}

TEST_F(SolveTest, PreserveBlockKeepsAlignedBlocksIntact) {
  const PlantedTraces planted = MakePlanted(1500, 3);
  SolverOptions solver;
  solver.activation_quantile = 0.5;
  solver.preserve_block = 4;
  auto result = Compute("layers.0.inner", planted.rows, 300, solver);
  ASSERT_TRUE(result.ok()) << result.status();
  const std::vector<int64_t>& order = result->permutation.index;
  for (size_t j = 0; j < order.size(); ++j) {
    EXPECT_EQ(order[j] / 4, order[j / 4 * 4] / 4) << "position " << j;
  }
  ASSERT_TRUE(engine_.Apply("m", {result->permutation}).ok());
}

TEST_F(SolveTest, DeterministicForASeed) {
  const PlantedTraces planted = MakePlanted(800, 4);
  const torch::Tensor noisy = planted.rows + 0.3f * (traces::UniformKeys(800, 128, 9).to(torch::kFloat32) - 0.5f);
  auto first = Compute("layers.0.inner", noisy, 100, {}, 64);
  auto second = Compute("layers.0.inner", noisy, 100, {}, 1000);
  ASSERT_TRUE(first.ok() && second.ok());
  EXPECT_EQ(first->permutation.index, second->permutation.index);
  EXPECT_EQ(first->modularity, second->modularity);
}

// Issue 14: the statistics check the call's context block by block (a
// chunk of many rows stops inside), and a stopped stream is poisoned.
TEST_F(SolveTest, StatisticsStopWhenTheCallerGoesAway) {
  const torch::Tensor rows = MakePlanted(5000, 7).rows;
  TraceHeader header{"m", "layers.0.inner", 128, 500, {}};
  auto session = engine_.BeginTraces(header);
  ASSERT_TRUE(session.ok());
  CallContext ctx;
  int polls = 0;
  ctx.cancelled = [&polls] { return ++polls > 1; };  // after one block of rows
  const absl::Status stopped = (*session)->AddRows(Bytes(rows), rows.size(0), ctx);
  EXPECT_EQ(stopped.code(), absl::StatusCode::kCancelled) << stopped;
  EXPECT_NE(std::string(stopped.message()).find("trace statistics"), std::string::npos);
  EXPECT_GE(polls, 2);
  EXPECT_EQ((*session)->Finish().status().code(), absl::StatusCode::kCancelled);
}

TEST_F(SolveTest, BadStreamsAreRefusedAndKeepNothing) {
  const torch::Tensor rows = torch::ones({4, 128});
  TraceHeader header{"m", "layers.0.inner", 128, 0, {}};
  {
    auto session = engine_.BeginTraces(header);
    ASSERT_TRUE(session.ok());
    absl::Status shortened = (*session)->AddRows(Bytes(rows).substr(4), 4);
    EXPECT_EQ(shortened.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(std::string(shortened.message()).find("layers.0.inner"), std::string::npos);
    // Poisoned: later good chunks and Finish fail the same way.
    EXPECT_EQ((*session)->AddRows(Bytes(rows), 4).code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ((*session)->Finish().status().code(), absl::StatusCode::kInvalidArgument);
  }
  {
    auto session = engine_.BeginTraces(header);
    ASSERT_TRUE(session.ok());
    torch::Tensor bad = rows.clone();
    bad[2][5] = std::numeric_limits<float>::quiet_NaN();
    absl::Status nan = (*session)->AddRows(Bytes(bad), 4);
    EXPECT_EQ(nan.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(std::string(nan.message()).find("row 2"), std::string::npos) << nan;
  }
  TraceHeader wrong = header;
  wrong.channels = 64;
  EXPECT_EQ(engine_.BeginTraces(wrong).status().code(), absl::StatusCode::kInvalidArgument);
  wrong = header;
  wrong.group = "layers.9.inner";
  auto unknown = engine_.BeginTraces(wrong);
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(unknown.status().message()).find("layers.{i}.inner"), std::string::npos);
  wrong = header;
  wrong.model = "nope";
  EXPECT_EQ(engine_.BeginTraces(wrong).status().code(), absl::StatusCode::kNotFound);
  wrong = header;
  wrong.solver.statistic = "cosine";
  EXPECT_EQ(engine_.BeginTraces(wrong).status().code(), absl::StatusCode::kInvalidArgument);
  wrong = header;
  wrong.solver.nm_n = 4;
  wrong.solver.nm_m = 4;
  EXPECT_EQ(engine_.BeginTraces(wrong).status().code(), absl::StatusCode::kInvalidArgument);
  // Too few rows to correlate.
  auto one_row = Compute("layers.0.inner", rows.narrow(0, 0, 1), 0, {});
  EXPECT_EQ(one_row.status().code(), absl::StatusCode::kInvalidArgument);
  // The model was never touched.
  auto info = engine_.Info("m");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->version, 1u);
}

TEST_F(SolveTest, NmSparsityKeepsMoreSaliencyAndAppliesExactly) {
  const std::vector<std::pair<std::string, int64_t>> groups = {
      {"layers.0.inner", 128}, {"residual", 64}, {"layers.1.dt_rank", 4}};
  for (const auto& [group, channels] : groups) {
    SolverOptions solver;
    solver.objective = "nm_sparsity";
    auto result = Compute(group, torch::zeros({0, channels}), 0, solver);
    ASSERT_TRUE(result.ok()) << group << ": " << result.status();
    EXPECT_GE(result->nm_kept_solved, result->nm_kept_identity) << group;
    EXPECT_LE(result->nm_kept_solved, result->nm_upper_bound * (1 + 1e-9)) << group;
    EXPECT_GE(result->nm_efficacy, 0.0) << group;
    auto applied = engine_.Apply("m", {result->permutation});
    ASSERT_TRUE(applied.ok()) << applied.status();
    EXPECT_TRUE(applied->correctness.ok) << group;
  }
  SolverOptions solver;
  solver.objective = "nm_sparsity";
  auto state = Compute("layers.0.state", torch::zeros({0, 8}), 0, solver);
  EXPECT_EQ(state.status().code(), absl::StatusCode::kInvalidArgument);
}

// Capture on every golden model: every group solved, all applied together,
// the logits still HF's.
class CaptureTest : public ::testing::TestWithParam<testing::GoldenCase> {};

TEST_P(CaptureTest, EveryGroupSolvesAndAppliesExactly) {
  const testing::GoldenCase& c = GetParam();
  Engine engine;
  ASSERT_TRUE(engine.Load("m", (GoldenDir(c.fixture) / c.layout).string()).ok());
  const testing::Golden golden = testing::ReadGolden(c.fixture);
  CaptureRequest request;
  request.model = "m";
  request.input_ids = golden.input_ids;
  request.batch = golden.batch;
  request.solver.seeds = 2;
  auto results = engine.Capture(request);
  ASSERT_TRUE(results.ok()) << results.status();
  auto groups = engine.Symmetries("m");
  ASSERT_TRUE(groups.ok());
  ASSERT_EQ(results->size(), groups->size());
  std::vector<Permutation> permutations;
  for (size_t i = 0; i < results->size(); ++i) {
    const PermutationResult& result = (*results)[i];
    EXPECT_EQ(result.permutation.group, (*groups)[i].name);
    EXPECT_GT(result.tokens, 0);
    EXPECT_GT(result.holdout_tokens, 0);
    EXPECT_FALSE(result.blocks.empty() && (*groups)[i].size >= 64);
    permutations.push_back(result.permutation);
  }
  auto applied = engine.Apply("m", permutations);
  ASSERT_TRUE(applied.ok()) << applied.status();
  EXPECT_TRUE(applied->correctness.ok);
  EXPECT_DOUBLE_EQ(applied->correctness.top1_agreement, 1.0);
  EvaluateRequest evaluate;
  evaluate.input_ids = golden.input_ids;
  evaluate.batch = golden.batch;
  evaluate.return_logits = true;
  auto evaluated = engine.Evaluate("m", evaluate);
  ASSERT_TRUE(evaluated.ok());
  const torch::Tensor logits =
      torch::tensor(evaluated->logits).reshape(golden.logits.sizes());
  EXPECT_LT(testing::RelL2(logits, golden.logits), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Golden, CaptureTest, ::testing::ValuesIn(testing::GoldenCases()));

TEST_F(SolveTest, CaptureWithHeldOutTokensAndNamedGroups) {
  CaptureRequest request;
  request.model = "m";
  for (int64_t i = 0; i < 2 * 40; ++i) request.input_ids.push_back((i * 37) % 128);
  for (int64_t i = 0; i < 2 * 10; ++i) request.holdout_ids.push_back((i * 11) % 128);
  request.batch = 2;
  request.groups = {"layers.1.inner", "residual"};
  auto results = engine_.Capture(request);
  ASSERT_TRUE(results.ok()) << results.status();
  ASSERT_EQ(results->size(), 2u);
  EXPECT_EQ((*results)[0].permutation.group, "layers.1.inner");
  EXPECT_EQ((*results)[0].tokens, 80);
  EXPECT_EQ((*results)[0].holdout_tokens, 20);
  EXPECT_EQ((*results)[1].tokens, 80 * 3);  // two in_proj inputs and lm_head's
  request.groups = {"residual", "residual"};
  EXPECT_EQ(engine_.Capture(request).status().code(), absl::StatusCode::kInvalidArgument);
  request.groups = {"layers.7.inner"};
  EXPECT_EQ(engine_.Capture(request).status().code(), absl::StatusCode::kInvalidArgument);
  request.groups = {};
  request.input_ids.push_back(500);
  EXPECT_EQ(engine_.Capture(request).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace icd
