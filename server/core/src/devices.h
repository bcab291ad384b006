// The devices a model's weights are on: one, or several where it is placed
// over them (LoadOptions::placement), and waiting for their work. Internal to
// core.
#ifndef ICD_CORE_SRC_DEVICES_H_
#define ICD_CORE_SRC_DEVICES_H_

#include "torch_api.h"

#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <vector>

#include "model.h"

namespace icd {

// Waits for the work queued on the current stream of `device` (a CUDA one;
// nothing on the CPU). Not torch::cuda::synchronize: a device-wide wait is
// refused while another thread captures a CUDA graph, and invalidates that
// capture.
inline void SynchronizeCurrentStream(const torch::Device& device) {
  if (!device.is_cuda()) return;
  const c10::impl::DeviceGuardImplInterface* cuda = c10::impl::getDeviceGuardImpl(device.type());
  cuda->getStream(device.has_index() ? device : cuda->getDevice()).synchronize();
}

// Every device that holds a weight, the embedding's first.
inline std::vector<torch::Device> DevicesOf(const Weights& weights) {
  std::vector<torch::Device> devices{weights.at(kEmbeddingTensor).device()};
  for (const auto& [name, tensor] : weights) {
    if (!tensor.defined()) continue;
    bool seen = false;
    for (const torch::Device& device : devices) seen = seen || device == tensor.device();
    if (!seen) devices.push_back(tensor.device());
  }
  return devices;
}

}  // namespace icd

#endif  // ICD_CORE_SRC_DEVICES_H_
