#include "paths.h"

#include <climits>
#include <system_error>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace icd::rpc {
namespace fs = std::filesystem;
namespace {

absl::StatusOr<std::vector<fs::path>> CanonicalRoots(
    const std::vector<std::string>& roots, const std::string& flag) {
  std::vector<fs::path> out;
  for (const auto& r : roots) {
    std::error_code ec;
    fs::path p = fs::canonical(fs::absolute(fs::path(r)), ec);
    if (ec || !fs::is_directory(p, ec)) {
      return absl::InvalidArgumentError(
          absl::StrCat(flag, " ", r, ": not an existing directory"));
    }
    out.push_back(std::move(p));
  }
  return out;
}

// Joins a relative request path onto the first root, then resolves symlinks
// of the existing prefix and `..` lexically.
absl::StatusOr<fs::path> Resolve(const std::string& requested,
                                 const std::vector<fs::path>& roots,
                                 const char* what) {
  if (requested.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(what, " path is empty"));
  }
  if (roots.empty()) {
    return absl::PermissionDeniedError(absl::StrCat(
        what, " path ", requested, ": the server has no ", what, " root"));
  }
  fs::path p(requested);
  // Names the system could never hold are the request's fault, whatever
  // the roots: INVALID_ARGUMENT before any lookup.
  for (const fs::path& component : p) {
    if (component.native().size() > NAME_MAX) {
      return absl::InvalidArgumentError(absl::StrCat(
          "path: a component of ", component.native().size(), " bytes (",
          component.native().substr(0, 32), "...), longer than NAME_MAX (", NAME_MAX, ")"));
    }
  }
  if (p.is_relative()) p = roots.front() / p;
  if (p.native().size() >= PATH_MAX) {
    return absl::InvalidArgumentError(absl::StrCat("path: ", p.native().size(),
                                                   " bytes, longer than PATH_MAX (", PATH_MAX,
                                                   " with its terminating byte)"));
  }
  std::error_code ec;
  fs::path resolved = fs::weakly_canonical(p, ec);
  if (ec) {
    return absl::PermissionDeniedError(absl::StrCat(
        what, " path ", requested, ": cannot be resolved: ", ec.message()));
  }
  for (const auto& root : roots) {
    if (IsUnder(resolved, root)) return resolved;
  }
  return absl::PermissionDeniedError(absl::StrCat(
      what, " path ", requested, " resolves to ", resolved.string(),
      ", outside the allowed ", what, " roots"));
}

}  // namespace

bool IsUnder(const fs::path& path, const fs::path& root) {
  // Kept in step with core's check of the files a load reads (checkpoint.cc).
  auto p = path.begin();
  for (auto r = root.begin(); r != root.end(); ++r, ++p) {
    if (r->empty()) continue;  // trailing separator of the root
    if (p == path.end() || *p != *r) return false;
  }
  return true;
}

absl::StatusOr<PathPolicy> PathPolicy::Create(
    const std::vector<std::string>& model_roots,
    const std::vector<std::string>& export_roots) {
  PathPolicy policy;
  auto m = CanonicalRoots(model_roots, "--model-root");
  if (!m.ok()) return m.status();
  auto e = CanonicalRoots(export_roots, "--export-root");
  if (!e.ok()) return e.status();
  policy.model_roots_ = std::move(*m);
  policy.export_roots_ = std::move(*e);
  return policy;
}

absl::StatusOr<std::string> PathPolicy::ResolveModelPath(
    const std::string& path) const {
  auto resolved = Resolve(path, model_roots_, "model");
  if (!resolved.ok()) return resolved.status();
  std::error_code ec;
  const fs::file_status st = fs::status(*resolved, ec);
  if (!fs::exists(st)) {
    return absl::NotFoundError(
        absl::StrCat("checkpoint directory ", path, " does not exist"));
  }
  if (!fs::is_directory(st)) {
    return absl::InvalidArgumentError(
        absl::StrCat("checkpoint path ", path, " is not a directory"));
  }
  return resolved->string();
}

absl::StatusOr<std::string> PathPolicy::ResolveExportPath(
    const std::string& path) const {
  auto resolved = Resolve(path, export_roots_, "export");
  if (!resolved.ok()) return resolved.status();
  std::error_code ec;
  fs::path requested(path);
  if (requested.is_relative()) requested = export_roots_.front() / requested;
  if (fs::exists(fs::symlink_status(*resolved, ec)) ||
      fs::exists(fs::symlink_status(requested, ec))) {
    return absl::AlreadyExistsError(
        absl::StrCat("export path ", path, " already exists"));
  }
  return resolved->string();
}

}  // namespace icd::rpc
