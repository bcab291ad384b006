#include "traces/stats.h"

#include <algorithm>
#include <vector>

#include "splitmix64.h"

namespace icd::traces {

torch::Tensor UniformKeys(int64_t rows, int64_t cols, uint64_t seed) {
  torch::Tensor keys = torch::empty({rows, cols}, torch::kFloat64);
  double* out = keys.data_ptr<double>();
  SplitMix64 stream(seed);
  for (int64_t i = 0; i < rows * cols; ++i) {
    out[i] = static_cast<double>(stream.Next() >> 11) * 0x1.0p-53;
  }
  return keys;
}

TraceStats::TraceStats(StatsOptions options) : options_(std::move(options)) {
  const auto wide = torch::TensorOptions().dtype(torch::kFloat64).device(options_.device);
  const int64_t channels = options_.channels;
  sum_ = torch::zeros({channels}, wide);
  sum_squares_ = torch::zeros({channels}, wide);
  active_count_ = torch::zeros({channels}, wide);
  if (options_.outer_products) {
    outer_ = torch::zeros({channels, channels}, wide);
    null_outer_ = torch::zeros({channels, channels}, wide);
  }
  if (options_.coactivation) {
    coactive_ = torch::zeros({channels, channels}, wide);
    null_coactive_ = torch::zeros({channels, channels}, wide);
  }
}

absl::Status TraceStats::Add(const torch::Tensor& rows, const CallContext& ctx) {
  if (rows.size(0) == 0) return absl::OkStatus();
  pending_.push_back(rows.to(options_.device, torch::kFloat64));
  pending_rows_ += rows.size(0);
  while (pending_rows_ >= options_.block_rows) {
    if (absl::Status status = CheckCall(ctx, "trace statistics"); !status.ok()) return status;
    // Cut exactly block_rows rows off the front of the pending queue.
    std::vector<torch::Tensor> parts;
    int64_t need = options_.block_rows;
    while (need > 0) {
      torch::Tensor& front = pending_.front();
      if (front.size(0) <= need) {
        need -= front.size(0);
        parts.push_back(front);
        pending_.pop_front();
      } else {
        parts.push_back(front.narrow(0, 0, need));
        front = front.narrow(0, need, front.size(0) - need);
        need = 0;
      }
    }
    pending_rows_ -= options_.block_rows;
    ProcessBlock(torch::cat(parts, 0));
  }
  return absl::OkStatus();
}

void TraceStats::Finish() {
  if (pending_rows_ > 0) {
    ProcessBlock(torch::cat(std::vector<torch::Tensor>(pending_.begin(), pending_.end()), 0));
    pending_.clear();
    pending_rows_ = 0;
  }
  if (!thresholds_.defined()) {
    thresholds_ = torch::zeros({options_.channels},
                               torch::TensorOptions().dtype(torch::kFloat64).device(options_.device));
    sample_ = torch::zeros({0, options_.channels}, thresholds_.options());
  }
}

torch::Tensor TraceStats::Active(const torch::Tensor& rows) const {
  const torch::Tensor thresholds = thresholds_.to(rows.device());
  return (rows.to(torch::kFloat64).abs() > thresholds).to(torch::kFloat32);
}

void TraceStats::ProcessBlock(const torch::Tensor& block) {
  const int64_t count = block.size(0);
  if (blocks_done_ == 0) {
    // Per-channel quantile of |a| on the first block: the k-th smallest.
    const auto k = static_cast<int64_t>(
        std::clamp(options_.activation_quantile, 0.0, 1.0) * static_cast<double>(count - 1));
    thresholds_ = std::get<0>(block.abs().kthvalue(k + 1, 0));
    sample_ = block;
  }
  ++blocks_done_;
  rows_ += count;
  sum_ += block.sum(0);
  sum_squares_ += block.square().sum(0);

  // The null: every channel's column shuffled on its own within the block,
  // which keeps each channel's distribution and destroys co-dependence.
  const torch::Tensor shuffle =
      // Keys laid out [channel, row] so each channel's sort runs over
      // contiguous memory (about twice as fast as sorting columns).
      UniformKeys(options_.channels, count,
                  options_.seed ^ (0x6a09e667f3bcc908ULL * static_cast<uint64_t>(blocks_done_)))
          .argsort(/*dim=*/int64_t{1})
          .t()
          .to(block.device());
  if (options_.outer_products) {
    outer_ += block.t().mm(block);
    const torch::Tensor shuffled = block.gather(0, shuffle);
    null_outer_ += shuffled.t().mm(shuffled);
  }
  // 0/1 counts: a float32 GEMM is exact below 2^24 rows per block.
  const torch::Tensor active = Active(block);
  active_count_ += active.sum(0).to(torch::kFloat64);
  if (options_.coactivation) {
    coactive_ += active.t().mm(active).to(torch::kFloat64);
    const torch::Tensor shuffled = active.gather(0, shuffle);
    null_coactive_ += shuffled.t().mm(shuffled).to(torch::kFloat64);
  }
}

}  // namespace icd::traces
