// The symmetries docs/hybrid_symmetries.md derives for the hybrid models'
// blocks (issue 19), checked numerically before any block kind exists: each
// block written here from its definition in float64 LibTorch ops (HF's
// Llama-style attention with grouped KV heads and rotate_half rotary
// embeddings, the gated MLP, a top-k mixture of experts, RMS pre-norm), each
// claimed permutation applied to the weights, the output compared with the
// unpermuted block's (permuted where the group reaches the output). Every
// claim has a negative control: the permutation applied to only part of its
// members, or to what the derivation says is not free (rotary dimensions),
// moves the output.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "test_util.h"

namespace icd {
namespace {

constexpr double kExact = 1e-12;  // float64: summation order only
constexpr double kMoved = 1e-3;   // a control must move the output by more

torch::Tensor Random(std::vector<int64_t> sizes) {
  return torch::randn(sizes, torch::kFloat64);
}

// A random permutation of n, never the identity (n >= 2): a control that
// drew the identity would prove nothing.
torch::Tensor Perm(int64_t n) {
  torch::Tensor perm = torch::randperm(n, torch::kLong);
  if (n >= 2 && torch::equal(perm, torch::arange(n, torch::kLong))) perm = perm.roll(1);
  return perm;
}

// Rows `index` of each block of `block` rows: the block b's rows permuted by
// index (rows of a [blocks * block, ...] weight, one permutation per block).
torch::Tensor PermuteWithinBlocks(const torch::Tensor& weight, int64_t block,
                                  const std::vector<torch::Tensor>& per_block, int64_t axis) {
  std::vector<torch::Tensor> parts;
  for (size_t b = 0; b < per_block.size(); ++b) {
    parts.push_back(weight.narrow(axis, static_cast<int64_t>(b) * block, block)
                        .index_select(axis, per_block[b]));
  }
  return torch::cat(parts, axis);
}

// Whole blocks of `block` rows moved: block order[b] goes to place b.
torch::Tensor PermuteBlocks(const torch::Tensor& weight, int64_t block, const torch::Tensor& order,
                            int64_t axis) {
  std::vector<torch::Tensor> parts;
  for (int64_t b = 0; b < order.size(0); ++b) {
    parts.push_back(weight.narrow(axis, order[b].item<int64_t>() * block, block));
  }
  return torch::cat(parts, axis);
}

torch::Tensor RmsNorm(const torch::Tensor& x, const torch::Tensor& weight) {
  return x * torch::rsqrt(x.pow(2).mean(-1, true) + 1e-6) * weight;
}

// down(silu(gate x) · up x): gate and up [H, D], down [D, H].
torch::Tensor GatedMlp(const torch::Tensor& x, const torch::Tensor& gate, const torch::Tensor& up,
                       const torch::Tensor& down) {
  return torch::matmul(torch::silu(torch::matmul(x, gate.t())) * torch::matmul(x, up.t()),
                       down.t());
}

struct AttentionWeights {
  torch::Tensor q, k, v, o;  // [H·Dh, D], [KV·Dh, D], [KV·Dh, D], [D, H·Dh]
};

struct AttentionShape {
  int64_t heads, kv_heads, head_dim;
  int64_t rotary_dims;  // 0: none; else the first rotary_dims of each head, rotate_half style
};

// HF's rotate_half rotary embedding on the first `dims` of each head's
// [L, Dh] rows: dimension i pairs with i + dims/2 at frequency 10000^(-2i/dims).
torch::Tensor Rotary(const torch::Tensor& x, int64_t dims) {
  if (dims == 0) return x;
  const int64_t length = x.size(-2);
  const torch::Tensor position = torch::arange(length, torch::kFloat64).unsqueeze(1);
  const torch::Tensor frequency =
      torch::pow(10000.0, -torch::arange(0, dims, 2, torch::kFloat64) / static_cast<double>(dims));
  const torch::Tensor angle = torch::cat({position * frequency, position * frequency}, 1);
  const torch::Tensor rotated = x.narrow(-1, 0, dims);
  const torch::Tensor half = torch::cat(
      {-rotated.narrow(-1, dims / 2, dims / 2), rotated.narrow(-1, 0, dims / 2)}, -1);
  const torch::Tensor out = rotated * torch::cos(angle) + half * torch::sin(angle);
  return torch::cat({out, x.narrow(-1, dims, x.size(-1) - dims)}, -1);
}

// Causal attention over x [L, D]: query head h reads KV head h / (H / KV)
// (HF's repeat_kv), softmax written out (not SDPA), the heads' outputs
// concatenated into o.
torch::Tensor Attention(const torch::Tensor& x, const AttentionWeights& w,
                        const AttentionShape& s) {
  const int64_t length = x.size(0);
  const torch::Tensor q = torch::matmul(x, w.q.t()).view({length, s.heads, s.head_dim});
  const torch::Tensor k = torch::matmul(x, w.k.t()).view({length, s.kv_heads, s.head_dim});
  const torch::Tensor v = torch::matmul(x, w.v.t()).view({length, s.kv_heads, s.head_dim});
  const torch::Tensor mask =
      torch::ones({length, length}, torch::kBool).triu(1);  // true above the diagonal
  std::vector<torch::Tensor> heads;
  for (int64_t h = 0; h < s.heads; ++h) {
    const int64_t kv = h / (s.heads / s.kv_heads);
    const torch::Tensor qh = Rotary(q.select(1, h), s.rotary_dims);   // [L, Dh]
    const torch::Tensor kh = Rotary(k.select(1, kv), s.rotary_dims);  // [L, Dh]
    torch::Tensor scores = torch::matmul(qh, kh.t()) / std::sqrt(static_cast<double>(s.head_dim));
    scores = scores.masked_fill(mask, -INFINITY);
    heads.push_back(torch::matmul(torch::softmax(scores, -1), v.select(1, kv)));
  }
  return torch::matmul(torch::cat(heads, -1), w.o.t());
}

// A top-k mixture of gated-MLP experts (Mixtral / Jamba routing: softmax
// over the router's logits, the top k, their weights as they are).
struct Experts {
  torch::Tensor router;          // [E, D]
  torch::Tensor gate, up, down;  // [E, H, D], [E, H, D], [E, D, H]
};

torch::Tensor MixtureOfExperts(const torch::Tensor& x, const Experts& e, int64_t top_k) {
  const torch::Tensor weights = torch::softmax(torch::matmul(x, e.router.t()), -1);  // [L, E]
  const auto [chosen_weights, chosen] = torch::topk(weights, top_k, -1);
  torch::Tensor out = torch::zeros_like(x);
  for (int64_t t = 0; t < x.size(0); ++t) {
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t expert = chosen[t][j].item<int64_t>();
      out[t] += chosen_weights[t][j] * GatedMlp(x[t], e.gate[expert], e.up[expert], e.down[expert]);
    }
  }
  return out;
}

double Distance(const torch::Tensor& a, const torch::Tensor& b) {
  return testing::RelL2(a, b);
}

class HybridSymmetriesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::manual_seed(1901);
    x_ = Random({11, model_});  // 11 positions
  }
  const int64_t model_ = 24;
  torch::Tensor x_;
};

// Gated MLP hidden channels: gate and up rows and down columns by one σ.
TEST_F(HybridSymmetriesTest, GatedMlpHiddenChannels) {
  const int64_t hidden = 40;
  const torch::Tensor gate = Random({hidden, model_}), up = Random({hidden, model_}),
                      down = Random({model_, hidden});
  const torch::Tensor before = GatedMlp(x_, gate, up, down);
  const torch::Tensor sigma = Perm(hidden);
  EXPECT_LE(Distance(GatedMlp(x_, gate.index_select(0, sigma), up.index_select(0, sigma),
                              down.index_select(1, sigma)),
                     before),
            kExact);
  // A fused fc1 ([up | gate] halves, mamba_ssm's GatedMLP) takes σ on both halves.
  const torch::Tensor fc1 = torch::cat({up, gate}, 0);
  const torch::Tensor halves = PermuteWithinBlocks(fc1, hidden, {sigma, sigma}, 0);
  EXPECT_LE(Distance(GatedMlp(x_, halves.narrow(0, hidden, hidden), halves.narrow(0, 0, hidden),
                              down.index_select(1, sigma)),
                     before),
            kExact);
  // Control: the gate's rows alone.
  EXPECT_GT(Distance(GatedMlp(x_, gate.index_select(0, sigma), up, down.index_select(1, sigma)),
                     before),
            kMoved);
}

class AttentionSymmetriesTest : public HybridSymmetriesTest,
                                public ::testing::WithParamInterface<AttentionShape> {
 protected:
  void SetUp() override {
    HybridSymmetriesTest::SetUp();
    s_ = GetParam();
    w_ = {Random({s_.heads * s_.head_dim, model_}), Random({s_.kv_heads * s_.head_dim, model_}),
          Random({s_.kv_heads * s_.head_dim, model_}), Random({model_, s_.heads * s_.head_dim})};
    before_ = Attention(x_, w_, s_);
  }
  int64_t GroupSize() const { return s_.heads / s_.kv_heads; }
  AttentionShape s_{};
  AttentionWeights w_;
  torch::Tensor before_;
};

// KV heads, each moved with its query heads as one block (rotary or not: the
// heads' own dimensions stay where they are).
TEST_P(AttentionSymmetriesTest, KvHeadsWithTheirQueryHeads) {
  const torch::Tensor sigma = Perm(s_.kv_heads);
  const int64_t q_block = GroupSize() * s_.head_dim;
  AttentionWeights moved = {PermuteBlocks(w_.q, q_block, sigma, 0),
                            PermuteBlocks(w_.k, s_.head_dim, sigma, 0),
                            PermuteBlocks(w_.v, s_.head_dim, sigma, 0),
                            PermuteBlocks(w_.o, q_block, sigma, 1)};
  EXPECT_LE(Distance(Attention(x_, moved, s_), before_), kExact);
  if (s_.kv_heads > 1) {  // control: the query blocks stay
    moved.q = w_.q;
    moved.o = w_.o;
    EXPECT_GT(Distance(Attention(x_, moved, s_), before_), kMoved);
  }
}

// Query heads within their KV group: q rows and o columns, head by head.
TEST_P(AttentionSymmetriesTest, QueryHeadsWithinTheirGroup) {
  if (GroupSize() == 1) {
    SUCCEED() << "one query head per KV head: the only such permutation is the identity";
    return;
  }
  std::vector<torch::Tensor> per_group;
  for (int64_t g = 0; g < s_.kv_heads; ++g) per_group.push_back(Perm(GroupSize()));
  // Head order within each group, as whole heads of head_dim rows.
  auto heads = [&](const torch::Tensor& weight, int64_t axis) {
    std::vector<torch::Tensor> parts;
    for (int64_t g = 0; g < s_.kv_heads; ++g) {
      const torch::Tensor group =
          weight.narrow(axis, g * GroupSize() * s_.head_dim, GroupSize() * s_.head_dim);
      parts.push_back(PermuteBlocks(group, s_.head_dim, per_group[g], axis));
    }
    return torch::cat(parts, axis);
  };
  AttentionWeights moved = {heads(w_.q, 0), w_.k, w_.v, heads(w_.o, 1)};
  EXPECT_LE(Distance(Attention(x_, moved, s_), before_), kExact);
  moved.o = w_.o;  // control: the outputs' columns left behind
  EXPECT_GT(Distance(Attention(x_, moved, s_), before_), kMoved);
}

// The value / output head dimension: one π per KV head on its v rows and on
// the o columns of each of its query heads.
TEST_P(AttentionSymmetriesTest, ValueDimensionsPerKvHead) {
  std::vector<torch::Tensor> per_kv, per_query;
  for (int64_t g = 0; g < s_.kv_heads; ++g) {
    per_kv.push_back(Perm(s_.head_dim));
    for (int64_t r = 0; r < GroupSize(); ++r) per_query.push_back(per_kv.back());
  }
  AttentionWeights moved = {w_.q, w_.k, PermuteWithinBlocks(w_.v, s_.head_dim, per_kv, 0),
                            PermuteWithinBlocks(w_.o, s_.head_dim, per_query, 1)};
  EXPECT_LE(Distance(Attention(x_, moved, s_), before_), kExact);
  moved.o = w_.o;
  EXPECT_GT(Distance(Attention(x_, moved, s_), before_), kMoved);
}

// The query / key head dimension: one π per KV head on its k rows and the q
// rows of its query heads, free only where no rotary embedding fixes it: all
// of it without rotary, the dimensions past the rotary ones with a partial
// rotary. A π that moves rotary dimensions is the control.
TEST_P(AttentionSymmetriesTest, QueryKeyDimensionsOutsideTheRotary) {
  const int64_t free_dims = s_.head_dim - s_.rotary_dims;
  auto per_head = [&](bool touch_rotary) {
    torch::Tensor pi = torch::arange(s_.head_dim, torch::kLong);
    if (touch_rotary) {
      pi = Perm(s_.head_dim);
    } else if (free_dims > 1) {
      pi.narrow(0, s_.rotary_dims, free_dims).copy_(Perm(free_dims) + s_.rotary_dims);
    }
    return pi;
  };
  auto moved_with = [&](bool touch_rotary) {
    std::vector<torch::Tensor> per_kv, per_query;
    for (int64_t g = 0; g < s_.kv_heads; ++g) {
      per_kv.push_back(per_head(touch_rotary));
      for (int64_t r = 0; r < GroupSize(); ++r) per_query.push_back(per_kv.back());
    }
    return AttentionWeights{PermuteWithinBlocks(w_.q, s_.head_dim, per_query, 0),
                            PermuteWithinBlocks(w_.k, s_.head_dim, per_kv, 0), w_.v, w_.o};
  };
  EXPECT_LE(Distance(Attention(x_, moved_with(false), s_), before_), kExact);
  if (s_.rotary_dims > 0) {
    EXPECT_GT(Distance(Attention(x_, moved_with(true), s_), before_), kMoved)
        << "a permutation of rotary dimensions kept the output";
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, AttentionSymmetriesTest,
    ::testing::Values(AttentionShape{4, 4, 6, 0},   // multi-head, no rotary (Jamba)
                      AttentionShape{4, 2, 6, 0},   // grouped KV heads
                      AttentionShape{6, 1, 8, 8},   // one KV head, full rotary
                      AttentionShape{8, 2, 8, 4}),  // partial rotary (half the dims)
    [](const auto& param_info) {
      const AttentionShape& s = param_info.param;
      return "H" + std::to_string(s.heads) + "KV" + std::to_string(s.kv_heads) + "D" +
             std::to_string(s.head_dim) + "Rot" + std::to_string(s.rotary_dims);
    });

// Mixture of experts: the experts' order (router rows with the experts'
// weights) and each expert's hidden channels.
TEST_F(HybridSymmetriesTest, ExpertsOrderAndTheirHiddenChannels) {
  const int64_t experts = 6, hidden = 10, top_k = 2;
  const Experts e{Random({experts, model_}), Random({experts, hidden, model_}),
                  Random({experts, hidden, model_}), Random({experts, model_, hidden})};
  const torch::Tensor before = MixtureOfExperts(x_, e, top_k);
  const torch::Tensor sigma = Perm(experts);
  const Experts reordered{e.router.index_select(0, sigma), e.gate.index_select(0, sigma),
                          e.up.index_select(0, sigma), e.down.index_select(0, sigma)};
  EXPECT_LE(Distance(MixtureOfExperts(x_, reordered, top_k), before), kExact);
  Experts router_only = e;
  router_only.router = reordered.router;
  EXPECT_GT(Distance(MixtureOfExperts(x_, router_only, top_k), before), kMoved);

  Experts inside = e;
  const torch::Tensor tau = Perm(hidden);
  inside.gate = e.gate.index_select(1, tau);
  inside.up = e.up.index_select(1, tau);
  inside.down = e.down.index_select(2, tau);
  EXPECT_LE(Distance(MixtureOfExperts(x_, inside, top_k), before), kExact);
  inside.down = e.down;
  EXPECT_GT(Distance(MixtureOfExperts(x_, inside, top_k), before), kMoved);
}

// The residual stream through a pre-norm block of each kind: π over d_model
// on the norm weight, every input projection's columns (and the router's)
// and every output projection's rows permutes the block's output by π.
TEST_F(HybridSymmetriesTest, ResidualThroughEachBlockKind) {
  const torch::Tensor norm = Random({model_}) + 2.0;
  const AttentionShape s{4, 2, 6, 6};
  const AttentionWeights w{Random({24, model_}), Random({12, model_}), Random({12, model_}),
                           Random({model_, 24})};
  const torch::Tensor gate = Random({16, model_}), up = Random({16, model_}),
                      down = Random({model_, 16});
  const Experts e{Random({4, model_}), Random({4, 8, model_}), Random({4, 8, model_}),
                  Random({4, model_, 8})};
  const torch::Tensor pi = Perm(model_);
  const torch::Tensor x = x_.index_select(1, pi);
  const torch::Tensor n = norm.index_select(0, pi);
  auto residual = [](const torch::Tensor& r, const torch::Tensor& mixed) { return r + mixed; };

  const torch::Tensor attention = residual(x_, Attention(RmsNorm(x_, norm), w, s));
  const AttentionWeights wp{w.q.index_select(1, pi), w.k.index_select(1, pi),
                            w.v.index_select(1, pi), w.o.index_select(0, pi)};
  EXPECT_LE(Distance(residual(x, Attention(RmsNorm(x, n), wp, s)), attention.index_select(1, pi)),
            kExact);

  const torch::Tensor mlp = residual(x_, GatedMlp(RmsNorm(x_, norm), gate, up, down));
  EXPECT_LE(Distance(residual(x, GatedMlp(RmsNorm(x, n), gate.index_select(1, pi),
                                          up.index_select(1, pi), down.index_select(0, pi))),
                     mlp.index_select(1, pi)),
            kExact);

  const torch::Tensor moe = residual(x_, MixtureOfExperts(RmsNorm(x_, norm), e, 2));
  const Experts ep{e.router.index_select(1, pi), e.gate.index_select(2, pi),
                   e.up.index_select(2, pi), e.down.index_select(1, pi)};
  EXPECT_LE(Distance(residual(x, MixtureOfExperts(RmsNorm(x, n), ep, 2)), moe.index_select(1, pi)),
            kExact);
  // Control: the norm weight left in the old order.
  EXPECT_GT(Distance(residual(x, GatedMlp(RmsNorm(x, norm), gate.index_select(1, pi),
                                          up.index_select(1, pi), down.index_select(0, pi))),
                     mlp.index_select(1, pi)),
            kMoved);
}

}  // namespace
}  // namespace icd
