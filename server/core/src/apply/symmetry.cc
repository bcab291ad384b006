#include "apply/symmetry.h"

#include <deque>
#include <map>
#include <set>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "apply/gather/permute_gather.h"
#include "blocks/mixer.h"

namespace icd {
namespace {

// A member's expansion, parsed: how many slice positions one group index
// covers, and how to map a slice position to its source position.
struct Expansion {
  enum Kind { kIdentity, kPerHead, kPerGroup, kSegments } kind = kIdentity;
  int64_t width = 1;  // P for per_head, N for per_group
  // segments:COPIES:STRIDE:OFFSET
  int64_t copies = 1, stride = 1, offset = 0;
};

bool ParsePositive(absl::string_view text, int64_t* out, bool zero_allowed = false) {
  return absl::SimpleAtoi(text, out) && (*out > 0 || (zero_allowed && *out == 0));
}

bool ParseExpansion(const std::string& text, Expansion* out) {
  if (text == "identity") {
    *out = {Expansion::kIdentity, 1};
    return true;
  }
  if (text.rfind("segments:", 0) == 0) {
    const std::vector<absl::string_view> parts = absl::StrSplit(text, ':');
    Expansion e{Expansion::kSegments, 1};
    if (parts.size() != 4 || !ParsePositive(parts[1], &e.copies) ||
        !ParsePositive(parts[2], &e.stride) || !ParsePositive(parts[3], &e.offset, true)) {
      return false;
    }
    *out = e;
    return true;
  }
  for (auto [prefix, kind] : {std::pair{"per_head:", Expansion::kPerHead},
                              std::pair{"per_group:", Expansion::kPerGroup}}) {
    const std::string p = prefix;
    if (text.rfind(p, 0) == 0) {
      int64_t width = 0;
      if (!ParsePositive(text.substr(p.size()), &width)) return false;
      *out = {kind, width};
      return true;
    }
  }
  return false;
}

int64_t ExpectedLength(const GroupInfo& group, const Expansion& e) {
  switch (e.kind) {
    case Expansion::kIdentity: return group.size;
    case Expansion::kPerHead: return group.size * e.width;
    case Expansion::kPerGroup: return group.whole > 0 ? group.size / group.whole * e.width : -1;
    case Expansion::kSegments:
      return group.block > 0 && e.offset + group.block <= e.stride
                 ? group.size / group.block * e.copies * e.stride
                 : -1;
  }
  return -1;
}

// Source position (within the slice) of slice position k.
int64_t SourcePosition(const GroupInfo& group, const Expansion& e,
                       const std::vector<int64_t>& index, int64_t k) {
  switch (e.kind) {
    case Expansion::kIdentity: return index[static_cast<size_t>(k)];
    case Expansion::kPerHead:
      return index[static_cast<size_t>(k / e.width)] * e.width + k % e.width;
    case Expansion::kPerGroup: {
      const int64_t group_id = k / e.width;
      const int64_t first_head = index[static_cast<size_t>(group_id * group.whole)];
      return first_head / group.whole * e.width + k % e.width;
    }
    case Expansion::kSegments: {
      // Segment s holds copy s % copies of block s / copies at [offset,
      // offset + block); the rest of the segment stays.
      const int64_t block = group.block;
      const int64_t segment = k / e.stride, within = k % e.stride - e.offset;
      if (within < 0 || within >= block) return k;
      const int64_t first = segment / e.copies * block;
      return segment * e.stride + e.offset +
             (index[static_cast<size_t>(first + within)] - first);
    }
  }
  return k;
}

}  // namespace

GroupMember Member(std::string tensor, int axis, int64_t offset, int64_t length,
                   std::string expand) {
  GroupMember member;
  member.tensor = std::move(tensor);
  member.axis = axis;
  member.offset = offset;
  member.length = length;
  member.expand = std::move(expand);
  return member;
}

GroupMember SliceMember(std::string tensor, int64_t slice, int axis, int64_t offset,
                        int64_t length) {
  GroupMember member = Member(std::move(tensor), axis, offset, length);
  member.slice = slice;
  return member;
}

GroupMember TensorsMember(std::vector<std::string> tensors) {
  GroupMember member;
  member.tensor = tensors.empty() ? std::string() : tensors.front();
  member.length = static_cast<int64_t>(tensors.size());
  member.expand = "tensors";
  member.tensors = std::move(tensors);
  return member;
}

void AddRowBlocks(std::vector<GroupMember>& members, int64_t layer, const std::string& module,
                  bool has_bias, std::initializer_list<int64_t> offsets, int64_t length) {
  for (const char* part : {".weight", ".bias"}) {
    if (std::string(part) == ".bias" && !has_bias) continue;
    for (int64_t offset : offsets) {
      members.push_back(Member(LayerTensorName(layer, module + part), 0, offset, length));
    }
  }
}

GroupInfo NewGroup(std::string name, int64_t size, std::vector<GroupMember> members) {
  GroupInfo group;
  group.name = std::move(name);
  group.size = size;
  group.members = std::move(members);
  return group;
}

// The residual stream: one permutation of d_model for the whole model. Every
// block norm, in_proj's input columns, out_proj's output rows, the final norm
// and both ends of the vocabulary projection (§3 d).
GroupInfo ResidualGroup(const ModelConfig& c) {
  const int64_t width = c.d_model;
  GroupInfo group = NewGroup("residual", width);
  auto& m = group.members;
  m.push_back(Member(kEmbeddingTensor, 1, 0, width));
  for (int64_t i = 0; i < c.n_layer; ++i) {
    m.push_back(Member(LayerTensorName(i, "norm.weight"), 0, 0, width));
    if (c.layer_norm) m.push_back(Member(LayerTensorName(i, "norm.bias"), 0, 0, width));
    blocks::MixerAt(c, i).residual_members(c, i, m);
    if (c.parallel_attention) blocks::kAttentionMixer.residual_members(c, i, m);
    if (blocks::HasMlp(c)) blocks::MlpResidualMembers(c, i, m);
  }
  blocks::SharedBlockResidualMembers(c, m);
  m.push_back(Member("backbone.norm_f.weight", 0, 0, width));
  if (c.layer_norm) m.push_back(Member("backbone.norm_f.bias", 0, 0, width));
  // Tied: the head is the embedding tensor, already permuted above.
  if (!c.tied) m.push_back(Member(kHeadTensor, 1, 0, width));
  return group;
}

FamilySpec BuildSpec(const ModelConfig& config) {
  FamilySpec spec{ResidualGroup(config)};
  for (int64_t layer = 0; layer < config.n_layer; ++layer) {
    blocks::MixerAt(config, layer).groups(config, layer, spec);
    if (config.parallel_attention) blocks::kAttentionMixer.groups(config, layer, spec);
    if (blocks::HasMlp(config)) blocks::MlpGroups(config, layer, spec);
  }
  blocks::SharedBlockGroups(config, spec);
  return spec;
}

namespace {

absl::Status CheckSpecOf(const FamilySpec& spec, const Weights& weights) {
  std::set<std::string> touched;
  for (const GroupInfo& group : spec) {
    if (group.size <= 0 || (group.block > 0 && group.size % group.block != 0) ||
        (group.whole > 0 && group.size % group.whole != 0)) {
      return absl::InternalError(absl::StrCat("symmetry spec: group '", group.name,
                                              "' has inconsistent size/block/whole"));
    }
    for (const GroupMember& member : group.members) {
      if (member.expand == "tensors") {
        // Whole tensors, one per index, all of one shape.
        if (static_cast<int64_t>(member.tensors.size()) != group.size) {
          return absl::InternalError(absl::StrCat("symmetry spec: group '", group.name,
                                                  "' moves ", member.tensors.size(),
                                                  " whole tensors, not ", group.size));
        }
        for (const std::string& name : member.tensors) {
          auto it = weights.find(name);
          if (it == weights.end() ||
              it->second.sizes() != weights.at(member.tensors.front()).sizes()) {
            return absl::InternalError(absl::StrCat("symmetry spec: group '", group.name,
                                                    "' moves '", name,
                                                    "', missing or of another shape"));
          }
          touched.insert(name);
        }
        continue;
      }
      auto it = weights.find(member.tensor);
      if (it == weights.end()) {
        return absl::InternalError(absl::StrCat("symmetry spec: group '", group.name,
                                                "' names missing tensor '", member.tensor, "'"));
      }
      const torch::Tensor& tensor = it->second;
      Expansion e;
      if ((member.slice >= 0 && (member.axis < 1 || member.slice >= tensor.size(0))) ||
          member.axis < 0 || member.axis >= tensor.dim() || !ParseExpansion(member.expand, &e) ||
          ExpectedLength(group, e) != member.length || member.offset < 0 ||
          member.offset + member.length > tensor.size(member.axis)) {
        return absl::InternalError(absl::StrCat(
            "symmetry spec: group '", group.name, "' member ", member.tensor, " axis ",
            member.axis, " [", member.offset, ", +", member.length, ") ", member.expand,
            " does not fit the tensor or the group"));
      }
      touched.insert(member.tensor);
    }
  }
  std::vector<std::string> untouched;
  for (const auto& [name, tensor] : weights) {
    if (touched.count(name) == 0) untouched.push_back(name);
  }
  if (!untouched.empty()) {
    return absl::InternalError(absl::StrCat("symmetry spec covers no group for tensors: ",
                                            absl::StrJoin(untouched, ", ")));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckSpec(const FamilySpec& spec, const Weights& weights) {
  return CheckSpecOf(spec, weights);
}


absl::Status ValidatePermutation(const GroupInfo& group, const std::vector<int64_t>& index) {
  auto error = [&group](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("group '", group.name, "': ", what));
  };
  if (static_cast<int64_t>(index.size()) != group.size) {
    return error(absl::StrCat("wrong length: expected ", group.size, " indices, got ",
                              index.size()));
  }
  std::vector<int64_t> seen_at(static_cast<size_t>(group.size), -1);
  for (size_t j = 0; j < index.size(); ++j) {
    const int64_t v = index[j];
    if (v < 0 || v >= group.size) {
      return error(absl::StrCat("index ", v, " at position ", j, " out of range [0, ",
                                group.size, ")"));
    }
    if (seen_at[static_cast<size_t>(v)] >= 0) {
      return error(absl::StrCat("repeated index ", v, " at positions ",
                                seen_at[static_cast<size_t>(v)], " and ", j));
    }
    seen_at[static_cast<size_t>(v)] = static_cast<int64_t>(j);
  }
  if (group.block > 0) {
    for (size_t j = 0; j < index.size(); ++j) {
      const int64_t b = group.block, position = static_cast<int64_t>(j);
      if (index[j] / b != position / b) {
        return error(absl::StrCat("constraint broken: position ", j, " takes index ", index[j],
                                  " from block ", index[j] / b, ", but each index must stay in "
                                  "its own block of ", b, " (block ", position / b, ")"));
      }
    }
  }
  if (group.whole > 0) {
    const int64_t w = group.whole;
    for (int64_t k = 0; k < group.size / w; ++k) {
      const int64_t source_block = index[static_cast<size_t>(k * w)] / w;
      for (int64_t a = 1; a < w; ++a) {
        const int64_t v = index[static_cast<size_t>(k * w + a)];
        if (v / w != source_block) {
          return error(absl::StrCat(
              "constraint broken: positions ", k * w, "..", k * w + w - 1,
              " must take indices from one block of ", w, ", but position ", k * w + a,
              " takes ", v, " (block ", v / w, ") while position ", k * w, " takes block ",
              source_block, " (members move inside their block, or whole blocks move)"));
        }
      }
    }
  }
  return absl::OkStatus();
}

namespace {

// ApplyGathers where some group moves whole tensors between names, or one
// slice of a stacked tensor: each name's content is tracked through the
// permutations in order (where it came from, and the source position of
// every index on each axis moved), then gathered from its origin and stored
// under its name. A tensor that some member moves by slice is tracked as one
// content per slice of axis 0 (its axes shifted down by one), stacked again
// at the end.
// Each weight is read and written once, as a copy would: on a GPU by one
// batched kernel, elsewhere by one LibTorch indexing op per tensor; a batch
// per device where the model is placed over several.
// A throw on one device (an out-of-memory, a CUDA error) undoes the devices
// already gathered, so that every device is as it was.
void GatherOnEachDevice(std::vector<gather::TensorGather> plan) {
  std::map<std::string, std::vector<gather::TensorGather>> by_device;
  for (gather::TensorGather& tensor_gather : plan) {
    by_device[tensor_gather.tensor->device().str()].push_back(std::move(tensor_gather));
  }
  const auto gather_part = [](const std::vector<gather::TensorGather>& part) {
    if (!gather::GatherWithCuda(part)) gather::GatherWithLibTorch(part);
  };
  std::vector<const std::vector<gather::TensorGather>*> done;
  try {
    for (const auto& [device, part] : by_device) {
      gather_part(part);
      done.push_back(&part);
    }
  } catch (...) {
    std::deque<std::vector<int64_t>> inverses;  // stable addresses for the plan
    for (const std::vector<gather::TensorGather>* part : done) {
      std::vector<gather::TensorGather> undo;
      for (const gather::TensorGather& tensor_gather : *part) {
        gather::TensorGather back{tensor_gather.tensor, {}};
        for (const auto& [axis, index] : tensor_gather.index_of) {
          back.index_of[axis] = &inverses.emplace_back(InversePermutation(*index));
        }
        undo.push_back(std::move(back));
      }
      gather_part(undo);
    }
    throw;
  }
}

void ApplyGathersAcrossNames(const std::vector<GroupPermutation>& perms, Weights& weights) {
  struct Content {
    std::string origin;
    std::map<int, std::vector<int64_t>> source;  // axis -> source of each position
  };
  // Slice s of tensor T: "T\x1fs" (no tensor name holds a unit separator).
  const auto slice_name = [](const std::string& tensor, int64_t slice) {
    return tensor + '\x1f' + std::to_string(slice);
  };
  const auto origin_tensor = [&](const std::string& name) {
    const size_t cut = name.find('\x1f');
    if (cut == std::string::npos) return weights.at(name);
    return weights.at(name.substr(0, cut)).select(0, std::stoll(name.substr(cut + 1)));
  };
  std::set<std::string> split;
  for (const GroupPermutation& perm : perms) {
    for (const GroupMember& member : perm.group->members) {
      if (member.slice >= 0) split.insert(member.tensor);
    }
  }
  std::map<std::string, Content> contents;
  auto at = [&](const std::string& name) -> Content& {
    auto it = contents.find(name);
    if (it == contents.end()) it = contents.emplace(name, Content{name, {}}).first;
    return it->second;
  };
  // Positions [offset, offset + length) of `axis` of `name`'s content, moved
  // by the member's expansion of `perm`.
  const auto move = [&](const GroupPermutation& perm, const GroupMember& member,
                        const std::string& name, int axis) {
    Content& content = at(name);
    std::vector<int64_t>& source = content.source[axis];
    if (source.empty()) {
      source.resize(static_cast<size_t>(origin_tensor(content.origin).size(axis)));
      for (size_t k = 0; k < source.size(); ++k) source[k] = static_cast<int64_t>(k);
    }
    Expansion e;
    ParseExpansion(member.expand, &e);
    std::vector<int64_t> moved(static_cast<size_t>(member.length));
    const int64_t* slice = source.data() + member.offset;
    for (int64_t k = 0; k < member.length; ++k) {
      moved[static_cast<size_t>(k)] = slice[SourcePosition(*perm.group, e, *perm.index, k)];
    }
    std::copy(moved.begin(), moved.end(), source.begin() + member.offset);
  };
  for (const GroupPermutation& perm : perms) {
    for (const GroupMember& member : perm.group->members) {
      std::vector<std::string> names;  // contents exchanged whole, in the group's order
      if (member.expand == "tensors") {
        names = member.tensors;
      } else if (member.slice >= 0) {
        move(perm, member, slice_name(member.tensor, member.slice), member.axis - 1);
        continue;
      } else if (split.count(member.tensor) > 0 && member.axis == 0) {
        for (int64_t k = 0; k < member.length; ++k) {
          names.push_back(slice_name(member.tensor, member.offset + k));
        }
      } else if (split.count(member.tensor) > 0) {
        for (int64_t s = 0; s < weights.at(member.tensor).size(0); ++s) {
          move(perm, member, slice_name(member.tensor, s), member.axis - 1);
        }
        continue;
      } else {
        move(perm, member, member.tensor, member.axis);
        continue;
      }
      Expansion e;
      ParseExpansion(member.expand == "tensors" ? "identity" : member.expand, &e);
      std::vector<Content> before;
      for (const std::string& name : names) before.push_back(at(name));
      for (size_t j = 0; j < names.size(); ++j) {
        const int64_t from = SourcePosition(*perm.group, e, *perm.index, static_cast<int64_t>(j));
        contents[names[j]] = before[static_cast<size_t>(from)];
      }
    }
  }
  std::map<std::string, torch::Tensor> gathered;
  for (const auto& [name, content] : contents) gathered[name] = origin_tensor(content.origin);
  std::vector<gather::TensorGather> plan;
  for (const auto& [name, content] : contents) {
    if (content.source.empty()) continue;
    gather::TensorGather tensor_gather{&gathered.at(name), {}};
    for (const auto& [axis, source] : content.source) tensor_gather.index_of[axis] = &source;
    plan.push_back(std::move(tensor_gather));
  }
  GatherOnEachDevice(std::move(plan));
  for (const std::string& tensor : split) {
    std::vector<torch::Tensor> slices;
    for (int64_t s = 0; s < weights.at(tensor).size(0); ++s) {
      auto it = gathered.find(slice_name(tensor, s));
      slices.push_back(it != gathered.end() ? it->second : weights.at(tensor).select(0, s));
    }
    weights[tensor] = torch::stack(slices, 0);
  }
  for (auto& [name, tensor] : gathered) {
    if (name.find('\x1f') == std::string::npos) weights[name] = std::move(tensor);
  }
}

}  // namespace

void ApplyGathers(const std::vector<GroupPermutation>& perms, Weights& weights) {
  for (const GroupPermutation& perm : perms) {
    for (const GroupMember& member : perm.group->members) {
      if (member.expand == "tensors" || member.slice >= 0) {
        return ApplyGathersAcrossNames(perms, weights);
      }
    }
  }
  // The members that move each (tensor, axis), in order.
  std::map<std::string, std::map<int, std::vector<std::pair<const GroupPermutation*,
                                                            const GroupMember*>>>> moves;
  for (const GroupPermutation& perm : perms) {
    for (const GroupMember& member : perm.group->members) {
      moves[member.tensor][member.axis].emplace_back(&perm, &member);
    }
  }
  // Compose: for each (tensor, axis), the source position of every new
  // position after all the permutations in order. Applying p after the
  // composed S gives S'[k] = S[p's source of k]; a group only moves
  // positions inside its members' slices, so only those change. An axis one
  // group moves whole and unexpanded gathers by the group's own index.
  std::deque<std::vector<int64_t>> composed;
  std::vector<gather::TensorGather> plan;
  for (const auto& [name, axes] : moves) {
    gather::TensorGather tensor_gather{&weights.at(name), {}};
    for (const auto& [axis, members] : axes) {
      const int64_t axis_size = tensor_gather.tensor->size(axis);
      const auto& [first_perm, first_member] = members.front();
      if (members.size() == 1 && first_member->expand == "identity" &&
          first_member->offset == 0 && first_member->length == axis_size) {
        tensor_gather.index_of[axis] = first_perm->index;
        continue;
      }
      std::vector<int64_t>& source = composed.emplace_back(static_cast<size_t>(axis_size));
      for (size_t k = 0; k < source.size(); ++k) source[k] = static_cast<int64_t>(k);
      std::vector<int64_t> moved;
      for (const auto& [perm, member] : members) {
        Expansion e;
        ParseExpansion(member->expand, &e);
        moved.resize(static_cast<size_t>(member->length));
        const int64_t* slice = source.data() + member->offset;
        if (e.kind == Expansion::kIdentity) {  // most members: one tight loop
          const int64_t* index = perm->index->data();
          for (int64_t k = 0; k < member->length; ++k) moved[static_cast<size_t>(k)] = slice[index[k]];
        } else {
          for (int64_t k = 0; k < member->length; ++k) {
            moved[static_cast<size_t>(k)] = slice[SourcePosition(*perm->group, e, *perm->index, k)];
          }
        }
        std::copy(moved.begin(), moved.end(), source.begin() + member->offset);
      }
      tensor_gather.index_of[axis] = &source;
    }
    plan.push_back(std::move(tensor_gather));
  }
  GatherOnEachDevice(std::move(plan));
}

void ApplyGather(const GroupInfo& group, const std::vector<int64_t>& index, Weights& weights) {
  ApplyGathers({{&group, &index}}, weights);
}

std::vector<int64_t> InversePermutation(const std::vector<int64_t>& index) {
  std::vector<int64_t> inverse(index.size());
  for (size_t j = 0; j < index.size(); ++j) {
    inverse[static_cast<size_t>(index[j])] = static_cast<int64_t>(j);
  }
  return inverse;
}

}  // namespace icd
