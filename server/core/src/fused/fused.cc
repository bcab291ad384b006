// Builds without CUDA kernels: every fused entry point declines, and the
// forward runs its LibTorch ops. The CUDA build defines them in fused_cuda.cc.
#include "fused/fused.h"

namespace icd::fused {

#ifndef ICD_HAVE_CUDA_FUSED
std::optional<torch::Tensor> CausalConvSilu(const torch::Tensor&, const torch::Tensor&,
                                            const torch::Tensor&, const torch::Tensor&,
                                            torch::Tensor*, bool) {
  return std::nullopt;
}

std::optional<AddRmsNormResult> AddRmsNorm(const torch::Tensor&, const torch::Tensor&,
                                           const torch::Tensor&, double) {
  return std::nullopt;
}

std::optional<torch::Tensor> GatedRmsNorm(const torch::Tensor&, const torch::Tensor&,
                                          const torch::Tensor&, int64_t, double, bool, bool) {
  return std::nullopt;
}

std::optional<torch::Tensor> FewRowsLinear(const torch::Tensor&, const torch::Tensor&,
                                           const torch::Tensor&, bool) {
  return std::nullopt;
}

std::optional<LinearConvStepResult> FewRowsLinearConvStep(const torch::Tensor&,
                                                          const torch::Tensor&,
                                                          const torch::Tensor&,
                                                          const torch::Tensor&,
                                                          const torch::Tensor&, torch::Tensor*,
                                                          int64_t, bool, bool) {
  return std::nullopt;
}
void ReloadLaunchSettings() {}
int64_t FewRowsLinearEarlyLaunches() { return 0; }
int64_t FewRowsLinearEarlyConvLaunches() { return 0; }
bool EarlyOperandsEnabled() { return false; }
int64_t GatedRmsNormEarlyLaunches() { return 0; }
#endif  // ICD_HAVE_CUDA_FUSED

}  // namespace icd::fused
