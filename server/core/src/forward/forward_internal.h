// Pieces shared by forward.cc and the per-family mixers. Internal to core.
#ifndef ICD_CORE_SRC_FORWARD_INTERNAL_H_
#define ICD_CORE_SRC_FORWARD_INTERNAL_H_

#include "torch_api.h"

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "forward/forward.h"
#include "model.h"

namespace icd::forward_internal {

// The dtypes one forward works in. `compute` is the weights' dtype (matmuls,
// conv); `accumulate` is max(float32, compute): norms, residual stream and the
// scan state, so that float64 models stay float64 end to end (permutation
// equivariance to ~1e-12) and bfloat16 models reduce in float32 as HF does.
struct Precision {
  torch::ScalarType compute = torch::kFloat32;
  torch::ScalarType accumulate = torch::kFloat32;
};

// "backbone.layers.{layer}.mixer.{suffix}".
inline std::string MixerTensorName(int64_t layer, const std::string& suffix) {
  return LayerTensorName(layer, "mixer." + suffix);
}

// InvalidArgument naming the tensor when it is absent from `weights` or its
// shape differs from `shape`.
absl::Status CheckTensor(const Weights& weights, const std::string& name,
                         const std::vector<int64_t>& shape);

// weights.at(name) cast to `dtype` (a no-op when it already has it).
torch::Tensor TensorAs(const Weights& weights, const std::string& name,
                       torch::ScalarType dtype);
// As TensorAs, or an undefined tensor when the name is absent.
torch::Tensor OptionalTensorAs(const Weights& weights, const std::string& name,
                               torch::ScalarType dtype);

// torch::linear(input, weight, bias); on CUDA, inputs of a few rows (a
// decode step) through icd's few-rows kernel (fused/fused.h), one pass over
// the weight. `weight_settled`: the model's own tensor (fused::FewRowsLinear).
torch::Tensor Linear(const torch::Tensor& input, const torch::Tensor& weight,
                     const torch::Tensor& bias = {}, bool weight_settled = false);

// `view` is `weights`' tensor `name` itself (TensorAs made no copy): a
// weight settled before the forward began.
bool IsModelTensor(const Weights& weights, const std::string& name, const torch::Tensor& view);

// Weightless RMS normalisation over the last axis, reduced in `accumulate`
// and returned in `accumulate`: v / sqrt(mean(v^2) + eps).
torch::Tensor RmsNormalize(const torch::Tensor& values, double eps,
                           torch::ScalarType accumulate);

// Positions (batch x time) one pass of the CPU forward, or of a depthwise
// conv, takes at most before the rest goes in a further chunk of time (a
// few ms of work each on a 2-core CPU; forward.h).
inline constexpr int64_t kPositionsPerChunk = 4096;

// Depthwise causal conv over time, before the activation. values [B, L, C];
// weight [C, 1, K]; bias [C] or undefined. Returns [B, L, C].
// `history` [B, C, K-1] holds the inputs before values[:, 0] (the conv runs
// over [history | values] without padding); undefined means zeros, computed
// as before by padding (bitwise the stateless result). `next_history`
// (optional) receives the last K-1 inputs of [history | values]; it may
// point at `history` itself. On the CPU, inputs over kPositionsPerChunk
// positions go in chunks of time, checking `ctx` between them
// (CheckCallInLayer; `layer` names where). With `then_silu`, silu of the
// conv: on the CPU in float32 inside the conv's own pass, elsewhere
// torch::silu after it.
torch::Tensor CausalDepthwiseConv(const torch::Tensor& values, const torch::Tensor& weight,
                                  const torch::Tensor& bias,
                                  const torch::Tensor& history = torch::Tensor(),
                                  torch::Tensor* next_history = nullptr,
                                  const CallContext& ctx = CallContext{}, int64_t layer = 0,
                                  bool then_silu = false);

// The forward's side of a CaptureSink (forward.h): a null sink wants nothing,
// so the mixers ask without checking for one.
class Capture {
 public:
  explicit Capture(CaptureSink* sink) : sink_(sink) {}

  bool Wants(const std::string& group) const { return sink_ != nullptr && sink_->Wants(group); }

  // values [..., channels] -> rows [n, channels], handed out when wanted.
  void Add(const std::string& group, const torch::Tensor& values) const;

 private:
  CaptureSink* sink_;
};

// A stop that the call's context asked for in the middle of a layer. The
// mixers compute tensors, not statuses, so a failed CheckCall between chunks
// of a scan is thrown as this (not a std::exception, so that no generic
// handler takes it for a LibTorch error) and the forward's one guard returns
// its status. Never leaves forward.cc's entry points.
struct CallStopped {
  absl::Status status;
};

// CheckCall(ctx) inside a layer's scan; throws CallStopped when it fails.
void CheckCallInLayer(const CallContext& ctx, int64_t layer);

// How often a sequential scan on the CPU checks the call's context: after
// about `values` state values updated (state values per step × steps), and
// at most every `most_steps` steps. Each chunk costs a slice of the inputs,
// a carried state and a share of a final concatenation, so chunks should
// not be smaller than the stop bound (CallContext: about 100 ms) needs.
struct ScanCheck {
  int64_t values;
  int64_t most_steps;
};
// Mamba-1's scan takes an exp per state value and step: 2^20 values are
// 1.5 ms of a mamba-2.8b-sized layer in float32 on one core of the 2-core
// VM, 3-4 ms in float64 (2^24 were 32 and 103-114 ms).
inline constexpr ScanCheck kSelectiveScanCheck{int64_t{1} << 20, 256};
// Mamba-2's takes one exp per head and step: 2^24 values are 1.5 ms of a
// mamba2-2.7b-sized layer in float32, 4 ms in float64; at 2^20 / 256 a
// 1024-token layer of mamba2-pydoc's Evaluate was 8 chunks and a tenth of
// the scan's time. At most 1024 steps: a layer of a 2048-token chunk of
// the forward still checks inside itself.
inline constexpr ScanCheck kStateSpaceScanCheck{int64_t{1} << 24, 1024};

// Time steps between two checks for `state_elements` state values updated
// per step: at least 1.
int64_t ScanStepsPerCheck(int64_t state_elements, const ScanCheck& check);

// "layers.{layer}.{suffix}": a per-layer group's name (blocks/*.cc).
std::string LayerGroupName(int64_t layer, const std::string& suffix);

// One mixer: normed [B, L, d_model] in precision.compute -> [B, L, d_model]
// in precision.compute. Mamba1Mixer also runs FalconMamba (config.family).
// Each hands its layer's groups to `capture` (forward.h lists the points).
// `state` (optional, forward.h LayerState): undefined tensors start from
// zeros; on return it holds the state after the last token. The sequential
// scans check `ctx` every ScanStepsPerCheck steps (CheckCallInLayer).
torch::Tensor Mamba1Mixer(const ModelConfig& config, const Weights& weights, int64_t layer,
                          const Precision& precision, const torch::Tensor& normed,
                          const Capture& capture, LayerState* state, const CallContext& ctx);
torch::Tensor Mamba2Mixer(const ModelConfig& config, const Weights& weights, int64_t layer,
                          const Precision& precision, const torch::Tensor& normed,
                          const Capture& capture, LayerState* state, const CallContext& ctx);

}  // namespace icd::forward_internal

#endif  // ICD_CORE_SRC_FORWARD_INTERNAL_H_
