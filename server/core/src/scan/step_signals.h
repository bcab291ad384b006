// Step signals (ICD_DECODE_SIGNALS): inside one layer of a decode step, a
// kernel may start on the part of a projection's output it needs before the
// whole projection has finished. Mamba-1's x_proj needs only in_proj's x
// half, and its state step needs z only at the end; Mamba-2's state step
// needs xBC and dt, its gated norm z. So each block of a producer counts the
// features (or rows) it has written into a signal, and the last block to
// count raises the signal's flags; a consumer waits for the flags it needs
// instead of for the whole kernel ahead (griddepcontrol.wait). The kernels
// between in_proj and the layer's out_proj then run while in_proj's second
// part still streams its weights.
//
// A signal is a counter and kFlagLines flags, each alone in a 128-byte line
// so that the consumers' polls spread over the L2's slices instead of
// queueing at one (and slowing the weight streams beside them). The layer's
// out_proj, which waits for the whole chain the ordinary way, sets them back
// to zero for the next step.
#ifndef ICD_CORE_SRC_SCAN_STEP_SIGNALS_H_
#define ICD_CORE_SRC_SCAN_STEP_SIGNALS_H_

#include <cstdint>

namespace icd::step_signals {

// A layer's signals, in order.
enum Signal : int {
  kInProjFirst = 0,  // in_proj's features wanted first (Mamba-1 x; Mamba-2 xBC and dt)
  kInProjRest = 1,   // the rest (z)
  kProjection = 2,   // Mamba-1's x_proj (dt, B, C)
  kStateStep = 3,    // Mamba-2's state step (y)
  kSignals = 4,
};

inline constexpr int kLineInts = 32;   // 128 bytes
inline constexpr int kFlagLines = 32;  // flags per signal
inline constexpr int kSignalInts = (1 + kFlagLines) * kLineInts;  // the counter's line, then the flags'
inline constexpr int kLayerInts = kSignals * kSignalInts;         // int32s per layer

// A signal a kernel waits for: its kSignalInts ints; null: none.
struct Await {
  const int* signal = nullptr;
};

// Up to three signals a kernel waits for instead of the kernel ahead; with
// none set it waits for the kernel ahead.
struct Awaits {
  Await first;
  Await second;
  Await third;
  bool any() const { return first.signal != nullptr; }
};

// What a producer counts: its work items (features, rows) in the kernel's
// order, the first first_items into `first`, the rest into `rest`; the block
// that brings a signal's count to its total raises its flags.
struct Publish {
  int* first = nullptr;  // null: nothing published
  int* rest = nullptr;   // may be null when first_items == total
  int64_t first_items = 0;
  int64_t total = 0;
};

// Enqueues on `stream` (a cudaStream_t) one ordinary kernel that returns
// once every signal s of `layer_signals` with bit s of `mask` set is raised
// (CUDA builds: step_signals.cu). Returns 0 or a cudaError_t value.
int LaunchSettle(const int* layer_signals, unsigned mask, void* stream);

}  // namespace icd::step_signals

#endif  // ICD_CORE_SRC_SCAN_STEP_SIGNALS_H_
