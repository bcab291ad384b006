// The engine's contract: refused calls change nothing, versions, the
// post-apply check, export and reload, checkpoint errors.
#include "icd/core/engine.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <future>
#include <random>
#include <set>
#include <thread>

#include "io/checkpoint.h"
#include "test_util.h"

namespace icd {
namespace {

namespace fs = std::filesystem;
using testing::GoldenDir;
using testing::RelL2;

std::string Str(const fs::path& p) { return p.string(); }

::testing::AssertionResult HasError(const absl::Status& status, absl::StatusCode code,
                                    const std::string& needle) {
  if (status.code() != code) {
    return ::testing::AssertionFailure() << "expected code " << absl::StatusCodeToString(code)
                                         << ", got " << status;
  }
  if (std::string(status.message()).find(needle) == std::string::npos) {
    return ::testing::AssertionFailure() << "message lacks '" << needle << "': " << status;
  }
  return ::testing::AssertionSuccess();
}

class EngineTest : public ::testing::Test {
 protected:
  void Load(const std::string& fixture, const std::string& layout = "hf",
            const LoadOptions& options = {}) {
    auto info = engine_.Load("m", Str(GoldenDir(fixture) / layout), options);
    ASSERT_TRUE(info.ok()) << info.status();
    info_ = *info;
  }
  std::map<std::string, std::string> Weights() { return testing::TensorBytes(engine_, "m"); }
  GroupInfo Group(const std::string& name) {
    auto groups = engine_.Symmetries("m");
    for (const GroupInfo& g : *groups) {
      if (g.name == name) return g;
    }
    ADD_FAILURE() << "no group " << name;
    return {};
  }
  // A refused apply: the right code, the group named, nothing changed.
  void ExpectRefused(const std::vector<Permutation>& perms, absl::StatusCode code,
                     const std::string& needle, const ApplyOptions& options = {}) {
    const auto before = Weights();
    const uint64_t version = engine_.Info("m")->version;
    const double rel_before = engine_.Verify("m")->rel_l2;
    auto report = engine_.Apply("m", perms, options);
    EXPECT_TRUE(HasError(report.status(), code, needle));
    EXPECT_EQ(Weights(), before);
    EXPECT_EQ(engine_.Info("m")->version, version);
    auto verify = engine_.Verify("m");  // same weights, same bits
    ASSERT_TRUE(verify.ok());
    EXPECT_EQ(verify->rel_l2, rel_before);
  }
  static std::vector<int64_t> Iota(int64_t n) {
    std::vector<int64_t> v(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = i;
    return v;
  }

  Engine engine_;
  ModelInfo info_;
};

TEST_F(EngineTest, LoadReportsFamilyLayoutAndDims) {
  Load("mamba2-groups");
  EXPECT_EQ(info_.family, Family::kMamba2);
  EXPECT_EQ(info_.layout, Layout::kHf);
  EXPECT_EQ(info_.version, 1u);
  EXPECT_EQ(info_.device, "cpu");
  EXPECT_EQ(info_.dtype, DType::kFloat32);
  EXPECT_EQ(info_.dims.at("nheads"), 8);
  EXPECT_EQ(info_.dims.at("ngroups"), 2);
  EXPECT_EQ(info_.fingerprint.size(), 16u);
  auto ssm = engine_.Load("ssm", Str(GoldenDir("mamba1-small") / "mamba_ssm"));
  ASSERT_TRUE(ssm.ok()) << ssm.status();
  EXPECT_EQ(ssm->layout, Layout::kMambaSsm);
  EXPECT_EQ(ssm->family, Family::kMamba1);
  EXPECT_EQ(engine_.List().size(), 2u);
  EXPECT_TRUE(HasError(engine_.Load("m", Str(GoldenDir("mamba1-small") / "hf")).status(),
                       absl::StatusCode::kAlreadyExists, "'m'"));
  ASSERT_TRUE(engine_.Unload("ssm").ok());
  EXPECT_EQ(engine_.Unload("ssm").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(engine_.List().size(), 1u);
}

// A checkpoint written from `config_json` with random float64 weights (so
// that no top-k router choice is near enough a tie for float32 rounding to
// flip it), loaded; every group permuted at random and verified; exported,
// reloaded with the same logits; captured, solved and applied. Returns the
// group names GetSymmetries listed. `stored` names each tensor in the files
// (default: the layout's name).
std::vector<std::string> LoadApplyExportReload(
    Engine& engine, const std::string& config_json,
    const std::function<std::string(const std::string&)>& stored = {}) {
  testing::TempDir temp;
  const fs::path dir = temp.path() / "hybrid";
  fs::create_directories(dir);
  std::ofstream(dir / "config.json") << config_json;
  auto config = ParseConfig(config_json, "hybrid");
  EXPECT_TRUE(config.ok()) << config.status();
  if (!config.ok()) return {};
  io::TensorList tensors;
  for (const auto& [name, tensor] : testing::RandomWeights(*config, 43, torch::kFloat64)) {
    tensors.push_back({stored ? stored(name) : LayoutTensorName(config->layout, name), tensor});
  }
  EXPECT_TRUE(io::WriteSafetensors(dir / "model.safetensors", tensors).ok());
  auto info = engine.Load("m", Str(dir));
  EXPECT_TRUE(info.ok()) << info.status();
  if (!info.ok()) return {};
  EXPECT_EQ(info->layout, config->layout);
  auto groups = engine.Symmetries("m");
  EXPECT_TRUE(groups.ok()) << groups.status();
  torch::manual_seed(7);
  const torch::Tensor ids = torch::randint(0, config->vocab_unpadded, {2, 9}, torch::kLong);
  EvaluateRequest request{std::vector<int64_t>(ids.data_ptr<int64_t>(),
                                               ids.data_ptr<int64_t>() + ids.numel()),
                          2, /*return_logits=*/true};
  auto before = engine.Evaluate("m", request);
  EXPECT_TRUE(before.ok()) << before.status();
  std::mt19937_64 rng(5);
  auto report = engine.Apply("m", testing::RandomPermutations(*groups, rng));
  EXPECT_TRUE(report.ok()) << report.status();
  if (!report.ok() || !before.ok()) return {};
  EXPECT_TRUE(report->verified && report->correctness.ok) << report->correctness.rel_l2;
  const fs::path exported = temp.path() / "exported";
  EXPECT_TRUE(engine.Export("m", Str(exported)).ok());
  EXPECT_TRUE(engine.Load("r", Str(exported)).ok());
  auto after = engine.Evaluate("r", request);
  EXPECT_TRUE(after.ok()) << after.status();
  if (after.ok()) {
    EXPECT_LE(RelL2(torch::tensor(after->logits), torch::tensor(before->logits)), 1e-5);
  }
  // The export holds the files' own names.
  auto written = io::ReadSafetensors(exported / "model.safetensors");
  EXPECT_TRUE(written.ok()) << written.status();
  if (written.ok()) {
    std::set<std::string> names_in, names_out;
    for (const auto& tensor : tensors) names_in.insert(tensor.name);
    for (const auto& tensor : *written) names_out.insert(tensor.name);
    EXPECT_EQ(names_out, names_in);
  }
  // Traces -> a permutation of every group (each kind's capture points),
  // applied together exactly to the reloaded model.
  CaptureRequest capture;
  capture.model = "r";
  for (int64_t i = 0; i < 2 * 48; ++i) {
    capture.input_ids.push_back((i * 37 + 5) % config->vocab_unpadded);
  }
  capture.batch = 2;
  auto results = engine.Capture(capture);
  EXPECT_TRUE(results.ok()) << results.status();
  if (results.ok()) {
    EXPECT_EQ(results->size(), groups->size());
    std::vector<Permutation> permutations;
    for (const PermutationResult& result : *results) {
      EXPECT_GT(result.tokens, 0) << result.permutation.group;
      permutations.push_back(result.permutation);
    }
    auto applied = engine.Apply("r", permutations);
    EXPECT_TRUE(applied.ok()) << applied.status();

    if (applied.ok()) {
      EXPECT_TRUE(applied->correctness.ok);
      EXPECT_DOUBLE_EQ(applied->correctness.top1_agreement, 1.0);
    }
  }
  std::vector<std::string> names;
  for (const GroupInfo& group : *groups) names.push_back(group.name);
  return names;
}

int64_t CountEndingWith(const std::vector<std::string>& names, const std::string& suffix) {
  return std::count_if(names.begin(), names.end(), [&suffix](const std::string& name) {
    return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  });
}

TEST_F(EngineTest, MambaSsmWithGatedMlpLoadsAppliesAndExports) {
  const std::vector<std::string> groups = LoadApplyExportReload(
      engine_, R"({"d_model": 16, "n_layer": 2, "vocab_size": 40, "d_intermediate": 12,
                   "ssm_cfg": {"layer": "Mamba2", "d_state": 4, "headdim": 8, "ngroups": 2}})");
  EXPECT_EQ(engine_.Info("m")->dims.at("d_intermediate"), 128);  // GatedMLP's rounding
  EXPECT_EQ(CountEndingWith(groups, ".mlp"), 2);
}

// mamba_ssm's hybrid layout: attention at attn_layer_idx (MHA with grouped KV
// heads, a conv and a partial rotary), Mamba-2 elsewhere, a gated MLP in
// every layer.
TEST_F(EngineTest, MambaSsmHybridWithAttentionLoadsAppliesAndExports) {
  const std::vector<std::string> groups = LoadApplyExportReload(
      engine_, R"({"d_model": 16, "n_layer": 3, "vocab_size": 40, "d_intermediate": 12,
                   "attn_layer_idx": [1],
                   "attn_cfg": {"causal": true, "num_heads": 4, "num_heads_kv": 2,
                                "head_dim": 4, "d_conv": 4, "rotary_emb_dim": 2,
                                "qkv_proj_bias": false, "out_proj_bias": false},
                   "ssm_cfg": {"layer": "Mamba2", "d_state": 4, "headdim": 8}})");
  EXPECT_EQ(engine_.Info("m")->dims.at("attention_layers"), 1);
  EXPECT_EQ(groups, (std::vector<std::string>{
                        "residual", "layers.0.heads", "layers.0.headdim", "layers.0.state",
                        "layers.0.mlp", "layers.1.heads", "layers.1.value_dims",
                        "layers.1.key_dims", "layers.1.mlp", "layers.2.heads",
                        "layers.2.headdim", "layers.2.state", "layers.2.mlp"}));
}

// NVIDIA's Nemotron-H as transformers 5 may store it (model.* names):
// Mamba-2, attention, ReLU² MLP and experts layers, one mixer a layer.
TEST_F(EngineTest, NemotronHLoadsAppliesAndExportsUnderItsOwnNames) {
  const std::vector<std::string> groups = LoadApplyExportReload(
      engine_, R"({"model_type": "nemotron_h", "hybrid_override_pattern": "M*-ME",
                   "hidden_size": 16, "vocab_size": 40, "mamba_num_heads": 4,
                   "mamba_head_dim": 8, "n_groups": 2, "ssm_state_size": 4,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 6,
                   "intermediate_size": 20, "n_routed_experts": 3, "num_experts_per_tok": 2,
                   "moe_intermediate_size": 5, "moe_shared_expert_intermediate_size": 6})",
      [](const std::string& name) {
        return name.rfind("backbone.", 0) == 0 ? "model." + name.substr(9) : name;
      });
  EXPECT_EQ(groups, (std::vector<std::string>{
                        "residual", "layers.0.heads", "layers.0.headdim", "layers.0.state",
                        "layers.1.heads", "layers.1.value_dims", "layers.1.key_dims",
                        "layers.2.mlp", "layers.3.heads", "layers.3.headdim", "layers.3.state",
                        "layers.4.experts", "layers.4.expert_hidden.0", "layers.4.expert_hidden.1",
                        "layers.4.expert_hidden.2", "layers.4.shared_expert"}));
  auto symmetries = engine_.Symmetries("m");
  ASSERT_TRUE(symmetries.ok());
  for (const GroupMember& member : symmetries->front().members) {
    EXPECT_TRUE(member.tensor.rfind("model.", 0) == 0 || member.tensor == "lm_head.weight")
        << member.tensor;
  }
  EXPECT_EQ(engine_.Info("m")->dims.at("mlp_layers"), 1);
  EXPECT_EQ(engine_.Info("m")->architecture, "nemotron_h");
  EXPECT_EQ(engine_.Info("m")->family, Family::kMamba2);
}

// Bamba's and Jamba's module names (model.layers.{i}.mamba or self_attn,
// feed_forward, input_layernorm, pre_ff_layernorm, ...) for icd's canonical
// ones, attention at `attention`.
std::function<std::string(const std::string&)> BambaStyleNames(std::set<int64_t> attention) {
  return [attention](const std::string& name) {
    const std::vector<std::pair<std::string, std::string>> top = {
        {"backbone.embeddings.", "model.embed_tokens."},
        {"backbone.norm_f.", "model.final_layernorm."}};
    for (const auto& [from, to] : top) {
      if (name.rfind(from, 0) == 0) return to + name.substr(from.size());
    }
    const std::string layers = "backbone.layers.";
    if (name.rfind(layers, 0) != 0) return name;
    const size_t dot = name.find('.', layers.size());
    const int64_t layer = std::stoll(name.substr(layers.size(), dot - layers.size()));
    const std::string rest = name.substr(dot + 1);
    const std::vector<std::pair<std::string, std::string>> modules = {
        {"norm.", "input_layernorm."}, {"norm2.", "pre_ff_layernorm."},
        {"mixer.", attention.count(layer) ? "self_attn." : "mamba."},
        {"mlp.", "feed_forward."}, {"attn.", "self_attn."}};  // Falcon-H1's beside
    for (const auto& [from, to] : modules) {
      if (rest.rfind(from, 0) == 0) {
        return "model.layers." + std::to_string(layer) + "." + to + rest.substr(from.size());
      }
    }
    return name;
  };
}

// IBM's Bamba under its own module names.
TEST_F(EngineTest, BambaLoadsAppliesAndExportsUnderItsOwnNames) {
  const std::vector<std::string> groups = LoadApplyExportReload(
      engine_, R"({"model_type": "bamba", "hidden_size": 16, "num_hidden_layers": 3,
                   "vocab_size": 40, "attn_layer_indices": [1], "num_attention_heads": 4,
                   "num_key_value_heads": 2, "mamba_n_heads": 4, "mamba_n_groups": 2,
                   "mamba_d_state": 4, "intermediate_size": 12})",
      BambaStyleNames({1}));
  EXPECT_EQ(groups, (std::vector<std::string>{
                        "residual", "layers.0.heads", "layers.0.headdim", "layers.0.state",
                        "layers.0.mlp", "layers.1.heads", "layers.1.value_dims",
                        "layers.1.key_dims", "layers.1.mlp", "layers.2.heads",
                        "layers.2.headdim", "layers.2.state", "layers.2.mlp"}));
  auto symmetries = engine_.Symmetries("m");
  ASSERT_TRUE(symmetries.ok());
  for (const GroupMember& member : symmetries->front().members) {
    EXPECT_TRUE(member.tensor.rfind("model.", 0) == 0 || member.tensor == "lm_head.weight")
        << member.tensor;
  }
}

// AI21's Jamba under its own names, its experts a tensor each.
TEST_F(EngineTest, JambaLoadsAppliesAndExportsUnderItsOwnNames) {
  const std::vector<std::string> groups = LoadApplyExportReload(
      engine_, R"({"model_type": "jamba", "hidden_size": 16, "num_hidden_layers": 3,
                   "vocab_size": 40, "attn_layer_period": 3, "attn_layer_offset": 1,
                   "expert_layer_period": 2, "expert_layer_offset": 0, "num_experts": 2,
                   "num_experts_per_tok": 1, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "mamba_d_state": 4, "intermediate_size": 10})",
      BambaStyleNames({1}));
  EXPECT_EQ(groups, (std::vector<std::string>{
                        "residual", "layers.0.inner", "layers.0.state", "layers.0.dt_rank",
                        "layers.0.experts", "layers.0.expert_hidden.0",
                        "layers.0.expert_hidden.1", "layers.1.heads", "layers.1.value_dims",
                        "layers.1.key_dims", "layers.1.mlp", "layers.2.inner", "layers.2.state",
                        "layers.2.dt_rank", "layers.2.experts", "layers.2.expert_hidden.0",
                        "layers.2.expert_hidden.1"}));
}

// TII's Falcon-H1 under its own names: attention (self_attn, icd's "attn")
// beside the Mamba-2 mixer in every layer, its multipliers.
TEST_F(EngineTest, FalconH1LoadsAppliesAndExportsUnderItsOwnNames) {
  const std::vector<std::string> groups = LoadApplyExportReload(
      engine_, R"({"model_type": "falcon_h1", "hidden_size": 16, "num_hidden_layers": 2,
                   "vocab_size": 40, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_n_groups": 2,
                   "mamba_d_state": 4, "intermediate_size": 12, "key_multiplier": 0.5,
                   "ssm_multipliers": [0.5, 2.0, 0.8, 1.5, 0.9], "lm_head_multiplier": 0.3})",
      BambaStyleNames({}));
  EXPECT_EQ(groups, (std::vector<std::string>{
                        "residual", "layers.0.heads", "layers.0.headdim", "layers.0.state",
                        "layers.0.attn.heads", "layers.0.attn.value_dims", "layers.0.mlp",
                        "layers.1.heads", "layers.1.headdim", "layers.1.state",
                        "layers.1.attn.heads", "layers.1.attn.value_dims", "layers.1.mlp"}));
  auto symmetries = engine_.Symmetries("m");
  ASSERT_TRUE(symmetries.ok());
  bool self_attn = false;
  for (const GroupMember& member : symmetries->front().members) {
    self_attn |= member.tensor == "model.layers.1.self_attn.q_proj.weight";
  }
  EXPECT_TRUE(self_attn);
  EXPECT_EQ(engine_.Info("m")->architecture, "falcon_h1");
}

// IBM's Granite 4.0 under its own names (shared_mlp, block_sparse_moe,
// post_attention_layernorm, model.norm), with a mixture of experts.
TEST_F(EngineTest, GraniteLoadsAppliesAndExportsUnderItsOwnNames) {
  const std::vector<std::string> groups = LoadApplyExportReload(
      engine_, R"({"model_type": "granitemoehybrid", "hidden_size": 16, "vocab_size": 40,
                   "layer_types": ["attention", "mamba"], "num_attention_heads": 4,
                   "num_key_value_heads": 1, "position_embedding_type": "rope",
                   "mamba_n_heads": 4, "mamba_n_groups": 2, "mamba_d_state": 4,
                   "shared_intermediate_size": 10, "num_local_experts": 4,
                   "num_experts_per_tok": 2, "intermediate_size": 6,
                   "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                   "logits_scaling": 4.0})",
      [](const std::string& name) {
        if (name == "backbone.embeddings.weight") return std::string("model.embed_tokens.weight");
        if (name == "backbone.norm_f.weight") return std::string("model.norm.weight");
        const std::string layers = "backbone.layers.";
        if (name.rfind(layers, 0) != 0) return name;
        const size_t dot = name.find('.', layers.size());
        const std::string layer = name.substr(layers.size(), dot - layers.size());
        const std::string rest = name.substr(dot + 1);
        const std::vector<std::pair<std::string, std::string>> modules = {
            {"norm.", "input_layernorm."},
            {"norm2.", "post_attention_layernorm."},
            {"mixer.", layer == "0" ? "self_attn." : "mamba."},
            {"mlp.fc1.", "shared_mlp.input_linear."},
            {"mlp.fc2.", "shared_mlp.output_linear."},
            {"moe.router.", "block_sparse_moe.router.layer."},
            {"moe.fc1.", "block_sparse_moe.input_linear."},
            {"moe.fc2.", "block_sparse_moe.output_linear."}};
        for (const auto& [from, to] : modules) {
          if (rest.rfind(from, 0) == 0) {
            return "model.layers." + layer + "." + to + rest.substr(from.size());
          }
        }
        return name;
      });
  EXPECT_EQ(groups, (std::vector<std::string>{
                        "residual", "layers.0.heads", "layers.0.value_dims", "layers.0.mlp",
                        "layers.0.experts", "layers.0.expert_hidden.0",
                        "layers.0.expert_hidden.1", "layers.0.expert_hidden.2",
                        "layers.0.expert_hidden.3", "layers.1.heads", "layers.1.headdim",
                        "layers.1.state", "layers.1.mlp", "layers.1.experts",
                        "layers.1.expert_hidden.0", "layers.1.expert_hidden.1",
                        "layers.1.expert_hidden.2", "layers.1.expert_hidden.3"}));
}

// Zyphra's Zamba2 under its own names: a hybrid layer's Mamba layer as
// mamba_decoder, its linear, the shared block under its first layer.
TEST_F(EngineTest, Zamba2LoadsAppliesAndExportsUnderItsOwnNames) {
  const std::set<int64_t> hybrid{0, 2};
  const std::vector<std::string> groups = LoadApplyExportReload(
      engine_, R"({"model_type": "zamba2", "hidden_size": 12, "num_hidden_layers": 3,
                   "vocab_size": 40, "layers_block_type": ["hybrid", "mamba", "hybrid"],
                   "mamba_d_state": 4, "n_mamba_heads": 4, "mamba_ngroups": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2,
                   "intermediate_size": 10, "adapter_rank": 2})",
      [&hybrid](const std::string& name) {
        if (name == "backbone.embeddings.weight") return std::string("model.embed_tokens.weight");
        if (name == "backbone.norm_f.weight") return std::string("model.final_layernorm.weight");
        const std::string layers = "backbone.layers.";
        if (name.rfind(layers, 0) != 0) return name;
        const size_t dot = name.find('.', layers.size());
        const int64_t layer = std::stoll(name.substr(layers.size(), dot - layers.size()));
        const std::string rest = name.substr(dot + 1);
        const std::string decoder = hybrid.count(layer) ? "mamba_decoder." : "";
        const std::vector<std::pair<std::string, std::string>> modules = {
            {"norm.", decoder + "input_layernorm."}, {"mixer.", decoder + "mamba."}};
        for (const auto& [from, to] : modules) {
          if (rest.rfind(from, 0) == 0) {
            return "model.layers." + std::to_string(layer) + "." + to + rest.substr(from.size());
          }
        }
        return "model.layers." + std::to_string(layer) + "." + rest;  // linear, shared_transformer
      });
  EXPECT_EQ(groups,
            (std::vector<std::string>{
                "residual", "layers.0.heads", "layers.0.headdim", "layers.0.state",
                "layers.1.heads", "layers.1.headdim", "layers.1.state", "layers.2.heads",
                "layers.2.headdim", "layers.2.state", "shared.0.heads", "shared.0.value_dims",
                "shared.0.key_dims", "shared.0.attention_output", "shared.0.mlp",
                "shared.0.output", "shared.0.adapters.0.gate_up", "shared.0.adapters.1.gate_up"}));
  auto symmetries = engine_.Symmetries("m");
  ASSERT_TRUE(symmetries.ok());
  std::set<std::string> residual_tensors;
  for (const GroupMember& member : symmetries->front().members) {
    residual_tensors.insert(member.tensor);
  }
  EXPECT_TRUE(residual_tensors.count("model.layers.2.mamba_decoder.mamba.in_proj.weight"));
  EXPECT_TRUE(residual_tensors.count("model.layers.0.shared_transformer.self_attn.q_proj.weight"));
  EXPECT_TRUE(residual_tensors.count("model.layers.2.linear.weight"));
  EXPECT_EQ(engine_.Info("m")->architecture, "zamba2");
  EXPECT_EQ(engine_.Info("m")->dims.at("shared_blocks"), 1);
}

TEST_F(EngineTest, TiedHeadStaysOneTensor) {
  Load("mamba1-small", "mamba_ssm");
  // Both names are readable and hold the same bytes; the residual group
  // lists the shared tensor once.
  auto tensors = engine_.ReadTensors("m", {"backbone.embedding.weight", "lm_head.weight"});
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  EXPECT_EQ((*tensors)[0].data, (*tensors)[1].data);
  auto residual = Group("residual");
  for (const GroupMember& m : residual.members) EXPECT_NE(m.tensor, "lm_head.weight");
  const int64_t vocab = info_.dims.at("vocab_size"), width = info_.dims.at("d_model");
  std::mt19937_64 rng(7);
  ASSERT_TRUE(engine_.Apply("m", {{"residual", testing::RandomPermutation(residual, rng)}}).ok());
  tensors = engine_.ReadTensors("m", {"backbone.embedding.weight", "lm_head.weight"});
  EXPECT_EQ((*tensors)[0].data, (*tensors)[1].data);
  EXPECT_EQ(static_cast<int64_t>((*tensors)[0].data.size()), vocab * width * 4);
}

TEST_F(EngineTest, BadPermutationsAreRefusedAndChangeNothing) {
  Load("mamba1-bias-untied");
  const int64_t inner = info_.dims.at("d_inner");
  auto bad_length = Iota(inner - 1);
  ExpectRefused({{"layers.0.inner", bad_length}}, absl::StatusCode::kInvalidArgument,
                "group 'layers.0.inner': wrong length");
  auto repeated = Iota(inner);
  repeated[5] = 3;
  ExpectRefused({{"layers.0.inner", repeated}}, absl::StatusCode::kInvalidArgument,
                "group 'layers.0.inner': repeated index 3");
  auto out_of_range = Iota(inner);
  out_of_range[0] = inner;
  ExpectRefused({{"layers.1.inner", out_of_range}}, absl::StatusCode::kInvalidArgument,
                "group 'layers.1.inner': index 128 at position 0 out of range");
  ExpectRefused({{"layers.7.inner", Iota(inner)}}, absl::StatusCode::kInvalidArgument,
                "unknown group 'layers.7.inner'");
  // A valid first permutation is not applied when a later one is bad.
  std::mt19937_64 rng(1);
  ExpectRefused({{"residual", testing::RandomPermutation(Group("residual"), rng)},
                 {"layers.0.state", Iota(3)}},
                absl::StatusCode::kInvalidArgument, "group 'layers.0.state': wrong length");
  ExpectRefused({}, absl::StatusCode::kInvalidArgument, "none given");
}

TEST_F(EngineTest, Mamba2ConstraintsAreEnforced) {
  Load("mamba2-groups");  // 8 heads of 8 in 2 groups of 4 heads, d_state 8
  // A head moved to the other group alone.
  auto heads = Iota(8);
  std::swap(heads[3], heads[4]);
  ExpectRefused({{"layers.0.heads", heads}}, absl::StatusCode::kInvalidArgument,
                "group 'layers.0.heads': constraint broken");
  // Whole groups moving is fine; so are heads inside their group.
  std::vector<int64_t> swapped_groups{5, 4, 7, 6, 1, 0, 3, 2};
  ASSERT_TRUE(engine_.Apply("m", {{"layers.0.heads", swapped_groups}}).ok());
  // A headdim index leaving its head.
  auto headdim = Iota(64);
  std::swap(headdim[7], headdim[8]);
  ExpectRefused({{"layers.1.headdim", headdim}}, absl::StatusCode::kInvalidArgument,
                "group 'layers.1.headdim': constraint broken");
  // A state index leaving its group.
  auto state = Iota(16);
  std::swap(state[0], state[15]);
  ExpectRefused({{"layers.1.state", state}}, absl::StatusCode::kInvalidArgument,
                "group 'layers.1.state': constraint broken");
}

TEST_F(EngineTest, ExpectedVersionGivesOptimisticConcurrency) {
  Load("mamba1-small");
  std::mt19937_64 rng(3);
  const GroupInfo inner = Group("layers.0.inner");
  ApplyOptions stale;
  stale.expected_version = 7;
  ExpectRefused({{"layers.0.inner", testing::RandomPermutation(inner, rng)}},
                absl::StatusCode::kFailedPrecondition, "version 1", stale);
  ApplyOptions current;
  current.expected_version = 1;
  auto report = engine_.Apply("m", {{"layers.0.inner", testing::RandomPermutation(inner, rng)}},
                              current);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->version, 2u);
}

TEST_F(EngineTest, FailedCheckRestoresWeightsExactly) {
  Load("mamba2-one-group");
  std::mt19937_64 rng(11);
  std::vector<Permutation> perms;
  for (const char* name : {"residual", "layers.0.heads", "layers.0.headdim", "layers.1.state"}) {
    perms.push_back({name, testing::RandomPermutation(Group(name), rng)});
  }
  ApplyOptions impossible;
  impossible.tolerance = 1e-300;  // reordered float32 sums cannot meet it
  ExpectRefused(perms, absl::StatusCode::kAborted, "weights restored", impossible);
  ApplyOptions skip;
  skip.skip_verify = true;
  auto report = engine_.Apply("m", perms, skip);
  ASSERT_TRUE(report.ok());
  EXPECT_FALSE(report->verified);
  EXPECT_EQ(report->version, 2u);
}

// Issue 14: an apply whose caller goes away, or whose deadline passes,
// during its post-apply check restores the weights exactly and keeps the
// version; a NaN, infinite or negative tolerance is refused.
TEST_F(EngineTest, ApplyStoppedDuringItsCheckRestoresTheWeights) {
  Load("mamba1-small");
  std::mt19937_64 rng(5);
  const std::vector<Permutation> perms = {
      {"layers.0.inner", testing::RandomPermutation(Group("layers.0.inner"), rng)},
      {"residual", testing::RandomPermutation(Group("residual"), rng)}};
  const auto before = Weights();
  for (const bool deadline : {false, true}) {
    const CallContext ctx =
        deadline ? testing::PastDeadlineContext() : testing::CancelledContext();
    auto report = engine_.Apply("m", perms, {}, ctx);
    EXPECT_EQ(report.status().code(), deadline ? absl::StatusCode::kDeadlineExceeded
                                               : absl::StatusCode::kCancelled)
        << report.status();
    EXPECT_EQ(Weights(), before);
    EXPECT_EQ(engine_.Info("m")->version, 1u);
  }
  for (const double tolerance : {std::nan(""), HUGE_VAL, -1e-3}) {
    ApplyOptions odd;
    odd.tolerance = tolerance;
    ExpectRefused(perms, absl::StatusCode::kInvalidArgument, "tolerance: must be a finite number",
                  odd);
  }
}

// A throw after the gathers (on a GPU: a CUDA error while waiting for them,
// or an out-of-memory comparing the logits; here the progress callback of
// the check's stage) restores the weights and keeps the version: the H200
// soak found them left permuted.
TEST_F(EngineTest, ApplyThrowingDuringItsCheckRestoresTheWeights) {
  Load("mamba1-small");
  std::mt19937_64 rng(6);
  const std::vector<Permutation> perms = {
      {"layers.1.inner", testing::RandomPermutation(Group("layers.1.inner"), rng)},
      {"residual", testing::RandomPermutation(Group("residual"), rng)}};
  const auto before = Weights();
  CallContext ctx;
  bool reached = false;
  ctx.progress = [&reached](absl::string_view stage, int64_t, int64_t) {
    if (stage != "check") return;
    reached = true;
    throw std::runtime_error("a device fault after the gathers");
  };
  auto report = engine_.Apply("m", perms, {}, ctx);
  EXPECT_TRUE(reached);
  EXPECT_EQ(report.status().code(), absl::StatusCode::kInternal) << report.status();
  EXPECT_EQ(Weights(), before);
  EXPECT_EQ(engine_.Info("m")->version, 1u);
  // The control: the same permutations apply when nothing throws.
  auto applied = engine_.Apply("m", perms);
  ASSERT_TRUE(applied.ok()) << applied.status();
  EXPECT_NE(Weights(), before);
}

// Issue 15, finding 9: Verify and Evaluate stop at their deadline or when
// cancelled, and change nothing.
TEST_F(EngineTest, VerifyAndEvaluateStopAtTheirDeadlineOrWhenCancelled) {
  Load("mamba1-small");
  const auto golden = testing::ReadGolden("mamba1-small");
  const auto before = Weights();
  for (const bool deadline : {false, true}) {
    const CallContext ctx =
        deadline ? testing::PastDeadlineContext() : testing::CancelledContext();
    const absl::StatusCode code =
        deadline ? absl::StatusCode::kDeadlineExceeded : absl::StatusCode::kCancelled;
    EXPECT_EQ(engine_.Verify("m", ctx).status().code(), code) << engine_.Verify("m", ctx).status();
    auto evaluated = engine_.Evaluate("m", {golden.input_ids, golden.batch, true}, ctx);
    EXPECT_EQ(evaluated.status().code(), code) << evaluated.status();
  }
  EXPECT_EQ(Weights(), before);
  EXPECT_EQ(engine_.Info("m")->version, 1u);
  auto verify = engine_.Verify("m");  // the same calls without a deadline pass
  ASSERT_TRUE(verify.ok()) << verify.status();
  EXPECT_EQ(verify->rel_l2, 0.0);
}

// Issue 15, finding 9: a device this machine lacks is refused at load, by
// name, and nothing is loaded. Without CUDA (CI) "cuda" itself; with it, an
// index past the last device.
TEST_F(EngineTest, ACudaDeviceThisMachineLacksIsRefused) {
  const bool has_cuda = torch::cuda::is_available();
  const std::string device =
      has_cuda ? "cuda:" + std::to_string(torch::cuda::device_count()) : "cuda";
  const std::string reason = has_cuda ? "CUDA devices" : "no CUDA device is available";
  for (const bool by_default : {false, true}) {
    Engine engine(EngineOptions{by_default ? device : "cpu"});
    LoadOptions options;
    if (!by_default) options.device = device;
    auto info = engine.Load("m", Str(GoldenDir("mamba1-small") / "hf"), options);
    EXPECT_TRUE(HasError(info.status(), absl::StatusCode::kInvalidArgument,
                         "device '" + device + "': "));
    EXPECT_TRUE(HasError(info.status(), absl::StatusCode::kInvalidArgument, reason));
    EXPECT_TRUE(engine.List().empty());
  }
}

// Issue 15, finding 9: Unload during an in-flight Evaluate waits for it
// (exclusive lock), and the Evaluate finishes on the model it started with.
// The Evaluate's own cancellation check, polled from inside its forward,
// starts the Unload and then looks whether the Unload got through: it must
// not while the forward runs. A correct engine passes at any speed (the
// Unload is blocked); one whose Unload did not wait would be seen within the
// 200 ms the check gives it.
TEST_F(EngineTest, UnloadWaitsForAnInFlightEvaluate) {
  Load("mamba1-small");
  const auto golden = testing::ReadGolden("mamba1-small");
  const EvaluateRequest request{golden.input_ids, golden.batch, true};
  auto reference = engine_.Evaluate("m", request);
  ASSERT_TRUE(reference.ok()) << reference.status();

  std::promise<absl::Status> unloaded;
  std::shared_future<absl::Status> unload_result = unloaded.get_future().share();
  std::thread unloader;
  bool unload_got_through_mid_forward = false;
  int polls = 0;
  CallContext ctx;
  ctx.cancelled = [&] {
    if (++polls == 1) {
      unloader = std::thread([&] { unloaded.set_value(engine_.Unload("m")); });
      unload_got_through_mid_forward =
          unload_result.wait_for(std::chrono::milliseconds(200)) == std::future_status::ready;
    }
    return false;
  };
  auto in_flight = engine_.Evaluate("m", request, ctx);
  ASSERT_TRUE(unloader.joinable()) << "the forward never polled its context";
  unloader.join();
  EXPECT_FALSE(unload_got_through_mid_forward) << "Unload did not wait for the Evaluate";
  ASSERT_TRUE(in_flight.ok()) << in_flight.status();
  EXPECT_EQ(in_flight->logits, reference->logits);  // the whole model, to the end
  EXPECT_TRUE(unload_result.get().ok()) << unload_result.get();
  EXPECT_EQ(engine_.Info("m").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(engine_.Evaluate("m", request).status().code(), absl::StatusCode::kNotFound);
}

// Issue 14: a model loaded again under a name starts above every version
// the name had, so an expected_version from the earlier instance is stale.
TEST_F(EngineTest, AReloadUnderTheSameNameNeverRepeatsAVersion) {
  Load("mamba1-small");
  std::mt19937_64 rng(6);
  const std::vector<Permutation> perms = {
      {"layers.1.inner", testing::RandomPermutation(Group("layers.1.inner"), rng)}};
  ASSERT_EQ(engine_.Apply("m", perms)->version, 2u);
  ASSERT_TRUE(engine_.Unload("m").ok());
  Load("mamba1-small");
  EXPECT_EQ(info_.version, 3u);
  ApplyOptions stale;
  stale.expected_version = 2;
  ExpectRefused(perms, absl::StatusCode::kFailedPrecondition, "version 3", stale);
  // Another name still starts at 1.
  auto other = engine_.Load("n", Str(GoldenDir("mamba1-small") / "hf"));
  ASSERT_TRUE(other.ok()) << other.status();
  EXPECT_EQ(other->version, 1u);
}

// Issue 14: NaN or infinite weights are refused by name, before anything
// changes; Evaluate on one token says there is nothing to score.
TEST_F(EngineTest, NonFiniteWeightsAndOneTokenEvaluateAreRefused) {
  Load("mamba1-small");
  auto tensors = engine_.ReadTensors("m", {"backbone.norm_f.weight"});
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  const auto before = Weights();
  for (const float bad : {std::nanf(""), HUGE_VALF, -HUGE_VALF}) {
    HostTensor tensor = (*tensors)[0];
    std::memcpy(tensor.data.data() + 8, &bad, sizeof bad);  // element 2
    auto written = engine_.WriteTensors("m", {tensor});
    EXPECT_TRUE(HasError(written.status(), absl::StatusCode::kInvalidArgument,
                         "tensor 'backbone.norm_f.weight': element 2 is NaN or infinite"));
    EXPECT_EQ(Weights(), before);
    EXPECT_EQ(engine_.Info("m")->version, 1u);
  }
  EvaluateRequest one;
  one.input_ids = {5, 7};
  one.batch = 2;
  EXPECT_TRUE(HasError(engine_.Evaluate("m", one).status(), absl::StatusCode::kInvalidArgument,
                       "nothing to score"));
  one.return_logits = true;  // logits of one token are a fair question
  auto logits = engine_.Evaluate("m", one);
  ASSERT_TRUE(logits.ok()) << logits.status();
  EXPECT_EQ(logits->tokens, 0);
}

// The engine validates a request's batch itself (the service passes it on):
// 0 is one row, below 0 is refused, naming the field, for Evaluate and
// Capture alike; and Symmetries reports the version it read the groups at.
TEST_F(EngineTest, ANegativeBatchIsRefusedAndZeroIsOneRow) {
  Load("mamba1-small");
  EvaluateRequest evaluate;
  evaluate.input_ids = {5, 7, 9, 11};
  evaluate.batch = -2;
  EXPECT_TRUE(HasError(engine_.Evaluate("m", evaluate).status(),
                       absl::StatusCode::kInvalidArgument, "batch: -2 < 0"));
  evaluate.batch = 0;
  auto one_row = engine_.Evaluate("m", evaluate);
  ASSERT_TRUE(one_row.ok()) << one_row.status();
  EXPECT_EQ(one_row->tokens, 3);
  CaptureRequest capture;
  capture.model = "m";
  capture.input_ids = evaluate.input_ids;
  capture.batch = -1;
  EXPECT_TRUE(HasError(engine_.Capture(capture).status(), absl::StatusCode::kInvalidArgument,
                       "batch: -1 < 0"));
}

TEST_F(EngineTest, SymmetriesReportTheVersionTheyWereReadAt) {
  Load("mamba1-small");
  uint64_t version = 0;
  ASSERT_TRUE(engine_.Symmetries("m", &version).ok());
  EXPECT_EQ(version, 1u);
  std::mt19937_64 rng(5);
  const GroupInfo inner = Group("layers.0.inner");
  ASSERT_TRUE(engine_.Apply("m", {{"layers.0.inner", testing::RandomPermutation(inner, rng)}}).ok());
  ASSERT_TRUE(engine_.Symmetries("m", &version).ok());
  EXPECT_EQ(version, 2u);
}

TEST_F(EngineTest, DTypesFloat64AndBFloat16) {
  LoadOptions f64;
  f64.dtype = "float64";
  Load("mamba1-bias-untied", "hf", f64);
  EXPECT_EQ(info_.dtype, DType::kFloat64);
  std::mt19937_64 rng(5);
  auto groups = engine_.Symmetries("m");
  ASSERT_TRUE(groups.ok());
  std::vector<Permutation> perms = testing::RandomPermutations(*groups, rng);
  auto report = engine_.Apply("m", perms);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->correctness.tolerance, 1e-10);
  EXPECT_LE(report->correctness.rel_l2, 1e-10);
  std::printf("[dtype] float64 all groups rel_l2 %.3g\n", report->correctness.rel_l2);

  LoadOptions bf16;
  bf16.dtype = "bfloat16";
  auto info = engine_.Load("bf", Str(GoldenDir("mamba2-groups") / "hf"), bf16);
  ASSERT_TRUE(info.ok()) << info.status();
  groups = engine_.Symmetries("bf");
  ASSERT_TRUE(groups.ok());
  perms = testing::RandomPermutations(*groups, rng);
  report = engine_.Apply("bf", perms);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->correctness.tolerance, 2e-2);
  std::printf("[dtype] bfloat16 all groups rel_l2 %.3g\n", report->correctness.rel_l2);

  LoadOptions f16;
  f16.dtype = "float16";
  EXPECT_TRUE(HasError(engine_.Load("h", Str(GoldenDir("mamba1-small") / "hf"), f16).status(),
                       absl::StatusCode::kInvalidArgument, "float16 on the CPU"));
  EXPECT_TRUE(engine_.Info("h").status().code() == absl::StatusCode::kNotFound);
}

// Issue 15, finding 1: the probe alone cannot judge a bfloat16 apply. Its
// tolerance is 2e-2 while leaving one member out of a group moves the logits
// by as little as 2e-3 (NegativeControlTest), so a wrong gather of a bf16
// model would pass it. A gather only moves bytes: after the same
// permutations, the bf16 model must hold exactly the float32 model's
// permuted weights rounded to bf16, bit for bit, in every tensor.
class LowPrecisionApplyTest : public ::testing::TestWithParam<testing::GoldenCase> {
 protected:
  std::string Source() const {
    return Str(GoldenDir(GetParam().fixture) / GetParam().layout);
  }
  absl::StatusOr<ModelInfo> LoadAs(const std::string& name, const std::string& dtype) {
    LoadOptions options;
    options.dtype = dtype;
    return engine_.Load(name, Source(), options);
  }
  std::map<std::string, HostTensor> Tensors(const std::string& model) {
    return testing::TensorsByName(engine_, model);
  }

  Engine engine_;
};


TEST_P(LowPrecisionApplyTest, BFloat16WeightsAreTheFloat32PermutationCastBitForBit) {
  ASSERT_TRUE(LoadAs("f32", "float32").ok());
  ASSERT_TRUE(LoadAs("bf16", "bfloat16").ok());
  const auto unpermuted = Tensors("bf16");
  testing::ApplySamePermutations(engine_, {"f32", "bf16"}, 21);
  const auto f32 = Tensors("f32"), bf16 = Tensors("bf16");
  testing::ExpectFloat32Cast(f32, bf16, DType::kBFloat16, torch::kBFloat16);
  int moved = 0;
  for (const auto& [name, tensor] : bf16) moved += tensor.data != unpermuted.at(name).data;
  // Every group was permuted, so every tensor moved: nothing here is vacuous.
  EXPECT_EQ(moved, static_cast<int>(f32.size()));

  // The bf16 forward against HF's float32 goldens, permuted, asserted at the
  // design's bf16 tolerance (design.md "Tolerances": 2e-2).
  const testing::Golden golden = testing::ReadGolden(GetParam().fixture);
  auto result = engine_.Evaluate("bf16", {golden.input_ids, golden.batch, true});
  ASSERT_TRUE(result.ok()) << result.status();
  const double vs_golden = RelL2(torch::tensor(result->logits).reshape(result->shape),
                                 golden.logits);
  EXPECT_LE(vs_golden, 2e-2);
  std::printf("[bf16] %s/%s: %d of %zu tensors moved, bit-identical to float32 cast; "
              "permuted bf16 vs HF float32 golden rel_l2 %.3g\n",
              GetParam().fixture.c_str(), GetParam().layout.c_str(), moved, f32.size(),
              vs_golden);
}

INSTANTIATE_TEST_SUITE_P(Goldens, LowPrecisionApplyTest, ::testing::ValuesIn(testing::GoldenCases()),
                         [](const auto& param_info) {
                           return testing::GoldenCaseLabel(param_info.param);
                         });

TEST_F(EngineTest, EvaluateGivesNllAndChecksIds) {
  Load("mamba1-small");
  const auto golden = testing::ReadGolden("mamba1-small");
  auto result = engine_.Evaluate("m", {golden.input_ids, golden.batch, false});
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_TRUE(result->logits.empty());
  EXPECT_EQ(result->tokens, 2 * 16);
  // The NLL recomputed from HF's logits.
  torch::Tensor ids = torch::tensor(golden.input_ids).reshape({2, 17});
  torch::Tensor log_probs = torch::log_softmax(golden.logits.slice(1, 0, 16).to(torch::kFloat64), -1);
  const double nll =
      -log_probs.gather(-1, ids.slice(1, 1, 17).unsqueeze(-1)).mean().item<double>();
  EXPECT_NEAR(result->mean_nll, nll, 1e-4 * nll);
  EXPECT_TRUE(HasError(engine_.Evaluate("m", {{1, 2, 500}, 1, false}).status(),
                       absl::StatusCode::kInvalidArgument, "id 500 at position 2"));
  EXPECT_TRUE(HasError(engine_.Evaluate("m", {{1, 2, 3}, 2, false}).status(),
                       absl::StatusCode::kInvalidArgument, "batch 2"));
  EXPECT_TRUE(HasError(engine_.Evaluate("x", {{1, 2}, 1, false}).status(),
                       absl::StatusCode::kNotFound, "'x'"));
}

TEST_F(EngineTest, WriteTensorsReplacesAndRetakesTheReference) {
  Load("mamba1-small");
  auto tensors = engine_.ReadTensors("m", {"backbone.norm_f.weight"});
  ASSERT_TRUE(tensors.ok());
  HostTensor norm = (*tensors)[0];
  std::vector<float> values(norm.data.size() / 4);
  std::memcpy(values.data(), norm.data.data(), norm.data.size());
  for (float& v : values) v *= 1.5f;
  std::memcpy(norm.data.data(), values.data(), norm.data.size());
  HostTensor wrong = norm;
  wrong.shape = {2, 32};
  const auto before = Weights();
  EXPECT_TRUE(HasError(engine_.WriteTensors("m", {norm, wrong}).status(),
                       absl::StatusCode::kInvalidArgument, "given twice"));
  EXPECT_TRUE(HasError(engine_.WriteTensors("m", {wrong}).status(),
                       absl::StatusCode::kInvalidArgument, "backbone.norm_f.weight"));
  EXPECT_TRUE(HasError(engine_.WriteTensors("m", {norm}, 9).status(),
                       absl::StatusCode::kFailedPrecondition, "version 1"));
  EXPECT_EQ(Weights(), before);
  auto version = engine_.WriteTensors("m", {norm}, 1);
  ASSERT_TRUE(version.ok()) << version.status();
  EXPECT_EQ(*version, 2u);
  EXPECT_EQ((*engine_.ReadTensors("m", {"backbone.norm_f.weight"}))[0].data, norm.data);
  auto verify = engine_.Verify("m");  // the new function is the new reference
  ASSERT_TRUE(verify.ok());
  EXPECT_EQ(verify->rel_l2, 0.0);
}

}  // namespace
}  // namespace icd
