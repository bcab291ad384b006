// The settling kernel of step signals (step_signals.h): where a kernel that
// does not wait for signals comes after their producers (a fallback to
// LibTorch or cuBLAS), this one kernel waits for the signals first, as an
// ordinary launch, so that everything after it sees the producers' writes.
#include <cuda_runtime.h>

#include "scan/step_signals.cuh"

namespace icd::step_signals {
namespace {

__global__ void SettleKernel(const int* layer_signals, unsigned mask) {
  if (threadIdx.x != 0) return;
  for (int signal = 0; signal < kSignals; ++signal) {
    if ((mask >> signal) & 1u) PollFlag(Await{layer_signals + signal * kSignalInts});
  }
}

}  // namespace

int LaunchSettle(const int* layer_signals, unsigned mask, void* stream) {
  if (layer_signals == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  SettleKernel<<<1, 32, 0, static_cast<cudaStream_t>(stream)>>>(layer_signals, mask);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace icd::step_signals
