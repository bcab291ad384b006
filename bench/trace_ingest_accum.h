// The LibTorch half of trace_ingest_bench: TraceStats accumulation and the
// bare GEMMs it is compared with. Plain C++ types only, so the gRPC half
// (trace_ingest_bench.cc) includes this without seeing LibTorch (the
// LibTorch/protobuf boundary of docs/design.md).
#ifndef ICD_BENCH_TRACE_INGEST_ACCUM_H_
#define ICD_BENCH_TRACE_INGEST_ACCUM_H_

#include <cstdint>
#include <string>

namespace icd::bench {

int TorchThreads();
void SetTorchThreads(int threads);
std::string TorchVersion();

struct AccumTiming {
  int64_t rows = 0;
  int64_t blocks = 0;       // internal blocks of block_rows (the last may be short)
  double seconds = 0;       // timed region only
  double gemm_flop = 0;     // 2 GEMMs x^T x per block (data and null): 2 * 2 r C^2
  double checksum = 0;      // keeps the work observable
  // TimeNullShuffle only: its parts.
  double keys_seconds = 0;     // UniformKeys [r, C] (a scalar splitmix64 loop)
  double argsort_seconds = 0;  // argsort along the rows (dim 0)
  double gather_seconds = 0;   // block.gather(0, shuffle)
};

// TraceStats (the engine's options for the default "correlation" statistic:
// outer products and their null, quantile 0.9) fed `rows` row-major float32
// rows in pieces of `chunk_rows`, then Finish. Times Add + Finish.
AccumTiming TimeTraceStats(const float* rows, int64_t n_rows, int64_t channels,
                           int64_t chunk_rows, int64_t block_rows, uint64_t seed);

// The same blocks as float64 [r, C]: block.t().mm(block) twice per block
// (the second on a row-rotated copy, a stand-in for the shuffled rows). Only
// the two mm calls are timed; the conversion to float64 is not.
AccumTiming TimeBareGemms(const float* rows, int64_t n_rows, int64_t channels,
                          int64_t block_rows);

// The rest of the null's cost per block, alone: UniformKeys [r, C] +
// argsort along rows + gather of the block, timed over the same blocks.
AccumTiming TimeNullShuffle(const float* rows, int64_t n_rows, int64_t channels,
                            int64_t block_rows, uint64_t seed);

}  // namespace icd::bench

#endif  // ICD_BENCH_TRACE_INGEST_ACCUM_H_
