// One model's layers over several devices (engine/placement.cc, issue 23):
// the explicit ranges and their refusals, the byte-balanced plan, and on
// this CPU a model placed in ranges (every range on the CPU: the ranges, the
// bytes and the refusals are what can be seen without a second device;
// cuda_test splits over a GPU and the CPU, and over two GPUs where there are).
#include "engine/placement.h"

#include <gtest/gtest.h>

#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "icd/core/engine.h"
#include "icd/core/memory_budget.h"
#include "io/config.h"
#include "test_util.h"

namespace icd {
namespace {

using engine_internal::BalancePlacement;
using engine_internal::ParsePlacement;
using engine_internal::PlacementSizes;

std::string Ranges(const std::vector<LayerRange>& ranges) {
  std::string text;
  for (const LayerRange& r : ranges) {
    text += (text.empty() ? "" : ",") + r.device + "=" + std::to_string(r.first) + "-" +
            std::to_string(r.last);
  }
  return text;
}

TEST(ParsePlacementTest, RangesNameEveryLayerOnceInOrder) {
  auto ranges = ParsePlacement("cuda:0=0-31,cuda:1=32-63", 64);
  ASSERT_TRUE(ranges.ok()) << ranges.status();
  EXPECT_EQ(Ranges(*ranges), "cuda:0=0-31,cuda:1=32-63");
  auto single = ParsePlacement("cpu=0-2,cuda:0=3", 4);  // "3" is "3-3"
  ASSERT_TRUE(single.ok()) << single.status();
  EXPECT_EQ(Ranges(*single), "cpu=0-2,cuda:0=3-3");
}

TEST(ParsePlacementTest, GapsOverlapsAndStrayLayersAreRefusedByName) {
  const std::vector<std::pair<std::string, std::string>> refused = {
      {"cuda:0=0-30,cuda:1=32-63", "should start at layer 31"},
      {"cuda:0=0-32,cuda:1=32-63", "should start at layer 33"},
      {"cuda:0=0-31", "layers 32-63 are on no device"},
      {"cuda:0=0-64", "layer 64 past the model's 64 layers"},
      {"cuda:0=5-0", "should start at layer 0"},
      {"cuda:0=0-3-5", "is not a layer range"},
      {"cuda:0", "is not DEVICE=FIRST-LAST"},
      {"=0-63", "is not DEVICE=FIRST-LAST"},
      {"cuda:0=a-b", "is not a layer range"},
  };
  for (const auto& [text, needle] : refused) {
    auto ranges = ParsePlacement(text, 64);
    testing::ExpectError(ranges.status(), absl::StatusCode::kInvalidArgument, needle);
    testing::ExpectError(ranges.status(), absl::StatusCode::kInvalidArgument,
                         "placement '" + text + "'");
  }
}

TEST(BalancePlacementTest, EqualLayersSplitEvenly) {
  PlacementSizes sizes;
  sizes.layers.assign(64, 100);
  auto ranges = *BalancePlacement(sizes, {"cuda:0", "cuda:1"});
  EXPECT_EQ(Ranges(ranges), "cuda:0=0-31,cuda:1=32-63");
  EXPECT_EQ(ranges[0].bytes, 3200);
  EXPECT_EQ(ranges[1].bytes, 3200);
}

TEST(BalancePlacementTest, TheEmbeddingAndHeadWeighOnTheEndDevices) {
  PlacementSizes sizes;
  sizes.layers.assign(8, 100);
  sizes.first = 300;  // the embedding: three layers' worth
  sizes.last = 100;   // final norm and head
  auto ranges = *BalancePlacement(sizes, {"cuda:0", "cuda:1", "cuda:2"});
  // Totals 1200 over three: 400 each is reachable only as 300+100 | 4x100 | 3x100+100.
  EXPECT_EQ(Ranges(ranges), "cuda:0=0-0,cuda:1=1-4,cuda:2=5-7");
  int64_t total = 0;
  int64_t largest = 0;
  for (const LayerRange& r : ranges) {
    total += r.bytes;
    largest = std::max(largest, r.bytes);
  }
  EXPECT_EQ(total, 1200);
  EXPECT_EQ(largest, 400);
}

TEST(BalancePlacementTest, NoPartIsLargerThanTheBestSplitFoundByBruteForce) {
  std::mt19937_64 rng(3);
  for (int trial = 0; trial < 200; ++trial) {
    PlacementSizes sizes;
    const int n = 1 + static_cast<int>(rng() % 9);
    for (int i = 0; i < n; ++i) sizes.layers.push_back(1 + static_cast<int64_t>(rng() % 50));
    sizes.first = static_cast<int64_t>(rng() % 60);
    sizes.last = static_cast<int64_t>(rng() % 60);
    const auto ranges = *BalancePlacement(sizes, {"a", "b", "c"});
    // Contiguous, in device order, every layer once.
    ASSERT_FALSE(ranges.empty());
    EXPECT_EQ(ranges.front().first, 0);
    EXPECT_EQ(ranges.back().last, n - 1);
    for (size_t r = 1; r < ranges.size(); ++r) {
      EXPECT_EQ(ranges[r].first, ranges[r - 1].last + 1);
      EXPECT_LT(ranges[r - 1].device, ranges[r].device);
    }
    int64_t largest = 0;
    for (const LayerRange& r : ranges) largest = std::max(largest, r.bytes);
    // Every way to cut the n layers into at most three runs.
    std::vector<int64_t> per(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) {
      per[static_cast<size_t>(i)] = sizes.layers[static_cast<size_t>(i)] +
                                    (i == 0 ? sizes.first : 0) + (i == n - 1 ? sizes.last : 0);
    }
    int64_t best = std::numeric_limits<int64_t>::max();
    for (int a = 0; a <= n; ++a) {
      for (int b = a; b <= n; ++b) {
        const int cuts[] = {0, a, b, n};
        int64_t worst = 0;
        for (int c = 0; c < 3; ++c) {
          worst = std::max(worst, std::accumulate(per.begin() + cuts[c], per.begin() + cuts[c + 1],
                                                  int64_t{0}));
        }
        best = std::min(best, worst);
      }
    }
    EXPECT_EQ(largest, best) << "trial " << trial;
  }
}

TEST(BalancePlacementTest, ADeviceWithNoRoomIsLeftOut) {
  PlacementSizes sizes;
  sizes.layers.assign(4, 100);
  // The first GPU's budget is spent: everything goes to the second.
  auto ranges = BalancePlacement(sizes, {"cuda:0", "cuda:1"}, {1, 1000});
  ASSERT_TRUE(ranges.ok()) << ranges.status();
  EXPECT_EQ(Ranges(*ranges), "cuda:1=0-3");
  // Fewer layers than devices: one range each, the rest unused.
  sizes.layers.assign(2, 100);
  EXPECT_EQ(Ranges(*BalancePlacement(sizes, {"a", "b", "c"})), "a=0-0,b=1-1");
}

TEST(BalancePlacementTest, DeviceMemoryShapesThePlanAndAModelTooLargeIsRefused) {
  PlacementSizes sizes;
  sizes.layers.assign(12, 100);
  // The second device has three times the first's room: it takes three
  // quarters of the layers.
  auto ranges = BalancePlacement(sizes, {"cuda:0", "cuda:1"}, {400, 1200});
  ASSERT_TRUE(ranges.ok()) << ranges.status();
  EXPECT_EQ(Ranges(*ranges), "cuda:0=0-2,cuda:1=3-11");
  // Room for 1100 of the 1200 bytes: refused, nothing planned.
  testing::ExpectError(BalancePlacement(sizes, {"cuda:0", "cuda:1"}, {500, 600}).status(),
                       absl::StatusCode::kResourceExhausted, "do not fit the 1100 bytes free");
  // Room unknown on one device: balanced by bytes.
  auto unknown = BalancePlacement(sizes, {"cuda:0", "cuda:1"}, {400, -1});
  ASSERT_TRUE(unknown.ok());
  EXPECT_EQ(Ranges(*unknown), "cuda:0=0-5,cuda:1=6-11");
}

TEST(PlacementSizesTest, EveryWeightIsCountedOnce) {
  auto config = ReadConfigFile(testing::GoldenDir("mamba1-bias-untied") / "hf" / "config.json");
  ASSERT_TRUE(config.ok()) << config.status();
  const PlacementSizes sizes = engine_internal::SizesOf(*config, 4);
  int64_t total = sizes.first + sizes.last;
  for (int64_t bytes : sizes.layers) total += bytes;
  int64_t expected = 0;
  for (const auto& [name, shape] : ExpectedShapes(*config)) {
    int64_t bytes = 4;
    for (int64_t size : shape) bytes *= size;
    expected += bytes;
  }
  EXPECT_EQ(total, expected);
  EXPECT_EQ(sizes.first, config->vocab_size * config->d_model * 4);  // the embedding
  EXPECT_GT(sizes.last, sizes.first);  // the untied head and the final norm
}

// ---------------------------------------------------------------- the engine

class PlacedModelTest : public ::testing::Test {
 protected:
  absl::StatusOr<ModelInfo> Load(const std::string& name, const std::string& fixture,
                                 const std::string& placement, const std::string& layout = "hf") {
    LoadOptions options;
    options.placement = placement;
    return engine_.Load(name, (testing::GoldenDir(fixture) / layout).string(), options);
  }
  Engine engine_;
};

TEST_F(PlacedModelTest, RangesAreReportedWithTheirBytesAndTheModelIsUnchanged) {
  auto whole = Load("whole", "mamba1-bias-untied", "");
  ASSERT_TRUE(whole.ok()) << whole.status();
  ASSERT_EQ(whole->placement.size(), 1u);
  EXPECT_EQ(whole->placement[0].device, "cpu");
  EXPECT_EQ(whole->placement[0].last, whole->dims.at("n_layer") - 1);
  EXPECT_EQ(whole->placement[0].bytes, whole->device_bytes);

  auto placed = Load("placed", "mamba1-bias-untied", "cpu=0-0,cpu=1-1");
  ASSERT_TRUE(placed.ok()) << placed.status();
  ASSERT_EQ(placed->placement.size(), 2u);
  EXPECT_EQ(Ranges(placed->placement), "cpu=0-0,cpu=1-1");
  EXPECT_EQ(placed->device, "cpu");
  EXPECT_EQ(placed->placement[0].bytes + placed->placement[1].bytes, placed->device_bytes);
  EXPECT_EQ(placed->device_bytes, whole->device_bytes);
  // The embedding with layer 0, the untied head with layer 1: the second
  // range holds the head (as large as the embedding) and the final norm.
  EXPECT_GT(placed->placement[1].bytes, placed->placement[0].bytes / 2);

  const testing::Golden golden = testing::ReadGolden("mamba1-bias-untied");
  const EvaluateRequest request{golden.input_ids, golden.batch, /*return_logits=*/true};
  auto a = engine_.Evaluate("whole", request);
  auto b = engine_.Evaluate("placed", request);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->logits, b->logits);

  // Every group applied, checked and exported as on one device.
  testing::ApplySamePermutations(engine_, {"placed", "whole"}, 5);
  EXPECT_EQ(testing::TensorBytes(engine_, "placed"), testing::TensorBytes(engine_, "whole"));
  const testing::TempDir temp;
  auto exported = engine_.Export("placed", (temp.path() / "out").string());
  ASSERT_TRUE(exported.ok()) << exported.status();

  // Unloading gives back every range's bytes.
  ASSERT_TRUE(engine_.Unload("placed").ok());
  ASSERT_TRUE(engine_.Unload("whole").ok());
  for (const DeviceMemory& memory : engine_.Memory()) {
    EXPECT_EQ(memory.model_bytes, 0) << memory.device;
    EXPECT_EQ(memory.models, 0) << memory.device;
  }
}

TEST_F(PlacedModelTest, BadPlacementsAreRefusedAndLoadNothing) {
  testing::ExpectError(Load("m", "mamba1-small", "cpu=0-0").status(),
                       absl::StatusCode::kInvalidArgument, "layers 1-1 are on no device");
  testing::ExpectError(Load("m", "mamba1-small", "cpu=0-0,tpu:0=1-1").status(),
                       absl::StatusCode::kInvalidArgument, "tpu:0");
  testing::ExpectError(Load("m", "mamba1-small", "cpu=0-5").status(),
                       absl::StatusCode::kInvalidArgument, "past the model's 2 layers");
  if (!torch::cuda::is_available()) {
    testing::ExpectError(Load("m", "mamba1-small", "auto").status(),
                         absl::StatusCode::kInvalidArgument, "no CUDA device");
  }
  LoadOptions both;
  both.device = "cpu";
  both.placement = "cpu=0-1";
  testing::ExpectError(
      engine_.Load("m", (testing::GoldenDir("mamba1-small") / "hf").string(), both).status(),
      absl::StatusCode::kInvalidArgument, "give one");
  // Zamba2's shared blocks run at layers all over the model.
  testing::ExpectError(Load("m", "zamba2-small", "cpu=0-1,cpu=2-4").status(),
                       absl::StatusCode::kInvalidArgument, "shared blocks");
  EXPECT_TRUE(engine_.List().empty());
}

TEST_F(PlacedModelTest, ABudgetRefusesThePlacementAsAWhole) {
  EngineOptions options;
  ASSERT_TRUE(AddMemoryBudget("cpu=1", options.memory_budget).ok());  // 1 MiB
  Engine engine(options);
  LoadOptions load;
  load.dtype = "float32";
  // mamba1-pydoc: 4 MB in float32, past 1 MiB in either range's share or both.
  const std::string reference = testing::ReferenceModelDir("mamba1-pydoc");
  load.placement = "cpu=0-1,cpu=2-3";
  auto refused = engine.Load("m", reference, load);
  testing::ExpectError(refused.status(), absl::StatusCode::kResourceExhausted, "cpu");
  for (const DeviceMemory& memory : engine.Memory()) EXPECT_EQ(memory.model_bytes, 0);
  // The control: the fixture, far under 1 MiB, loads placed.
  load.placement = "cpu=0-0,cpu=1-1";
  auto small = engine.Load("s", (testing::GoldenDir("mamba1-small") / "hf").string(), load);
  EXPECT_TRUE(small.ok()) << small.status();
}

}  // namespace
}  // namespace icd
