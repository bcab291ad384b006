// The engine façade: everything the transport may call. Thread-safe.
//
// Models live in a registry keyed by name. Reads (Verify, Evaluate,
// ReadTensors, Symmetries, Capture, MeasureLatency) take a shared lock on the
// model; changes (Apply,
// WriteTensors, Export, Unload) an exclusive one. Every successful change
// returns a new, strictly larger version; versions start at 1.
//
// Status codes (the transport maps them one to one):
//   InvalidArgument    bad permutation or request (message names the group);
//                      a malformed or unsupported checkpoint (names the file)
//   NotFound           unknown model, missing checkpoint directory or file
//   AlreadyExists      a loaded name, an existing export path
//   FailedPrecondition stale expected_version
//   Aborted            post-apply check failed, weights restored
//   ResourceExhausted  a request over a built-in limit (latency samples), or
//                      past its device's memory budget (EngineOptions); an
//                      allocation that failed (status_macros.h OutOfMemory)
//   PermissionDenied   a checkpoint file linking outside LoadOptions::allowed_roots
//   Cancelled / DeadlineExceeded  the CallContext said stop (CheckCall);
//                      nothing changed
//   Internal           says what failed; the detail is a payload
//                      (status_macros.h InternalFailure) for the log only
// Path policy (which roots) belongs to the caller: the engine checks the
// files it reads against the roots it is given.
#ifndef ICD_CORE_ENGINE_H_
#define ICD_CORE_ENGINE_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "icd/core/export.h"
#include "icd/core/memory_budget.h"
#include "icd/core/traces.h"
#include "icd/core/types.h"

namespace icd {

struct EngineOptions {
  std::string default_device = "cpu";  // "cpu", "cuda", "cuda:N"
  // Most models loaded (or loading) at once; 0: no limit. Beyond it Load is
  // ResourceExhausted.
  int max_models = 0;
  // Bytes each device may hold (icd/core/memory_budget.h): loaded (and
  // loading) models' weights in their loaded dtype and probe references, and
  // running calls' estimates; empty: no limit. A Load or call that would
  // pass its device's budget is ResourceExhausted before it allocates there.
  MemoryBudget memory_budget = {};
  // Each CUDA model's calls on a stream of its own (engine/model_stream.h)
  // instead of the device's default stream. Off by default: not yet run
  // under load on a GPU (the first H200 soak's server died, cause not found).
  bool model_streams = false;
};

class ICD_CORE_API Engine {
 public:
  explicit Engine(EngineOptions options = {});
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Reads a checkpoint directory, detects family and layout, takes the probe
  // reference. Version 1.
  absl::StatusOr<ModelInfo> Load(const std::string& name,
                                 const std::string& path,
                                 const LoadOptions& options = {},
                                 const CallContext& ctx = {});
  absl::Status Unload(const std::string& name);
  std::vector<ModelInfo> List() const;
  // What each device holds as the memory budget counts it: every device
  // with a budget or with anything booked.
  std::vector<DeviceMemory> Memory() const;
  absl::StatusOr<ModelInfo> Info(const std::string& name) const;

  // The model's groups, tensor names in its layout; `version` (optional)
  // receives the model's version, read under the same lock.
  absl::StatusOr<std::vector<GroupInfo>> Symmetries(const std::string& name,
                                                    uint64_t* version = nullptr) const;

  // All-or-nothing: every permutation is validated before any weight moves;
  // they are applied in request order. Unless skip_verify, the probe check
  // runs after; if it fails the weights are restored (Aborted).
  absl::StatusOr<ApplyReport> Apply(const std::string& name,
                                    const std::vector<Permutation>& perms,
                                    const ApplyOptions& options = {},
                                    const CallContext& ctx = {});

  absl::StatusOr<CorrectnessReport> Verify(const std::string& name,
                                           const CallContext& ctx = {}) const;

  absl::StatusOr<EvaluateResult> Evaluate(const std::string& name,
                                          const EvaluateRequest& request,
                                          const CallContext& ctx = {}) const;

  // Empty `names`: every tensor, in the layout's own names and order.
  absl::StatusOr<std::vector<HostTensor>> ReadTensors(
      const std::string& name, const std::vector<std::string>& names) const;

  // Bytes the named tensor (a ReadTensors name) holds in the model as
  // loaded: what a WriteTensors of it must send. NotFound for an unknown
  // model or tensor.
  absl::StatusOr<int64_t> TensorBytes(const std::string& name, const std::string& tensor) const;

  // Replaces named tensors (same shape and dtype), all-or-nothing, and takes
  // the probe reference again (an intended change of function). Refuses
  // (InvalidArgument naming the tensor) a NaN or infinite value.
  absl::StatusOr<uint64_t> WriteTensors(const std::string& name,
                                        const std::vector<HostTensor>& tensors,
                                        uint64_t expected_version = 0);

  // Writes the current weights to a new directory `path` (must not exist),
  // same layout and format; other files of the source copied unchanged.
  absl::StatusOr<ExportResult> Export(const std::string& name,
                                      const std::string& path,
                                      const CallContext& ctx = {});

  // Starts a ComputePermutation stream for one group of a loaded model:
  // NotFound for an unknown model, InvalidArgument for an unknown group, a
  // channel count other than the group's size or bad solver options.
  absl::StatusOr<std::unique_ptr<TraceSession>> BeginTraces(const TraceHeader& header);

  // Runs the model on the tokens under a shared lock, captures each group's
  // activations (traces.h), and solves each group. Outputs are unchanged.
  absl::StatusOr<std::vector<PermutationResult>> Capture(const CaptureRequest& request,
                                                         const CallContext& ctx = {});

  // Times samples of the model's forward (types.h LatencyOptions) on its
  // device, under shared locks: CUDA events on a GPU of a CUDA build, else a
  // steady clock. With compare_model, both in interleaved rounds and their
  // ratio. InvalidArgument names a bad field (or different vocabularies);
  // ResourceExhausted over a limit (latency.h: iters, tokens, logits);
  // NotFound an unknown model; FailedPrecondition models on two devices.
  absl::StatusOr<LatencyReport> MeasureLatency(const LatencyOptions& options,
                                               const CallContext& ctx = {});

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace icd

#endif  // ICD_CORE_ENGINE_H_
