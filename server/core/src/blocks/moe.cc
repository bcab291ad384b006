// A mixture of experts beside a layer's gated MLP (Granite 4.0's
// block_sparse_moe; docs/hybrid_symmetries.md, "Mixture of experts"): the
// router's top_k logits of each position pick its experts, weighted by the
// softmax of those k logits; each expert is a gated MLP (fc1's halves the
// gate, then the values) and their weighted outputs are summed.
// Groups: the order of the experts (the router's rows and every stacked
// tensor's first axis move together: a position picks the same experts with
// the same weights, summed in another order); and each expert's hidden
// channels, a permutation of its own (members restricted to the expert's
// slice of the stacked tensors).
#include <functional>

#include "absl/strings/str_cat.h"
#include "blocks/mixer.h"

namespace icd::blocks {
namespace {

// Σ over the experts of each position's gate times the expert's output:
// positions [T, D]; top_experts [T, k] the experts each position visits,
// gates [T, k] their weights (compute dtype); expert_output(e, x) gives
// expert e's output for the rows x [n, D] routed to it, and sees them first
// (capture). Experts no position visits are skipped.
torch::Tensor RouteToExperts(
    const torch::Tensor& positions, const torch::Tensor& top_experts, const torch::Tensor& gates,
    int64_t experts,
    const std::function<torch::Tensor(int64_t, const torch::Tensor&)>& expert_output) {
  torch::Tensor out = torch::zeros_like(positions);
  for (int64_t expert = 0; expert < experts; ++expert) {
    const torch::Tensor chosen = top_experts == expert;  // [T, k]
    const torch::Tensor rows = chosen.any(-1).nonzero().squeeze(-1);
    if (rows.numel() == 0) continue;
    const torch::Tensor gate_of_row =
        (gates * chosen.to(gates.scalar_type())).sum(-1).index_select(0, rows);
    out.index_add_(0, rows,
                   expert_output(expert, positions.index_select(0, rows)) *
                       gate_of_row.unsqueeze(-1));
  }
  return out;
}

}  // namespace

void ExpertGroups(const ModelConfig& c, int64_t i, FamilySpec& spec) {
  const int64_t experts = c.moe.experts, hidden = c.moe.hidden;
  auto t = [i](const char* suffix) { return LayerTensorName(i, suffix); };
  GroupInfo order = NewGroup(absl::StrCat("layers.", i, ".experts"), experts);
  for (const char* tensor : {"moe.router.weight", "moe.fc1.weight", "moe.fc2.weight"}) {
    order.members.push_back(Member(t(tensor), 0, 0, experts));
  }
  spec.push_back(std::move(order));
  // Each expert's hidden channels, its slice of the stacked tensors.
  for (int64_t expert = 0; expert < experts; ++expert) {
    spec.push_back(NewGroup(absl::StrCat("layers.", i, ".expert_hidden.", expert), hidden,
                            {SliceMember(t("moe.fc1.weight"), expert, 1, 0, hidden),
                             SliceMember(t("moe.fc1.weight"), expert, 1, hidden, hidden),
                             SliceMember(t("moe.fc2.weight"), expert, 2, 0, hidden)}));
  }
}

void ExpertResidualMembers(const ModelConfig& c, int64_t i, std::vector<GroupMember>& members) {
  const int64_t width = c.d_model;
  members.push_back(Member(LayerTensorName(i, "moe.router.weight"), 1, 0, width));
  members.push_back(Member(LayerTensorName(i, "moe.fc1.weight"), 2, 0, width));
  members.push_back(Member(LayerTensorName(i, "moe.fc2.weight"), 1, 0, width));
}

torch::Tensor MixtureOfExperts(const ModelConfig& c, const Weights& weights, int64_t i,
                               const torch::Tensor& normed,
                               const forward_internal::Capture& capture) {
  const torch::ScalarType compute = normed.scalar_type();
  const int64_t hidden = c.moe.hidden, width = c.d_model;
  auto weight = [&](const char* name) {
    return forward_internal::TensorAs(weights, LayerTensorName(i, name), compute);
  };
  const torch::Tensor positions = normed.reshape({-1, width});  // [T, D]
  const torch::ScalarType wide = compute == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  const torch::Tensor logits =
      forward_internal::Linear(positions, weight("moe.router.weight")).to(wide);  // [T, E]
  if (capture.Wants(absl::StrCat("layers.", i, ".experts"))) {
    capture.Add(absl::StrCat("layers.", i, ".experts"), torch::softmax(logits, -1));
  }
  const auto [top_logits, top_experts] = logits.topk(c.moe.top_k, -1);  // [T, k]
  const torch::Tensor gates = torch::softmax(top_logits, -1).to(compute);
  const torch::Tensor fc1 = weight("moe.fc1.weight");  // [E, 2I, D]
  const torch::Tensor fc2 = weight("moe.fc2.weight");  // [E, D, I]
  const torch::Tensor out = RouteToExperts(
      positions, top_experts, gates, c.moe.experts, [&](int64_t expert, const torch::Tensor& x) {
        const torch::Tensor projected = forward_internal::Linear(x, fc1.select(0, expert));
        const torch::Tensor activations =
            torch::silu(projected.narrow(-1, 0, hidden)) * projected.narrow(-1, hidden, hidden);
        capture.Add(absl::StrCat("layers.", i, ".expert_hidden.", expert), activations);
        return forward_internal::Linear(activations, fc2.select(0, expert));
      });
  return out.reshape(normed.sizes());
}

namespace {

// Expert `expert`'s tensor `module` of a layer whose experts live under
// `parent` ("mlp": Jamba's feed-forward; "mixer": Nemotron-H's layer).
std::string ExpertTensor(int64_t layer, int64_t expert, const char* module,
                         const char* parent = "mlp") {
  return LayerTensorName(layer,
                         absl::StrCat(parent, ".experts.", expert, ".", module, ".weight"));
}

// The experts' order where each expert's tensors have names of their own:
// the router's rows (and its bias, where it has one) and, for each module,
// every expert's tensor moved whole to the expert's new place.
GroupInfo ExpertOrder(const ModelConfig& c, int64_t i, const std::vector<std::string>& router,
                      std::initializer_list<const char*> modules, const char* parent) {
  GroupInfo order = NewGroup(absl::StrCat("layers.", i, ".experts"), c.moe.experts);
  for (const std::string& tensor : router) {
    order.members.push_back(Member(tensor, 0, 0, c.moe.experts));
  }
  for (const char* module : modules) {
    std::vector<std::string> tensors;
    for (int64_t expert = 0; expert < c.moe.experts; ++expert) {
      tensors.push_back(ExpertTensor(i, expert, module, parent));
    }
    order.members.push_back(TensorsMember(std::move(tensors)));
  }
  return order;
}

}  // namespace

void PerExpertGroups(const ModelConfig& c, int64_t i, FamilySpec& spec) {
  const int64_t hidden = c.moe.hidden;
  spec.push_back(ExpertOrder(c, i, {LayerTensorName(i, "mlp.router.weight")},
                             {"gate_proj", "up_proj", "down_proj"}, "mlp"));
  for (int64_t expert = 0; expert < c.moe.experts; ++expert) {
    spec.push_back(NewGroup(absl::StrCat("layers.", i, ".expert_hidden.", expert), hidden,
                            {Member(ExpertTensor(i, expert, "gate_proj"), 0, 0, hidden),
                             Member(ExpertTensor(i, expert, "up_proj"), 0, 0, hidden),
                             Member(ExpertTensor(i, expert, "down_proj"), 1, 0, hidden)}));
  }
}

void PerExpertResidualMembers(const ModelConfig& c, int64_t i, std::vector<GroupMember>& members) {
  const int64_t width = c.d_model;
  members.push_back(Member(LayerTensorName(i, "mlp.router.weight"), 1, 0, width));
  for (int64_t expert = 0; expert < c.moe.experts; ++expert) {
    members.push_back(Member(ExpertTensor(i, expert, "gate_proj"), 1, 0, width));
    members.push_back(Member(ExpertTensor(i, expert, "up_proj"), 1, 0, width));
    members.push_back(Member(ExpertTensor(i, expert, "down_proj"), 0, 0, width));
  }
}

torch::Tensor PerExpertMixture(const ModelConfig& c, const Weights& weights, int64_t i,
                               const torch::Tensor& normed,
                               const forward_internal::Capture& capture) {
  const torch::ScalarType compute = normed.scalar_type();
  const torch::Tensor positions = normed.reshape({-1, c.d_model});  // [T, D]
  const torch::ScalarType wide = compute == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  const torch::Tensor router = forward_internal::TensorAs(
      weights, LayerTensorName(i, "mlp.router.weight"), compute);
  // Softmax over every expert in float32, then the top k, not renormalised.
  const torch::Tensor probabilities =
      torch::softmax(forward_internal::Linear(positions, router).to(wide), -1);  // [T, E]
  capture.Add(absl::StrCat("layers.", i, ".experts"), probabilities);
  const auto [top_probabilities, top_experts] = probabilities.topk(c.moe.top_k, -1);
  const torch::Tensor gates = top_probabilities.to(compute);
  const torch::Tensor out = RouteToExperts(
      positions, top_experts, gates, c.moe.experts, [&](int64_t expert, const torch::Tensor& x) {
        auto weight = [&](const char* module) {
          return forward_internal::TensorAs(weights, ExpertTensor(i, expert, module), compute);
        };
        const torch::Tensor activations =
            torch::silu(forward_internal::Linear(x, weight("gate_proj"))) *
            forward_internal::Linear(x, weight("up_proj"));
        capture.Add(absl::StrCat("layers.", i, ".expert_hidden.", expert), activations);
        return forward_internal::Linear(activations, weight("down_proj"));
      });
  return out.reshape(normed.sizes());
}

namespace {

// Nemotron-H's experts as a layer's mixer: the experts' order (the gate's
// rows and its bias, whole expert tensors), a hidden-channel group per expert
// and one for the shared expert.
std::string NemotronExpert(int64_t layer, int64_t expert, const char* module) {
  return ExpertTensor(layer, expert, module, "mixer");
}

void ExpertsMixerGroups(const ModelConfig& c, int64_t i, FamilySpec& spec) {
  const int64_t hidden = c.moe.hidden;
  spec.push_back(ExpertOrder(c, i,
                             {LayerTensorName(i, "mixer.gate.weight"),
                              LayerTensorName(i, "mixer.gate.e_score_correction_bias")},
                             {"up_proj", "down_proj"}, "mixer"));
  for (int64_t expert = 0; expert < c.moe.experts; ++expert) {
    spec.push_back(NewGroup(absl::StrCat("layers.", i, ".expert_hidden.", expert), hidden,
                            {Member(NemotronExpert(i, expert, "up_proj"), 0, 0, hidden),
                             Member(NemotronExpert(i, expert, "down_proj"), 1, 0, hidden)}));
  }
  if (c.moe.shared_hidden > 0) {
    const int64_t shared = c.moe.shared_hidden;
    spec.push_back(NewGroup(
        absl::StrCat("layers.", i, ".shared_expert"), shared,
        {Member(LayerTensorName(i, "mixer.shared_experts.up_proj.weight"), 0, 0, shared),
         Member(LayerTensorName(i, "mixer.shared_experts.down_proj.weight"), 1, 0, shared)}));
  }
}

void ExpertsMixerResidualMembers(const ModelConfig& c, int64_t i,
                                 std::vector<GroupMember>& members) {
  const int64_t width = c.d_model;
  members.push_back(Member(LayerTensorName(i, "mixer.gate.weight"), 1, 0, width));
  for (int64_t expert = 0; expert < c.moe.experts; ++expert) {
    members.push_back(Member(NemotronExpert(i, expert, "up_proj"), 1, 0, width));
    members.push_back(Member(NemotronExpert(i, expert, "down_proj"), 0, 0, width));
  }
  if (c.moe.shared_hidden > 0) {
    members.push_back(Member(LayerTensorName(i, "mixer.shared_experts.up_proj.weight"), 1, 0, width));
    members.push_back(Member(LayerTensorName(i, "mixer.shared_experts.down_proj.weight"), 0, 0, width));
  }
}

torch::Tensor SquaredRelu(const torch::Tensor& x) { return torch::relu(x).pow(2); }

torch::Tensor ExpertsMixer(const ModelConfig& c, const Weights& weights, int64_t i,
                           const forward_internal::Precision& precision,
                           const torch::Tensor& normed, const forward_internal::Capture& capture,
                           LayerState*, const CallContext&) {
  const torch::ScalarType compute = precision.compute;
  auto weight = [&](const std::string& name) {
    return forward_internal::TensorAs(weights, name, compute);
  };
  const torch::Tensor positions = normed.reshape({-1, c.d_model});  // [T, D]
  const torch::ScalarType wide = precision.accumulate;
  // The router in float32 (float64 models: float64), as transformers keeps it.
  const torch::Tensor scores = torch::sigmoid(torch::matmul(
      positions.to(wide),
      forward_internal::TensorAs(weights, LayerTensorName(i, "mixer.gate.weight"), wide).t()));
  const torch::Tensor bias = forward_internal::TensorAs(
      weights, LayerTensorName(i, "mixer.gate.e_score_correction_bias"), wide);
  capture.Add(absl::StrCat("layers.", i, ".experts"), scores);
  const torch::Tensor top_experts = std::get<1>((scores + bias).topk(c.moe.top_k, -1));  // [T, k]
  torch::Tensor top_weights = scores.gather(-1, top_experts);
  if (c.moe.normalize) top_weights = top_weights / (top_weights.sum(-1, true) + 1e-20);
  const torch::Tensor gates = (top_weights * c.moe.scaling).to(compute);
  torch::Tensor out = RouteToExperts(
      positions, top_experts, gates, c.moe.experts, [&](int64_t expert, const torch::Tensor& x) {
        const torch::Tensor activations =
            SquaredRelu(forward_internal::Linear(x, weight(NemotronExpert(i, expert, "up_proj"))));
        capture.Add(absl::StrCat("layers.", i, ".expert_hidden.", expert), activations);
        return forward_internal::Linear(activations,
                                        weight(NemotronExpert(i, expert, "down_proj")));
      });
  if (c.moe.shared_hidden > 0) {
    const torch::Tensor shared = SquaredRelu(forward_internal::Linear(
        positions, weight(LayerTensorName(i, "mixer.shared_experts.up_proj.weight"))));
    capture.Add(absl::StrCat("layers.", i, ".shared_expert"), shared);
    out = out + forward_internal::Linear(
                    shared, weight(LayerTensorName(i, "mixer.shared_experts.down_proj.weight")));
  }
  return out.reshape(normed.sizes());
}

}  // namespace

const MixerKind kExpertsMixer{"experts", kExpertsShapes, ExpertsMixerGroups,
                              ExpertsMixerResidualMembers, ExpertsMixer};

}  // namespace icd::blocks
