// What the benchmarks' drivers share: they stop at the first failed engine
// call, saying what failed (OrDie: the value of a StatusOr, or exit status 1
// with the status on stderr), and run a checkpoint read by icd's reader on
// cuda:0 in one dtype (CheckpointOnCuda).
#ifndef ICD_BENCH_DRIVER_UTIL_H_
#define ICD_BENCH_DRIVER_UTIL_H_

#include <cstdlib>
#include <iostream>
#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "io/checkpoint.h"

template <typename T>
T OrDie(absl::StatusOr<T> value, const char* what) {
  if (!value.ok()) {
    std::cerr << what << ": " << value.status() << "\n";
    std::exit(1);
  }
  return *std::move(value);
}

inline void OrDie(const absl::Status& status, const char* what) {
  if (!status.ok()) {
    std::cerr << what << ": " << status << "\n";
    std::exit(1);
  }
}

// `path` read by icd's reader, every weight on cuda:0 in `dtype`, contiguous.
inline icd::Checkpoint CheckpointOnCuda(const std::string& path, torch::ScalarType dtype) {
  icd::Checkpoint checkpoint = OrDie(icd::ReadCheckpoint(path), "ReadCheckpoint");
  const torch::Device cuda(torch::kCUDA, 0);
  for (auto& [name, tensor] : checkpoint.weights) tensor = tensor.to(cuda, dtype).contiguous();
  return checkpoint;
}

#endif  // ICD_BENCH_DRIVER_UTIL_H_
