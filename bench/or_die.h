// The benchmarks' drivers stop at the first failed engine call, saying what
// failed: the value of a StatusOr, or exit status 1 with the status on stderr.
#ifndef ICD_BENCH_OR_DIE_H_
#define ICD_BENCH_OR_DIE_H_

#include <cstdlib>
#include <iostream>
#include <utility>

#include "absl/status/statusor.h"

template <typename T>
T OrDie(absl::StatusOr<T> value, const char* what) {
  if (!value.ok()) {
    std::cerr << what << ": " << value.status() << "\n";
    std::exit(1);
  }
  return *std::move(value);
}

#endif  // ICD_BENCH_OR_DIE_H_
