// The service's metrics in Prometheus' text exposition format (0.0.4), as
// Triton serves its own on :8002/metrics: calls and their latency per RPC
// and status code, applies and refused applies, the last verified rel L2 per
// model, trace bytes ingested; and, read when scraped, the loaded models and
// their bytes per device, each device's memory against its budget, and the
// process's resident memory. The service
// records (service.cc); icd-server serves Render() over HTTP
// (--metrics-listen, metrics_endpoint.cc). Thread-safe.
#ifndef ICD_RPC_METRICS_H_
#define ICD_RPC_METRICS_H_

#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "icd/core/memory_budget.h"
#include "icd/core/types.h"

namespace icd::rpc {

class Metrics {
 public:
  // Upper bounds of the latency histogram's buckets, in seconds (+Inf last).
  static constexpr std::array<double, 12> kBuckets = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                      0.1,   0.25,   0.5,   1.0,  5.0,   30.0};

  // One finished call of `rpc` (e.g. "ApplyPermutation") with its status.
  void RecordCall(std::string_view rpc, absl::StatusCode code, double seconds);
  // An ApplyPermutation that changed the model (with its verification's rel
  // L2 when it verified), or one refused (the model left as it was).
  void RecordApply(const std::string& model, bool applied, std::optional<double> rel_l2);
  // A Verify's rel L2.
  void RecordVerify(const std::string& model, double rel_l2);
  // An unloaded model: its per-model series go.
  void ForgetModel(const std::string& model);
  // Bytes of activation traces a ComputePermutation stream delivered.
  void AddTraceBytes(int64_t bytes);

  // The exposition: the recorded series, then `models` (Engine::List, read
  // by the caller at scrape time), what each device holds against the
  // memory budget (`devices`, Engine::Memory) and the process's resident
  // memory.
  std::string Render(const std::vector<ModelInfo>& models,
                     const std::vector<DeviceMemory>& devices = {}) const;

 private:
  struct Histogram {
    std::array<uint64_t, kBuckets.size() + 1> counts{};  // the last: +Inf
    double sum = 0;
    uint64_t count = 0;
  };
  mutable std::mutex mutex_;
  std::map<std::pair<std::string, std::string>, uint64_t> calls_;  // (rpc, code) -> count
  std::map<std::string, Histogram> durations_;                      // rpc -> seconds
  uint64_t applies_ = 0;
  uint64_t refused_applies_ = 0;
  std::map<std::string, double> verify_rel_l2_;  // model -> last verification
  uint64_t trace_bytes_ = 0;
};

// The process's resident set in bytes (/proc/self/statm); 0 if unreadable.
int64_t ResidentBytes();

}  // namespace icd::rpc

#endif  // ICD_RPC_METRICS_H_
