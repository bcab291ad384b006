// Sizes that come from the wire, multiplied in checked 64-bit arithmetic: a
// product that wraps could match the bytes that came, or size an allocation.
#ifndef ICD_CORE_CHECKED_H_
#define ICD_CORE_CHECKED_H_

#include <cstdint>
#include <initializer_list>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace icd {

// The product of `factors`, or InvalidArgument naming `field` when one is
// negative or the product overflows int64.
template <typename Factors>
absl::StatusOr<int64_t> CheckedProduct(const Factors& factors, absl::string_view field) {
  int64_t product = 1;
  for (const int64_t factor : factors) {
    if (factor < 0) {
      return absl::InvalidArgumentError(absl::StrCat(field, ": negative size ", factor));
    }
    if (__builtin_mul_overflow(product, factor, &product)) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ": ", absl::StrJoin(factors, " x "), " overflows a 64-bit size"));
    }
  }
  return product;
}

inline absl::StatusOr<int64_t> CheckedProduct(std::initializer_list<int64_t> factors,
                                              absl::string_view field) {
  return CheckedProduct<std::initializer_list<int64_t>>(factors, field);
}

}  // namespace icd

#endif  // ICD_CORE_CHECKED_H_
