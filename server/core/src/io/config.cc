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

namespace icd {
namespace {

using Json = nlohmann::json;

constexpr char kSupported[] =
    "supported: HuggingFace MambaForCausalLM (model_type 'mamba'), "
    "FalconMambaForCausalLM ('falcon_mamba'), Mamba2ForCausalLM ('mamba2'); "
    "mamba_ssm MambaLMHeadModel with ssm_cfg.layer 'Mamba1' or 'Mamba2', with or "
    "without a gated MLP (d_intermediate) and causal attention layers (attn_layer_idx); "
    "NemotronHForCausalLM ('nemotron_h'), "
    "BambaForCausalLM ('bamba'), GraniteMoeHybridForCausalLM ('granitemoehybrid'), "
    "JambaForCausalLM ('jamba')";

// Reads typed fields with defaults; every error names the file and field.
class Fields {
 public:
  Fields(const Json& object, std::string source, std::string prefix = "")
      : object_(object), source_(std::move(source)), prefix_(std::move(prefix)) {}

  bool Has(const char* key) const {
    return object_.contains(key) && !object_.at(key).is_null();
  }

  absl::StatusOr<int64_t> Int(const char* key, std::optional<int64_t> fallback) const {
    if (!Has(key)) {
      if (fallback) return *fallback;
      return Error(key, "is missing");
    }
    const Json& value = object_.at(key);
    if (value.is_number_integer()) return value.get<int64_t>();
    if (value.is_number_float()) {
      // 2^63 is exact in a double; the range check comes before the cast,
      // which is undefined for values int64 cannot hold.
      const double d = value.get<double>();
      constexpr double kLimit = 9223372036854775808.0;
      if (std::floor(d) == d && d >= -kLimit && d < kLimit) return static_cast<int64_t>(d);
    }
    return Error(key, absl::StrCat("must be an integer, got ", value.dump()));
  }

  absl::StatusOr<int64_t> PositiveInt(const char* key, std::optional<int64_t> fallback) const {
    ICD_ASSIGN_OR_RETURN(int64_t v, Int(key, fallback));
    if (v <= 0) return Error(key, absl::StrCat("must be positive, got ", v));
    return v;
  }

  absl::StatusOr<double> Number(const char* key, double fallback) const {
    if (!Has(key)) return fallback;
    return ParseNumber(key, object_.at(key));
  }

  absl::StatusOr<bool> Bool(const char* key, bool fallback) const {
    if (!Has(key)) return fallback;
    const Json& value = object_.at(key);
    if (value.is_boolean()) return value.get<bool>();
    return Error(key, absl::StrCat("must be true or false, got ", value.dump()));
  }

  absl::StatusOr<std::string> String(const char* key, std::string fallback) const {
    if (!Has(key)) return fallback;
    const Json& value = object_.at(key);
    if (value.is_string()) return value.get<std::string>();
    return Error(key, absl::StrCat("must be a string, got ", value.dump()));
  }

  // HF writes non-finite floats as {"__float__": "Infinity"}.
  absl::StatusOr<double> ParseNumber(const char* key, const Json& value) const {
    if (value.is_number()) return value.get<double>();
    if (value.is_object() && value.contains("__float__") && value.at("__float__").is_string()) {
      const std::string text = value.at("__float__").get<std::string>();
      if (text == "Infinity") return std::numeric_limits<double>::infinity();
      if (text == "-Infinity") return -std::numeric_limits<double>::infinity();
    }
    return Error(key, absl::StrCat("must be a number, got ", value.dump()));
  }

  absl::Status Error(const char* key, const std::string& what) const {
    return absl::InvalidArgumentError(
        absl::StrCat(source_, ": field '", prefix_, key, "' ", what));
  }

  const Json& object() const { return object_; }

 private:
  const Json& object_;
  std::string source_;
  std::string prefix_;
};

absl::Status Unsupported(const std::string& source, const std::string& what) {
  return absl::InvalidArgumentError(
      absl::StrCat(source, ": unsupported model: ", what, " (", kSupported, ")"));
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Largest width icd accepts for any dimension: far above every released
// Mamba (d_inner 8192, vocab 65024), far below where products of dimensions
// could overflow int64.
constexpr int64_t kMaxDimension = int64_t{1} << 24;

// Most layers icd accepts: far above every released model (NemotronH 56B has
// 118), low enough that a config's tensor list (a dozen names a layer) is
// built in milliseconds; a forged n_layer of 2^24 took seconds and gigabytes.
constexpr int64_t kMaxLayers = 4096;

// d_inner = int(expand * d_model), as both layouts compute it; refuses
// expand values that are not finite and positive, or give no channel or too
// many (before the cast, which is undefined for out-of-range doubles).
absl::StatusOr<int64_t> InnerWidth(double expand, int64_t d_model, const std::string& source,
                                   const std::string& field) {
  const double inner = expand * static_cast<double>(d_model);
  if (!std::isfinite(expand) || !(inner >= 1) || inner > static_cast<double>(kMaxDimension)) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": ", field, " ", expand, " gives an inner width of ", inner,
        " channels; expected 1 to ", kMaxDimension));
  }
  return static_cast<int64_t>(inner);
}

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

// "auto" or a number; auto is ceil(d_model / 16) in both layouts.
absl::StatusOr<int64_t> DtRank(const Fields& fields, const char* key, int64_t d_model) {
  if (!fields.Has(key)) return CeilDiv(d_model, 16);
  const Json& value = fields.object().at(key);
  if (value.is_string() && value.get<std::string>() == "auto") return CeilDiv(d_model, 16);
  return fields.PositiveInt(key, std::nullopt);
}

absl::Status CheckMamba2Shapes(const ModelConfig& config, const std::string& source) {
  if (config.nheads * config.headdim != config.d_inner) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": num_heads (", config.nheads, ") x head_dim (", config.headdim,
        ") must equal the inner width expand x hidden (", config.d_inner, ")"));
  }
  if (config.nheads % config.ngroups != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": num_heads (", config.nheads, ") must be a multiple of n_groups (",
        config.ngroups, ")"));
  }
  return absl::OkStatus();
}

// The first of `keys` the config has (a field NemotronH renamed keeps its old
// name in older configs), or the last key when none is there.
const char* FirstPresent(const Fields& f, std::initializer_list<const char*> keys) {
  for (const char* key : keys) {
    if (f.Has(key)) return key;
  }
  return *(keys.end() - 1);
}

// NVIDIA's Nemotron-H (transformers' NemotronHForCausalLM): one mixer per
// layer, by hybrid_override_pattern ('M' Mamba-2, '*' attention without a
// positional encoding, '-' a ReLU² MLP, 'E' a mixture of experts) or
// layers_block_type; tensors under backbone.layers.{i}.mixer, as icd's
// canonical names; the Mamba-2 gated norm per group; no bias in attention.
absl::StatusOr<ModelConfig> ParseNemotronH(const Json& root, const std::string& source) {
  Fields f(root, source);
  ModelConfig c;
  c.layout = Layout::kHf;
  c.architecture = "nemotron_h";
  c.family = Family::kMamba2;
  std::vector<char> pattern;
  if (f.Has("hybrid_override_pattern")) {
    ICD_ASSIGN_OR_RETURN(std::string text, f.String("hybrid_override_pattern", ""));
    pattern.assign(text.begin(), text.end());
  } else if (f.Has("layers_block_type")) {
    const Json& types = root.at("layers_block_type");
    if (!types.is_array()) return f.Error("layers_block_type", "must be a list of layer kinds");
    for (const Json& type : types) {
      const std::string kind = type.is_string() ? type.get<std::string>() : type.dump();
      if (kind == "mamba" || kind == "linear_attention") {
        pattern.push_back('M');
      } else if (kind == "attention" || kind == "full_attention") {
        pattern.push_back('*');
      } else if (kind == "mlp") {
        pattern.push_back('-');
      } else if (kind == "moe") {
        pattern.push_back('E');
      } else {
        return f.Error("layers_block_type", absl::StrCat("lists an unknown layer kind ", kind));
      }
    }
  } else {
    return f.Error("hybrid_override_pattern", "is missing (and so is layers_block_type)");
  }
  c.n_layer = static_cast<int64_t>(pattern.size());
  if (c.n_layer == 0) return f.Error("hybrid_override_pattern", "lists no layer");
  for (int64_t layer = 0; layer < c.n_layer; ++layer) {
    switch (pattern[static_cast<size_t>(layer)]) {
      case 'M': break;
      case '*': c.attention_layers.push_back(layer); break;
      case '-': c.mlp_layers.push_back(layer); break;
      case 'E': c.moe.mixer_layers.push_back(layer); break;
      default:
        return f.Error("hybrid_override_pattern",
                       absl::StrCat("has '", std::string(1, pattern[static_cast<size_t>(layer)]),
                                    "' at layer ", layer, "; expected M, *, - or E"));
    }
  }
  ICD_ASSIGN_OR_RETURN(c.d_model, f.PositiveInt("hidden_size", std::nullopt));
  ICD_ASSIGN_OR_RETURN(c.vocab_size, f.PositiveInt("vocab_size", 131072));
  c.vocab_unpadded = c.vocab_size;
  c.tied = false;  // NemotronH ties nothing, whatever tie_word_embeddings says
  ICD_ASSIGN_OR_RETURN(c.norm_eps, f.Number("layer_norm_epsilon", 1e-5));

  ICD_ASSIGN_OR_RETURN(std::string mamba_act, f.String("mamba_hidden_act", "silu"));
  if (mamba_act != "silu") {
    return Unsupported(source, absl::StrCat("mamba_hidden_act '", mamba_act, "'"));
  }
  ICD_ASSIGN_OR_RETURN(c.nheads, f.PositiveInt("mamba_num_heads", 128));
  ICD_ASSIGN_OR_RETURN(c.headdim, f.PositiveInt("mamba_head_dim", 64));
  if (c.nheads > kMaxDimension || c.headdim > kMaxDimension) {
    return f.Error("mamba_num_heads", "or mamba_head_dim is too large");
  }
  c.d_inner = c.nheads * c.headdim;  // NemotronH ignores expand
  ICD_ASSIGN_OR_RETURN(c.ngroups, f.PositiveInt(FirstPresent(f, {"n_groups", "mamba_n_groups"}), 8));
  ICD_ASSIGN_OR_RETURN(c.d_state, f.PositiveInt("ssm_state_size", 128));
  ICD_ASSIGN_OR_RETURN(c.d_conv, f.PositiveInt(FirstPresent(f, {"conv_kernel", "mamba_d_conv"}), 4));
  ICD_ASSIGN_OR_RETURN(c.conv_bias, f.Bool(FirstPresent(f, {"use_conv_bias", "mamba_conv_bias"}), true));
  ICD_ASSIGN_OR_RETURN(c.proj_bias, f.Bool("use_bias", false));
  ICD_ASSIGN_OR_RETURN(c.chunk_size,
                       f.PositiveInt(FirstPresent(f, {"chunk_size", "mamba_chunk_size"}), 128));
  const char* limit_key = FirstPresent(f, {"time_step_limit", "mamba_dt_limit"});
  if (f.Has(limit_key)) {
    const Json& limit = root.at(limit_key);
    if (!limit.is_array() || limit.size() != 2) return f.Error(limit_key, "must be [min, max]");
    ICD_ASSIGN_OR_RETURN(c.dt_min, f.ParseNumber(limit_key, limit[0]));
    ICD_ASSIGN_OR_RETURN(c.dt_max, f.ParseNumber(limit_key, limit[1]));
  }
  c.gated_norm = true;
  c.grouped_gated_norm = true;  // Zamba2RMSNormGated, groups of d_inner / n_groups
  c.norm_before_gate = false;
  ICD_RETURN_IF_ERROR(CheckMamba2Shapes(c, source));

  AttentionConfig& a = c.attention;
  a.separate_projections = true;
  a.qkv_bias = a.out_bias = false;  // hard-coded in NemotronHAttention
  ICD_ASSIGN_OR_RETURN(a.heads, f.PositiveInt("num_attention_heads", 32));
  ICD_ASSIGN_OR_RETURN(a.kv_heads, f.PositiveInt("num_key_value_heads", 8));
  ICD_ASSIGN_OR_RETURN(a.head_dim, f.PositiveInt("head_dim", 128));
  if (a.heads > kMaxDimension || a.head_dim > kMaxDimension || a.heads % a.kv_heads != 0 ||
      a.qkv_rows() > kMaxDimension) {
    return f.Error("num_key_value_heads",
                   absl::StrCat(a.kv_heads, " must divide num_attention_heads ", a.heads,
                                ", and heads x head_dim ", a.head_dim, " stay below ",
                                kMaxDimension));
  }
  ICD_ASSIGN_OR_RETURN(c.mlp.hidden, f.PositiveInt("intermediate_size", 21504));
  if (c.mlp.hidden > kMaxDimension) return f.Error("intermediate_size", "is too large");
  ICD_ASSIGN_OR_RETURN(std::string mlp_act, f.String("mlp_hidden_act", "relu2"));
  if (mlp_act != "relu2") {
    return Unsupported(source, absl::StrCat("mlp_hidden_act '", mlp_act, "' (relu2 only)"));
  }
  c.mlp.activation = MlpConfig::Activation::kRelu2;
  ICD_ASSIGN_OR_RETURN(c.mlp.bias, f.Bool("mlp_bias", false));
  if (!c.moe.mixer_layers.empty()) {
    // The experts' layers: ReLU² experts and a shared one, routed by
    // sigmoid scores plus a correction bias (transformers' NemotronHMoE).
    auto& e = c.moe;
    ICD_ASSIGN_OR_RETURN(e.experts, f.PositiveInt("n_routed_experts", 8));
    ICD_ASSIGN_OR_RETURN(e.top_k, f.PositiveInt("num_experts_per_tok", 2));
    ICD_ASSIGN_OR_RETURN(e.hidden, f.PositiveInt("moe_intermediate_size", 7688));
    ICD_ASSIGN_OR_RETURN(e.shared_hidden,
                         f.PositiveInt("moe_shared_expert_intermediate_size", 7688));
    ICD_ASSIGN_OR_RETURN(e.normalize, f.Bool("norm_topk_prob", true));
    ICD_ASSIGN_OR_RETURN(e.scaling, f.Number("routed_scaling_factor", 1.0));
    ICD_ASSIGN_OR_RETURN(int64_t n_group, f.PositiveInt("n_group", 1));
    if (f.Has("moe_latent_size")) {
      return Unsupported(source, "NemotronH experts with latent projections (moe_latent_size)");
    }
    if (n_group != 1) {
      return Unsupported(source, absl::StrCat("NemotronH's group-limited routing (n_group ",
                                              n_group, ")"));
    }
    if (c.mlp.bias) return Unsupported(source, "NemotronH experts with biases (mlp_bias)");
    if (e.top_k > e.experts || e.experts > 256 ||
        static_cast<int64_t>(e.mixer_layers.size()) * e.experts > int64_t{1} << 14 ||
        e.hidden > kMaxDimension || e.shared_hidden > kMaxDimension ||
        !(std::isfinite(e.scaling) && e.scaling > 0)) {
      return f.Error("n_routed_experts",
                     absl::StrCat(e.experts, " experts, top ", e.top_k, ", hidden ", e.hidden,
                                  ": out of what icd takes (at most 256 experts a layer, 16384 "
                                  "in all, top_k at most the experts, a positive scaling)"));
    }
  }
  return c;
}

// Rotary settings as transformers 5 writes them (rope_parameters) or as the
// older top-level fields; only the default rope type.
absl::Status ParseRope(const Json& root, const Fields& f, const std::string& source,
                       double default_factor, AttentionConfig& a) {
  static const Json kEmpty = Json::object();
  const Json& rope = f.Has("rope_parameters") ? root.at("rope_parameters") : kEmpty;
  if (!rope.is_object()) return f.Error("rope_parameters", "must be an object");
  Fields r(rope, source, "rope_parameters.");
  ICD_ASSIGN_OR_RETURN(std::string rope_type, r.String("rope_type", "default"));
  if (rope_type != "default") {
    return Unsupported(source, absl::StrCat("rope_type '", rope_type, "'"));
  }
  ICD_ASSIGN_OR_RETURN(double theta, f.Number("rope_theta", 10000.0));
  ICD_ASSIGN_OR_RETURN(a.rotary_base, r.Number("rope_theta", theta));
  ICD_ASSIGN_OR_RETURN(double factor, f.Number("partial_rotary_factor", default_factor));
  ICD_ASSIGN_OR_RETURN(factor, r.Number("partial_rotary_factor", factor));
  if (!(factor > 0 && factor <= 1) || !(a.rotary_base > 0 && std::isfinite(a.rotary_base))) {
    return f.Error("partial_rotary_factor", "or rope_theta out of range");
  }
  a.rotary_dim = static_cast<int64_t>(static_cast<double>(a.head_dim) * factor);
  a.rotary_dim -= a.rotary_dim % 2;
  return absl::OkStatus();
}

// The Mamba-2 fields Bamba and Granite 4.0 share (mamba_*), into `c`.
absl::Status ParseMambaFields(const Json& root, const Fields& f, const std::string& source,
                              int64_t default_state, ModelConfig& c) {
  ICD_ASSIGN_OR_RETURN(double expand, f.Number("mamba_expand", 2));
  ICD_ASSIGN_OR_RETURN(c.d_inner, InnerWidth(expand, c.d_model, source, "mamba_expand"));
  ICD_ASSIGN_OR_RETURN(c.nheads, f.PositiveInt("mamba_n_heads", 128));
  if (f.Has("mamba_d_head") && !(root.at("mamba_d_head").is_string() &&
                                 root.at("mamba_d_head").get<std::string>() == "auto")) {
    ICD_ASSIGN_OR_RETURN(c.headdim, f.PositiveInt("mamba_d_head", std::nullopt));
  } else {
    if (c.d_inner % c.nheads != 0) {
      return f.Error("mamba_n_heads", absl::StrCat(c.nheads, " does not divide mamba_expand x "
                                                   "hidden_size ", c.d_inner));
    }
    c.headdim = c.d_inner / c.nheads;
  }
  ICD_ASSIGN_OR_RETURN(c.ngroups, f.PositiveInt("mamba_n_groups", 1));
  ICD_ASSIGN_OR_RETURN(c.d_state, f.PositiveInt("mamba_d_state", default_state));
  ICD_ASSIGN_OR_RETURN(c.d_conv, f.PositiveInt("mamba_d_conv", 4));
  ICD_ASSIGN_OR_RETURN(c.chunk_size, f.PositiveInt("mamba_chunk_size", 256));
  ICD_ASSIGN_OR_RETURN(c.conv_bias, f.Bool("mamba_conv_bias", true));
  ICD_ASSIGN_OR_RETURN(c.proj_bias, f.Bool("mamba_proj_bias", false));
  if (f.Has("time_step_limit")) {
    const Json& limit = root.at("time_step_limit");
    if (!limit.is_array() || limit.size() != 2) {
      return f.Error("time_step_limit", "must be [min, max]");
    }
    ICD_ASSIGN_OR_RETURN(c.dt_min, f.ParseNumber("time_step_limit", limit[0]));
    ICD_ASSIGN_OR_RETURN(c.dt_max, f.ParseNumber("time_step_limit", limit[1]));
  }
  c.gated_norm = true;
  c.norm_before_gate = false;
  return CheckMamba2Shapes(c, source);
}

// IBM's Bamba (transformers' BambaForCausalLM): HF Mamba-2 layers (the gated
// norm over all of d_inner) and attention at attn_layer_indices (q/k/v/o
// projections, a partial rotary), each layer followed by pre_ff_layernorm and
// a gated MLP (feed_forward); tensors under model.* with Bamba's module names
// (io/checkpoint.cc maps them to icd's canonical ones).
absl::StatusOr<ModelConfig> ParseBamba(const Json& root, const std::string& source) {
  Fields f(root, source);
  ModelConfig c;
  c.layout = Layout::kHf;
  c.architecture = "bamba";
  c.family = Family::kMamba2;
  ICD_ASSIGN_OR_RETURN(c.d_model, f.PositiveInt("hidden_size", 4096));
  ICD_ASSIGN_OR_RETURN(c.n_layer, f.PositiveInt("num_hidden_layers", 32));
  ICD_ASSIGN_OR_RETURN(c.vocab_size, f.PositiveInt("vocab_size", 128000));
  c.vocab_unpadded = c.vocab_size;
  ICD_ASSIGN_OR_RETURN(c.tied, f.Bool("tie_word_embeddings", false));
  ICD_ASSIGN_OR_RETURN(c.norm_eps, f.Number("rms_norm_eps", 1e-5));
  ICD_ASSIGN_OR_RETURN(std::string act, f.String("hidden_act", "silu"));
  if (act != "silu") return Unsupported(source, absl::StrCat("hidden_act '", act, "'"));
  if (c.n_layer > kMaxLayers) return f.Error("num_hidden_layers", "is too large");
  if (f.Has("attn_layer_indices")) {
    const Json& layers = root.at("attn_layer_indices");
    if (!layers.is_array()) return f.Error("attn_layer_indices", "must be a list of layer indices");
    for (const Json& entry : layers) {
      const Json wrapped = {{"attn_layer_indices", entry}};
      ICD_ASSIGN_OR_RETURN(int64_t layer, Fields(wrapped, source).Int("attn_layer_indices", 0));
      if (layer < 0 || layer >= c.n_layer) {
        return f.Error("attn_layer_indices", absl::StrCat("lists layer ", layer,
                                                          ", but num_hidden_layers is ", c.n_layer));
      }
      c.attention_layers.push_back(layer);
    }
    std::sort(c.attention_layers.begin(), c.attention_layers.end());
    c.attention_layers.erase(std::unique(c.attention_layers.begin(), c.attention_layers.end()),
                             c.attention_layers.end());
  }

  ICD_RETURN_IF_ERROR(ParseMambaFields(root, f, source, 256, c));
  c.grouped_gated_norm = false;  // MambaRMSNormGated over all of d_inner

  AttentionConfig& a = c.attention;
  a.separate_projections = true;
  ICD_ASSIGN_OR_RETURN(a.heads, f.PositiveInt("num_attention_heads", 32));
  ICD_ASSIGN_OR_RETURN(a.kv_heads, f.PositiveInt("num_key_value_heads", 8));
  if (a.heads > kMaxDimension || a.heads % a.kv_heads != 0 ||
      (!f.Has("head_dim") && c.d_model % a.heads != 0)) {
    return f.Error("num_key_value_heads",
                   absl::StrCat(a.kv_heads, " must divide num_attention_heads ", a.heads,
                                ", which must divide hidden_size ", c.d_model,
                                " when head_dim is not given"));
  }
  ICD_ASSIGN_OR_RETURN(a.head_dim, f.PositiveInt("head_dim", c.d_model / a.heads));
  if (a.head_dim > kMaxDimension || a.qkv_rows() > kMaxDimension) {
    return f.Error("head_dim", "x the heads is too large");
  }
  ICD_ASSIGN_OR_RETURN(a.qkv_bias, f.Bool("attention_bias", false));
  a.out_bias = a.qkv_bias;
  // Bamba's config fixes partial_rotary_factor at 0.5.
  ICD_RETURN_IF_ERROR(ParseRope(root, f, source, 0.5, a));

  ICD_ASSIGN_OR_RETURN(c.d_intermediate, f.PositiveInt("intermediate_size", 14336));
  if (c.d_intermediate > kMaxDimension) return f.Error("intermediate_size", "is too large");
  c.mlp_separate_projections = true;
  return c;
}

// IBM's Granite 4.0 (transformers' GraniteMoeHybridForCausalLM): Mamba-2
// (the gated norm per group) and attention layers by layer_types (anything
// but "mamba" is attention: q/k/v/o, a full rotary with position_embedding_
// type "rope", none otherwise; the softmax scale is attention_multiplier),
// each followed by post_attention_layernorm and a shared gated MLP (its
// input_linear's halves the gate, then the values) plus, with
// num_local_experts > 0, a mixture of experts; embedding_multiplier,
// residual_multiplier and logits_scaling scale the stream.
absl::StatusOr<ModelConfig> ParseGranite(const Json& root, const std::string& source) {
  Fields f(root, source);
  ModelConfig c;
  c.layout = Layout::kHf;
  c.architecture = "granitemoehybrid";
  c.family = Family::kMamba2;
  ICD_ASSIGN_OR_RETURN(c.d_model, f.PositiveInt("hidden_size", 4096));
  ICD_ASSIGN_OR_RETURN(c.vocab_size, f.PositiveInt("vocab_size", 32000));
  c.vocab_unpadded = c.vocab_size;
  ICD_ASSIGN_OR_RETURN(c.tied, f.Bool("tie_word_embeddings", false));
  ICD_ASSIGN_OR_RETURN(c.norm_eps, f.Number("rms_norm_eps", 1e-6));
  ICD_ASSIGN_OR_RETURN(std::string act, f.String("hidden_act", "silu"));
  if (act != "silu") return Unsupported(source, absl::StrCat("hidden_act '", act, "'"));
  const char* types_key = FirstPresent(f, {"layer_types", "layers_block_type"});
  if (f.Has(types_key)) {
    const Json& types = root.at(types_key);
    if (!types.is_array()) return f.Error(types_key, "must be a list of layer kinds");
    c.n_layer = static_cast<int64_t>(types.size());
    for (int64_t layer = 0; layer < c.n_layer; ++layer) {
      const Json& type = types[static_cast<size_t>(layer)];
      if (!type.is_string()) return f.Error(types_key, absl::StrCat("lists ", type.dump()));
      if (type.get<std::string>() != "mamba") c.attention_layers.push_back(layer);
    }
  } else {
    ICD_ASSIGN_OR_RETURN(c.n_layer, f.PositiveInt("num_hidden_layers", 32));
  }
  if (c.n_layer < 1 || c.n_layer > kMaxLayers) return f.Error(types_key, "lists no layer, or too many");
  ICD_RETURN_IF_ERROR(ParseMambaFields(root, f, source, 256, c));
  c.grouped_gated_norm = true;

  AttentionConfig& a = c.attention;
  a.separate_projections = true;
  ICD_ASSIGN_OR_RETURN(a.heads, f.PositiveInt("num_attention_heads", 32));
  ICD_ASSIGN_OR_RETURN(a.kv_heads, f.PositiveInt("num_key_value_heads", a.heads));
  if (a.heads > kMaxDimension || a.heads % a.kv_heads != 0 ||
      (!f.Has("head_dim") && c.d_model % a.heads != 0)) {
    return f.Error("num_key_value_heads",
                   absl::StrCat(a.kv_heads, " must divide num_attention_heads ", a.heads,
                                ", which must divide hidden_size ", c.d_model,
                                " when head_dim is not given"));
  }
  ICD_ASSIGN_OR_RETURN(a.head_dim, f.PositiveInt("head_dim", c.d_model / a.heads));
  if (a.head_dim > kMaxDimension || a.qkv_rows() > kMaxDimension) {
    return f.Error("head_dim", "x the heads is too large");
  }
  ICD_ASSIGN_OR_RETURN(a.qkv_bias, f.Bool("attention_bias", false));
  a.out_bias = a.qkv_bias;
  ICD_ASSIGN_OR_RETURN(std::string positions, f.String("position_embedding_type", ""));
  if (positions == "rope") {
    ICD_RETURN_IF_ERROR(ParseRope(root, f, source, 1.0, a));
  } else if (!positions.empty() && positions != "nope") {
    return Unsupported(source, absl::StrCat("position_embedding_type '", positions, "'"));
  }
  ICD_ASSIGN_OR_RETURN(a.softmax_scale, f.Number("attention_multiplier", 1.0));
  ICD_ASSIGN_OR_RETURN(c.embedding_multiplier, f.Number("embedding_multiplier", 1.0));
  ICD_ASSIGN_OR_RETURN(c.residual_multiplier, f.Number("residual_multiplier", 1.0));
  ICD_ASSIGN_OR_RETURN(c.logits_scaling, f.Number("logits_scaling", 1.0));
  for (const auto& [key, value] : {std::pair{"attention_multiplier", a.softmax_scale},
                                   std::pair{"embedding_multiplier", c.embedding_multiplier},
                                   std::pair{"residual_multiplier", c.residual_multiplier},
                                   std::pair{"logits_scaling", c.logits_scaling}}) {
    if (!(value > 0 && std::isfinite(value))) return f.Error(key, "must be a positive number");
  }

  ICD_ASSIGN_OR_RETURN(c.d_intermediate, f.PositiveInt("shared_intermediate_size", 1024));
  c.mlp_gate_first = true;
  ICD_ASSIGN_OR_RETURN(c.moe.experts, f.Int("num_local_experts", 8));
  if (c.moe.experts < 0 || c.moe.experts > kMaxDimension) {
    return f.Error("num_local_experts", "must be 0 (no experts) or positive");
  }
  if (c.moe.experts > 0) {
    ICD_ASSIGN_OR_RETURN(c.moe.top_k, f.PositiveInt("num_experts_per_tok", 2));
    ICD_ASSIGN_OR_RETURN(c.moe.hidden, f.PositiveInt("intermediate_size", 11008));
    if (c.moe.top_k > c.moe.experts) {
      return f.Error("num_experts_per_tok", absl::StrCat(c.moe.top_k, " is above num_local_experts ",
                                                         c.moe.experts));
    }
  }
  if (c.d_intermediate > kMaxDimension || c.moe.hidden > kMaxDimension) {
    return f.Error("shared_intermediate_size", "or intermediate_size is too large");
  }
  return c;
}

// AI21's Jamba (transformers' JambaForCausalLM): Mamba-1 layers with weighted
// RMS norms on dt, B and C, and attention (q/k/v/o, no positions, no bias)
// where layer % attn_layer_period == attn_layer_offset; every layer followed
// by pre_ff_layernorm and a SwiGLU MLP, or a mixture of experts (a tensor per
// expert, the top k of the softmax over every expert) where layer %
// expert_layer_period == expert_layer_offset.
absl::StatusOr<ModelConfig> ParseJamba(const Json& root, const std::string& source) {
  Fields f(root, source);
  ModelConfig c;
  c.layout = Layout::kHf;
  c.architecture = "jamba";
  c.family = Family::kMamba1;
  ICD_ASSIGN_OR_RETURN(c.d_model, f.PositiveInt("hidden_size", 4096));
  ICD_ASSIGN_OR_RETURN(c.n_layer, f.PositiveInt("num_hidden_layers", 32));
  if (c.n_layer > kMaxLayers) return f.Error("num_hidden_layers", "is too large");
  ICD_ASSIGN_OR_RETURN(c.vocab_size, f.PositiveInt("vocab_size", 65536));
  c.vocab_unpadded = c.vocab_size;
  ICD_ASSIGN_OR_RETURN(c.tied, f.Bool("tie_word_embeddings", false));
  ICD_ASSIGN_OR_RETURN(c.norm_eps, f.Number("rms_norm_eps", 1e-6));
  ICD_ASSIGN_OR_RETURN(std::string act, f.String("hidden_act", "silu"));
  if (act != "silu") return Unsupported(source, absl::StrCat("hidden_act '", act, "'"));
  ICD_ASSIGN_OR_RETURN(int64_t attn_period, f.PositiveInt("attn_layer_period", 8));
  ICD_ASSIGN_OR_RETURN(int64_t attn_offset, f.Int("attn_layer_offset", 4));
  ICD_ASSIGN_OR_RETURN(int64_t expert_period, f.PositiveInt("expert_layer_period", 2));
  ICD_ASSIGN_OR_RETURN(int64_t expert_offset, f.Int("expert_layer_offset", 1));
  ICD_ASSIGN_OR_RETURN(c.moe.experts, f.PositiveInt("num_experts", 16));
  for (int64_t layer = 0; layer < c.n_layer; ++layer) {
    if (layer % attn_period == attn_offset) c.attention_layers.push_back(layer);
    if (c.moe.experts > 1 && layer % expert_period == expert_offset) c.moe.layers.push_back(layer);
  }
  if (c.moe.experts == 1) c.moe.experts = 0;  // one expert: the MLP everywhere
  c.moe.per_expert_tensors = true;

  ICD_ASSIGN_OR_RETURN(double expand, f.Number("mamba_expand", 2));
  ICD_ASSIGN_OR_RETURN(c.d_inner, InnerWidth(expand, c.d_model, source, "mamba_expand"));
  ICD_ASSIGN_OR_RETURN(c.d_state, f.PositiveInt("mamba_d_state", 16));
  ICD_ASSIGN_OR_RETURN(c.d_conv, f.PositiveInt("mamba_d_conv", 4));
  ICD_ASSIGN_OR_RETURN(c.dt_rank, DtRank(f, "mamba_dt_rank", c.d_model));
  ICD_ASSIGN_OR_RETURN(c.conv_bias, f.Bool("mamba_conv_bias", true));
  ICD_ASSIGN_OR_RETURN(c.proj_bias, f.Bool("mamba_proj_bias", false));
  c.mixer_norm_weights = true;

  AttentionConfig& a = c.attention;
  a.separate_projections = true;
  a.qkv_bias = a.out_bias = false;
  ICD_ASSIGN_OR_RETURN(a.heads, f.PositiveInt("num_attention_heads", 32));
  ICD_ASSIGN_OR_RETURN(a.kv_heads, f.PositiveInt("num_key_value_heads", 8));
  if (a.heads > kMaxDimension || a.heads % a.kv_heads != 0 || c.d_model % a.heads != 0) {
    return f.Error("num_key_value_heads",
                   absl::StrCat(a.kv_heads, " must divide num_attention_heads ", a.heads,
                                ", which must divide hidden_size ", c.d_model));
  }
  a.head_dim = c.d_model / a.heads;

  ICD_ASSIGN_OR_RETURN(c.d_intermediate, f.PositiveInt("intermediate_size", 14336));
  if (c.d_intermediate > kMaxDimension) return f.Error("intermediate_size", "is too large");
  c.mlp_separate_projections = true;
  c.moe.hidden = c.d_intermediate;
  ICD_ASSIGN_OR_RETURN(c.moe.top_k, f.PositiveInt("num_experts_per_tok", 2));
  if (c.moe.experts > 0 && c.moe.top_k > c.moe.experts) {
    return f.Error("num_experts_per_tok", absl::StrCat(c.moe.top_k, " is above num_experts ",
                                                       c.moe.experts));
  }
  // A tensor per expert: the tensor list stays one a forged config cannot
  // make take seconds to build (as n_layer's bound).
  if (c.moe.experts > 256 ||
      static_cast<int64_t>(c.moe.layers.size()) * c.moe.experts > int64_t{1} << 14) {
    return f.Error("num_experts", absl::StrCat(c.moe.experts, " experts in ", c.moe.layers.size(),
                                               " layers are more than icd takes (256 a layer, "
                                               "16384 in all)"));
  }
  return c;
}

absl::StatusOr<ModelConfig> ParseHf(const Json& root, const std::string& source) {
  Fields f(root, source);
  ICD_ASSIGN_OR_RETURN(std::string model_type, f.String("model_type", ""));
  if (model_type == "nemotron_h") return ParseNemotronH(root, source);
  if (model_type == "bamba") return ParseBamba(root, source);
  if (model_type == "granitemoehybrid") return ParseGranite(root, source);
  if (model_type == "jamba") return ParseJamba(root, source);
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
    if (f.Has("time_step_limit")) {
      const Json& limit = root.at("time_step_limit");
      if (!limit.is_array() || limit.size() != 2) {
        return f.Error("time_step_limit", "must be [min, max]");
      }
      ICD_ASSIGN_OR_RETURN(c.dt_min, f.ParseNumber("time_step_limit", limit[0]));
      ICD_ASSIGN_OR_RETURN(c.dt_max, f.ParseNumber("time_step_limit", limit[1]));
    }
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

// mamba_ssm's hybrid fields: attn_layer_idx (the layers whose mixer is its
// MHA) and attn_cfg (MHA's keyword arguments; MambaLMHeadModel passes them
// as they are, so a key MHA does not take cannot be loaded there either).
absl::Status ParseAttention(const Json& root, const std::string& source, ModelConfig& c) {
  Fields f(root, source);
  if (!f.Has("attn_layer_idx")) return absl::OkStatus();
  const Json& layers = root.at("attn_layer_idx");
  if (!layers.is_array()) return f.Error("attn_layer_idx", "must be a list of layer indices");
  for (const Json& entry : layers) {
    const Json wrapped = {{"attn_layer_idx", entry}};
    ICD_ASSIGN_OR_RETURN(int64_t layer, Fields(wrapped, source).Int("attn_layer_idx", 0));
    if (layer < 0 || layer >= c.n_layer) {
      return f.Error("attn_layer_idx", absl::StrCat("lists layer ", layer, ", but n_layer is ",
                                                    c.n_layer));
    }
    c.attention_layers.push_back(layer);
  }
  std::sort(c.attention_layers.begin(), c.attention_layers.end());
  c.attention_layers.erase(std::unique(c.attention_layers.begin(), c.attention_layers.end()),
                           c.attention_layers.end());
  if (c.attention_layers.empty()) return absl::OkStatus();

  static const Json kEmpty = Json::object();
  const Json& attn_cfg = f.Has("attn_cfg") ? root.at("attn_cfg") : kEmpty;
  if (!attn_cfg.is_object()) return f.Error("attn_cfg", "must be an object");
  static const char* const kKnown[] = {
      "num_heads",     "num_heads_kv",  "head_dim",       "mlp_dim",
      "qkv_proj_bias", "out_proj_bias", "softmax_scale",  "causal",
      "d_conv",        "rotary_emb_dim", "rotary_emb_base", "rotary_emb_interleaved"};
  for (const auto& [key, value] : attn_cfg.items()) {
    if (std::find_if(std::begin(kKnown), std::end(kKnown),
                     [&key = key](const char* known) { return key == known; }) ==
        std::end(kKnown)) {
      return Unsupported(source, absl::StrCat("attn_cfg.", key, " (MHA takes no such argument)"));
    }
  }
  Fields a(attn_cfg, source, "attn_cfg.");
  AttentionConfig& attention = c.attention;
  ICD_ASSIGN_OR_RETURN(attention.heads, a.PositiveInt("num_heads", std::nullopt));
  if (attention.heads > kMaxDimension) return a.Error("num_heads", "is too large");
  ICD_ASSIGN_OR_RETURN(attention.kv_heads, a.PositiveInt("num_heads_kv", attention.heads));
  if (attention.heads % attention.kv_heads != 0) {
    return a.Error("num_heads_kv", absl::StrCat(attention.kv_heads, " does not divide num_heads ",
                                                attention.heads));
  }
  if (!a.Has("head_dim") && c.d_model % attention.heads != 0) {
    return a.Error("num_heads", absl::StrCat(attention.heads, " does not divide d_model ",
                                             c.d_model, " (and head_dim is not given)"));
  }
  ICD_ASSIGN_OR_RETURN(attention.head_dim, a.PositiveInt("head_dim", c.d_model / attention.heads));
  ICD_ASSIGN_OR_RETURN(int64_t mlp_dim, a.Int("mlp_dim", 0));
  if (mlp_dim < 0 || mlp_dim > kMaxDimension) {
    return a.Error("mlp_dim", absl::StrCat("is ", mlp_dim, "; expected 0 to ", kMaxDimension));
  }
  attention.mlp_dim = CeilDiv(mlp_dim, 256) * 256;  // as MHA rounds it
  ICD_ASSIGN_OR_RETURN(attention.qkv_bias, a.Bool("qkv_proj_bias", true));
  ICD_ASSIGN_OR_RETURN(attention.out_bias, a.Bool("out_proj_bias", true));
  ICD_ASSIGN_OR_RETURN(attention.softmax_scale, a.Number("softmax_scale", 0.0));
  if (a.Has("softmax_scale") && !(attention.softmax_scale > 0 &&
                                  std::isfinite(attention.softmax_scale))) {
    return a.Error("softmax_scale", "must be a positive number (or null: 1/sqrt(head_dim))");
  }
  ICD_ASSIGN_OR_RETURN(bool causal, a.Bool("causal", false));
  if (!causal) {
    return Unsupported(source, "attention that is not causal (attn_cfg.causal is false, MHA's "
                               "default): every position would read the ones after it");
  }
  ICD_ASSIGN_OR_RETURN(attention.conv, a.Int("d_conv", 0));
  ICD_ASSIGN_OR_RETURN(attention.rotary_dim, a.Int("rotary_emb_dim", 0));
  ICD_ASSIGN_OR_RETURN(attention.rotary_base, a.Number("rotary_emb_base", 10000.0));
  ICD_ASSIGN_OR_RETURN(attention.rotary_interleaved, a.Bool("rotary_emb_interleaved", false));
  if (attention.head_dim > kMaxDimension || attention.conv < 0 ||
      attention.conv > kMaxDimension) {
    return a.Error("head_dim", absl::StrCat("or d_conv out of range: ", attention.head_dim, ", ",
                                            attention.conv));
  }
  if (attention.qkv_rows() + attention.mlp_dim > kMaxDimension) {
    return a.Error("num_heads", absl::StrCat("x head_dim gives ", attention.qkv_rows(),
                                             " rows of q, k and v; expected at most ",
                                             kMaxDimension));
  }
  if (attention.rotary_dim < 0 || attention.rotary_dim % 2 != 0 ||
      attention.rotary_dim > attention.head_dim) {
    return a.Error("rotary_emb_dim", absl::StrCat(attention.rotary_dim,
                                                  " must be even and at most head_dim ",
                                                  attention.head_dim));
  }
  if (attention.rotary_dim > 0 &&
      !(attention.rotary_base > 0 && std::isfinite(attention.rotary_base))) {
    return a.Error("rotary_emb_base", "must be a positive number");
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> ParseMambaSsm(const Json& root, const std::string& source) {
  Fields f(root, source);
  ICD_ASSIGN_OR_RETURN(int64_t d_intermediate, f.Int("d_intermediate", 0));
  if (d_intermediate < 0) return f.Error("d_intermediate", "must be 0 (no MLP) or positive");
  static const Json kEmpty = Json::object();
  const Json& ssm_cfg = f.Has("ssm_cfg") ? root.at("ssm_cfg") : kEmpty;
  if (!ssm_cfg.is_object()) return f.Error("ssm_cfg", "must be an object");
  Fields s(ssm_cfg, source, "ssm_cfg.");
  ICD_ASSIGN_OR_RETURN(std::string layer, s.String("layer", "Mamba1"));

  ModelConfig c;
  c.layout = Layout::kMambaSsm;
  c.architecture = "mamba_ssm";
  c.d_intermediate = d_intermediate;
  if (layer == "Mamba1") {
    c.family = Family::kMamba1;
  } else if (layer == "Mamba2") {
    c.family = Family::kMamba2;
  } else {
    return Unsupported(source, absl::StrCat("ssm_cfg.layer '", layer, "'"));
  }
  ICD_ASSIGN_OR_RETURN(c.d_model, f.PositiveInt("d_model", std::nullopt));
  ICD_ASSIGN_OR_RETURN(c.n_layer, f.PositiveInt("n_layer", std::nullopt));
  ICD_ASSIGN_OR_RETURN(c.vocab_unpadded, f.PositiveInt("vocab_size", 50277));
  ICD_ASSIGN_OR_RETURN(int64_t pad_multiple, f.PositiveInt("pad_vocab_size_multiple", 8));
  c.vocab_size = CeilDiv(c.vocab_unpadded, pad_multiple) * pad_multiple;
  ICD_ASSIGN_OR_RETURN(c.tied, f.Bool("tie_embeddings", true));
  ICD_ASSIGN_OR_RETURN(bool rms_norm, f.Bool("rms_norm", true));
  c.layer_norm = !rms_norm;
  ICD_ASSIGN_OR_RETURN(c.norm_eps, f.Number("norm_epsilon", 1e-5));
  ICD_ASSIGN_OR_RETURN(c.d_conv, s.PositiveInt("d_conv", 4));
  ICD_ASSIGN_OR_RETURN(double expand, s.Number("expand", 2));
  ICD_ASSIGN_OR_RETURN(c.d_inner, InnerWidth(expand, c.d_model, source, "ssm_cfg.expand"));
  ICD_ASSIGN_OR_RETURN(c.proj_bias, s.Bool("bias", false));
  ICD_ASSIGN_OR_RETURN(c.conv_bias, s.Bool("conv_bias", true));
  ICD_RETURN_IF_ERROR(ParseAttention(root, source, c));

  if (c.family == Family::kMamba1) {
    ICD_ASSIGN_OR_RETURN(c.d_state, s.PositiveInt("d_state", 16));
    ICD_ASSIGN_OR_RETURN(c.dt_rank, DtRank(s, "dt_rank", c.d_model));
    return c;
  }
  ICD_ASSIGN_OR_RETURN(c.d_state, s.PositiveInt("d_state", 128));
  ICD_ASSIGN_OR_RETURN(c.headdim, s.PositiveInt("headdim", 64));
  ICD_ASSIGN_OR_RETURN(c.ngroups, s.PositiveInt("ngroups", 1));
  ICD_ASSIGN_OR_RETURN(c.chunk_size, s.PositiveInt("chunk_size", 256));
  ICD_ASSIGN_OR_RETURN(c.gated_norm, s.Bool("rmsnorm", true));
  ICD_ASSIGN_OR_RETURN(c.norm_before_gate, s.Bool("norm_before_gate", false));
  ICD_ASSIGN_OR_RETURN(c.d_has_hdim, s.Bool("D_has_hdim", false));
  c.grouped_gated_norm = true;  // mamba_ssm's Mamba2 normalises per group
  ICD_ASSIGN_OR_RETURN(int64_t d_ssm, s.Int("d_ssm", c.d_inner));
  if (d_ssm != c.d_inner) {
    return Unsupported(source, absl::StrCat("ssm_cfg.d_ssm ", d_ssm, " below d_inner ",
                                            c.d_inner, " (a gated-MLP part in the mixer)"));
  }
  if (s.Has("dt_limit")) {
    const Json& limit = ssm_cfg.at("dt_limit");
    if (!limit.is_array() || limit.size() != 2) return s.Error("dt_limit", "must be [min, max]");
    ICD_ASSIGN_OR_RETURN(c.dt_min, s.ParseNumber("dt_limit", limit[0]));
    ICD_ASSIGN_OR_RETURN(c.dt_max, s.ParseNumber("dt_limit", limit[1]));
  }
  if (c.d_inner % c.headdim != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": d_inner ", c.d_inner, " is not a multiple of ssm_cfg.headdim ", c.headdim));
  }
  c.nheads = c.d_inner / c.headdim;
  ICD_RETURN_IF_ERROR(CheckMamba2Shapes(c, source));
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
    if (blocks::HasMlp(c)) blocks::AddMlpTensors(c, i, shapes);
  }
  return shapes;
}

std::map<std::string, int64_t> ConfigDims(const ModelConfig& c) {
  std::map<std::string, int64_t> dims{{"d_model", c.d_model},   {"n_layer", c.n_layer},
                                      {"vocab_size", c.vocab_size}, {"d_inner", c.d_inner},
                                      {"d_state", c.d_state},   {"d_conv", c.d_conv},
                                      {"tied", c.tied ? 1 : 0}};
  for (const MixerType type : blocks::MixerTypes(c)) blocks::ShapesOf(type).dims(c, dims);
  if (blocks::HasMlp(c)) dims["d_intermediate"] = c.d_intermediate;
  return dims;
}

}  // namespace icd
