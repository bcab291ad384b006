#include "forward/probe.h"

#include "absl/strings/numbers.h"
#include "forward/forward.h"
#include "icd/core/status_macros.h"
#include "splitmix64.h"

namespace icd {

torch::Tensor ProbeIds(const std::string& fingerprint, int64_t vocab, torch::Device device) {
  uint64_t seed = 0;
  if (!absl::SimpleHexAtoi(fingerprint, &seed)) seed = 0x1cd;
  SplitMix64 stream(seed);
  std::vector<int64_t> ids(static_cast<size_t>(kProbeBatch * kProbeSeq));
  for (int64_t& id : ids) {
    id = static_cast<int64_t>(stream.Below(vocab));
  }
  return torch::tensor(ids, torch::dtype(torch::kInt64))
      .reshape({kProbeBatch, kProbeSeq})
      .to(device);
}

absl::StatusOr<ProbeReference> TakeProbe(const ModelConfig& config, const Weights& weights,
                                         const std::string& fingerprint,
                                         const CallContext& ctx) {
  ProbeReference probe;
  const torch::Device device = weights.at(kEmbeddingTensor).device();
  // Only real tokens: mamba_ssm's padding rows are never produced by a tokenizer.
  probe.input_ids = ProbeIds(fingerprint, config.vocab_unpadded, device);
  ICD_ASSIGN_OR_RETURN(probe.logits, Forward(config, weights, probe.input_ids, ctx));
  return probe;
}

double DefaultTolerance(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat64: return 1e-10;
    case torch::kFloat32: return 1e-5;
    default: return 2e-2;  // bfloat16, float16
  }
}

CorrectnessReport CompareLogits(const torch::Tensor& now, const torch::Tensor& reference,
                                double tolerance) {
  torch::NoGradGuard no_grad;
  const torch::Tensor a = now.to(torch::kFloat64), b = reference.to(torch::kFloat64);
  const torch::Tensor diff = (a - b).abs();
  CorrectnessReport report;
  const double ref_norm = b.norm().item<double>();
  const double diff_norm = (a - b).norm().item<double>();
  report.rel_l2 = ref_norm > 0 ? diff_norm / ref_norm : diff_norm;
  report.max_abs = diff.max().item<double>();
  const double ref_max = b.abs().max().item<double>();
  report.max_rel = ref_max > 0 ? report.max_abs / ref_max : report.max_abs;
  const torch::Tensor agree = a.argmax(-1).eq(b.argmax(-1));
  report.top1_agreement = agree.to(torch::kFloat64).mean().item<double>();
  report.tokens = agree.numel();
  report.tolerance = tolerance;
  report.ok = std::isfinite(report.rel_l2) && report.rel_l2 <= tolerance;
  return report;
}

}  // namespace icd
