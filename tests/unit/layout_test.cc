// Orders from partitions, constraints, blocks touched and the block refinement.
#include "traces/layout.h"

#include <gtest/gtest.h>
#include "torch_api.h"

#include <numeric>
#include <vector>

#include "traces/stats.h"

namespace icd::traces {
namespace {

std::vector<int64_t> Identity(int64_t n) {
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  return order;
}

bool IsPermutation(std::vector<int64_t> order) {
  std::sort(order.begin(), order.end());
  return order == Identity(static_cast<int64_t>(order.size()));
}

GroupInfo Group(int64_t size, int64_t block = 0, int64_t whole = 0) {
  GroupInfo group;
  group.name = "layers.0.inner";
  group.size = size;
  group.block = block;
  group.whole = whole;
  return group;
}

// Channel c belongs to cluster c % clusters: the identity interleaves them.
torch::Tensor InterleavedGraph(int64_t channels, int64_t clusters) {
  const torch::Tensor label = torch::arange(channels) % clusters;
  torch::Tensor graph = (label.unsqueeze(1) == label.unsqueeze(0)).to(torch::kFloat64) + 0.01;
  graph.fill_diagonal_(0);
  return graph;
}

TEST(BlocksTouchedTest, CountsBlocksWithAnActiveChannel) {
  // Two rows, 6 channels, blocks of 4 (the last partial).
  const torch::Tensor active = torch::tensor({1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0},
                                             torch::kFloat32).reshape({2, 6});
  EXPECT_DOUBLE_EQ(MeanBlocksTouched(active, Identity(6), 4), (2.0 + 0.0) / 2);
  EXPECT_DOUBLE_EQ(MeanBlocksTouched(active, {0, 1, 5, 2, 3, 4}, 4), (1.0 + 0.0) / 2);
  EXPECT_DOUBLE_EQ(MeanBlocksTouched(active.narrow(0, 0, 0), Identity(6), 4), 0.0);
}

TEST(ClusterAndOrderTest, LaysClustersOutContiguously) {
  const torch::Tensor graph = InterleavedGraph(32, 4);
  auto layout = ClusterAndOrder(graph, torch::zeros({32}), {32, 1}, {});
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(layout->clusters, 4);
  ASSERT_TRUE(IsPermutation(layout->order));
  for (int64_t j = 0; j < 32; ++j) {
    // Every aligned run of 8 positions holds one cluster.
    EXPECT_EQ(layout->order[static_cast<size_t>(j)] % 4, layout->order[static_cast<size_t>(j / 8 * 8)] % 4);
  }
}

TEST(ClusterAndOrderTest, OrdersChannelsInsideAClusterByActivity) {
  const torch::Tensor graph = InterleavedGraph(8, 1);
  const torch::Tensor rate = torch::tensor({0.1, 0.5, 0.3, 0.9, 0.2, 0.0, 0.8, 0.4}, torch::kFloat64);
  auto layout = ClusterAndOrder(graph, rate, {8, 1}, {});
  ASSERT_TRUE(layout.ok());
  EXPECT_EQ(layout->order, (std::vector<int64_t>{3, 6, 1, 7, 2, 4, 0, 5}));
}

TEST(ClusterAndOrderTest, KeepsChannelsInsideTheirSegment) {
  const torch::Tensor graph = InterleavedGraph(48, 4);
  auto constraints = MakeConstraints(Group(48, 16), 0);
  ASSERT_TRUE(constraints.ok());
  auto layout = ClusterAndOrder(graph, torch::zeros({48}), *constraints, {});
  ASSERT_TRUE(layout.ok());
  ASSERT_TRUE(IsPermutation(layout->order));
  for (int64_t j = 0; j < 48; ++j) EXPECT_EQ(layout->order[static_cast<size_t>(j)] / 16, j / 16);
}

TEST(ClusterAndOrderTest, PreservedBlocksMoveWholeOrInside) {
  // Units of 4 channels; the graph ties unit u to unit u + 4 (8 units).
  const torch::Tensor unit = torch::div(torch::arange(32), 4, "floor") % 4;
  torch::Tensor graph = (unit.unsqueeze(1) == unit.unsqueeze(0)).to(torch::kFloat64) + 0.01;
  graph.fill_diagonal_(0);
  auto constraints = MakeConstraints(Group(32), 4);
  ASSERT_TRUE(constraints.ok());
  auto layout = ClusterAndOrder(graph, UniformKeys(1, 32, 3).squeeze(0), *constraints, {});
  ASSERT_TRUE(layout.ok());
  ASSERT_TRUE(IsPermutation(layout->order));
  for (int64_t j = 0; j < 32; ++j) {
    // Each aligned destination unit holds exactly one source unit.
    EXPECT_EQ(layout->order[static_cast<size_t>(j)] / 4, layout->order[static_cast<size_t>(j / 4 * 4)] / 4);
  }
  EXPECT_EQ(layout->clusters, 4);
}

TEST(MakeConstraintsTest, RefusesBlocksThatDoNotFit) {
  EXPECT_EQ(MakeConstraints(Group(48, 16), 5).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeConstraints(Group(50), 4).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeConstraints(Group(48), -1).status().code(), absl::StatusCode::kInvalidArgument);
  auto heads = MakeConstraints(Group(8, 0, 4), 0);
  ASSERT_TRUE(heads.ok());
  EXPECT_EQ(heads->segment, 4);
}

TEST(RefineForBlocksTest, ReachesThePlantedOptimumAndNeverWorsens) {
  // 64 channels, 4 hidden clusters of 16 (c % 4); each row activates one.
  const int64_t rows = 256, channels = 64;
  const torch::Tensor which = (UniformKeys(rows, 1, 2) * 4).floor();
  const torch::Tensor cluster = (torch::arange(channels) % 4).to(torch::kFloat64);
  const torch::Tensor active = (which == cluster.unsqueeze(0)).to(torch::kFloat32);
  // Start from the clustered layout with five channels swapped across
  // blocks (some blocks hold two strangers: fixing one alone gains nothing).
  std::vector<int64_t> start;
  for (int64_t c = 0; c < 4; ++c) {
    for (int64_t k = 0; k < 16; ++k) start.push_back(c + 4 * k);
  }
  for (auto [p, q] : std::vector<std::pair<size_t, size_t>>{{0, 20}, {5, 40}, {17, 63}, {33, 50}, {9, 60}}) {
    std::swap(start[p], start[q]);
  }
  EXPECT_DOUBLE_EQ(MeanBlocksTouched(active, Identity(channels), 16), 4.0);
  EXPECT_GT(MeanBlocksTouched(active, start, 16), 1.5);
  const std::vector<int64_t> refined = RefineForBlocks(active, start, 16, {channels, 1}, 30);
  ASSERT_TRUE(IsPermutation(refined));
  EXPECT_DOUBLE_EQ(MeanBlocksTouched(active, refined, 16), 1.0);
  // From the interleaved identity no single swap removes a touched block;
  // the Σ count² tie-break walks off that plateau.
  EXPECT_DOUBLE_EQ(
      MeanBlocksTouched(active, RefineForBlocks(active, Identity(channels), 16, {channels, 1}, 30), 16),
      1.0);

  // Constrained to segments of 16 = blocks: nothing may move across.
  const std::vector<int64_t> pinned = RefineForBlocks(active, start, 16, {16, 1}, 30);
  EXPECT_EQ(pinned, start);
}

}  // namespace
}  // namespace icd::traces
