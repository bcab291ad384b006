// Export: same layout and format, atomic, source untouched; exported
// checkpoints reload with identical tensors and logits.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>

#include "icd/core/engine.h"
#include "io/torch_bin.h"
#include "test_util.h"

namespace icd {
namespace {

namespace fs = std::filesystem;
using testing::GoldenDir;

struct Case {
  std::string fixture, layout, weights_file;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.fixture << "/" << c.layout; }

// The start of a copy of the HF checkpoint `source` in another file layout:
// `target` made with source's config.json, and source's tensors to write there.
absl::StatusOr<io::TensorList> StartCopy(const fs::path& source, const fs::path& target) {
  fs::create_directories(target);
  fs::copy_file(source / "config.json", target / "config.json");
  return io::ReadSafetensors(source / "model.safetensors");
}


class ExportTest : public ::testing::TestWithParam<Case> {
 protected:
  std::vector<HostTensor> All(const std::string& model) {
    auto tensors = engine_.ReadTensors(model, {});
    EXPECT_TRUE(tensors.ok()) << tensors.status();
    return tensors.ok() ? *tensors : std::vector<HostTensor>{};
  }
  std::vector<float> Logits(const std::string& model) {
    const auto golden = testing::ReadGolden(GetParam().fixture);
    auto result = engine_.Evaluate(model, {golden.input_ids, golden.batch, true});
    EXPECT_TRUE(result.ok()) << result.status();
    return result.ok() ? result->logits : std::vector<float>{};
  }
  Engine engine_;
  testing::TempDir temp_;
};

TEST_P(ExportTest, PermutedExportReloadsIdentically) {
  const fs::path source = GoldenDir(GetParam().fixture) / GetParam().layout;
  const auto source_before = testing::Snapshot(source);
  ASSERT_TRUE(engine_.Load("m", source.string()).ok());
  std::mt19937_64 rng(21);
  auto groups = engine_.Symmetries("m");
  ASSERT_TRUE(groups.ok());
  const auto perms = testing::RandomPermutations(*groups, rng);
  ASSERT_TRUE(engine_.Apply("m", perms).ok());

  const fs::path target = temp_.path() / "exports" / "permuted";
  auto exported = engine_.Export("m", target.string());
  ASSERT_TRUE(exported.ok()) << exported.status();
  EXPECT_EQ(exported->version, 2u);
  EXPECT_EQ(exported->path, target.string());
  // Same file names as the source: weights rewritten, the rest copied.
  std::vector<std::string> source_files;
  for (const auto& [name, bytes] : source_before) source_files.push_back(name);
  EXPECT_EQ(exported->files, source_files);
  const auto target_files = testing::Snapshot(target);
  EXPECT_EQ(target_files.at("config.json"), source_before.at("config.json"));
  EXPECT_NE(target_files.at(GetParam().weights_file), source_before.at(GetParam().weights_file));
  // Nothing left beside the target, the source byte-identical.
  size_t entries = 0;
  for ([[maybe_unused]] const auto& entry : fs::directory_iterator(target.parent_path())) ++entries;
  EXPECT_EQ(entries, 1u);
  EXPECT_EQ(testing::Snapshot(source), source_before);

  auto reloaded = engine_.Load("again", target.string());
  ASSERT_TRUE(reloaded.ok()) << reloaded.status();
  EXPECT_EQ(reloaded->layout, engine_.Info("m")->layout);
  const auto a = All("m"), b = All("again");
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].name, b[i].name);
    EXPECT_EQ(a[i].shape, b[i].shape);
    EXPECT_EQ(a[i].data, b[i].data) << a[i].name;
  }
  EXPECT_EQ(Logits("m"), Logits("again"));

  // An existing target is refused and left alone.
  auto again = engine_.Export("m", target.string());
  EXPECT_EQ(again.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_NE(std::string(again.status().message()).find(target.string()), std::string::npos);
  EXPECT_EQ(testing::Snapshot(target), target_files);
}

INSTANTIATE_TEST_SUITE_P(Layouts, ExportTest,
                         ::testing::Values(Case{"mamba1-small", "hf", "model.safetensors"},
                                           Case{"mamba1-small", "mamba_ssm", "pytorch_model.bin"},
                                           Case{"mamba2-groups", "hf", "model.safetensors"},
                                           Case{"mamba2-one-group", "mamba_ssm",
                                                "pytorch_model.bin"},
                                           Case{"falcon-mamba-small", "hf",
                                                "model.safetensors"}),
                         [](const auto& param_info) {
                           std::string name = param_info.param.fixture + "_" + param_info.param.layout;
                           for (char& c : name) {
                             if (c == '-') c = '_';
                           }
                           return name;
                         });

// PyTorch's default loader (weights_only=True, what mamba_ssm calls) accepts
// the exported .bin: an ordered mapping whose tied tensors share storage.
TEST(ExportBinTest, TorchLoadWeightsOnlyAccepts) {
  Engine engine;
  testing::TempDir temp;
  ASSERT_TRUE(engine.Load("m", (GoldenDir("mamba1-small") / "mamba_ssm").string()).ok());
  std::mt19937_64 rng(2);
  auto groups = engine.Symmetries("m");
  ASSERT_TRUE(groups.ok());
  const auto perms = testing::RandomPermutations(*groups, rng);
  ASSERT_TRUE(engine.Apply("m", perms).ok());
  const fs::path target = temp.path() / "out";
  ASSERT_TRUE(engine.Export("m", target.string()).ok());
  auto tensors = engine.ReadTensors("m", {});
  ASSERT_TRUE(tensors.ok());
  std::string names;
  for (const HostTensor& t : *tensors) names += t.name + ",";
  const std::string script =
      "import sys, collections, torch\n"
      "sd = torch.load(sys.argv[1], weights_only=True)\n"
      "assert isinstance(sd, collections.OrderedDict), type(sd)\n"
      "assert ','.join(sd.keys()) + ',' == sys.argv[2], list(sd.keys())\n"
      "e, h = sd['backbone.embedding.weight'], sd['lm_head.weight']\n"
      "assert e.storage().data_ptr() == h.storage().data_ptr(), 'tied tensors do not share'\n"
      "assert torch.equal(e, h)\n"
      "print('torch.load ok', len(sd))\n";
  const fs::path script_file = temp.path() / "check.py";
  std::ofstream(script_file) << script;
  const std::string command = std::string(ICD_SYSTEM_PYTHON) + " " + script_file.string() + " " +
                              (target / "pytorch_model.bin").string() + " " + names;
  EXPECT_EQ(std::system(command.c_str()), 0) << command;
}

TEST(ExportBinTest, HfPytorchModelBinLoadsAndExportsAsBin) {
  // HF checkpoints saved without safetensors: the same tensors in a .bin.
  testing::TempDir temp;
  const fs::path bin_dir = temp.path() / "bin";
  auto tensors = StartCopy(GoldenDir("mamba2-groups") / "hf", bin_dir);
  ASSERT_TRUE(tensors.ok());
  ASSERT_TRUE(io::WriteTorchBin(bin_dir / "pytorch_model.bin", *tensors).ok());
  Engine engine;
  ASSERT_TRUE(engine.Load("bin", bin_dir.string()).ok());
  const auto golden = testing::ReadGolden("mamba2-groups");
  auto result = engine.Evaluate("bin", {golden.input_ids, golden.batch, true});
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_LE(testing::RelL2(torch::tensor(result->logits).reshape(result->shape), golden.logits),
            1e-4);
  auto exported = engine.Export("bin", (temp.path() / "out").string());
  ASSERT_TRUE(exported.ok()) << exported.status();
  EXPECT_EQ(exported->files, (std::vector<std::string>{"config.json", "pytorch_model.bin"}));
}

TEST(ExportBinTest, ShardedSafetensorsRoundTrip) {
  // A two-shard copy of a fixture with its index, as save_pretrained writes
  // large models.
  testing::TempDir temp;
  const fs::path source = GoldenDir("mamba1-bias-untied") / "hf";
  const fs::path sharded = temp.path() / "sharded";
  auto tensors = StartCopy(source, sharded);
  ASSERT_TRUE(tensors.ok());
  io::TensorList first, second;
  std::string weight_map;
  for (size_t i = 0; i < tensors->size(); ++i) {
    const bool one = i < tensors->size() / 2;
    (one ? first : second).push_back((*tensors)[i]);
    weight_map += (weight_map.empty() ? "" : ",") + std::string("\"") + (*tensors)[i].name +
                  "\": \"model-0000" + (one ? "1" : "2") + "-of-00002.safetensors\"";
  }
  ASSERT_TRUE(io::WriteSafetensors(sharded / "model-00001-of-00002.safetensors", first).ok());
  ASSERT_TRUE(io::WriteSafetensors(sharded / "model-00002-of-00002.safetensors", second).ok());
  std::ofstream(sharded / "model.safetensors.index.json")
      << "{\"metadata\": {}, \"weight_map\": {" << weight_map << "}}";

  Engine engine;
  ASSERT_TRUE(engine.Load("single", source.string()).ok());
  auto info = engine.Load("sharded", sharded.string());
  ASSERT_TRUE(info.ok()) << info.status();
  const auto golden = testing::ReadGolden("mamba1-bias-untied");
  auto a = engine.Evaluate("single", {golden.input_ids, golden.batch, true});
  auto b = engine.Evaluate("sharded", {golden.input_ids, golden.batch, true});
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->logits, b->logits);
  auto exported = engine.Export("sharded", (temp.path() / "out").string());
  ASSERT_TRUE(exported.ok()) << exported.status();
  EXPECT_EQ(exported->files,
            (std::vector<std::string>{"config.json", "model-00001-of-00002.safetensors",
                                      "model-00002-of-00002.safetensors",
                                      "model.safetensors.index.json"}));
  ASSERT_TRUE(engine.Load("reloaded", exported->path).ok());
}

// A deadline that passes, or a cancellation that arrives, in the middle of
// a load or an export: the call fails with that code and leaves nothing: no
// model under the name, no target directory and no staging directory beside
// it; the same calls then succeed.
TEST(CallContextTest, LoadAndExportStoppedMidCallLeaveNothing) {
  const fs::path source = GoldenDir("mamba1-bias-untied") / "hf";
  testing::TempDir temp;
  Engine engine;
  // Cancelled at the n-th poll: after some tensors were read or written.
  auto cancelled_at = [](int n) {
    auto polls = std::make_shared<int>(0);
    CallContext ctx;
    ctx.cancelled = [polls, n] { return ++*polls >= n; };
    return ctx;
  };
  auto entries = [&] {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(temp.path())) names.push_back(e.path().filename());
    return names;
  };

  EXPECT_EQ(engine.Load("m", source.string(), {}, testing::PastDeadlineContext()).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(engine.Load("m", source.string(), {}, cancelled_at(3)).status().code(),
            absl::StatusCode::kCancelled);
  EXPECT_TRUE(engine.List().empty());
  ASSERT_TRUE(engine.Load("m", source.string()).ok());

  // An export that completed, beside which nothing else may remain.
  ASSERT_TRUE(engine.Export("m", (temp.path() / "first").string()).ok());
  const std::string target = (temp.path() / "out").string();
  EXPECT_EQ(engine.Export("m", target, testing::PastDeadlineContext()).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  // Cancelled at its first poll: the staging directory exists by then.
  EXPECT_EQ(engine.Export("m", target, cancelled_at(1)).status().code(),
            absl::StatusCode::kCancelled);
  EXPECT_EQ(entries(), std::vector<std::string>{"first"});
  EXPECT_TRUE(engine.Export("m", target).ok());
  EXPECT_EQ(engine.List().size(), 1u);
}

}  // namespace
}  // namespace icd
