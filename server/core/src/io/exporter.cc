#include "io/exporter.h"

#include <fcntl.h>
#include <stdio.h>

#include <algorithm>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "icd/core/stale_exports.h"
#include "icd/core/status_macros.h"
#include "io/safetensors.h"
#include "io/torch_bin.h"

namespace icd {
namespace fs = std::filesystem;
namespace {

// Removes the temporary directory unless it was renamed into place.
class TempDir {
 public:
  explicit TempDir(fs::path path) : path_(std::move(path)) {}
  ~TempDir() {
    if (!released_) {
      std::error_code ec;
      fs::remove_all(path_, ec);
    }
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const fs::path& path() const { return path_; }
  void Release() { released_ = true; }

 private:
  fs::path path_;
  bool released_ = false;
};

absl::Status Poll(const CallContext& ctx) { return CheckCall(ctx, "export"); }

}  // namespace

absl::StatusOr<ExportResult> ExportCheckpoint(const fs::path& source_dir,
                                              const CheckpointLayout& layout,
                                              const ModelConfig& config, const Weights& weights,
                                              const fs::path& target, const CallContext& ctx) {
  std::error_code ec;
  if (fs::exists(fs::symlink_status(target, ec))) {
    return absl::AlreadyExistsError(absl::StrCat(target.string(), ": export target exists"));
  }
  const fs::path parent = target.parent_path();
  if (target.filename().empty() || parent.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("export path '", target.string(),
                                                   "' needs a parent directory and a name"));
  }
  fs::create_directories(parent, ec);
  if (ec) {
    return absl::InvalidArgumentError(absl::StrCat(parent.string(), ": cannot create: ",
                                                   ec.message()));
  }
  std::random_device random;
  // Beside the target, named after it, within NAME_MAX (255 bytes) however
  // long the target's own name is: at most 12 + 200 + 11 bytes.
  const std::string stem = target.filename().string().substr(0, 200);
  TempDir temp(parent / absl::StrCat(kExportTempPrefix, stem, ".", random()));
  if (!fs::create_directory(temp.path(), ec)) {
    return absl::InternalError(absl::StrCat(temp.path().string(), ": cannot create: ",
                                            ec.message()));
  }

  // Everything but the weights is copied unchanged (config, tokenizer, index).
  std::set<std::string> weight_files;
  for (const WeightFile& file : layout.files) weight_files.insert(file.file);
  for (const auto& entry : fs::directory_iterator(source_dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (!entry.is_regular_file() || weight_files.count(name) > 0) continue;
    fs::copy_file(entry.path(), temp.path() / name, ec);
    if (ec) {
      return absl::InternalError(absl::StrCat(entry.path().string(), ": copy failed: ",
                                              ec.message()));
    }
  }
  if (ec) return absl::InternalError(absl::StrCat(source_dir.string(), ": ", ec.message()));

  // Host copies, one per canonical tensor, so a tied head written under two
  // names still shares one storage.
  std::map<std::string, torch::Tensor> host;
  auto host_tensor = [&](const std::string& canonical) -> torch::Tensor {
    auto it = host.find(canonical);
    if (it != host.end()) return it->second;
    torch::Tensor t = weights.at(canonical).to(torch::kCPU).contiguous();
    host.emplace(canonical, t);
    return t;
  };
  for (const WeightFile& file : layout.files) {
    ICD_RETURN_IF_ERROR(Poll(ctx));
    io::TensorList tensors;
    for (const std::string& stored : file.names) {
      tensors.push_back({stored, host_tensor(WeightKey(stored, config))});
    }
    const fs::path out = temp.path() / file.file;
    ICD_RETURN_IF_ERROR(layout.format == WeightFormat::kSafetensors
                            ? io::WriteSafetensors(out, tensors, layout.metadata)
                            : io::WriteTorchBin(out, tensors));
  }

  ExportResult result;
  for (const auto& entry : fs::directory_iterator(temp.path())) {
    result.files.push_back(entry.path().filename().string());
  }
  std::sort(result.files.begin(), result.files.end());
  // Atomic, and refuses a target that appeared meanwhile (even an empty dir).
  if (::renameat2(AT_FDCWD, temp.path().c_str(), AT_FDCWD, target.c_str(), RENAME_NOREPLACE) !=
      0) {
    const int error = errno;
    if (error == EEXIST || error == ENOTEMPTY) {
      return absl::AlreadyExistsError(absl::StrCat(target.string(), ": export target exists"));
    }
    return absl::InternalError(absl::StrCat(target.string(), ": rename failed: ",
                                            std::strerror(error)));
  }
  temp.Release();
  result.path = target.string();
  return result;
}

absl::StatusOr<std::vector<std::string>> RemoveStaleExports(const std::string& root) {
  namespace fs = std::filesystem;
  std::error_code ec;
  std::vector<fs::path> stale;
  fs::recursive_directory_iterator it(root, fs::directory_options::skip_permission_denied, ec);
  if (ec) return absl::InternalError(absl::StrCat(root, ": cannot list: ", ec.message()));
  for (; it != fs::recursive_directory_iterator(); it.increment(ec)) {
    if (ec) return absl::InternalError(absl::StrCat(root, ": cannot list: ", ec.message()));
    if (it->is_symlink(ec)) {
      it.disable_recursion_pending();
      continue;
    }
    if (it->is_directory(ec) &&
        it->path().filename().string().rfind(kExportTempPrefix, 0) == 0) {
      stale.push_back(it->path());
      it.disable_recursion_pending();
    }
  }
  std::vector<std::string> removed;
  for (const fs::path& path : stale) {
    fs::remove_all(path, ec);
    if (ec) return absl::InternalError(absl::StrCat(path.string(), ": cannot remove: ", ec.message()));
    removed.push_back(path.string());
  }
  return removed;
}

}  // namespace icd
