// The engine's status helpers: the early-return macros (icd/status_macros.h,
// shared with the clients), InternalFailure and Guarded.
#ifndef ICD_CORE_STATUS_MACROS_H_
#define ICD_CORE_STATUS_MACROS_H_

#include <exception>

#include "absl/strings/string_view.h"

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "icd/status_macros.h"

namespace icd {

// The payload under which an InternalFailure carries its detail.
inline constexpr char kInternalDetailPayload[] = "type.icd/internal-detail";

// INTERNAL for a failure inside the engine (a LibTorch exception, a broken
// invariant): the message says only what failed; the exception's text
// (LibTorch's carries a backtrace with load addresses) rides as a payload,
// which the server logs and never sends to a client.
inline absl::Status InternalFailure(absl::string_view what, absl::string_view detail) {
  absl::Status status = absl::InternalError(
      absl::StrCat(what, " failed: an internal error (the server's log has the detail)"));
  status.SetPayload(kInternalDetailPayload, absl::Cord(detail));
  return status;
}

// fn(), or InternalFailure(what, ...) when it throws: LibTorch reports errors
// by exception, and none may cross the engine API.
template <typename Fn>
auto Guarded(const char* what, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const std::exception& e) {
    return InternalFailure(what, e.what());
  }
}

}  // namespace icd

#endif  // ICD_CORE_STATUS_MACROS_H_
