// What every architecture's config parser shares (io/config.cc and
// architectures/*.cc): typed reads of config.json's fields whose errors name
// the file and the field, the bounds icd puts on every size, and the pieces
// of Mamba configuration several architectures read alike. Internal to core.
#ifndef ICD_CORE_SRC_IO_CONFIG_FIELDS_H_
#define ICD_CORE_SRC_IO_CONFIG_FIELDS_H_

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "icd/core/status_macros.h"
#include "model.h"

namespace icd::config_fields {

using Json = nlohmann::json;

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

// InvalidArgument: "<source>: unsupported model: <what> (supported: ...)".
absl::Status Unsupported(const std::string& source, const std::string& what);

// ceil(a / b) for a >= 0, b > 0, without a + b - 1 (which overflows near
// INT64_MAX: found by review before the fuzzer did).
inline int64_t CeilDiv(int64_t a, int64_t b) { return a / b + (a % b != 0 ? 1 : 0); }

// Largest width icd accepts for any dimension: far above every released
// Mamba (d_inner 8192, vocab 65024), far below where products of dimensions
// could overflow int64.
inline constexpr int64_t kMaxDimension = int64_t{1} << 24;

// Most layers icd accepts: far above every released model (NemotronH 56B has
// 118), low enough that a config's tensor list (a dozen names a layer) is
// built in milliseconds; a forged n_layer of 2^24 took seconds and gigabytes.
inline constexpr int64_t kMaxLayers = 4096;

// d_inner = int(expand * d_model), as both layouts compute it; refuses
// expand values that are not finite and positive, or give no channel or too
// many (before the cast, which is undefined for out-of-range doubles).
absl::StatusOr<int64_t> InnerWidth(double expand, int64_t d_model, const std::string& source,
                                   const std::string& field);
// "auto" or a number; auto is ceil(d_model / 16) in both layouts.
absl::StatusOr<int64_t> DtRank(const Fields& fields, const char* key, int64_t d_model);
// Mamba-2's heads x headdim = d_inner, heads a multiple of the groups.
absl::Status CheckMamba2Shapes(const ModelConfig& config, const std::string& source);
// The first of `keys` the config has (a field renamed keeps its old name in
// older configs), or the last key when none is there.
const char* FirstPresent(const Fields& f, std::initializer_list<const char*> keys);
// Rotary settings as transformers 5 writes them (rope_parameters) or as the
// older top-level fields; only the default rope type. Sets rotary_base and
// rotary_dim (head_dim x partial_rotary_factor, even; a.head_dim set first).
absl::Status ParseRope(const Json& root, const Fields& f, const std::string& source,
                       double default_factor, AttentionConfig& a);
// The Mamba-2 fields Bamba, Granite 4.0 and Falcon-H1 share (mamba_*), into
// `c`; with read_d_ssm, d_inner is mamba_d_ssm where given (Falcon-H1).
absl::Status ParseMambaFields(const Json& root, const Fields& f, const std::string& source,
                              int64_t default_state, ModelConfig& c, bool read_d_ssm = false);
// A [min, max] time-step limit at `key` (absent: none) into c.dt_min, dt_max.
absl::Status ParseTimeStepLimit(const Json& root, const Fields& f, const char* key,
                                ModelConfig& c);
// The fields every transformers hybrid shares: hidden_size, vocab_size,
// tie_word_embeddings (default `tied`), rms_norm_eps, hidden_act (`activation`
// only, which is also its default).
absl::StatusOr<ModelConfig> HfHybridBase(const Fields& f, const std::string& source,
                                         const char* architecture, Family family,
                                         int64_t default_vocab, double default_eps,
                                         bool tied = false, const char* activation = "silu");
// Attention with q/k/v/o of their own: num_attention_heads,
// num_key_value_heads, head_dim (default: hidden / heads, which must then
// divide; or `default_head_dim`), attention_bias; every size bounded.
absl::Status ParseSeparateAttention(const Fields& f, int64_t d_model, int64_t default_kv_heads,
                                    std::optional<int64_t> default_head_dim, AttentionConfig& a);

// One parser per architecture (architectures/*.cc): config.json's object ->
// the config, or InvalidArgument naming the file and the field.
absl::StatusOr<ModelConfig> ParseMambaSsm(const Json& root, const std::string& source);
absl::StatusOr<ModelConfig> ParseNemotronH(const Json& root, const std::string& source);
absl::StatusOr<ModelConfig> ParseBamba(const Json& root, const std::string& source);
absl::StatusOr<ModelConfig> ParseGranite(const Json& root, const std::string& source);
absl::StatusOr<ModelConfig> ParseJamba(const Json& root, const std::string& source);
absl::StatusOr<ModelConfig> ParseFalconH1(const Json& root, const std::string& source);
absl::StatusOr<ModelConfig> ParseZamba2(const Json& root, const std::string& source);

}  // namespace icd::config_fields

#endif  // ICD_CORE_SRC_IO_CONFIG_FIELDS_H_
