// The part of LibTorch the engine uses: tensors, their operators and
// factories, grad mode, seeding and CUDA queries.
//
// <torch/torch.h> also parses nn, optim, data, jit and serialize, which
// nothing here uses; it cost every translation unit 27 s of parsing against
// 11 s for these three (docs/build.md). Include this, never <torch/torch.h>;
// the build precompiles it.
#ifndef ICD_CORE_SRC_TORCH_API_H_
#define ICD_CORE_SRC_TORCH_API_H_

#include <torch/cuda.h>
#include <torch/types.h>
#include <torch/utils.h>

#endif  // ICD_CORE_SRC_TORCH_API_H_
