// Each family's forward in LibTorch, matching HuggingFace's PyTorch path, and
// the activations it can hand out for trace statistics.
#ifndef ICD_CORE_SRC_FORWARD_H_
#define ICD_CORE_SRC_FORWARD_H_

#include "torch_api.h"

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "icd/core/types.h"
#include "model.h"

namespace icd {

// Receives activations during a forward, for trace statistics. Non-owning
// observer; called synchronously on the forward's thread.
//
// Rows are in the group's coordinates: column j is the channel that index j
// of the group's permutation moves, so permuting the weights by p (a gather,
// new[j] = old[p[j]]) turns the rows of that group into old_rows[:, p]. Group
// names are the families' (symmetry.h). Capture points, with B·L = batch·seq:
//   residual            the normalised input of every layer's in_proj, then
//                       the final norm's output (lm_head's input):
//                       n_layer + 1 row sets [B·L, d_model].
//   Mamba-1 / FalconMamba, per layer i:
//   layers.{i}.inner    out_proj's input (scan output + D·x)·silu(z)
//                       [B·L, d_inner]: what a channel-skipping kernel skips on.
//   layers.{i}.state    B, then C, as they enter the scan (after FalconMamba's
//                       RMS): two row sets [B·L, d_state].
//   layers.{i}.dt_rank  the low-rank time step entering dt_proj (after
//                       FalconMamba's RMS) [B·L, dt_rank].
//   Mamba-2, per layer i:
//   layers.{i}.headdim  out_proj's input (the gated, normed output)
//                       [B·L, nheads·headdim], channel = head·headdim + p.
//   layers.{i}.heads    per head, the RMS over headdim of that same input,
//                       sqrt(mean_p v²) without eps [B·L, nheads].
//   layers.{i}.state    B, then C, as they enter the scan (after the conv and
//                       silu): two row sets [B·L, ngroups·d_state].
// Rows are the tensors the forward itself computes (weights' dtype; the heads
// RMS in at least float32), on the weights' device; they may be
// non-contiguous views, so a sink that keeps them copies.
class CaptureSink {
 public:
  virtual ~CaptureSink() = default;
  // Whether the forward should compute and hand out this group's rows.
  virtual bool Wants(const std::string& group) const = 0;
  // rows: [n, channels] in the group's coordinates (any float dtype, on the
  // weights' device). A group may receive several row sets per forward.
  virtual void Add(const std::string& group, const torch::Tensor& rows) = 0;
  // The rows handed out until the next call cover time positions [start,
  // start + length) of every sequence, batch-major (row b * length + t -
  // start): a long forward runs in chunks of time (Forward below).
  virtual void SetWindow(int64_t start, int64_t length) {
    (void)start;
    (void)length;
  }
};

// What one mixer carries from token to token, for decoding: with it, a
// forward over tokens t+1..t+L continues one over tokens 1..t. Tensors on the
// weights' device, batch B, K = d_conv.
struct LayerState {
  // The last K-1 inputs of the causal conv, oldest first, in the weights'
  // dtype: Mamba-1 / FalconMamba x before the conv [B, d_inner, K-1];
  // Mamba-2 xBC [B, d_inner + 2·ngroups·d_state, K-1].
  torch::Tensor conv_history;
  // The scan state in the accumulate dtype (max(float32, weights' dtype)):
  // Mamba-1 / FalconMamba h [B, d_inner, d_state]; Mamba-2 S
  // [B, nheads, headdim, d_state].
  torch::Tensor ssm_state;
  // An attention layer's cache instead (blocks/attention.cc): the keys
  // (rotary applied) and values of every position seen, [B, kv_heads, T,
  // head_dim] in the weights' dtype, growing by each call's length; its
  // conv_history only where its conv has one, ssm_state undefined. Each is a
  // view of the first T positions of its storage, which has room for more,
  // so that a step appends without copying the cache; a forward writes past
  // T in that storage. A copy of a state that is to be continued beside the
  // original must clone these (a clone gets storage of its own).
  torch::Tensor attention_keys;
  torch::Tensor attention_values;
  torch::Tensor attention_key_storage;
  torch::Tensor attention_value_storage;
  // Whether a forward writes the new conv_history and ssm_state into these
  // tensors' own storage instead of replacing them: a decode session's step
  // is a CUDA graph, replayed on fixed addresses (decode.h). A forward that
  // fails may then leave them partly advanced.
  bool in_place = false;
  // With in_place only (a session bound to one model version): the scan's
  // constants in the accumulate dtype, A = -exp(A_log) and D, and the time
  // step's bias in float32 (as the CUDA kernels add it: Mamba-1's dt_proj
  // bias on CUDA, Mamba-2's dt_bias), computed by the first step and reused.
  torch::Tensor scan_decay;
  torch::Tensor scan_skip;
  torch::Tensor scan_delta_bias;
};

struct RecurrentState {
  std::vector<LayerState> layers;  // one per layer; empty: nothing seen yet
};

// input_ids: int64 [batch, seq] on the weights' device. Returns float32
// logits [batch, seq, vocab_size]. Computes in the weights' dtype; norms
// reduce in at least float32 (float64 models in float64). Checks ctx
// (CheckCall) between layers and every few hundred steps of a scan, and
// returns Cancelled / DeadlineExceeded, `state` unchanged, once it fails.
// On the CPU, inputs over 4096 positions (batch x time) run in chunks of
// time of about 4096 positions, each continuing the recurrent state of the
// one before (the same function; rounding may differ from one pass in the
// last bits), so that no matmul or conv outlasts a check by much; `capture`
// is told each chunk's window (SetWindow). `capture` (optional) receives the
// activations above; capturing leaves the logits bitwise unchanged.
//
// `state` (optional): empty on entry, the sequence starts from zeros (the
// logits are those without a state, bitwise); otherwise it continues the
// tokens the state has seen (same batch). On success it holds the state
// after the last token; on failure it is unchanged (unless its layers are
// written in place, LayerState::in_place). Prefill then one token per call
// is decoding.
absl::StatusOr<torch::Tensor> Forward(const ModelConfig& config,
                                      const Weights& weights,
                                      const torch::Tensor& input_ids,
                                      const CallContext& ctx = {},
                                      CaptureSink* capture = nullptr,
                                      RecurrentState* state = nullptr);

// Forward's checks of config, weights and ids (shape, dtype, range; the
// range check reads the ids back, a device sync on CUDA).
absl::Status CheckForwardInputs(const ModelConfig& config, const Weights& weights,
                                const torch::Tensor& input_ids);

// Forward without those checks, for loops that run one model many times
// (latency samples, where a sync per call would be timed too): the caller has
// run CheckForwardInputs on this config and weights, and vouches that the ids
// are int64 [batch, seq] in [0, vocab_size) (e.g. drawn there itself). The
// state's shapes are still checked (host-side, cheap).
absl::StatusOr<torch::Tensor> ForwardPrechecked(const ModelConfig& config,
                                                const Weights& weights,
                                                const torch::Tensor& input_ids,
                                                const CallContext& ctx = {},
                                                RecurrentState* state = nullptr);

}  // namespace icd

#endif  // ICD_CORE_SRC_FORWARD_H_
