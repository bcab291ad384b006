// The probe reference: fixed token ids drawn from the model's fingerprint and
// the logits the model gave on them at load, so that verifying a permuted
// model needs no second copy of it.
#ifndef ICD_CORE_SRC_PROBE_H_
#define ICD_CORE_SRC_PROBE_H_

#include "torch_api.h"

#include <string>

#include "absl/status/statusor.h"
#include "icd/core/types.h"
#include "model.h"

namespace icd {

inline constexpr int64_t kProbeBatch = 2;
inline constexpr int64_t kProbeSeq = 32;

struct ProbeReference {
  torch::Tensor input_ids;  // int64 [kProbeBatch, kProbeSeq], on the model's device
  torch::Tensor logits;     // float32 [kProbeBatch, kProbeSeq, vocab]
};

// Same fingerprint, same ids, on every machine (splitmix64, not torch's RNG).
torch::Tensor ProbeIds(const std::string& fingerprint, int64_t vocab, torch::Device device);

absl::StatusOr<ProbeReference> TakeProbe(const ModelConfig& config, const Weights& weights,
                                         const std::string& fingerprint,
                                         const CallContext& ctx = {});

// Default `ok` tolerance on relative L2 (design.md "Tolerances").
double DefaultTolerance(torch::ScalarType dtype);

// Relative L2, max abs, max relative (max abs over max |reference|) and
// top-1 agreement of `now` against `reference` (same shape).
CorrectnessReport CompareLogits(const torch::Tensor& now, const torch::Tensor& reference,
                                double tolerance);

}  // namespace icd

#endif  // ICD_CORE_SRC_PROBE_H_
