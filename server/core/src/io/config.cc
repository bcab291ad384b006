#include "io/config.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <initializer_list>
#include <sstream>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "blocks/shapes.h"
#include "icd/core/status_macros.h"
#include "io/config_fields.h"

namespace icd {
namespace {

using config_fields::CheckMamba2Shapes;
using config_fields::DtRank;
using config_fields::Fields;
using config_fields::InnerWidth;
using config_fields::Json;
using config_fields::kMaxDimension;
using config_fields::kMaxLayers;
using config_fields::ParseBamba;
using config_fields::ParseFalconH1;
using config_fields::ParseZamba2;
using config_fields::ParseGranite;
using config_fields::ParseJamba;
using config_fields::ParseMambaSsm;
using config_fields::ParseNemotronH;
using config_fields::Unsupported;

// Every dimension of a parsed config in [1, kMaxDimension], named in errors.
absl::Status CheckDimensions(const ModelConfig& c, const std::string& source) {
  if (c.n_layer < 1 || c.n_layer > kMaxLayers) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": n_layer is ", c.n_layer, "; expected 1 to ", kMaxLayers));
  }
  std::vector<std::pair<const char*, int64_t>> dims = {
      {"d_model", c.d_model}, {"vocab_size", c.vocab_size}, {"d_inner", c.d_inner},
      {"d_state", c.d_state}, {"d_conv", c.d_conv}};
  if (c.d_intermediate != 0) dims.emplace_back("d_intermediate", c.d_intermediate);
  for (const auto& [name, value] : dims) {
    if (value < 1 || value > kMaxDimension) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": ", name, " is ", value,
                                                     "; expected 1 to ", kMaxDimension));
    }
  }
  const std::vector<std::pair<const char*, int64_t>> family_dims =
      c.family == Family::kMamba2
          ? std::vector<std::pair<const char*, int64_t>>{{"nheads", c.nheads},
                                                          {"headdim", c.headdim},
                                                          {"ngroups", c.ngroups}}
          : std::vector<std::pair<const char*, int64_t>>{{"dt_rank", c.dt_rank}};
  for (const auto& [name, value] : family_dims) {
    if (value < 1 || value > kMaxDimension) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": ", name, " is ", value,
                                                     "; expected 1 to ", kMaxDimension));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> ParseHf(const Json& root, const std::string& source) {
  Fields f(root, source);
  ICD_ASSIGN_OR_RETURN(std::string model_type, f.String("model_type", ""));
  if (model_type == "nemotron_h") return ParseNemotronH(root, source);
  if (model_type == "bamba") return ParseBamba(root, source);
  if (model_type == "granitemoehybrid") return ParseGranite(root, source);
  if (model_type == "jamba") return ParseJamba(root, source);
  if (model_type == "falcon_h1") return ParseFalconH1(root, source);
  if (model_type == "zamba2") return ParseZamba2(root, source);
  ModelConfig c;
  c.layout = Layout::kHf;
  c.architecture = model_type;
  if (model_type == "mamba") {
    c.family = Family::kMamba1;
  } else if (model_type == "falcon_mamba") {
    c.family = Family::kFalconMamba;
  } else if (model_type == "mamba2") {
    c.family = Family::kMamba2;
  } else {
    return Unsupported(source, absl::StrCat("model_type '", model_type, "'"));
  }
  ICD_ASSIGN_OR_RETURN(c.d_model, f.PositiveInt("hidden_size", std::nullopt));
  ICD_ASSIGN_OR_RETURN(c.n_layer, f.PositiveInt("num_hidden_layers", std::nullopt));
  ICD_ASSIGN_OR_RETURN(c.vocab_size, f.PositiveInt("vocab_size", std::nullopt));
  c.vocab_unpadded = c.vocab_size;
  ICD_ASSIGN_OR_RETURN(c.d_conv, f.PositiveInt("conv_kernel", 4));
  ICD_ASSIGN_OR_RETURN(c.proj_bias, f.Bool("use_bias", false));
  ICD_ASSIGN_OR_RETURN(c.conv_bias, f.Bool("use_conv_bias", true));
  ICD_ASSIGN_OR_RETURN(c.norm_eps, f.Number("layer_norm_epsilon", 1e-5));
  ICD_ASSIGN_OR_RETURN(double expand, f.Number("expand", 2));
  ICD_ASSIGN_OR_RETURN(const int64_t inner_default,
                       InnerWidth(expand, c.d_model, source, "expand"));

  if (c.family == Family::kMamba2) {
    ICD_ASSIGN_OR_RETURN(c.tied, f.Bool("tie_word_embeddings", false));
    ICD_ASSIGN_OR_RETURN(c.d_state, f.PositiveInt("state_size", 128));
    ICD_ASSIGN_OR_RETURN(c.headdim, f.PositiveInt("head_dim", 64));
    ICD_ASSIGN_OR_RETURN(c.ngroups, f.PositiveInt("n_groups", 8));
    c.d_inner = inner_default;
    ICD_ASSIGN_OR_RETURN(c.nheads, f.PositiveInt("num_heads", c.d_inner / c.headdim));
    ICD_ASSIGN_OR_RETURN(c.chunk_size, f.PositiveInt("chunk_size", 256));
    ICD_RETURN_IF_ERROR(config_fields::ParseTimeStepLimit(root, f, "time_step_limit", c));
    // HF's Mamba2 gates before the norm and normalises over the whole inner
    // width in its PyTorch path, whatever rms_norm says (mamba_symmetries §2.5).
    c.gated_norm = true;
    c.norm_before_gate = false;
    c.grouped_gated_norm = false;
    ICD_RETURN_IF_ERROR(CheckMamba2Shapes(c, source));
  } else {
    ICD_ASSIGN_OR_RETURN(c.tied, f.Bool("tie_word_embeddings", true));
    ICD_ASSIGN_OR_RETURN(c.d_state, f.PositiveInt("state_size", 16));
    ICD_ASSIGN_OR_RETURN(c.d_inner, f.PositiveInt("intermediate_size", inner_default));
    ICD_ASSIGN_OR_RETURN(c.dt_rank, DtRank(f, "time_step_rank", c.d_model));
    if (c.family == Family::kFalconMamba) {
      ICD_ASSIGN_OR_RETURN(c.mixer_rms_eps, f.Number("mixer_rms_eps", 1e-6));
    }
  }
  return c;
}

}  // namespace

absl::StatusOr<ModelConfig> ParseConfig(const std::string& json_text, const std::string& source) {
  Json root;
  try {
    root = Json::parse(json_text);
  } catch (const Json::exception& error) {
    // nlohmann's message says where ("parse error at line 3, column 1: ...").
    std::string what = error.what();
    const std::string::size_type at = what.find("parse error");
    if (at != std::string::npos) what = what.substr(at);
    return absl::InvalidArgumentError(absl::StrCat(source, ": not valid JSON: ", what));
  }
  if (!root.is_object()) {
    const std::string type = root.type_name();
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": the top level is ", type == "array" ? "an " : "a ", type, ", not an object"));
  }
  const bool mamba_ssm = root.contains("d_model") && root.contains("n_layer");
  if (mamba_ssm || root.contains("model_type")) {
    ICD_ASSIGN_OR_RETURN(ModelConfig config,
                         mamba_ssm ? ParseMambaSsm(root, source) : ParseHf(root, source));
    ICD_RETURN_IF_ERROR(CheckDimensions(config, source));
    blocks::PlanBlocks(config);
    return config;
  }
  return Unsupported(source, "neither a HuggingFace config (model_type) nor a mamba_ssm one "
                             "(d_model, n_layer)");
}

absl::StatusOr<ModelConfig> ReadConfigFile(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(file.string(), ": cannot open"));
  std::stringstream text;
  text << in.rdbuf();
  return ParseConfig(text.str(), file.string());
}

std::map<std::string, std::vector<int64_t>> ExpectedShapes(const ModelConfig& c) {
  const int64_t dm = c.d_model;
  blocks::TensorShapes shapes;
  shapes[kEmbeddingTensor] = {c.vocab_size, dm};
  shapes["backbone.norm_f.weight"] = {dm};
  if (c.layer_norm) shapes["backbone.norm_f.bias"] = {dm};
  if (!c.tied) shapes[kHeadTensor] = {c.vocab_size, dm};
  for (int64_t i = 0; i < c.n_layer; ++i) {
    shapes[LayerTensorName(i, "norm.weight")] = {dm};
    if (c.layer_norm) shapes[LayerTensorName(i, "norm.bias")] = {dm};
    blocks::ShapesAt(c, i).tensors(c, i, shapes);
    if (c.parallel_attention) blocks::kAttentionShapes.tensors(c, i, shapes);
    if (blocks::HasMlp(c)) blocks::AddMlpTensors(c, i, shapes);
  }
  blocks::AddSharedBlockTensors(c, shapes);
  return shapes;
}

std::map<std::string, int64_t> ConfigDims(const ModelConfig& c) {
  std::map<std::string, int64_t> dims{{"d_model", c.d_model},   {"n_layer", c.n_layer},
                                      {"vocab_size", c.vocab_size}, {"d_inner", c.d_inner},
                                      {"d_state", c.d_state},   {"d_conv", c.d_conv},
                                      {"tied", c.tied ? 1 : 0}};
  for (const MixerType type : blocks::MixerTypes(c)) blocks::ShapesOf(type).dims(c, dims);
  if (c.parallel_attention) blocks::kAttentionShapes.dims(c, dims);
  if (blocks::HasMlp(c)) dims["d_intermediate"] = c.d_intermediate;
  blocks::SharedBlockDims(c, dims);
  return dims;
}

}  // namespace icd

