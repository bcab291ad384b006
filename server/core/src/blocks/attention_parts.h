// The pieces of attention that blocks/attention.cc's mixer and Zamba2's
// shared block (blocks/shared_block.cc) both run. Internal to core.
#ifndef ICD_CORE_SRC_BLOCKS_ATTENTION_PARTS_H_
#define ICD_CORE_SRC_BLOCKS_ATTENTION_PARTS_H_

#include <cstdint>
#include <string>

#include "forward/forward_internal.h"
#include "model.h"

namespace icd::blocks {

// A group member's expansion "segments:C:S:O" (types.h), or "identity"
// where it is one: `block` indices of a group cover C copies at stride S
// from offset O.
std::string Segments(int64_t copies, int64_t stride, int64_t offset, int64_t block);

// [B, L, width] -> [B, heads, L, width / heads].
torch::Tensor SplitHeads(const torch::Tensor& x, int64_t heads);

// x [B, heads, L, head_dim] at positions first.. -> the same with its first
// a.rotary_dim turned (a.rotary_interleaved: pairs (2i, 2i+1); otherwise
// (i, i + rotary_dim / 2)), the angles' cos and sin in the compute dtype.
torch::Tensor Rotate(const torch::Tensor& x, int64_t first, const AttentionConfig& a,
                     const forward_internal::Precision& precision);

// Appends [B, KV, L, d] to a layer's cache (forward.h LayerState: `cache` a
// view of the first T positions of `storage`) and returns the new view of
// T + L positions.
torch::Tensor Append(const torch::Tensor& added, torch::Tensor* cache, torch::Tensor* storage);

// Causal softmax attention of L queries [B, H, L, d] at positions past ..
// past + L - 1 over T = past + L keys and values [B, KV, T, d]; query head h
// reads KV head h / per_kv. -> [B, H, L, d].
torch::Tensor Attend(const torch::Tensor& query, const torch::Tensor& key,
                     const torch::Tensor& value, int64_t past, int64_t per_kv, double scale,
                     const forward_internal::Precision& precision);

}  // namespace icd::blocks

#endif  // ICD_CORE_SRC_BLOCKS_ATTENTION_PARTS_H_
