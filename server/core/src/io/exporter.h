// Writes a model's current weights as a checkpoint of the same layout and
// format, atomically: a temporary directory beside the target, renamed into
// place with RENAME_NOREPLACE. The source directory is only read.
#ifndef ICD_CORE_SRC_EXPORTER_H_
#define ICD_CORE_SRC_EXPORTER_H_

#include <filesystem>

#include "absl/status/statusor.h"
#include "io/checkpoint.h"
#include "icd/core/types.h"
#include "model.h"

namespace icd {

// Prefix of temporary export directories; anything starting with it beside
// an export target is debris of an interrupted export.
inline constexpr char kExportTempPrefix[] = ".icd-export-";

absl::StatusOr<ExportResult> ExportCheckpoint(const std::filesystem::path& source_dir,
                                              const CheckpointLayout& layout,
                                              const ModelConfig& config, const Weights& weights,
                                              const std::filesystem::path& target,
                                              const CallContext& ctx = {});

}  // namespace icd

#endif  // ICD_CORE_SRC_EXPORTER_H_
