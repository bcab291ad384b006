// Path policy of the service: which directories a client may name.
//
// LoadModel paths must lie under one of the model roots and ExportModel paths
// under one of the export roots, after resolving `..` and symlinks
// (std::filesystem::weakly_canonical); otherwise PERMISSION_DENIED. A relative
// path is taken relative to the first root of its kind. The engine opens
// whatever it is given: this check is the transport's job.
#ifndef ICD_RPC_PATHS_H_
#define ICD_RPC_PATHS_H_

#include <filesystem>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace icd::rpc {

class PathPolicy {
 public:
  // Each root must be an existing directory; they are canonicalised here.
  static absl::StatusOr<PathPolicy> Create(
      const std::vector<std::string>& model_roots,
      const std::vector<std::string>& export_roots);

  // The resolved checkpoint directory: PERMISSION_DENIED outside the model
  // roots, NOT_FOUND if it does not exist, INVALID_ARGUMENT if not a
  // directory.
  absl::StatusOr<std::string> ResolveModelPath(const std::string& path) const;

  // The resolved export directory: PERMISSION_DENIED outside the export
  // roots, ALREADY_EXISTS if anything (even a dangling symlink) is there.
  absl::StatusOr<std::string> ResolveExportPath(const std::string& path) const;

  const std::vector<std::filesystem::path>& model_roots() const {
    return model_roots_;
  }
  const std::vector<std::filesystem::path>& export_roots() const {
    return export_roots_;
  }

 private:
  PathPolicy() = default;
  std::vector<std::filesystem::path> model_roots_;
  std::vector<std::filesystem::path> export_roots_;
};

// True when `path` equals `root` or lies below it (component-wise; both
// already canonical).
bool IsUnder(const std::filesystem::path& path,
             const std::filesystem::path& root);

}  // namespace icd::rpc

#endif  // ICD_RPC_PATHS_H_
