// config.json of either layout -> ModelConfig. Family and layout detection
// live here, and so does the list of what is refused and why.
#ifndef ICD_CORE_SRC_CONFIG_H_
#define ICD_CORE_SRC_CONFIG_H_

#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model.h"

namespace icd {

// `json_text` is the content of config.json; `source` names it in errors.
// HF layout: model_type mamba / falcon_mamba / mamba2. mamba_ssm layout:
// d_model + n_layer + ssm_cfg (layer Mamba1 or Mamba2). Anything else, and
// mamba_ssm hybrids (d_intermediate > 0, attention layers), Mamba3 and
// configs whose shapes disagree, is InvalidArgument with the reason and the
// list of what is supported.
absl::StatusOr<ModelConfig> ParseConfig(const std::string& json_text,
                                        const std::string& source);

absl::StatusOr<ModelConfig> ReadConfigFile(const std::filesystem::path& file);

// Every canonical tensor the config implies, with its shape: the one table of
// which tensors each family and option has (a tied head is not listed).
std::map<std::string, std::vector<int64_t>> ExpectedShapes(const ModelConfig& config);

// The dims reported in ModelInfo.
std::map<std::string, int64_t> ConfigDims(const ModelConfig& config);

}  // namespace icd

#endif  // ICD_CORE_SRC_CONFIG_H_
