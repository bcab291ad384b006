// The per-device memory budget (engine/memory_budget.cc): its text form
// (--memory-budget-mb), the exact bytes a loaded model is counted for, loads
// and calls past the budget refused before they allocate with every model
// left as it was, and running calls' bytes held until they end.
#include "engine/memory_budget.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "icd/core/engine.h"
#include "icd/core/memory_budget.h"
#include "test_util.h"

namespace icd {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kOneMiB = int64_t{1} << 20;

// ---------------------------------------------------------------- the flag

MemoryBudget ParsedBudget(const std::string& spec) {
  MemoryBudget budget;
  const absl::Status added = AddMemoryBudget(spec, budget);
  EXPECT_TRUE(added.ok()) << spec << ": " << added;
  return budget;
}

TEST(MemoryBudgetSpecTest, OneNumberCoversEveryDevice) {
  const MemoryBudget budget = ParsedBudget("70000");
  EXPECT_EQ(budget.For("cpu"), 70000 * kOneMiB);
  EXPECT_EQ(budget.For("cuda:0"), 70000 * kOneMiB);
  EXPECT_EQ(budget.For("cuda:7"), 70000 * kOneMiB);
  EXPECT_EQ(budget.Bound(), 70000 * kOneMiB);
  EXPECT_EQ(DescribeMemoryBudget(budget), "every other device 70000 MiB");
}

TEST(MemoryBudgetSpecTest, DevicesAreNamedAndTheRestHasNoLimit) {
  const MemoryBudget budget = ParsedBudget("cuda:0=70000, cpu=4000");
  EXPECT_EQ(budget.For("cuda:0"), 70000 * kOneMiB);
  EXPECT_EQ(budget.For("cpu"), 4000 * kOneMiB);
  EXPECT_EQ(budget.For("cuda:1"), 0);  // not named: no limit
  EXPECT_EQ(budget.Bound(), 0);        // so no bound on every device
  EXPECT_EQ(DescribeMemoryBudget(budget), "cpu 4000 MiB, cuda:0 70000 MiB");
}

TEST(MemoryBudgetSpecTest, CudaCoversUnnamedGpusAndABareNumberTheRest) {
  MemoryBudget budget = ParsedBudget("cuda=100,cuda:1=5");
  EXPECT_EQ(budget.For("cuda:0"), 100 * kOneMiB);
  EXPECT_EQ(budget.For("cuda:1"), 5 * kOneMiB);
  EXPECT_EQ(budget.For("cpu"), 0);
  // A second value (the flag repeated) adds entries.
  ASSERT_TRUE(AddMemoryBudget("7", budget).ok());
  EXPECT_EQ(budget.For("cpu"), 7 * kOneMiB);
  EXPECT_EQ(budget.For("cuda:3"), 100 * kOneMiB);
  EXPECT_EQ(budget.Bound(), 100 * kOneMiB);
  EXPECT_EQ(ParsedBudget("cpu=3,cuda=9").Bound(), 9 * kOneMiB);
  EXPECT_EQ(MemoryBudget{}.For("cpu"), 0);
  EXPECT_EQ(DescribeMemoryBudget(MemoryBudget{}), "no limit");
}

TEST(MemoryBudgetSpecTest, RefusesWhatItCannotReadAndKeepsWhatItHad) {
  for (const char* spec : {"",
                           "0",
                           "-5",
                           "+5",
                           "1.5",
                           "5MB",
                           "1073741825",
                           "99999999999999999999",
                           "gpu=5",
                           "cuda:x=5",
                           "cuda:=5",
                           "cuda:12345=5",
                           "CPU=5",
                           "cpu=",
                           "=5",
                           "cpu=0",
                           "cpu=5,",
                           "cpu=5;cuda=6",
                           "cpu=5,cpu=6",
                           "5,6",
                           "cpu=5=6"}) {
    MemoryBudget budget = ParsedBudget("cuda:0=1");
    const absl::Status status = AddMemoryBudget(spec, budget);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << "'" << spec << "': " << status;
    EXPECT_EQ(budget.bytes.size(), 1u) << spec;  // nothing of a refused value is kept
  }
  MemoryBudget budget = ParsedBudget("cpu=5");
  testing::ExpectError(AddMemoryBudget("cpu=6", budget), absl::StatusCode::kInvalidArgument,
                       "device cpu is given twice");
  EXPECT_EQ(budget.For("cpu"), 5 * kOneMiB);
  EXPECT_EQ(ParsedBudget("1073741824").For("cpu"), int64_t{1} << 50);  // 1 PiB, the largest
}

// ---------------------------------------------------------------- the engine

std::string HfDir(const std::string& fixture) {
  return (testing::GoldenDir(fixture) / "hf").string();
}

// What the budget counts for a loaded model: every distinct parameter in
// its dtype, and the probe reference (int64 ids and float32 logits, [2, 32]).
int64_t ExpectedDeviceBytes(const ModelInfo& info) {
  return info.parameters * DTypeSize(info.dtype) + 2 * 32 * 8 +
         2 * 32 * info.dims.at("vocab_size") * 4;
}

EngineOptions CpuBudget(int64_t bytes) {
  EngineOptions options;
  options.memory_budget.bytes["cpu"] = bytes;
  return options;
}

DeviceMemory CpuMemory(const Engine& engine) {
  for (const DeviceMemory& device : engine.Memory()) {
    if (device.device == "cpu") return device;
  }
  return {};
}

// mamba1-small in float32, as the budget counts it (measured by an engine
// without a budget).
int64_t SmallModelBytes() {
  Engine engine;
  auto info = engine.Load("probe", HfDir("mamba1-small"));
  EXPECT_TRUE(info.ok()) << info.status();
  return info.ok() ? info->device_bytes : 0;
}

TEST(MemoryBudgetEngineTest, CountsEachModelsWeightsAndProbeReferenceExactly) {
  Engine engine;  // no budget: counted all the same
  int64_t total = 0;
  for (const auto& [name, fixture, dtype] :
       std::vector<std::tuple<std::string, std::string, std::string>>{
           {"tied", "mamba1-small", ""},
           {"wide", "mamba1-small", "float64"},
           {"untied", "mamba1-bias-untied", ""},
           {"two", "mamba2-groups", "bfloat16"}}) {
    LoadOptions options;
    options.dtype = dtype;
    auto info = engine.Load(name, HfDir(fixture), options);
    ASSERT_TRUE(info.ok()) << name << ": " << info.status();
    EXPECT_EQ(info->device_bytes, ExpectedDeviceBytes(*info)) << name;
    total += info->device_bytes;
  }
  // mamba1-small: 67,520 parameters, vocabulary 128: 270,080 bytes of
  // float32 weights and 33,280 of probe reference.
  auto tied = engine.Info("tied");
  ASSERT_TRUE(tied.ok());
  EXPECT_EQ(tied->device_bytes, 303360);
  for (const ModelInfo& info : engine.List()) {
    EXPECT_EQ(info.device_bytes, ExpectedDeviceBytes(info)) << info.name;
  }
  DeviceMemory cpu = CpuMemory(engine);
  EXPECT_EQ(cpu.model_bytes, total);
  EXPECT_EQ(cpu.models, 4);
  EXPECT_EQ(cpu.call_bytes, 0);
  EXPECT_EQ(cpu.budget_bytes, 0);
  for (const char* name : {"tied", "wide", "untied", "two"}) ASSERT_TRUE(engine.Unload(name).ok());
  cpu = CpuMemory(engine);
  EXPECT_EQ(cpu.model_bytes, 0);
  EXPECT_EQ(cpu.models, 0);
}

TEST(MemoryBudgetEngineTest, ALoadPastTheBudgetIsRefusedAndTheLoadedModelStaysAsItWas) {
  const int64_t one = SmallModelBytes();
  ASSERT_EQ(one, 303360);
  // Room for one model and the early check of a second (2 bytes a weight),
  // not for a second in float32.
  const int64_t budget = 2 * one - 1;
  Engine engine(CpuBudget(budget));
  ASSERT_TRUE(engine.Load("a", HfDir("mamba1-small")).ok());
  std::mt19937_64 rng(11);
  auto groups = engine.Symmetries("a");
  ASSERT_TRUE(groups.ok());
  ASSERT_TRUE(engine.Apply("a", testing::RandomPermutations(*groups, rng)).ok());
  auto before = engine.Info("a");
  ASSERT_TRUE(before.ok());
  ASSERT_EQ(before->version, 2u);
  const auto weights = testing::TensorBytes(engine, "a");
  auto verified = engine.Verify("a");
  ASSERT_TRUE(verified.ok() && verified->ok);

  auto refused = engine.Load("b", HfDir("mamba1-small"));
  testing::ExpectError(refused.status(), absl::StatusCode::kResourceExhausted,
                       "memory budget of device cpu: loading model 'b'");
  for (const std::string& needle : std::vector<std::string>{
           absl::StrCat("needs ", one, " bytes"), absl::StrCat(one, " bytes (0.3 MiB) are in use"),
           absl::StrCat("the budget is ", budget, " bytes"), "--memory-budget-mb"}) {
    EXPECT_NE(std::string(refused.status().message()).find(needle), std::string::npos)
        << needle << " not in: " << refused.status();
  }
  // Nothing loaded, nothing booked, the loaded model as it was.
  EXPECT_EQ(engine.Info("b").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(engine.List().size(), 1u);
  EXPECT_EQ(CpuMemory(engine).model_bytes, one);
  EXPECT_EQ(CpuMemory(engine).budget_bytes, budget);
  auto after = engine.Info("a");
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->version, before->version);
  EXPECT_EQ(testing::TensorBytes(engine, "a"), weights);
  auto again = engine.Verify("a");
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->ok);
  EXPECT_EQ(again->rel_l2, verified->rel_l2);

  // An unload gives its bytes back.
  ASSERT_TRUE(engine.Unload("a").ok());
  EXPECT_EQ(CpuMemory(engine).model_bytes, 0);
  auto loaded = engine.Load("b", HfDir("mamba1-small"));
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(CpuMemory(engine).model_bytes, one);
}

TEST(MemoryBudgetEngineTest, ALoadIsRefusedBeforeItsWeightsAreRead) {
  const int64_t one = SmallModelBytes();
  // A checkpoint whose weights file is garbage: reading it fails.
  testing::TempDir tmp;
  const fs::path broken = tmp.path() / "broken";
  fs::copy(HfDir("mamba1-small"), broken, fs::copy_options::recursive);
  {
    std::ofstream out(broken / "model.safetensors", std::ios::binary | std::ios::trunc);
    out << "not a safetensors file";
  }
  LoadOptions float32;
  float32.dtype = "float32";
  // Control: without a budget the broken file is refused as broken.
  {
    Engine engine;
    testing::ExpectError(engine.Load("m", broken.string(), float32).status(),
                         absl::StatusCode::kInvalidArgument, "model.safetensors");
  }
  // With a dtype asked for, the model's bytes follow from config.json alone:
  // refused before the file is opened.
  {
    Engine engine(CpuBudget(one - 1));
    testing::ExpectError(engine.Load("m", broken.string(), float32).status(),
                         absl::StatusCode::kResourceExhausted,
                         absl::StrCat("needs ", one, " bytes"));
    // Without one, the early check counts 2 bytes a weight: a budget below
    // that refuses before reading too ...
    const int64_t at_least = 67520 * 2 + 33280;
    Engine tight(CpuBudget(at_least - 1));
    testing::ExpectError(tight.Load("m", broken.string()).status(),
                         absl::StatusCode::kResourceExhausted,
                         "the checkpoint's dtype, at least 2 bytes each");
    // ... one above it reads the files, whose dtype decides (here: broken).
    testing::ExpectError(engine.Load("m", broken.string()).status(),
                         absl::StatusCode::kInvalidArgument, "model.safetensors");
    // ... and a good float32 checkpoint is then refused, nothing loaded.
    testing::ExpectError(engine.Load("m", HfDir("mamba1-small")).status(),
                         absl::StatusCode::kResourceExhausted,
                         absl::StrCat("needs ", one, " bytes"));
    EXPECT_TRUE(engine.List().empty());
    EXPECT_EQ(CpuMemory(engine).model_bytes, 0);
    EXPECT_EQ(CpuMemory(engine).models, 0);
  }
}

// The fixture's golden ids' shape: 2 x 17.
std::vector<int64_t> Ids(int64_t count) {
  std::vector<int64_t> ids(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) ids[static_cast<size_t>(i)] = (i * 7) % 128;
  return ids;
}

TEST(MemoryBudgetEngineTest, CallsPastTheBudgetAreRefusedBeforeTheyAllocate) {
  const int64_t one = SmallModelBytes();
  Engine engine(CpuBudget(one + kOneMiB));
  ASSERT_TRUE(engine.Load("a", HfDir("mamba1-small")).ok());
  const auto weights = testing::TensorBytes(engine, "a");

  CaptureRequest capture;
  capture.model = "a";
  capture.input_ids = Ids(2 * 17);
  capture.batch = 2;
  testing::ExpectError(engine.Capture(capture).status(), absl::StatusCode::kResourceExhausted,
                       "memory budget of device cpu: CapturePermutation of model 'a' over 2 x 17 "
                       "tokens and 7 group(s)");
  LatencyOptions latency;
  latency.model = "a";
  latency.batch = 4;
  latency.seq_len = 1024;
  latency.warmup = 0;
  latency.iters = 1;
  testing::ExpectError(engine.MeasureLatency(latency).status(),
                       absl::StatusCode::kResourceExhausted,
                       "MeasureLatency (prefill) of model 'a'");
  latency.mode = "decode";
  testing::ExpectError(engine.MeasureLatency(latency).status(),
                       absl::StatusCode::kResourceExhausted, "decode state");
  EvaluateRequest evaluate;
  evaluate.input_ids = Ids(4096);
  testing::ExpectError(engine.Evaluate("a", evaluate).status(),
                       absl::StatusCode::kResourceExhausted, "Evaluate of model 'a' over 1 x 4096");
  const TraceHeader header{"a", "layers.0.state", 8, 0, {}};
  auto wide_group = engine.BeginTraces(TraceHeader{"a", "layers.0.inner", 128, 200000, {}});
  testing::ExpectError(wide_group.status(), absl::StatusCode::kResourceExhausted,
                       "ComputePermutation of group 'layers.0.inner'");

  // Refused calls booked nothing and changed nothing; smaller ones run.
  DeviceMemory cpu = CpuMemory(engine);
  EXPECT_EQ(cpu.calls, 0);
  EXPECT_EQ(cpu.call_bytes, 0);
  EXPECT_EQ(cpu.model_bytes, one);
  EXPECT_EQ(testing::TensorBytes(engine, "a"), weights);
  EXPECT_EQ(engine.Info("a")->version, 1u);
  evaluate.input_ids = Ids(34);
  evaluate.batch = 2;
  auto small = engine.Evaluate("a", evaluate);
  ASSERT_TRUE(small.ok()) << small.status();
  EXPECT_EQ(small->tokens, 32);
  EXPECT_TRUE(engine.BeginTraces(header).ok());
  latency.mode = "prefill";
  latency.batch = 1;
  latency.seq_len = 64;
  EXPECT_TRUE(engine.MeasureLatency(latency).ok());
  cpu = CpuMemory(engine);
  EXPECT_EQ(cpu.calls, 0);  // every hold given back, the session's too
  EXPECT_EQ(cpu.call_bytes, 0);

  // Control: the same calls under a budget they fit.
  Engine roomy(CpuBudget(one + 64 * kOneMiB));
  ASSERT_TRUE(roomy.Load("a", HfDir("mamba1-small")).ok());
  auto captured = roomy.Capture(capture);
  ASSERT_TRUE(captured.ok()) << captured.status();
  EXPECT_EQ(captured->size(), 7u);
  latency.batch = 4;
  latency.seq_len = 1024;
  EXPECT_TRUE(roomy.MeasureLatency(latency).ok());
  latency.mode = "decode";
  EXPECT_TRUE(roomy.MeasureLatency(latency).ok());
  evaluate.input_ids = Ids(4096);
  evaluate.batch = 1;
  EXPECT_TRUE(roomy.Evaluate("a", evaluate).ok());
  EXPECT_EQ(CpuMemory(roomy).call_bytes, 0);
}

TEST(MemoryBudgetEngineTest, ARunningCallHoldsItsBytesUntilItEnds) {
  const int64_t one = SmallModelBytes();
  const TraceHeader header{"a", "layers.0.inner", 128, 0, {}};
  // What an open ComputePermutation stream on a 128-channel group books:
  // its statistics, a held-out tail of 1024 float32 rows and the solve.
  const int64_t stream =
      engine_internal::StatsBytes(128, 1024) + 1024 * 128 * 4 + engine_internal::SolverBytes(128);
  EXPECT_EQ(stream, 2 * 128 * 128 * 8 + 2 * 1024 * 128 * 8 + 1024 * 128 * 4 + 4 * 128 * 128 * 8);
  // Room for two models and the stream, less one byte.
  Engine engine(CpuBudget(2 * one + stream - 1));
  ASSERT_TRUE(engine.Load("a", HfDir("mamba1-small")).ok());
  {
    auto session = engine.BeginTraces(header);
    ASSERT_TRUE(session.ok()) << session.status();
    const DeviceMemory cpu = CpuMemory(engine);
    EXPECT_EQ(cpu.calls, 1);
    EXPECT_EQ(cpu.call_bytes, stream);
    auto refused = engine.Load("b", HfDir("mamba1-small"));
    testing::ExpectError(refused.status(), absl::StatusCode::kResourceExhausted,
                         absl::StrCat("1 running call(s): ", stream, " bytes"));
    // A second stream does not fit beside the first either.
    testing::ExpectError(engine.BeginTraces(header).status(), absl::StatusCode::kResourceExhausted,
                         "1 running call(s)");
  }
  // The stream ended: its bytes are back, and the load fits.
  EXPECT_EQ(CpuMemory(engine).call_bytes, 0);
  auto loaded = engine.Load("b", HfDir("mamba1-small"));
  EXPECT_TRUE(loaded.ok()) << loaded.status();
}

TEST(MemoryBudgetEngineTest, EstimatesGrowWithWhatTheCallComputes) {
  Engine engine;
  ASSERT_TRUE(engine.Load("a", HfDir("mamba1-small")).ok());
  // mamba1-small: d_model 64, d_inner 128, in_proj 256 rows, vocabulary
  // 128, float32: per position 2·256 + 3·128 + 4·64 = 1152 activations of
  // 4 bytes, 128 float32 logits and the int64 id.
  ModelConfig config;
  config.family = Family::kMamba1;
  config.d_model = 64;
  config.n_layer = 2;
  config.vocab_size = 128;
  config.d_inner = 128;
  config.d_state = 8;
  config.d_conv = 4;
  config.dt_rank = 4;
  config.mixers = {MixerType::kMamba1, MixerType::kMamba1};
  const int64_t per_position = 1152 * 4 + 128 * 4 + 8;
  EXPECT_EQ(engine_internal::ForwardBytes(config, torch::kFloat32, 1, 1), per_position);
  EXPECT_EQ(engine_internal::ForwardBytes(config, torch::kFloat32, 3, 100), 300 * per_position);
  // bfloat16: activations still 4 bytes wide, the head's output too.
  EXPECT_EQ(engine_internal::ForwardBytes(config, torch::kBFloat16, 1, 1),
            1152 * 4 + 128 * (4 + 2) + 8);
  // Two layers' conv history [B, 128, 3] and scan state [B, 128, 8].
  EXPECT_EQ(engine_internal::StateBytes(config, torch::kFloat32, 2, 100),
            2 * (2 * 128 * 3 + 2 * 128 * 8) * 4);
  EXPECT_EQ(engine_internal::ModelBytes(config, torch::kFloat32), 303360);
  // A gated MLP of 40 channels after each mixer: fc1's output and the product,
  // 120 more activations a position.
  ModelConfig with_mlp = config;
  with_mlp.d_intermediate = 40;
  EXPECT_EQ(engine_internal::ForwardBytes(with_mlp, torch::kFloat32, 1, 1),
            per_position + 120 * 4);
  // Attention at layer 1 (4 heads, 2 KV heads of 6, no conv): its scores,
  // their masked copy, softmax and cast grow with the square of the length,
  // [B, 4, L, L] float32 each; its cache with the positions held, keys and
  // values [B, 2, T, 6].
  ModelConfig hybrid = config;
  hybrid.attention_layers = {1};
  hybrid.mixers = {MixerType::kMamba1, MixerType::kAttention};
  hybrid.attention.heads = 4;
  hybrid.attention.kv_heads = 2;
  hybrid.attention.head_dim = 6;
  EXPECT_EQ(engine_internal::ForwardBytes(hybrid, torch::kFloat32, 1, 100) -
                100 * engine_internal::ForwardBytes(hybrid, torch::kFloat32, 1, 1),
            4 * 4 * (100 * 100 - 100) * 4);
  EXPECT_EQ(engine_internal::StateBytes(hybrid, torch::kFloat32, 2, 30) -
                engine_internal::StateBytes(hybrid, torch::kFloat32, 2, 10),
            2 * (2 * 2 * 20 * 6) * 4);
  EXPECT_EQ(engine_internal::StateBytes(hybrid, torch::kFloat32, 2, 0),
            (2 * 128 * 3 + 2 * 128 * 8) * 4);  // layer 0's alone
  // Saturating, never wrapping.
  EXPECT_EQ(
      engine_internal::ForwardBytes(config, torch::kFloat32, int64_t{1} << 40, int64_t{1} << 40),
      std::numeric_limits<int64_t>::max());
}

}  // namespace
}  // namespace icd
