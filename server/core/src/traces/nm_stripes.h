// N:M stripes as tensors: what an order of columns keeps (KeptSaliency),
// the bound no order passes (NmUpperBound), the mask (NmMask), and the
// chunked, allocation-free tensor steps they share with the search
// (nm_sparsity.cc). Internal to core.
#ifndef ICD_CORE_SRC_TRACES_NM_STRIPES_H_
#define ICD_CORE_SRC_TRACES_NM_STRIPES_H_

#include "torch_api.h"

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace icd::traces {

// Elements of one batch of candidates (8 MiB in float32). The search works
// in scratch buffers of this order, allocated once: fresh large temporaries
// cost page faults, which dominate on some hosts.
inline constexpr int64_t kBatchElements = int64_t{1} << 21;

torch::Tensor IndexTensor(const std::vector<int64_t>& values, torch::Device device);

// Rows per chunk when a row holds `width` elements.
inline int64_t ChunkRows(int64_t width) {
  return std::max<int64_t>(1, kBatchElements / width);
}

// A buffer reused across calls: views of the shape asked for, reallocated
// only when a larger one is needed.
class Scratch {
 public:
  torch::Tensor Get(at::IntArrayRef shape, const torch::TensorOptions& options) {
    int64_t numel = 1;
    for (int64_t size : shape) numel *= size;
    if (!storage_.defined() || storage_.numel() < numel) storage_ = torch::empty({numel}, options);
    return storage_.narrow(0, 0, numel).view(shape);
  }

 private:
  torch::Tensor storage_;
};

// Reorders x along `dim` in place so that its first n entries are its n
// largest, largest first (the rest is left in no particular order): an
// insertion network of elementwise maximum/minimum, several times faster
// than topk for the small m of N:M patterns, on any device, and allocation
// free. scratch: a buffer of x.select(dim, 0)'s shape.
void TopNInPlace(const torch::Tensor& x, int64_t n, int64_t dim, const torch::Tensor& scratch);

// The n largest entries of x along `dim`: their sum and the n-th largest,
// both with `dim` removed. x may be overwritten. spare: scratch of
// x.select(dim, 0)'s shape. The insertion network costs O(n·m) passes, so
// topk takes over for large patterns.
std::pair<torch::Tensor, torch::Tensor> TopNSumAndNth(const torch::Tensor& x, int64_t n,
                                                      int64_t dim, const torch::Tensor& spare);

}  // namespace icd::traces

#endif  // ICD_CORE_SRC_TRACES_NM_STRIPES_H_
