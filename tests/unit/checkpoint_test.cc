// Reading checkpoints: config parsing of both layouts, refusals that say
// why, malformed files that name the file.
#include "io/checkpoint.h"

#include <gtest/gtest.h>

#include <fstream>

#include "io/config.h"
#include "icd/core/engine.h"
#include "test_util.h"

namespace icd {
namespace {

namespace fs = std::filesystem;
using testing::ExpectError;
using testing::GoldenDir;

TEST(ConfigTest, ParsesBothLayoutsOfTheFixtures) {
  auto hf = ReadConfigFile(GoldenDir("mamba1-bias-untied") / "hf" / "config.json");
  ASSERT_TRUE(hf.ok()) << hf.status();
  EXPECT_EQ(hf->family, Family::kMamba1);
  EXPECT_EQ(hf->layout, Layout::kHf);
  EXPECT_EQ(hf->dt_rank, 6);
  EXPECT_TRUE(hf->proj_bias);
  EXPECT_FALSE(hf->tied);
  auto ssm = ReadConfigFile(GoldenDir("mamba2-one-group") / "mamba_ssm" / "config.json");
  ASSERT_TRUE(ssm.ok()) << ssm.status();
  EXPECT_EQ(ssm->family, Family::kMamba2);
  EXPECT_EQ(ssm->layout, Layout::kMambaSsm);
  EXPECT_EQ(ssm->nheads, 4);
  EXPECT_EQ(ssm->headdim, 16);
  EXPECT_TRUE(ssm->grouped_gated_norm);
  auto groups = ReadConfigFile(GoldenDir("mamba2-groups") / "hf" / "config.json");
  ASSERT_TRUE(groups.ok());
  EXPECT_EQ(groups->ngroups, 2);
  EXPECT_FALSE(groups->grouped_gated_norm);
  EXPECT_TRUE(std::isinf(groups->dt_max));  // {"__float__": "Infinity"}
  auto falcon = ReadConfigFile(GoldenDir("falcon-mamba-small") / "hf" / "config.json");
  ASSERT_TRUE(falcon.ok());
  EXPECT_EQ(falcon->family, Family::kFalconMamba);
  EXPECT_EQ(falcon->dt_rank, 3);  // "auto": ceil(48 / 16)
}

TEST(ConfigTest, PadsMambaSsmVocabulary) {
  auto config = ParseConfig(
      R"({"d_model": 64, "n_layer": 2, "vocab_size": 50277, "pad_vocab_size_multiple": 8})",
      "config.json");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->vocab_unpadded, 50277);
  EXPECT_EQ(config->vocab_size, 50280);
  EXPECT_EQ(config->family, Family::kMamba1);
  EXPECT_EQ(config->dt_rank, 4);
  EXPECT_EQ(config->d_state, 16);
}

TEST(ConfigTest, RefusesWhatIsNotSupportedAndSaysWhy) {
  const auto refused = [](const std::string& json, const std::string& needle) {
    auto config = ParseConfig(json, "x/config.json");
    ExpectError(config.status(), absl::StatusCode::kInvalidArgument, needle);
    ExpectError(config.status(), absl::StatusCode::kInvalidArgument, "x/config.json");
  };
  refused(R"({"d_model": 64, "n_layer": 2, "d_intermediate": -1})", "d_intermediate");
  refused(R"({"d_model": 64, "n_layer": 2, "attn_layer_idx": [1], "attn_cfg": {"num_heads": 4}})",
          "attention that is not causal");
  refused(R"({"d_model": 64, "n_layer": 2, "ssm_cfg": {"layer": "Mamba3"}})", "'Mamba3'");
  refused(R"({"model_type": "plamo2", "hidden_size": 64})", "model_type 'plamo2'");
  refused(R"({"model_type": "llama"})", "supported: HuggingFace MambaForCausalLM");
  refused(R"({"hidden_size": 64})", "neither");
  refused(R"({"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 1,
              "vocab_size": 10, "num_heads": 3, "head_dim": 64, "n_groups": 1})",
          "num_heads (3) x head_dim (64)");
  refused(R"({"model_type": "mamba", "hidden_size": "wide"})", "field 'hidden_size'");
  // Where the syntax breaks, and what the top level is when it is not an object.
  refused("{not json", "not valid JSON: parse error at line 1, column 3");
  refused("{\n  \"d_model\": 64,\n}", "line 3, column 1");
  refused("[1, 2]", "the top level is an array, not an object");
  // Found by tests/fuzz (config_fuzz): expand 0 gave a config without
  // channels; out-of-range widths are refused before any arithmetic on them.
  refused(R"({"d_model": 32, "n_layer": 2, "vocab_size": 96,
              "ssm_cfg": {"layer": "Mamba2", "expand": 0, "headdim": 16}})",
          "ssm_cfg.expand 0 gives an inner width of 0");
  refused(R"({"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 1,
              "vocab_size": 10, "expand": 1e300})", "expand");
  refused(R"({"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 1,
              "vocab_size": 1000000000000})", "vocab_size is 1000000000000");
  // Found by config_fuzz in CI: an integral float beyond int64 was cast.
  refused(R"({"model_type": "mamba", "hidden_size": 9.6e118})",
          "field 'hidden_size' must be an integer, got 9.6e+118");
  // Found by config_fuzz in CI: n_layer 2^24 listed 200 million tensor names
  // (over libFuzzer's 10 s); a gated MLP's width is bounded like the others.
  refused(R"({"d_model": 64, "n_layer": 16777216})", "n_layer is 16777216; expected 1 to 4096");
  refused(R"({"d_model": 64, "n_layer": 2, "d_intermediate": 1000000000000})",
          "'d_intermediate' is 1000000000000");
}

// A copy of a fixture whose files a test may damage.
class BrokenCheckpointTest : public ::testing::Test {
 protected:
  fs::path Copy(const std::string& fixture, const std::string& layout = "hf") {
    const fs::path dir = temp_.path() / (fixture + "-" + layout);
    fs::create_directories(dir);
    for (const auto& entry : fs::directory_iterator(GoldenDir(fixture) / layout)) {
      fs::copy_file(entry.path(), dir / entry.path().filename());
      fs::permissions(dir / entry.path().filename(), fs::perms::owner_write, fs::perm_options::add);
    }
    return dir;
  }
  absl::Status Load(const fs::path& dir) {
    auto info = engine_.Load("m", dir.string());
    EXPECT_TRUE(engine_.List().empty()) << "a refused load left a model behind";
    return info.status();
  }
  Engine engine_;
  testing::TempDir temp_;
};

TEST_F(BrokenCheckpointTest, MissingDirectoryAndFiles) {
  ExpectError(Load(temp_.path() / "nope"), absl::StatusCode::kNotFound, "nope");
  const fs::path no_weights = Copy("mamba1-small");
  fs::remove(no_weights / "model.safetensors");
  ExpectError(Load(no_weights), absl::StatusCode::kNotFound, "no weights file");
  const fs::path no_config = Copy("mamba2-groups");
  fs::remove(no_config / "config.json");
  // A directory that exists but lacks config.json is a malformed checkpoint.
  ExpectError(Load(no_config), absl::StatusCode::kInvalidArgument, "config.json: missing");
}

TEST_F(BrokenCheckpointTest, TruncatedAndCorruptSafetensors) {
  const fs::path truncated = Copy("mamba1-small");
  fs::resize_file(truncated / "model.safetensors", 5000);
  ExpectError(Load(truncated), absl::StatusCode::kInvalidArgument, "model.safetensors");

  const fs::path header = Copy("mamba2-groups");
  {
    std::fstream file(header / "model.safetensors", std::ios::in | std::ios::out | std::ios::binary);
    const uint64_t huge = 1ULL << 40;
    file.write(reinterpret_cast<const char*>(&huge), 8);
  }
  ExpectError(Load(header), absl::StatusCode::kInvalidArgument, "model.safetensors");

  const fs::path garbage = Copy("falcon-mamba-small");
  {
    std::fstream file(garbage / "model.safetensors", std::ios::in | std::ios::out | std::ios::binary);
    file.seekp(8);
    file.write("#!garbage", 9);
  }
  ExpectError(Load(garbage), absl::StatusCode::kInvalidArgument, "model.safetensors");
}

TEST_F(BrokenCheckpointTest, TensorsThatDoNotMatchTheConfig) {
  // A config that claims another width: the message names tensor and shapes.
  const fs::path dir = Copy("mamba1-small");
  auto tensors = io::ReadSafetensors(dir / "model.safetensors");
  ASSERT_TRUE(tensors.ok());
  io::TensorList extra = *tensors;
  extra.push_back({"backbone.layers.0.mlp.fc1.weight", torch::zeros({4, 4})});
  ASSERT_TRUE(io::WriteSafetensors(dir / "model.safetensors", extra).ok());
  ExpectError(Load(dir), absl::StatusCode::kInvalidArgument,
              "unexpected tensor 'backbone.layers.0.mlp.fc1.weight'");
  io::TensorList missing(tensors->begin() + 1, tensors->end());
  ASSERT_TRUE(io::WriteSafetensors(dir / "model.safetensors", missing).ok());
  ExpectError(Load(dir), absl::StatusCode::kInvalidArgument, "is missing");
}

TEST_F(BrokenCheckpointTest, UnsupportedArchitectureListsWhatIs) {
  const fs::path dir = Copy("mamba1-small", "mamba_ssm");
  std::ofstream(dir / "config.json")
      << R"({"d_model": 64, "n_layer": 2, "vocab_size": 128, "ssm_cfg": {"layer": "Mamba3"}})";
  ExpectError(Load(dir), absl::StatusCode::kInvalidArgument, "supported:");
}

TEST_F(BrokenCheckpointTest, TruncatedBinIsRefused) {
  const fs::path dir = Copy("mamba1-small", "mamba_ssm");
  fs::resize_file(dir / "pytorch_model.bin", 1000);
  ExpectError(Load(dir), absl::StatusCode::kInvalidArgument, "pytorch_model.bin");
}

TEST(ExpectedShapesTest, EveryTensorOfTheFixturesIsExpected) {
  for (const char* fixture : {"mamba1-small", "mamba1-bias-untied", "mamba2-groups",
                              "mamba2-one-group", "falcon-mamba-small"}) {
    auto checkpoint = ReadCheckpoint(GoldenDir(fixture) / "hf");
    ASSERT_TRUE(checkpoint.ok()) << fixture << ": " << checkpoint.status();
    EXPECT_EQ(checkpoint->weights.size(), ExpectedShapes(checkpoint->config).size()) << fixture;
  }
}

}  // namespace
}  // namespace icd
