// Streaming statistics of activation rows for one symmetry group.
//
// Rows arrive in any number of chunks of any size; they are regrouped into
// fixed internal blocks of `block_rows` rows, and each block costs one GEMM
// per statistic on the rows' device. So the sums depend only on the rows and
// their order, never on how a client chunked them, and memory is
// O(channels^2 + block_rows * channels) whatever the number of rows.
#ifndef ICD_CORE_SRC_TRACES_STATS_H_
#define ICD_CORE_SRC_TRACES_STATS_H_

#include "torch_api.h"

#include <cstdint>
#include <deque>

#include "absl/status/status.h"
#include "icd/core/types.h"

namespace icd::traces {

struct StatsOptions {
  int64_t channels = 0;
  // Sums of outer products x^T x (for correlation), and the same on rows
  // shuffled per channel (the null).
  bool outer_products = true;
  // Co-activation counts (both channels active on a row), and the null.
  bool coactivation = false;
  // Active: |a| > the channel's own quantile of |a|, estimated on the first
  // block (or on all rows when fewer arrive).
  double activation_quantile = 0.9;
  uint64_t seed = 0;  // for the per-channel shuffle of the null
  int64_t block_rows = 1024;
  torch::Device device = torch::kCPU;
};

// Deterministic uniform [0, 1) keys, [rows, cols] float64 on the CPU, from a
// splitmix64 stream: identical on every LibTorch version and device.
torch::Tensor UniformKeys(int64_t rows, int64_t cols, uint64_t seed);

class TraceStats {
 public:
  explicit TraceStats(StatsOptions options);

  // rows: [n, channels], finite (the caller checks), any float dtype/device.
  void Add(const torch::Tensor& rows) { (void)Add(rows, CallContext{}); }
  // As Add, checking ctx (CheckCall) before each block; once it fails the
  // statistics are incomplete and must not be used.
  absl::Status Add(const torch::Tensor& rows, const CallContext& ctx);
  // Processes the rows still pending. Call once, before reading.
  void Finish();

  const StatsOptions& options() const { return options_; }
  int64_t rows() const { return rows_; }
  // All float64 on options.device. Sums over rows:
  const torch::Tensor& sum() const { return sum_; }                // [C]
  const torch::Tensor& sum_squares() const { return sum_squares_; }  // [C]
  const torch::Tensor& outer() const { return outer_; }            // [C, C] x^T x
  const torch::Tensor& null_outer() const { return null_outer_; }  // shuffled rows
  const torch::Tensor& active_count() const { return active_count_; }  // [C]
  const torch::Tensor& coactive() const { return coactive_; }          // [C, C]
  const torch::Tensor& null_coactive() const { return null_coactive_; }
  // [C] thresholds on |a|; defined once the first block was processed.
  const torch::Tensor& thresholds() const { return thresholds_; }
  // The first block's rows (float64), kept for thresholds and for the block
  // refinement of the layout: a sample of the training rows.
  const torch::Tensor& sample() const { return sample_; }

  // |rows| > thresholds (float32 0/1), rows on any device.
  torch::Tensor Active(const torch::Tensor& rows) const;

 private:
  void ProcessBlock(const torch::Tensor& block);

  StatsOptions options_;
  int64_t rows_ = 0;
  int64_t blocks_done_ = 0;
  std::deque<torch::Tensor> pending_;
  int64_t pending_rows_ = 0;
  torch::Tensor sum_, sum_squares_, outer_, null_outer_;
  torch::Tensor active_count_, coactive_, null_coactive_;
  torch::Tensor thresholds_, sample_;
};

// Holds back the last `capacity` rows of a stream; older rows are released
// to `sink`. Each row moves once.
class HoldoutTail {
 public:
  explicit HoldoutTail(int64_t capacity) : capacity_(capacity) {}
  template <typename Sink>
  void Add(const torch::Tensor& rows, Sink&& sink) {
    if (rows.size(0) > 0) {
      tail_.push_back(rows);
      held_ += rows.size(0);
    }
    Release(sink);
  }
  // Releases all but the last `keep` rows to `sink`; returns the kept rows
  // (an empty [0, channels] tensor when none).
  template <typename Sink>
  torch::Tensor Finish(int64_t keep, int64_t channels, Sink&& sink) {
    capacity_ = keep;
    Release(sink);
    if (tail_.empty()) return torch::empty({0, channels}, torch::kFloat32);
    return torch::cat(std::vector<torch::Tensor>(tail_.begin(), tail_.end()), 0);
  }
  int64_t held() const { return held_; }

 private:
  template <typename Sink>
  void Release(Sink&& sink) {
    while (held_ > capacity_) {
      torch::Tensor& front = tail_.front();
      const int64_t excess = held_ - capacity_;
      if (front.size(0) <= excess) {
        held_ -= front.size(0);
        sink(front);
        tail_.pop_front();
      } else {
        sink(front.narrow(0, 0, excess));
        front = front.narrow(0, excess, front.size(0) - excess);
        held_ -= excess;
      }
    }
  }

  int64_t capacity_;
  int64_t held_ = 0;
  std::deque<torch::Tensor> tail_;
};

}  // namespace icd::traces

#endif  // ICD_CORE_SRC_TRACES_STATS_H_
