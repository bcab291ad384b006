// A decode step layer's step signals (scan/step_signals.h), as the mixers
// use them: which of the layer's kernels published their parts, what the
// next kernel may wait for, and what a kernel that does not wait for signals
// needs first (Settle). Internal to core.
#ifndef ICD_CORE_SRC_FORWARD_LAYER_SIGNALS_H_
#define ICD_CORE_SRC_FORWARD_LAYER_SIGNALS_H_

#include "torch_api.h"

#include "forward/forward.h"
#include "fused/fused.h"
#include "scan/step_signals.h"

namespace icd::forward_internal {

class LayerSignals {
 public:
  // Off: nothing published, nothing to wait for.
  LayerSignals() = default;

  // The layer state's signals where ICD_DECODE_SIGNALS is on (fused::
  // StepSignalsMode), `eligible` (the caller's: an in-place step of one
  // token a row on CUDA with the session's settled constants, nothing
  // captured) and Prepare made them; else off.
  static LayerSignals For(const LayerState* state, bool eligible);

  // Where an in-place step first computes its constants: the state's
  // signals, zero, on `device` (CUDA only; kept out of a captured graph as
  // the constants are).
  static void Prepare(LayerState* state, const torch::Device& device);

  bool on() const { return ints_ != nullptr; }
  int* Signal(step_signals::Signal signal) const;  // null when off
  bool Published(step_signals::Signal signal) const;
  void MarkPublished(step_signals::Signal signal);
  // What a consumer waits for: the signal if it was published and not
  // settled since, else none.
  step_signals::Await Await(step_signals::Signal signal) const;

  // Before a kernel that waits only for the kernel ahead (or a LibTorch
  // op) reads what a published signal's producer writes: one kernel that
  // waits for every published signal. Nothing waits for signals after it.
  void Settle();

  // The layer's last projection (out_proj), which sets the signals back to
  // zero for the next step; where the few-rows kernel declines, LibTorch's
  // linear after Settle, then a zero fill.
  torch::Tensor ClosingLinear(const torch::Tensor& input, const torch::Tensor& weight,
                              const torch::Tensor& bias, bool weight_settled);

 private:
  torch::Tensor signals_;  // [kLayerInts] int32
  int* ints_ = nullptr;
  unsigned published_ = 0;  // bit s: signal s
  bool awaiting_ = true;    // ICD_DECODE_SIGNALS=2: published, never awaited
  bool settled_ = false;
};

}  // namespace icd::forward_internal

#endif  // ICD_CORE_SRC_FORWARD_LAYER_SIGNALS_H_
