#include "traces/nm_stripes.h"

#include <algorithm>
#include <tuple>

#include "traces/nm_sparsity.h"

namespace icd::traces {

torch::Tensor IndexTensor(const std::vector<int64_t>& values, torch::Device device) {
  return torch::tensor(values, torch::dtype(torch::kInt64)).to(device);
}

void TopNInPlace(const torch::Tensor& x, int64_t n, int64_t dim, const torch::Tensor& scratch) {
  for (int64_t j = 1; j < x.size(dim); ++j) {
    const torch::Tensor slot_j = x.select(dim, j);
    torch::Tensor carry = slot_j, spare = scratch;
    const int64_t filled = std::min(j, n);  // slots 0..filled-1: the top so far
    for (int64_t k = 0; k < filled; ++k) {
      torch::Tensor slot = x.select(dim, k);
      if (k + 1 == filled && filled == n) {
        torch::maximum_out(slot, slot, carry);  // the loser drops out
        break;
      }
      torch::minimum_out(spare, slot, carry);
      torch::maximum_out(slot, slot, carry);
      std::swap(carry, spare);  // the old carry's storage is free now
    }
    if (filled < n && carry.data_ptr() != slot_j.data_ptr()) slot_j.copy_(carry);
  }
}

std::pair<torch::Tensor, torch::Tensor> TopNSumAndNth(const torch::Tensor& x, int64_t n,
                                                      int64_t dim, const torch::Tensor& spare) {
  if (n * x.size(dim) > 64) {
    const torch::Tensor top = std::get<0>(x.topk(n, dim, /*largest=*/true, /*sorted=*/true));
    return {top.sum(dim), top.select(dim, n - 1)};
  }
  TopNInPlace(x, n, dim, spare);
  return {x.narrow(dim, 0, n).sum(dim), x.select(dim, n - 1)};
}

double KeptSaliency(const torch::Tensor& saliency, const std::vector<int64_t>& order, int64_t n,
                    int64_t m) {
  torch::NoGradGuard no_grad;
  const int64_t rows = saliency.size(0), channels = saliency.size(1);
  const torch::Tensor index = IndexTensor(order, saliency.device());
  const torch::TensorOptions wide = saliency.options().dtype(torch::kFloat64);
  Scratch gathered_scratch, wide_scratch, spare_scratch;
  double kept = 0;
  const int64_t chunk = ChunkRows(channels);
  for (int64_t first = 0; first < rows; first += chunk) {
    const int64_t length = std::min(chunk, rows - first);
    torch::Tensor gathered = gathered_scratch.Get({length, channels}, saliency.options());
    torch::index_select_out(gathered, saliency.narrow(0, first, length), 1, index);
    torch::Tensor stripes = gathered;
    if (saliency.scalar_type() != torch::kFloat64) {
      stripes = wide_scratch.Get({length, channels}, wide);
      stripes.copy_(gathered);
    }
    kept += TopNSumAndNth(stripes.view({length, channels / m, m}), n, 2,
                          spare_scratch.Get({length, channels / m}, wide))
                .first.sum()
                .item<double>();
  }
  return kept;
}

double NmUpperBound(const torch::Tensor& saliency, int64_t n, int64_t m, int64_t block) {
  torch::NoGradGuard no_grad;
  const int64_t rows = saliency.size(0), channels = saliency.size(1);
  const int64_t width = block > 0 ? block : channels;
  const int64_t keep = width / m * n;
  Scratch values_scratch, indices_scratch, wide_scratch;
  double bound = 0;
  const int64_t chunk = ChunkRows(channels);
  for (int64_t first = 0; first < rows; first += chunk) {
    const int64_t length = std::min(chunk, rows - first);
    torch::Tensor values = values_scratch.Get({length, channels / width, keep}, saliency.options());
    torch::Tensor indices = indices_scratch.Get({length, channels / width, keep},
                                                saliency.options().dtype(torch::kInt64));
    torch::topk_out(values, indices,
                    saliency.narrow(0, first, length).reshape({length, channels / width, width}), keep,
                    2, /*largest=*/true, /*sorted=*/false);
    torch::Tensor wide = values;
    if (saliency.scalar_type() != torch::kFloat64) {
      wide = wide_scratch.Get(values.sizes(), values.options().dtype(torch::kFloat64));
      wide.copy_(values);
    }
    bound += wide.sum().item<double>();
  }
  return bound;
}

torch::Tensor NmMask(const torch::Tensor& values, int64_t n, int64_t m) {
  torch::NoGradGuard no_grad;
  TORCH_CHECK(values.dim() >= 1 && values.size(-1) % m == 0 && n >= 0 && n <= m,
              "NmMask: the last axis must be a multiple of m, and 0 <= n <= m");
  std::vector<int64_t> grouped = values.sizes().vec();
  grouped.back() /= m;
  grouped.push_back(m);
  const torch::Tensor magnitude = values.abs().reshape(grouped);
  // Stable descending sort: among equal magnitudes the lower index is kept.
  const torch::Tensor ranked =
      std::get<1>(magnitude.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true));
  return torch::zeros_like(magnitude)
      .scatter_(-1, ranked.narrow(-1, 0, n), 1.0)
      .reshape(values.sizes());
}

}  // namespace icd::traces
