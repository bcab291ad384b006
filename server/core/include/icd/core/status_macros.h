// abseil 20220623 has no RETURN_IF_ERROR / ASSIGN_OR_RETURN: these two.
#ifndef ICD_CORE_STATUS_MACROS_H_
#define ICD_CORE_STATUS_MACROS_H_

#include "absl/strings/string_view.h"

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"

#define ICD_RETURN_IF_ERROR(expr)                 \
  do {                                            \
    ::absl::Status icd_status_ = (expr);          \
    if (!icd_status_.ok()) return icd_status_;    \
  } while (false)

#define ICD_CONCAT_INNER_(a, b) a##b
#define ICD_CONCAT_(a, b) ICD_CONCAT_INNER_(a, b)

#define ICD_ASSIGN_OR_RETURN(lhs, expr) \
  ICD_ASSIGN_OR_RETURN_IMPL_(ICD_CONCAT_(icd_statusor_, __LINE__), lhs, expr)

#define ICD_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                               \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()

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

}  // namespace icd

#endif  // ICD_CORE_STATUS_MACROS_H_
