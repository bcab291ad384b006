// The LibTorch half of trace_ingest_bench (see trace_ingest_accum.h). No
// gRPC or protobuf header here.
#include "trace_ingest_accum.h"

#include "torch_api.h"
#include <torch/version.h>

#include <algorithm>
#include <chrono>

#include "traces/stats.h"

namespace icd::bench {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

torch::Tensor View(const float* rows, int64_t n_rows, int64_t channels) {
  // Read only: every use copies (to float64) before writing anything.
  return torch::from_blob(const_cast<float*>(rows), {n_rows, channels}, torch::kFloat32);
}

double GemmFlop(int64_t block, int64_t channels) {
  return 2.0 * static_cast<double>(block) * static_cast<double>(channels) *
         static_cast<double>(channels);
}

}  // namespace

int TorchThreads() { return at::get_num_threads(); }
void SetTorchThreads(int threads) { at::set_num_threads(threads); }
std::string TorchVersion() { return TORCH_VERSION; }

AccumTiming TimeTraceStats(const float* rows, int64_t n_rows, int64_t channels,
                           int64_t chunk_rows, int64_t block_rows, uint64_t seed) {
  torch::NoGradGuard no_grad;
  const torch::Tensor all = View(rows, n_rows, channels);
  traces::StatsOptions options;  // as StatsOptionsFor, statistic "correlation"
  options.channels = channels;
  options.outer_products = true;
  options.coactivation = false;
  options.activation_quantile = 0.9;
  options.seed = seed;
  options.block_rows = block_rows;
  AccumTiming timing;
  const auto start = Clock::now();
  traces::TraceStats stats(options);
  for (int64_t pos = 0; pos < n_rows; pos += chunk_rows) {
    stats.Add(all.narrow(0, pos, std::min(chunk_rows, n_rows - pos)));
  }
  stats.Finish();
  timing.seconds = Since(start);
  timing.rows = stats.rows();
  timing.blocks = (n_rows + block_rows - 1) / block_rows;
  for (int64_t pos = 0; pos < n_rows; pos += block_rows) {
    timing.gemm_flop += 2 * GemmFlop(std::min(block_rows, n_rows - pos), channels);
  }
  timing.checksum = stats.outer().trace().item<double>() + stats.null_outer().trace().item<double>();
  return timing;
}

// Calls time_block(block, index) for every float64 block of block_rows rows
// (the last may be shorter), as TraceStats cuts them; index counts from 1.
template <typename TimeBlock>
AccumTiming ForEachBlock(const float* rows, int64_t n_rows, int64_t channels,
                         int64_t block_rows, TimeBlock&& time_block) {
  torch::NoGradGuard no_grad;
  const torch::Tensor all = View(rows, n_rows, channels);
  AccumTiming timing;
  timing.rows = n_rows;
  for (int64_t pos = 0; pos < n_rows; pos += block_rows) {
    const int64_t count = std::min(block_rows, n_rows - pos);
    const torch::Tensor block = all.narrow(0, pos, count).to(torch::kFloat64).contiguous();
    ++timing.blocks;
    time_block(block, timing);
  }
  return timing;
}

AccumTiming TimeBareGemms(const float* rows, int64_t n_rows, int64_t channels,
                          int64_t block_rows) {
  return ForEachBlock(rows, n_rows, channels, block_rows,
                      [&](const torch::Tensor& block, AccumTiming& timing) {
    const torch::Tensor other = block.roll(1, 0).contiguous();
    const auto start = Clock::now();
    const torch::Tensor a = block.t().mm(block);
    const torch::Tensor b = other.t().mm(other);
    timing.seconds += Since(start);
    timing.checksum += a[0][0].item<double>() + b[0][0].item<double>();
    timing.gemm_flop += 2 * GemmFlop(block.size(0), channels);
  });
}

AccumTiming TimeNullShuffle(const float* rows, int64_t n_rows, int64_t channels,
                            int64_t block_rows, uint64_t seed) {
  return ForEachBlock(rows, n_rows, channels, block_rows,
                      [&](const torch::Tensor& block, AccumTiming& timing) {
    // As TraceStats::ProcessBlock, one step at a time.
    const auto start = Clock::now();
    const torch::Tensor keys = traces::UniformKeys(
        channels, block.size(0),
        seed ^ (0x6a09e667f3bcc908ULL * static_cast<uint64_t>(timing.blocks)));
    const auto keyed = Clock::now();
    const torch::Tensor shuffle = keys.argsort(/*dim=*/int64_t{1}).t();
    const auto sorted = Clock::now();
    const torch::Tensor shuffled = block.gather(0, shuffle);
    timing.seconds += Since(start);
    timing.keys_seconds += std::chrono::duration<double>(keyed - start).count();
    timing.argsort_seconds += std::chrono::duration<double>(sorted - keyed).count();
    timing.gather_seconds += Since(sorted);
    timing.checksum += shuffled[0][0].item<double>();
  });
}

}  // namespace icd::bench
