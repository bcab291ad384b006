// MeasureLatency's engine side (design.md): samples of a model's forward,
// timed with CUDA events on a GPU or a steady clock on the CPU, and
// interleaved rounds when two models are compared. Internal to core; the
// Engine finds and locks the models.
#ifndef ICD_CORE_SRC_LATENCY_H_
#define ICD_CORE_SRC_LATENCY_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "icd/core/types.h"
#include "model.h"

namespace icd::latency {

// Limits of one call (RESOURCE_EXHAUSTED beyond them). The tokens are drawn
// by the server, so nothing else bounds a call's memory and time: at most
// 100,000 timed samples (and as many warm-up samples) per model,
// 2^20 = 1,048,576 tokens per forward (batch·seq_len), and 2^32 float32
// logits per forward (batch·seq_len·vocab, 16 GiB: the logits dominate a
// prefill's memory).
constexpr int64_t kMaxIters = 100000;
constexpr int64_t kMaxTokens = int64_t{1} << 20;
constexpr int64_t kMaxLogits = int64_t{1} << 32;
// Each repeat of the hardware counters replays every kernel of a sample.
constexpr int64_t kMaxCounterRepeats = 100;

// The options on their own: INVALID_ARGUMENT naming the field (mode not
// "prefill" / "decode"; batch, seq_len or iters below 1; warmup below 0),
// RESOURCE_EXHAUSTED over kMaxIters (iters or warmup) or kMaxTokens;
// counter_repeats below 0 or over kMaxCounterRepeats likewise.
absl::Status ValidateOptions(const LatencyOptions& options);

// A loaded model as the caller holds it (under its shared lock).
struct TimedModel {
  std::string name;
  const ModelConfig* config = nullptr;
  const Weights* weights = nullptr;
  std::string device;  // as ModelInfo reports it
  uint64_t version = 0;  // ModelInfo's
};

// Times `model`, and `compare` (optional) in interleaved rounds: A then B,
// then B then A, alternating, so that drift (clocks, temperature, caches)
// falls on both alike. Both must be on one device (FAILED_PRECONDITION) and
// share a vocabulary (INVALID_ARGUMENT): they run on the same token ids.
// Polls ctx between samples. The caller has run ValidateOptions.
absl::StatusOr<LatencyReport> Measure(const LatencyOptions& options, const TimedModel& model,
                                      const TimedModel* compare, const CallContext& ctx);

}  // namespace icd::latency

#endif  // ICD_CORE_SRC_LATENCY_H_
