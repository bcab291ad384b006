// The Mamba-2 mixer (mamba_symmetries.md §3 d, e). in_proj rows are
// [z | x | B | C | dt], conv1d channels [x | B | C]; channel c = head*P + p;
// heads of one B/C group are contiguous.
#include "absl/strings/str_cat.h"
#include "blocks/mixer.h"

namespace icd::blocks {
namespace {

void Mamba2Groups(const ModelConfig& c, int64_t i, FamilySpec& spec) {
  const int64_t inner = c.d_inner, heads = c.nheads, headdim = c.headdim;
  const int64_t bc = c.ngroups * c.d_state;  // rows of B (and of C)
  const int64_t heads_per_group = heads / c.ngroups;
  const std::string per_head = absl::StrCat("per_head:", headdim);
  const std::string per_group = absl::StrCat("per_group:", c.d_state);

  // Offsets of the blocks.
  const int64_t z_row = 0, x_row = inner, b_row = 2 * inner, c_row = 2 * inner + bc,
                dt_row = 2 * inner + 2 * bc;
  const int64_t x_chan = 0, b_chan = inner, c_chan = inner + bc;

  auto t = [i](const char* suffix) { return LayerTensorName(i, suffix); };
  const std::string layer = absl::StrCat("layers.", i, ".");

  // Heads move inside their B/C group, or whole groups move with their B
  // and C rows; a head carries its z/x channels, dt, dt_bias, A and D.
  GroupInfo heads_group = NewGroup(layer + "heads", heads);
  heads_group.whole = heads_per_group;
  auto& h = heads_group.members;
  for (const char* proj : {"mixer.in_proj.weight", "mixer.in_proj.bias"}) {
    if (std::string(proj) == "mixer.in_proj.bias" && !c.proj_bias) continue;
    h.push_back(Member(t(proj), 0, z_row, inner, per_head));
    h.push_back(Member(t(proj), 0, x_row, inner, per_head));
    h.push_back(Member(t(proj), 0, b_row, bc, per_group));
    h.push_back(Member(t(proj), 0, c_row, bc, per_group));
    h.push_back(Member(t(proj), 0, dt_row, heads));
  }
  for (const char* conv : {"mixer.conv1d.weight", "mixer.conv1d.bias"}) {
    if (std::string(conv) == "mixer.conv1d.bias" && !c.conv_bias) continue;
    h.push_back(Member(t(conv), 0, x_chan, inner, per_head));
    h.push_back(Member(t(conv), 0, b_chan, bc, per_group));
    h.push_back(Member(t(conv), 0, c_chan, bc, per_group));
  }
  h.push_back(Member(t("mixer.dt_bias"), 0, 0, heads));
  h.push_back(Member(t("mixer.A_log"), 0, 0, heads));
  h.push_back(c.d_has_hdim ? Member(t("mixer.D"), 0, 0, inner, per_head)
                           : Member(t("mixer.D"), 0, 0, heads));
  if (c.gated_norm) h.push_back(Member(t("mixer.norm.weight"), 0, 0, inner, per_head));
  h.push_back(Member(t("mixer.out_proj.weight"), 1, 0, inner, per_head));
  spec.push_back(std::move(heads_group));

  // Positions inside each head: z and x channels together.
  GroupInfo headdim_group = NewGroup(layer + "headdim", inner);
  headdim_group.block = headdim;
  auto& d = headdim_group.members;
  AddRowBlocks(d, i, "mixer.in_proj", c.proj_bias, {z_row, x_row}, inner);
  AddRowBlocks(d, i, "mixer.conv1d", c.conv_bias, {x_chan}, inner);
  if (c.d_has_hdim) d.push_back(Member(t("mixer.D"), 0, 0, inner));
  if (c.gated_norm) d.push_back(Member(t("mixer.norm.weight"), 0, 0, inner));
  d.push_back(Member(t("mixer.out_proj.weight"), 1, 0, inner));
  spec.push_back(std::move(headdim_group));

  // State positions inside each group: B and C rows together.
  GroupInfo state_group = NewGroup(layer + "state", bc);
  state_group.block = c.d_state;
  auto& s = state_group.members;
  AddRowBlocks(s, i, "mixer.in_proj", c.proj_bias, {b_row, c_row}, bc);
  AddRowBlocks(s, i, "mixer.conv1d", c.conv_bias, {b_chan, c_chan}, bc);
  spec.push_back(std::move(state_group));
}

}  // namespace

const MixerKind kMamba2Mixer{"mamba2", kMamba2Shapes, Mamba2Groups,
                             ProjectionResidualMembers, forward_internal::Mamba2Mixer};

}  // namespace icd::blocks
