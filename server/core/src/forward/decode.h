// A decode session (MeasureLatency's decode mode, design.md): the recurrent
// state of `batch` sequences on the model's device after a prefill, and one
// step that advances every sequence by a token. On a CUDA device the whole
// step, every layer and the head, is captured once into a CUDA graph and
// replayed; elsewhere a step is the eager forward. Internal to core.
#ifndef ICD_CORE_SRC_DECODE_H_
#define ICD_CORE_SRC_DECODE_H_

#include "torch_api.h"

#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "forward/forward.h"
#include "icd/core/types.h"
#include "model.h"

namespace icd::decode {

// kEager: each step the forward over one token, the state replaced.
// kCudaGraph: on a CUDA device, the step captured once and replayed, the
// state written in place. kInPlace: the graph's step launched kernel by
// kernel (the state written in place, the scan's constants computed once):
// the kernels a graph replays, one launch each, for the hardware counters,
// which count launches. A model that cannot be captured (attention, experts,
// placed over devices) decodes eagerly under either.
enum class Execution { kEager, kCudaGraph, kInPlace };

// "eager" | "cuda_graph" | "in_place", as LatencyReport::execution reports it.
const char* ExecutionName(Execution execution);

class Session {
 public:
  // Runs the prefill (Forward, with its checks) into the state, then on a
  // CUDA device with `execution` kCudaGraph captures the step, or with
  // kInPlace marks the state to be written in place (neither for a model
  // with attention layers, whose cache grows, or experts, which pick rows by
  // value, or one placed over devices: eager). `config` and
  // `weights` must outlive the session unchanged (the caller holds the
  // model's shared lock): the graph keeps the weights' addresses, so a
  // session never outlives the model version it was built on.
  static absl::StatusOr<std::unique_ptr<Session>> Start(const ModelConfig& config,
                                                        const Weights& weights,
                                                        const torch::Tensor& prefill_ids,
                                                        Execution execution,
                                                        const CallContext& ctx);

  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
  ~Session();

  // One token per sequence: ids int64 [batch, 1] on the weights' device,
  // in [0, vocab_size) (the caller vouches, as for ForwardPrechecked).
  // Returns float32 logits [batch, 1, vocab]; with a graph, the session's
  // output buffer, overwritten by the next step. After a failed step the
  // state may be partly advanced: the session refuses further steps.
  absl::StatusOr<torch::Tensor> Step(const torch::Tensor& ids, const CallContext& ctx);

  // Sessions that are not graphs: remembers the state as it is now, and goes
  // back to it (a step after Rewind repeats the step after Mark, bit for
  // bit): the hardware counters' user replay runs the same step once per
  // pass. Eager steps replace the state's tensors rather than write into
  // them, and an attention cache's step writes only past the positions it
  // has seen, so Mark keeps the tensors themselves; in-place steps write into
  // them, so Mark keeps copies and Rewind copies them back (launches of their
  // own, outside the step's). FAILED_PRECONDITION on a CUDA-graph session or
  // a failed one.
  absl::Status Mark();
  absl::Status Rewind();

  Execution execution() const;

  struct Impl;  // decode.cc

 private:
  explicit Session(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace icd::decode

#endif  // ICD_CORE_SRC_DECODE_H_
