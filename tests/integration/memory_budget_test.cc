// The per-device memory budget over real gRPC (issue 20, item 1): a load
// past the budget is RESOURCE_EXHAUSTED naming the device, the bytes
// needed, those in use and the budget, and loads nothing; a loaded model
// stays exactly as it was (version, weights, verification); an unload gives
// its bytes back; ListModels reports each model's device bytes; calls past
// the budget are refused the same way. Each with a control without the
// budget (or with room), so that the refusals are the budget's.
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "harness.h"

namespace icd::testing {
namespace {

using absl::StatusCode;

// mamba1-small in float32 as the budget counts it: 67,520 parameters x 4
// bytes, and the probe reference (int64 ids [2, 32], float32 logits [2, 32,
// 128]); in float64, 67,520 x 8 + the same probe.
constexpr int64_t kSmallFloat32Bytes = 67520 * 4 + 2 * 32 * 8 + 2 * 32 * 128 * 4;  // 303,360
constexpr int64_t kSmallFloat64Bytes = 67520 * 8 + 2 * 32 * 8 + 2 * 32 * 128 * 4;  // 573,440

EngineOptions BudgetBytesOnCpu(int64_t bytes) {
  EngineOptions options;
  options.memory_budget.bytes["cpu"] = bytes;
  return options;
}

// Every name in ListModels with its device bytes.
std::map<std::string, int64_t> ListedDeviceBytes(Client& client) {
  std::map<std::string, int64_t> listed;
  auto list = client.ListModels();
  EXPECT_TRUE(list.ok()) << list.status();
  if (list.ok()) {
    for (const v1::ModelInfo& info : *list) listed[info.name()] = info.device_bytes();
  }
  return listed;
}

// `model`'s version (ListModels) and every tensor's bytes (ReadTensors):
// equal means the model is exactly as it was. (Snapshot's Evaluate is a call
// the budget counts; this reads without one.)
struct BudgetModelState {
  uint64_t version = 0;
  std::map<std::string, std::string> tensors;
  bool operator==(const BudgetModelState& other) const {
    return version == other.version && tensors == other.tensors;
  }
};
BudgetModelState ReadModelState(Client& client, const std::string& model) {
  BudgetModelState state;
  auto list = client.ListModels();
  EXPECT_TRUE(list.ok()) << list.status();
  if (list.ok()) {
    for (const v1::ModelInfo& info : *list) {
      if (info.name() == model) state.version = info.version();
    }
  }
  auto tensors = client.ReadTensors(model);
  EXPECT_TRUE(tensors.ok()) << tensors.status();
  if (tensors.ok()) {
    for (Tensor& tensor : *tensors) state.tensors[tensor.name] = std::move(tensor.data);
  }
  return state;
}

void ExpectMessageHas(const absl::Status& status, const std::vector<std::string>& needles) {
  for (const std::string& needle : needles) {
    EXPECT_NE(std::string(status.message()).find(needle), std::string::npos)
        << "'" << needle << "' not in: " << status;
  }
}

TEST(MemoryBudgetServiceTest, LoadsPastTheBudgetAreRefusedAndAnUnloadGivesRoom) {
  // Room for one float32 model (and the early check of a second, 2 bytes a
  // weight), not for a float64 one, nor for two float32 ones.
  constexpr int64_t kBudget = 500000;
  Harness harness({}, BudgetBytesOnCpu(kBudget));
  Client& client = harness.client();

  // Smaller than the model: refused, nothing loaded.
  auto wide = client.LoadModel("wide", "mamba1-small/hf", "", "float64");
  ExpectCode(wide.status(), StatusCode::kResourceExhausted,
             "memory budget of device cpu: loading model 'wide'");
  ExpectMessageHas(
      wide.status(),
      {absl::StrCat("needs ", kSmallFloat64Bytes, " bytes"), "0 bytes (0.0 MiB) are in use",
       absl::StrCat("the budget is ", kBudget, " bytes"), "--memory-budget-mb"});
  EXPECT_TRUE(ListedDeviceBytes(client).empty());

  // One that fits, with its bytes in ListModels, then changed (version 2).
  ASSERT_OK_AND_ASSIGN(m, client.LoadModel("m", "mamba1-small/hf"));
  EXPECT_EQ(m.device_bytes(), kSmallFloat32Bytes);
  EXPECT_EQ(m.device_bytes(), m.parameters() * 4 + 2 * 32 * (8 + 4 * m.dims().at("vocab_size")));
  EXPECT_EQ(ListedDeviceBytes(client), (std::map<std::string, int64_t>{{"m", kSmallFloat32Bytes}}));
  ASSERT_OK_AND_ASSIGN(syms, client.GetSymmetries("m"));
  std::mt19937_64 rng(20);
  ASSERT_OK_AND_ASSIGN(applied, client.ApplyPermutation("m", RandomPermutations(syms, rng)));
  ASSERT_EQ(applied.version(), 2u);
  const BudgetModelState before = ReadModelState(client, "m");
  ASSERT_EQ(before.version, 2u);
  ASSERT_FALSE(before.tensors.empty());
  ASSERT_OK_AND_ASSIGN(verified, client.Verify("m"));
  ASSERT_TRUE(verified.ok());

  // A second one past what remains: refused, the first exactly as it was.
  auto second = client.LoadModel("n", "mamba1-small/hf");
  ExpectCode(second.status(), StatusCode::kResourceExhausted,
             "memory budget of device cpu: loading model 'n'");
  ExpectMessageHas(second.status(), {absl::StrCat("needs ", kSmallFloat32Bytes, " bytes"),
                                     absl::StrCat(kSmallFloat32Bytes,
                                                  " bytes (0.3 MiB) are in use there (1 model(s)"),
                                     absl::StrCat("the budget is ", kBudget, " bytes")});
  EXPECT_EQ(ListedDeviceBytes(client), (std::map<std::string, int64_t>{{"m", kSmallFloat32Bytes}}));
  EXPECT_TRUE(ReadModelState(client, "m") == before);  // version and every weight, bit for bit
  ASSERT_OK_AND_ASSIGN(again, client.Verify("m"));
  EXPECT_TRUE(again.ok());
  EXPECT_EQ(again.rel_l2(), verified.rel_l2());
  EXPECT_EQ(again.max_abs(), verified.max_abs());
  ASSERT_OK_AND_ASSIGN(serving, client.Health());
  EXPECT_TRUE(serving);

  // The unload gives the bytes back: the same load now succeeds.
  ASSERT_TRUE(client.UnloadModel("m").ok());
  ASSERT_OK_AND_ASSIGN(n, client.LoadModel("n", "mamba1-small/hf"));
  EXPECT_EQ(n.device_bytes(), kSmallFloat32Bytes);
  EXPECT_EQ(ListedDeviceBytes(client), (std::map<std::string, int64_t>{{"n", kSmallFloat32Bytes}}));
  ASSERT_OK_AND_ASSIGN(fresh, client.Verify("n"));
  EXPECT_TRUE(fresh.ok());
}

// Control: the same loads without a budget all succeed.
TEST(MemoryBudgetServiceTest, WithoutABudgetTheSameLoadsSucceed) {
  Harness harness;
  Client& client = harness.client();
  ASSERT_OK_AND_ASSIGN(wide, client.LoadModel("wide", "mamba1-small/hf", "", "float64"));
  EXPECT_EQ(wide.device_bytes(), kSmallFloat64Bytes);
  ASSERT_TRUE(client.LoadModel("m", "mamba1-small/hf").ok());
  ASSERT_TRUE(client.LoadModel("n", "mamba1-small/hf").ok());
  EXPECT_EQ(ListedDeviceBytes(client), (std::map<std::string, int64_t>{{"wide", kSmallFloat64Bytes},
                                                                       {"m", kSmallFloat32Bytes},
                                                                       {"n", kSmallFloat32Bytes}}));
}

v1::CaptureRequest GoldenCapture(const Golden& golden) {
  v1::CaptureRequest request;
  request.set_model("m");
  request.mutable_input_ids()->Add(golden.input_ids.begin(), golden.input_ids.end());
  request.set_batch(golden.batch);
  return request;
}

v1::LatencyRequest LongPrefill() {
  v1::LatencyRequest request;
  request.set_model("m");
  request.set_mode("prefill");
  request.set_batch(4);
  request.set_seq_len(1024);
  request.set_warmup(0);
  request.set_iters(1);
  return request;
}

// A capture and a latency run whose estimates pass what the model leaves
// of the budget: refused before they allocate, the model as it was; with
// room, the same calls run.
TEST(MemoryBudgetServiceTest, CallsPastTheBudgetAreRefusedAndChangeNothing) {
  const Golden golden = LoadGolden("mamba1-small");
  {
    Harness harness({}, BudgetBytesOnCpu(kSmallFloat32Bytes + (int64_t{1} << 20)));
    Client& client = harness.client();
    ASSERT_TRUE(client.LoadModel("m", "mamba1-small/hf").ok());
    const ModelState before = Snapshot(client, "m", golden);  // an Evaluate that fits
    auto capture = client.CapturePermutation(GoldenCapture(golden));
    ExpectCode(capture.status(), StatusCode::kResourceExhausted,
               "memory budget of device cpu: CapturePermutation of model 'm'");
    ExpectMessageHas(capture.status(),
                     {absl::StrCat(kSmallFloat32Bytes, " bytes (0.3 MiB) are in use"),
                      "an estimate at its peak", "use fewer tokens"});
    auto latency = client.MeasureLatency(LongPrefill());
    ExpectCode(latency.status(), StatusCode::kResourceExhausted,
               "memory budget of device cpu: MeasureLatency (prefill) of model 'm'");
    const ModelState after = Snapshot(client, "m", golden);
    EXPECT_EQ(after.version, before.version);
    EXPECT_EQ(after.logits, before.logits);
    ASSERT_OK_AND_ASSIGN(verified, client.Verify("m"));
    EXPECT_TRUE(verified.ok());
  }
  {
    Harness roomy({}, BudgetBytesOnCpu(kSmallFloat32Bytes + (int64_t{64} << 20)));
    Client& client = roomy.client();
    ASSERT_TRUE(client.LoadModel("m", "mamba1-small/hf").ok());
    ASSERT_OK_AND_ASSIGN(set, client.CapturePermutation(GoldenCapture(golden)));
    EXPECT_EQ(set.results_size(), 7);
    ASSERT_OK_AND_ASSIGN(report, client.MeasureLatency(LongPrefill()));
    EXPECT_EQ(report.samples(), 1);
  }
}

}  // namespace
}  // namespace icd::testing
