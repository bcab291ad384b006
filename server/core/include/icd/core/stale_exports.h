// What an export interrupted by a crash leaves behind, removed at start-up
// (icd-server does this for each --export-root before it serves).
#ifndef ICD_CORE_STALE_EXPORTS_H_
#define ICD_CORE_STALE_EXPORTS_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "icd/core/export.h"

namespace icd {

// Removes what an export killed mid-way left under `root`: directories named
// .icd-export-* (an export writes into one, then renames it into place), at
// any depth; symlinks are not followed. Returns the removed paths. Run at
// start, before any export: a live export's directory has that name too.
ICD_CORE_API absl::StatusOr<std::vector<std::string>> RemoveStaleExports(const std::string& root);

}  // namespace icd

#endif  // ICD_CORE_STALE_EXPORTS_H_
