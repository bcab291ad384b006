// Symmetry groups as data (each kind of mixer's, in blocks/) and the
// architecture-blind machinery that validates and applies them.
#ifndef ICD_CORE_SRC_SYMMETRY_H_
#define ICD_CORE_SRC_SYMMETRY_H_

#include <initializer_list>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "icd/core/types.h"
#include "model.h"

namespace icd {

// Groups with canonical tensor names, in a fixed order: residual first, then
// per layer. GroupInfo is the same type GetSymmetries reports.
using FamilySpec = std::vector<GroupInfo>;

FamilySpec BuildSpec(const ModelConfig& config);

// The group every block shares: the residual stream through the
// embedding, every block's norm, every mixer's projections (blocks/
// MixerKind::residual_members), the final norm and the head.
GroupInfo ResidualGroup(const ModelConfig& config);
GroupMember Member(std::string tensor, int axis, int64_t offset, int64_t length,
                   std::string expand = "identity");
// A member that moves whole tensors between `tensors` (expand "tensors",
// types.h): one per index of its group.
GroupMember TensorsMember(std::vector<std::string> tensors);
// A member of one slice of axis 0 (GroupMember::slice): `axis` >= 1 of the
// sub-tensor at `slice`, as Member otherwise.
GroupMember SliceMember(std::string tensor, int64_t slice, int axis, int64_t offset,
                        int64_t length);
// One member per offset for `length` rows of layer `layer`'s `module`.weight
// along axis 0, then the same for `module`.bias when the checkpoint has one:
// the blocks of a fused projection or convolution that move together.
void AddRowBlocks(std::vector<GroupMember>& members, int64_t layer, const std::string& module,
                  bool has_bias, std::initializer_list<int64_t> offsets, int64_t length);
// A group of `size` channels, unconstrained (block = whole = 0: set either
// by name where the group needs it).
GroupInfo NewGroup(std::string name, int64_t size, std::vector<GroupMember> members = {});

// At load: every member names an existing tensor and fits it, its expansion
// matches the group, and every weight is touched by some group (a forgotten
// tensor fails here, not silently). Internal error otherwise.
absl::Status CheckSpec(const FamilySpec& spec, const Weights& weights);

// Length, range, repeats, block and whole constraints. Messages name the group.
absl::Status ValidatePermutation(const GroupInfo& group, const std::vector<int64_t>& index);

// One group's permutation, for ApplyGathers. Non-owning.
struct GroupPermutation {
  const GroupInfo* group;
  const std::vector<int64_t>* index;  // must be valid for the group
};

// Applies the permutations in order (new[j] = old[index[j]] for every member
// of each group), composed: each tensor is gathered once, whatever the
// number of groups and axes touching it, and replaced by the gathered copy
// (the map's entries own their tensors; nothing aliases them). Peak extra
// memory is one tensor on the CPU, one batch of tensors (512 MB, or the
// largest tensor) on a GPU, where one kernel gathers a whole batch.
void ApplyGathers(const std::vector<GroupPermutation>& perms, Weights& weights);
void ApplyGather(const GroupInfo& group, const std::vector<int64_t>& index, Weights& weights);

std::vector<int64_t> InversePermutation(const std::vector<int64_t>& index);

}  // namespace icd

#endif  // ICD_CORE_SRC_SYMMETRY_H_
