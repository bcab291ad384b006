// Leiden clustering, modularity and the adjusted Rand index.
#include "traces/leiden.h"

#include <gtest/gtest.h>
#include "torch_api.h"

#include <vector>

#include "traces/graph.h"
#include "traces/stats.h"

namespace icd::traces {
namespace {

// `groups` planted communities of `size` nodes: weights in [0.5, 1) inside,
// [0, between) across, symmetric, zero diagonal, nodes shuffled.
struct Planted {
  torch::Tensor graph;
  std::vector<int64_t> truth;
};

Planted MakePlanted(int64_t groups, int64_t size, double between, uint64_t seed) {
  const int64_t n = groups * size;
  const torch::Tensor noise = UniformKeys(n, n, seed);
  const torch::Tensor shuffle = UniformKeys(1, n, seed + 1).argsort(int64_t{1}).squeeze(0);
  const torch::Tensor label = torch::div(shuffle, size, "floor");
  const torch::Tensor same = label.unsqueeze(1) == label.unsqueeze(0);
  torch::Tensor graph = torch::where(same, 0.5 + 0.5 * noise, between * noise);
  graph = (graph + graph.t()) / 2;
  graph.fill_diagonal_(0);
  Planted planted{graph, {}};
  for (int64_t i = 0; i < n; ++i) planted.truth.push_back(label[i].item<int64_t>());
  return planted;
}

TEST(ModularityTest, TwoTrianglesJoinedByAnEdge) {
  // Nodes 0-2 and 3-5 form triangles; edge 2-3 joins them. m = 7:
  // Q = 2 * (6/14 - (7/14)^2) = 5/14.
  torch::Tensor graph = torch::zeros({6, 6}, torch::kFloat64);
  for (auto [a, b] : std::vector<std::pair<int, int>>{{0, 1}, {0, 2}, {1, 2}, {3, 4}, {3, 5}, {4, 5}, {2, 3}}) {
    graph[a][b] = 1;
    graph[b][a] = 1;
  }
  EXPECT_NEAR(Modularity(graph, {0, 0, 0, 1, 1, 1}, 1.0), 5.0 / 14.0, 1e-15);
  EXPECT_NEAR(Modularity(graph, {0, 0, 0, 0, 0, 0}, 1.0), 0.0, 1e-15);
  auto labels = LeidenCluster(graph, {});
  ASSERT_TRUE(labels.ok()) << labels.status();
  EXPECT_EQ(*labels, (std::vector<int64_t>{0, 0, 0, 1, 1, 1}));
}

TEST(LeidenTest, RecoversPlantedCommunities) {
  for (uint64_t seed : {1, 2, 3}) {
    const Planted planted = MakePlanted(6, 20, 0.3, seed);
    auto labels = LeidenCluster(planted.graph, {1.0, seed});
    ASSERT_TRUE(labels.ok()) << labels.status();
    EXPECT_DOUBLE_EQ(AdjustedRandIndex(*labels, planted.truth), 1.0) << "seed " << seed;
    EXPECT_NEAR(Modularity(planted.graph, *labels, 1.0),
                Modularity(planted.graph, planted.truth, 1.0), 1e-12);
  }
}

TEST(LeidenTest, DeterministicForASeedAndLabelsNumberedByFirstAppearance) {
  const Planted planted = MakePlanted(5, 12, 0.6, 9);
  auto first = LeidenCluster(planted.graph, {1.0, 42});
  auto second = LeidenCluster(planted.graph, {1.0, 42});
  ASSERT_TRUE(first.ok() && second.ok());
  EXPECT_EQ(*first, *second);
  int64_t next = 0;
  for (int64_t label : *first) {
    EXPECT_LE(label, next);
    if (label == next) ++next;
  }
}

TEST(LeidenTest, NeverWorseThanEveryNodeAloneOrAllTogether) {
  // Dense noise graph: no structure, yet Q >= both trivial partitions.
  const torch::Tensor noise = UniformKeys(80, 80, 4);
  torch::Tensor graph = (noise + noise.t()) / 2;
  graph.fill_diagonal_(0);
  auto labels = LeidenCluster(graph, {});
  ASSERT_TRUE(labels.ok());
  std::vector<int64_t> alone(80), together(80, 0);
  for (int64_t i = 0; i < 80; ++i) alone[static_cast<size_t>(i)] = i;
  const double q = Modularity(graph, *labels, 1.0);
  EXPECT_GE(q, Modularity(graph, alone, 1.0));
  EXPECT_GE(q, Modularity(graph, together, 1.0));
}

// The GEMM form of the dense passes (what a GPU graph runs) against the
// CPU loops: the same partitions, the same modularity.
TEST(LeidenTest, TensorDensePassesFindTheSamePartitions) {
  torch::Tensor noise = UniformKeys(150, 150, 11);
  noise = (noise + noise.t()) / 2;
  noise.fill_diagonal_(0);
  for (const torch::Tensor& graph : {MakePlanted(6, 20, 0.4, 3).graph, noise}) {
    for (uint64_t seed : {1, 2, 3}) {
      LeidenOptions loops{1.0, seed};
      LeidenOptions tensors = loops;
      tensors.tensor_dense_passes = true;
      auto expected = LeidenCluster(graph, loops);
      auto actual = LeidenCluster(graph, tensors);
      ASSERT_TRUE(expected.ok() && actual.ok());
      EXPECT_EQ(*actual, *expected) << "seed " << seed;
      EXPECT_NEAR(Modularity(graph, *actual, 1.0), Modularity(graph, *expected, 1.0), 1e-12);
    }
  }
}

TEST(LeidenTest, HigherResolutionGivesMoreClusters) {
  const Planted planted = MakePlanted(4, 16, 0.4, 5);
  auto count = [&](double resolution) {
    auto labels = LeidenCluster(planted.graph, {resolution, 0});
    EXPECT_TRUE(labels.ok());
    int64_t clusters = 0;
    for (int64_t label : *labels) clusters = std::max(clusters, label + 1);
    return clusters;
  };
  EXPECT_EQ(count(1.0), 4);
  EXPECT_EQ(count(1e-3), 1);
  EXPECT_GT(count(3.0), 4);
}

TEST(LeidenTest, NoEdgesLeavesSingletons) {
  auto labels = LeidenCluster(torch::zeros({5, 5}), {});
  ASSERT_TRUE(labels.ok());
  EXPECT_EQ(*labels, (std::vector<int64_t>{0, 1, 2, 3, 4}));
}

TEST(LeidenTest, HonoursCancellation) {
  const Planted planted = MakePlanted(4, 16, 0.4, 5);
  CallContext ctx;
  ctx.cancelled = [] { return true; };
  auto labels = LeidenCluster(planted.graph, {}, ctx);
  EXPECT_EQ(labels.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(LeidenCluster(torch::zeros({3, 4}), {}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(AdjustedRandIndexTest, KnownValues) {
  EXPECT_DOUBLE_EQ(AdjustedRandIndex({0, 0, 1, 1}, {5, 5, 2, 2}), 1.0);
  // sklearn.metrics.adjusted_rand_score([0,0,1,1], [0,0,1,2]) = 0.5714285714
  EXPECT_NEAR(AdjustedRandIndex({0, 0, 1, 1}, {0, 0, 1, 2}), 4.0 / 7.0, 1e-12);
  // Independent labelings score near 0.
  std::vector<int64_t> a, b;
  const torch::Tensor keys = UniformKeys(2, 4000, 8);
  for (int64_t i = 0; i < 4000; ++i) {
    a.push_back(static_cast<int64_t>(keys[0][i].item<double>() * 8));
    b.push_back(static_cast<int64_t>(keys[1][i].item<double>() * 8));
  }
  EXPECT_LT(std::abs(AdjustedRandIndex(a, b)), 0.01);
}

}  // namespace
}  // namespace icd::traces
