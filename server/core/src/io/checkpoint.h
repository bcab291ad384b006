// A checkpoint directory of either layout -> config + canonical weights, and
// what export needs to write the same files back.
#ifndef ICD_CORE_SRC_CHECKPOINT_H_
#define ICD_CORE_SRC_CHECKPOINT_H_

#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "icd/core/types.h"
#include "model.h"

namespace icd {

enum class WeightFormat { kSafetensors, kTorchBin };

// Which file held which tensor, under which name, in which order: export
// writes the same files with the same names.
struct WeightFile {
  std::string file;                // relative to the checkpoint directory
  std::vector<std::string> names;  // names as stored, in file order
};

struct CheckpointLayout {
  WeightFormat format = WeightFormat::kSafetensors;
  std::vector<WeightFile> files;
  std::string index_file;  // "model.safetensors.index.json" etc. when sharded
  // The name each canonical tensor had in the files (HF checkpoints may
  // also use mamba_ssm's embedding name); the tied head maps to itself.
  std::map<std::string, std::string> stored_name;
  std::map<std::string, std::string> metadata;  // safetensors __metadata__
};

struct Checkpoint {
  ModelConfig config;
  Weights weights;  // canonical names, CPU, as stored (dtype unchanged)
  CheckpointLayout layout;
  std::string fingerprint;  // hex digest of config.json and all tensor bytes
};

// Largest config.json and shard index a checkpoint may have: both are read
// whole and parsed in memory, outside any weight budget.
inline constexpr int64_t kMaxConfigBytes = int64_t{1} << 20;
inline constexpr int64_t kMaxIndexBytes = int64_t{16} << 20;

// Reads `dir`: config.json, then model.safetensors, its sharded index,
// pytorch_model.bin or its sharded index (HF), or pytorch_model.bin
// (mamba_ssm). Checks every expected tensor is present with its shape, and
// nothing else is. NotFound for a missing directory or weights file;
// InvalidArgument naming the file for a missing config.json, one over
// kMaxConfigBytes or an index over kMaxIndexBytes. With `allowed_roots`,
// first CheckFilesUnderRoots. `before_weights` (optional) is called with the
// parsed config once the weight files are found and before any is read; a
// status it returns ends the read (the engine's memory budget).
absl::StatusOr<Checkpoint> ReadCheckpoint(
    const std::filesystem::path& dir, const CallContext& ctx = {},
    const std::vector<std::string>& allowed_roots = {},
    const std::function<absl::Status(const ModelConfig&)>& before_weights = {});

// Every regular file of `dir` (what a load reads and an export copies),
// links followed, must lie under one of `roots` (empty: no check);
// PermissionDenied naming the first that does not.
absl::Status CheckFilesUnderRoots(const std::filesystem::path& dir,
                                  const std::vector<std::string>& roots);

// mamba_ssm calls the embedding "backbone.embedding.weight"; every other
// name is shared by both layouts (mamba_symmetries.md §4). transformers 5
// may store a backbone's tensors under "model." (NemotronH): read as
// "backbone.", written back as the files had them (CheckpointLayout).
std::string LayoutTensorName(Layout layout, const std::string& canonical);
std::string CanonicalTensorName(const std::string& stored);
// The same for `config`'s architecture (Falcon-H1's self_attn beside its
// Mamba mixer is "attn").
std::string CanonicalTensorName(const std::string& stored, const ModelConfig& config);
// The key of a stored tensor in a model's Weights: its canonical name, a tied
// head read as the embedding (one tensor under two names).
std::string WeightKey(const std::string& stored, const ModelConfig& config);

}  // namespace icd

#endif  // ICD_CORE_SRC_CHECKPOINT_H_
