// The engine's memory accounting per device (icd/core/memory_budget.h): a
// ledger of what loaded models and running calls hold, checked against the
// budget before anything is allocated, and the estimates of what a call
// allocates. Internal to core.
#ifndef ICD_CORE_SRC_ENGINE_MEMORY_BUDGET_H_
#define ICD_CORE_SRC_ENGINE_MEMORY_BUDGET_H_

#include "torch_api.h"

#include <cstdint>
#include <initializer_list>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "icd/core/memory_budget.h"
#include "model.h"

namespace icd::engine_internal {

class MemoryLedger;

// Bytes booked on one device for a running call, given back when destroyed.
class MemoryHold {
 public:
  MemoryHold() = default;
  MemoryHold(MemoryHold&& other) noexcept;
  MemoryHold& operator=(MemoryHold&& other) noexcept;
  MemoryHold(const MemoryHold&) = delete;
  MemoryHold& operator=(const MemoryHold&) = delete;
  ~MemoryHold();

  int64_t bytes() const { return bytes_; }

 private:
  friend class MemoryLedger;
  void Release();
  MemoryLedger* ledger_ = nullptr;
  std::string device_;
  int64_t bytes_ = 0;
};

// What each device holds, against the budget. Thread-safe: a check and its
// booking happen under one lock, so two loads or calls cannot both pass on
// the same room.
class MemoryLedger {
 public:
  explicit MemoryLedger(MemoryBudget budget) : budget_(std::move(budget)) {}

  // Whether `bytes` more would fit on `device` now, booking nothing: a
  // load's early check, before its files are read. `what` says who needs
  // them ("loading model 'm' (...)"); `hint`, what to do about a refusal.
  absl::Status CheckFits(const std::string& device, int64_t bytes, absl::string_view what,
                         absl::string_view hint) const;

  // Books `bytes` on `device` for model `name`, replacing what `name` had
  // booked (which does not count against the new booking), or refuses,
  // changing nothing.
  absl::Status BookModel(const std::string& name, const std::string& device, int64_t bytes,
                         absl::string_view what, absl::string_view hint);
  // The same for a model over several devices (LoadOptions::placement):
  // bytes by device, booked on all of them or on none.
  absl::Status BookModel(const std::string& name, const std::map<std::string, int64_t>& parts,
                         absl::string_view what, absl::string_view hint);
  // Gives back what model `name` booked (nothing if none).
  void ReleaseModel(const std::string& name);

  // Books a running call's `bytes` on `device` until the hold is destroyed,
  // or refuses. `what` names the call and its estimate's parts.
  absl::StatusOr<MemoryHold> BookCall(const std::string& device, int64_t bytes,
                                      absl::string_view what, absl::string_view hint);

  // Every device with a budget or anything booked, by name.
  std::vector<DeviceMemory> Snapshot() const;

  // What `device`'s budget has left now; -1 where it has none.
  int64_t Unbooked(const std::string& device) const;
  // No call holds memory on any device.
  bool NoCalls() const;

 private:
  friend class MemoryHold;
  struct Usage {
    int64_t model_bytes = 0;
    int64_t call_bytes = 0;
    int64_t models = 0;
    int64_t calls = 0;
  };
  // OK, or ResourceExhausted naming the device, the bytes needed, those in
  // use (`usage`, less `excluded` bytes of one model being re-booked) and
  // the budget. Called under mutex_.
  absl::Status Fits(const std::string& device, int64_t bytes, absl::string_view what,
                    absl::string_view hint, int64_t excluded) const;
  void ReleaseCall(const std::string& device, int64_t bytes);
  void Unbook(const std::map<std::string, int64_t>& parts);  // under mutex_

  const MemoryBudget budget_;
  mutable std::mutex mutex_;
  std::map<std::string, Usage> devices_;
  std::map<std::string, std::map<std::string, int64_t>> models_;  // name -> bytes by device
};

// The device key memory is counted under: "cpu" or "cuda:N" (an index-less
// "cuda" resolved to the device LibTorch allocates on, which it initialises).
std::string MemoryDevice(const torch::Device& device);

// Bytes a new tensor could take on a CUDA device now: the driver's free
// memory and what LibTorch's allocator holds unused; -1 where that is not
// known (the CPU, a build without CUDA).
int64_t FreeDeviceBytes(const torch::Device& device);

// LibTorch keeps a cuBLAS workspace (32 MiB on Hopper) for every (thread,
// stream) pair that has run a matmul, for the process's life: a server's
// thread pool times the streams of decode captures and model streams reached
// gigabytes in the H200 soak. Given back to LibTorch's allocator here, when
// nothing is loaded or loading (Engine::Unload of the last model).
void ReleaseCublasWorkspaces();

// "303360 bytes (0.3 MiB)".
std::string BytesText(int64_t bytes);

// a·b·..., saturating at INT64_MAX (an estimate that large is refused by any
// budget instead of wrapping).
int64_t SaturatingProduct(std::initializer_list<int64_t> factors);
int64_t SaturatingSum(std::initializer_list<int64_t> terms);

// ---------------------------------------------------------------- estimates
//
// What a model or a call holds on the model's device, in bytes. A model's is
// exact; a call's is an estimate from the shapes it will compute, so that it
// can be refused before it allocates. `dtype` is the model's.

// Distinct weight elements the config implies (a tied head counted once).
int64_t WeightElements(const ModelConfig& config);
// The probe reference (forward/probe.h): int64 ids and float32 logits.
int64_t ProbeBytes(const ModelConfig& config);
// A loaded model: weights in `dtype` and the probe reference.
int64_t ModelBytes(const ModelConfig& config, torch::ScalarType dtype);

// One forward over [batch, seq] token ids: the logits (float32 [batch, seq,
// vocab], and the head's output in `dtype` when that is not float32), and
// one layer's activations at a time, per position (in_proj's output twice,
// three d_inner-wide and four d_model-wide tensors, in max(float32, dtype)),
// and with attention layers their scores and softmax [batch, heads, seq, seq].
int64_t ForwardBytes(const ModelConfig& config, torch::ScalarType dtype, int64_t batch,
                     int64_t seq);
// A recurrent state of `batch` sequences, every layer (forward.h
// LayerState: conv history in `dtype`, scan state in max(float32, dtype),
// an attention layer's keys and values of `positions` tokens in `dtype`).
int64_t StateBytes(const ModelConfig& config, torch::ScalarType dtype, int64_t batch,
                   int64_t positions);
// One group's trace statistics over at most `rows` rows (traces/stats.h):
// two float64 [C, C] sums, and the first block's sample and a pending block,
// float64 [min(rows, 1024), C] each.
int64_t StatsBytes(int64_t channels, int64_t rows);
// The solver of one group: the graph and the null graph, float64 [C, C],
// and two more for Leiden's aggregation and the modularity.
int64_t SolverBytes(int64_t channels);

}  // namespace icd::engine_internal

#endif  // ICD_CORE_SRC_ENGINE_MEMORY_BUDGET_H_
