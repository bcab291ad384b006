// The stream a CUDA model's calls run on. With EngineOptions::model_streams
// each CUDA model takes one of LibTorch's pool streams when it loads, so calls on different models are not
// queued behind each other on the device's default stream. Everything the
// model holds is allocated on that stream, so the caching allocator reuses its
// blocks in that stream's order only. A call waits for the stream before it
// returns: nothing it queued outlives its locks, and another model it read
// (MeasureLatency's compare_model) is done with before that model can change.
// A CUDA call also holds the engine's device gate, shared; a call that must
// have the devices to itself (the hardware counters count every kernel in the
// context) holds it exclusively. Every call takes its models' locks first and
// the gate last, so the gate adds no lock cycle. Internal to core.
#ifndef ICD_CORE_SRC_ENGINE_MODEL_STREAM_H_
#define ICD_CORE_SRC_ENGINE_MODEL_STREAM_H_

#include "torch_api.h"

#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <exception>
#include <iostream>
#include <mutex>
#include <optional>
#include <shared_mutex>

namespace icd::engine_internal {

// A stream of the high-priority pool of the model's device, or none on the
// CPU. Not the low-priority pool: a decode session captures its CUDA graph on
// a stream of that pool (forward/decode.cc), and a model whose stream were the
// capturing one would have its calls launched into another call's capture.
inline std::optional<c10::Stream> ModelStream(const torch::Device& device) {
  if (!device.is_cuda()) return std::nullopt;
  const c10::impl::DeviceGuardImplInterface* cuda = c10::impl::getDeviceGuardImpl(device.type());
  return cuda->getStreamFromGlobalPool(device.has_index() ? device : cuda->getDevice(),
                                       /*isHighPriority=*/true);
}

// For a call's duration: the model's stream is the current one and the gate
// is held; on leaving, the call waits for the stream.
class OnModelStream {
 public:
  // `on_cuda`: the model is on a CUDA device (the gate is taken); `stream`:
  // its own stream, when EngineOptions::model_streams gave it one.
  OnModelStream(bool on_cuda, std::optional<c10::Stream> stream, std::shared_mutex& gate,
                bool exclusive = false)
      : stream_(stream) {
    if (!on_cuda) return;
    if (exclusive) {
      exclusive_ = std::unique_lock<std::shared_mutex>(gate);
    } else {
      shared_ = std::shared_lock<std::shared_mutex>(gate);
    }
    if (stream_) guard_.reset_stream(*stream_);
  }
  OnModelStream(const OnModelStream&) = delete;
  OnModelStream& operator=(const OnModelStream&) = delete;
  ~OnModelStream() {
    if (!stream_) return;
    try {
      stream_->synchronize();
    } catch (const std::exception& e) {
      // A device fault is sticky: the next call on this device reports it.
      std::cerr << "icd: waiting for a model's stream failed: " << e.what() << "\n";
    }
  }

 private:
  std::optional<c10::Stream> stream_;
  std::shared_lock<std::shared_mutex> shared_;
  std::unique_lock<std::shared_mutex> exclusive_;
  c10::OptionalStreamGuard guard_;
};

}  // namespace icd::engine_internal

#endif  // ICD_CORE_SRC_ENGINE_MODEL_STREAM_H_
