// CHECK_CUDA(call): the CUDA benches' exit on a runtime error (exit status 2,
// the file and line on stderr). CUDA runtime only.
#ifndef ICD_BENCH_CUDA_CHECK_H_
#define ICD_BENCH_CUDA_CHECK_H_

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define CHECK_CUDA(call)                                                                    \
  do {                                                                                      \
    const cudaError_t error_ = (call);                                                      \
    if (error_ != cudaSuccess) {                                                            \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(error_)); \
      std::exit(2);                                                                         \
    }                                                                                       \
  } while (0)

#endif  // ICD_BENCH_CUDA_CHECK_H_
