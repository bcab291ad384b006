// The Mamba-1 mixer, and FalconMamba's (its extra RMS normalisations are
// weightless and act per channel or over whole blocks, so it has exactly
// Mamba-1's tensors and groups): mamba_symmetries.md §3 a-d.
#include "absl/strings/str_cat.h"
#include "blocks/mixer.h"

namespace icd::blocks {
namespace {

void Mamba1Groups(const ModelConfig& c, int64_t i, FamilySpec& spec) {
  const int64_t inner = c.d_inner, state = c.d_state, dt_rank = c.dt_rank;
  auto t = [i](const char* suffix) { return LayerTensorName(i, suffix); };
  const std::string layer = absl::StrCat("layers.", i, ".");

  // d_inner: x and z halves of in_proj take the same permutation, because
  // the output pairs y[d] with silu(z[d]).
  GroupInfo inner_group = NewGroup(layer + "inner", inner);
  auto& m = inner_group.members;
  AddRowBlocks(m, i, "mixer.in_proj", c.proj_bias, {0, inner}, inner);
  AddRowBlocks(m, i, "mixer.conv1d", c.conv_bias, {0}, inner);
  m.push_back(Member(t("mixer.x_proj.weight"), 1, 0, inner));
  m.push_back(Member(t("mixer.dt_proj.weight"), 0, 0, inner));
  m.push_back(Member(t("mixer.dt_proj.bias"), 0, 0, inner));
  m.push_back(Member(t("mixer.A_log"), 0, 0, inner));
  m.push_back(Member(t("mixer.D"), 0, 0, inner));
  m.push_back(Member(t("mixer.out_proj.weight"), 1, 0, inner));
  spec.push_back(std::move(inner_group));

  // d_state: the B and C rows of x_proj and A's columns take the same one.
  // Jamba's weighted norms on B and C (over d_state) carry their weights.
  GroupInfo state_group = NewGroup(layer + "state", state,
                                   {Member(t("mixer.A_log"), 1, 0, state),
                                    Member(t("mixer.x_proj.weight"), 0, dt_rank, state),
                                    Member(t("mixer.x_proj.weight"), 0, dt_rank + state, state)});
  if (c.mixer_norm_weights) {
    state_group.members.push_back(Member(t("mixer.b_layernorm.weight"), 0, 0, state));
    state_group.members.push_back(Member(t("mixer.c_layernorm.weight"), 0, 0, state));
  }
  spec.push_back(std::move(state_group));

  // dt_rank: the low-rank factorisation x_proj[:R] -> dt_proj (through
  // Jamba's weighted norm over the rank).
  GroupInfo rank_group = NewGroup(layer + "dt_rank", dt_rank,
                                  {Member(t("mixer.x_proj.weight"), 0, 0, dt_rank),
                                   Member(t("mixer.dt_proj.weight"), 1, 0, dt_rank)});
  if (c.mixer_norm_weights) {
    rank_group.members.push_back(Member(t("mixer.dt_layernorm.weight"), 0, 0, dt_rank));
  }
  spec.push_back(std::move(rank_group));
}

}  // namespace

const MixerKind kMamba1Mixer{"mamba1", kMamba1Shapes, Mamba1Groups,
                             ProjectionResidualMembers, forward_internal::Mamba1Mixer};

}  // namespace icd::blocks
