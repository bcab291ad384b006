// Each family's forward in LibTorch, matching HuggingFace's PyTorch path.
#ifndef ICD_CORE_SRC_FORWARD_H_
#define ICD_CORE_SRC_FORWARD_H_

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "icd/core/types.h"
#include "model.h"

namespace icd {

// input_ids: int64 [batch, seq] on the weights' device. Returns float32
// logits [batch, seq, vocab_size]. Computes in the weights' dtype; norms
// reduce in at least float32 (float64 models in float64). Polls ctx between
// layers (Cancelled / DeadlineExceeded).
absl::StatusOr<torch::Tensor> Forward(const ModelConfig& config,
                                      const Weights& weights,
                                      const torch::Tensor& input_ids,
                                      const CallContext& ctx = {});

}  // namespace icd

#endif  // ICD_CORE_SRC_FORWARD_H_
