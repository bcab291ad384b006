#include "forward/decode.h"

#include "devices.h"

#include <exception>
#include <mutex>
#include <optional>
#include <utility>

#ifdef ICD_HAVE_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/version.h>
#endif

#include "absl/strings/str_cat.h"
#include "blocks/shapes.h"
#include "icd/core/status_macros.h"

namespace icd::decode {

const char* ExecutionName(Execution execution) {
  switch (execution) {
    case Execution::kCudaGraph:
      return "cuda_graph";
    case Execution::kInPlace:
      return "in_place";
    case Execution::kEager:
      break;
  }
  return "eager";
}

#ifdef ICD_HAVE_CUDA
// LibTorch's CUDA generator registers each graph when its capture begins and
// unregisters it when the graph is destroyed, without a lock of its own: two
// captures at once raced there in the H200 soak (capture_begin's fill_ on an
// undefined tensor, INTERNAL). Captures and the graphs' destruction take
// turns under this lock; a capture is one step's launches.
static std::mutex& GraphRegistryMutex() {
  static std::mutex mutex;
  return mutex;
}
#endif

struct Session::Impl {
  const ModelConfig* config = nullptr;
  const Weights* weights = nullptr;
  RecurrentState state;
  std::optional<RecurrentState> marked;  // Mark's: eager and in-place sessions
  Execution execution = Execution::kEager;
  bool failed = false;  // a step failed: the state may be partly advanced
#ifdef ICD_HAVE_CUDA
  std::unique_ptr<at::cuda::CUDAGraph> graph;
  torch::Tensor step_ids;     // [B, 1] int64: the graph's input
  torch::Tensor step_logits;  // [B, 1, V] float32: its output
#endif
  ~Impl() {
#ifdef ICD_HAVE_CUDA
    const std::lock_guard<std::mutex> registry_lock(GraphRegistryMutex());
    graph.reset();  // a captured graph unregisters from LibTorch's generator
#endif
  }
};

namespace {

RecurrentState CopyOf(const RecurrentState& state) {
  RecurrentState copy = state;
  for (LayerState& layer : copy.layers) {
    // A layer without state (an MLP as its mixer) has undefined tensors.
    if (layer.conv_history.defined()) layer.conv_history = layer.conv_history.clone();
    if (layer.ssm_state.defined()) layer.ssm_state = layer.ssm_state.clone();
    if (layer.attention_keys.defined()) {
      layer.attention_keys = layer.attention_keys.clone();
      layer.attention_values = layer.attention_values.clone();
    }
  }
  return copy;
}

#ifdef ICD_HAVE_CUDA
// Captures one step into impl->graph, on a stream of its own (a capture may
// not run on the default stream). The state's tensors are written in place
// (LayerState::in_place), so every replay reads and advances the same ones.
absl::Status CaptureStep(Session::Impl* impl, const torch::Device& device, int64_t batch,
                         const CallContext& ctx) {
  const c10::cuda::CUDAGuard device_guard(device);
  impl->step_ids = torch::zeros({batch, 1}, torch::dtype(torch::kInt64).device(device));
  for (LayerState& layer : impl->state.layers) layer.in_place = true;

  c10::cuda::CUDAStream capture_stream = c10::cuda::getStreamFromPool(false, device.index());
  // The capture stream starts after the prefill (on the current stream).
  at::cuda::CUDAEvent prefill_done;
  prefill_done.record(c10::cuda::getCurrentCUDAStream(device.index()));
  prefill_done.block(capture_stream);
  const c10::cuda::CUDAStreamGuard stream_guard(capture_stream);
  // One step first, on a copy of the state: cuBLAS creates its handle and
  // workspace for this stream on first use, which a capture may not do.
  RecurrentState scratch = CopyOf(impl->state);
  ICD_RETURN_IF_ERROR(
      ForwardPrechecked(*impl->config, *impl->weights, impl->step_ids, ctx, &scratch).status());
  capture_stream.synchronize();
  // The constants that step derived from the weights stay out of the graph.
  for (size_t layer = 0; layer < scratch.layers.size(); ++layer) {
    impl->state.layers[layer].scan_decay = scratch.layers[layer].scan_decay;
    impl->state.layers[layer].scan_skip = scratch.layers[layer].scan_skip;
    impl->state.layers[layer].scan_delta_bias = scratch.layers[layer].scan_delta_bias;
  }

  impl->graph = std::make_unique<at::cuda::CUDAGraph>();
  const std::lock_guard<std::mutex> registry_lock(GraphRegistryMutex());
#if TORCH_VERSION_MAJOR >= 2
  // Thread-local: the server's other threads may allocate meanwhile.
  impl->graph->capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
#else
  impl->graph->capture_begin();
#endif
  // Nothing runs while capturing: the state is not advanced here.
  absl::StatusOr<torch::Tensor> logits =
      ForwardPrechecked(*impl->config, *impl->weights, impl->step_ids, ctx, &impl->state);
  impl->graph->capture_end();
  if (!logits.ok()) return logits.status();
  impl->step_logits = *std::move(logits);
  return absl::OkStatus();
}
#endif  // ICD_HAVE_CUDA

}  // namespace

Session::Session(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Session::~Session() = default;

Execution Session::execution() const { return impl_->execution; }

absl::StatusOr<std::unique_ptr<Session>> Session::Start(const ModelConfig& config,
                                                         const Weights& weights,
                                                         const torch::Tensor& prefill_ids,
                                                         Execution execution,
                                                         const CallContext& ctx) {
  auto impl = std::make_unique<Impl>();
  impl->config = &config;
  impl->weights = &weights;
  ICD_RETURN_IF_ERROR(Forward(config, weights, prefill_ids, ctx, nullptr, &impl->state).status());
  const torch::Device device = weights.at(kEmbeddingTensor).device();
  // An attention layer's cache grows with every token, and experts pick
  // their rows by value (a host sync): such a step has no fixed shapes to
  // replay, and the model decodes eagerly.
  // A model placed over several devices runs eagerly too: one graph would
  // span their streams.
  const bool replayable = !blocks::Attends(config) && config.moe.experts == 0 &&
                          DevicesOf(weights).size() == 1;
  if (execution == Execution::kInPlace && replayable) {
    for (LayerState& layer : impl->state.layers) layer.in_place = true;
    impl->execution = Execution::kInPlace;
  }
  if (execution == Execution::kCudaGraph && device.is_cuda() && replayable) {
#ifdef ICD_HAVE_CUDA
    try {
      torch::NoGradGuard no_grad;
      ICD_RETURN_IF_ERROR(CaptureStep(impl.get(), device, prefill_ids.size(0), ctx));
      impl->execution = Execution::kCudaGraph;
    } catch (const std::exception& error) {
      return InternalFailure("decode graph capture", error.what());
    }
#endif
  }
  return std::unique_ptr<Session>(new Session(std::move(impl)));
}

absl::StatusOr<torch::Tensor> Session::Step(const torch::Tensor& ids, const CallContext& ctx) {
  if (impl_->failed) {
    return absl::FailedPreconditionError(
        "decode session: an earlier step failed, its state may be partly advanced");
  }
#ifdef ICD_HAVE_CUDA
  if (impl_->graph != nullptr) {
    ICD_RETURN_IF_ERROR(CheckCall(ctx, "decode step"));
    try {
      torch::NoGradGuard no_grad;
      impl_->step_ids.copy_(ids);  // on the current stream, as the replay
      impl_->graph->replay();
    } catch (const std::exception& error) {
      impl_->failed = true;
      return InternalFailure("decode step", error.what());
    }
    return impl_->step_logits;
  }
#endif
  // A call stopped before the step leaves any session as it was.
  ICD_RETURN_IF_ERROR(CheckCall(ctx, "decode step"));
  absl::StatusOr<torch::Tensor> logits =
      ForwardPrechecked(*impl_->config, *impl_->weights, ids, ctx, &impl_->state);
  // Eager steps replace the state only on success (forward.h): a failed one
  // leaves it as it was. An in-place one may have written part of it.
  if (!logits.ok() && impl_->execution == Execution::kInPlace) impl_->failed = true;
  return logits;
}

absl::Status Session::Mark() {
  if (impl_->execution == Execution::kCudaGraph || impl_->failed) {
    return absl::FailedPreconditionError(
        "decode session: only a session that is not a graph and has not failed can mark its "
        "state");
  }
  // Eager steps replace the tensors, so sharing them is enough; in-place
  // steps write into them.
  impl_->marked =
      impl_->execution == Execution::kInPlace ? CopyOf(impl_->state) : impl_->state;
  return absl::OkStatus();
}

absl::Status Session::Rewind() {
  if (!impl_->marked.has_value() || impl_->failed) {
    return absl::FailedPreconditionError("decode session: no marked state to rewind to");
  }
  if (impl_->execution != Execution::kInPlace) {
    impl_->state = *impl_->marked;
    return absl::OkStatus();
  }
  // Into the state's own tensors, which the in-place steps write; the scan's
  // constants as they were at Mark (undefined before the first step, which
  // computes them: the step after Rewind launches what the step after Mark
  // did).
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < impl_->state.layers.size(); ++i) {
    LayerState& layer = impl_->state.layers[i];
    const LayerState& marked = impl_->marked->layers[i];
    if (layer.conv_history.defined()) layer.conv_history.copy_(marked.conv_history);
    if (layer.ssm_state.defined()) layer.ssm_state.copy_(marked.ssm_state);
    layer.scan_decay = marked.scan_decay;
    layer.scan_skip = marked.scan_skip;
    layer.scan_delta_bias = marked.scan_delta_bias;
  }
  return absl::OkStatus();
}

}  // namespace icd::decode
