#include "forward/layer_signals.h"

#include <optional>
#include <utility>

#include "forward/forward_internal.h"

namespace icd::forward_internal {

LayerSignals LayerSignals::For(const LayerState* state, bool eligible) {
  LayerSignals signals;
  const int mode = fused::StepSignalsMode();
  if (!eligible || state == nullptr || !state->step_signals.defined() || mode == 0) {
    return signals;
  }
  signals.awaiting_ = mode == 1;
  signals.signals_ = state->step_signals;
  signals.ints_ = state->step_signals.data_ptr<int>();
  return signals;
}

void LayerSignals::Prepare(LayerState* state, const torch::Device& device) {
  if (!device.is_cuda() || state->step_signals.defined()) return;
  state->step_signals =
      torch::zeros({step_signals::kLayerInts}, torch::dtype(torch::kInt32).device(device));
}

int* LayerSignals::Signal(step_signals::Signal signal) const {
  return ints_ != nullptr ? ints_ + signal * step_signals::kSignalInts : nullptr;
}

bool LayerSignals::Published(step_signals::Signal signal) const {
  return ((published_ >> signal) & 1u) != 0;
}

void LayerSignals::MarkPublished(step_signals::Signal signal) { published_ |= 1u << signal; }

step_signals::Await LayerSignals::Await(step_signals::Signal signal) const {
  if (!awaiting_ || settled_ || !Published(signal)) return {};
  return step_signals::Await{Signal(signal)};
}

void LayerSignals::Settle() {
  if (settled_ || published_ == 0) return;
  fused::SettleStepSignals(signals_, published_);
  settled_ = true;
}

torch::Tensor LayerSignals::ClosingLinear(const torch::Tensor& input, const torch::Tensor& weight,
                                          const torch::Tensor& bias, bool weight_settled) {
  if (published_ == 0) return Linear(input, weight, bias, weight_settled);
  fused::StepLink link;
  link.reset_signals = ints_;
  std::optional<torch::Tensor> output =
      fused::FewRowsLinear(input, weight, bias, weight_settled, &link);
  if (output.has_value()) return *std::move(output);
  Settle();
  torch::Tensor linear = torch::linear(input, weight, bias);
  signals_.zero_();
  return linear;
}

}  // namespace icd::forward_internal
