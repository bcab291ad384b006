// abseil 20220623 has no RETURN_IF_ERROR / ASSIGN_OR_RETURN: these two, for
// the engine and the clients alike (header-only target icd_common).
#ifndef ICD_STATUS_MACROS_H_
#define ICD_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define ICD_RETURN_IF_ERROR(expr)                 \
  do {                                            \
    ::absl::Status icd_status_ = (expr);          \
    if (!icd_status_.ok()) return icd_status_;    \
  } while (false)

#define ICD_CONCAT_INNER_(a, b) a##b
#define ICD_CONCAT_(a, b) ICD_CONCAT_INNER_(a, b)

// lhs = the value of a StatusOr expression, or return its status.
#define ICD_ASSIGN_OR_RETURN(lhs, expr) \
  ICD_ASSIGN_OR_RETURN_IMPL_(ICD_CONCAT_(icd_statusor_, __LINE__), lhs, expr)

#define ICD_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr)       \
  auto statusor = (expr);                                     \
  if (!statusor.ok()) return std::move(statusor).status();    \
  lhs = std::move(statusor).value()

#endif  // ICD_STATUS_MACROS_H_
