#include "scan/state_space_scan.h"

#include <algorithm>
#include <vector>

namespace icd::scan {
namespace {

struct Dims {
  int64_t batch, length, heads, head_dim, groups, per_group, state;
};

Dims DimsOf(const StateSpaceInputs& inputs) {
  Dims dims{};
  dims.batch = inputs.hidden.size(0);
  dims.length = inputs.hidden.size(1);
  dims.heads = inputs.hidden.size(2);
  dims.head_dim = inputs.hidden.size(3);
  dims.groups = inputs.b_proj.size(2);
  dims.per_group = dims.heads / dims.groups;
  dims.state = inputs.b_proj.size(3);
  return dims;
}

// S_0 as [B, G, Kh, P, N]: the heads axis split into groups and the heads of
// each, so that a group's B and C broadcast over its heads.
torch::Tensor InitialState(const Dims& dims, const torch::Tensor* state,
                           const torch::TensorOptions& options) {
  const std::vector<int64_t> shape = {dims.batch, dims.groups, dims.per_group, dims.head_dim,
                                      dims.state};
  if (state != nullptr && state->defined()) {
    return state->to(options.dtype().toScalarType()).reshape(shape);
  }
  return torch::zeros(shape, options);
}

// `values` with `pad` zero steps appended on the time axis (dim 1).
torch::Tensor PadTime(const torch::Tensor& values, int64_t pad) {
  if (pad == 0) return values;
  std::vector<int64_t> shape = values.sizes().vec();
  shape[1] = pad;
  return torch::cat({values, torch::zeros(shape, values.options())}, 1);
}

}  // namespace

torch::Tensor StateSpaceScanSequential(const StateSpaceInputs& inputs, torch::Tensor* state) {
  const Dims d = DimsOf(inputs);
  torch::Tensor hidden =
      inputs.hidden.reshape({d.batch, d.length, d.groups, d.per_group, d.head_dim});
  torch::Tensor delta = inputs.delta.reshape({d.batch, d.length, d.groups, d.per_group});
  torch::Tensor a_decay = inputs.a_decay.reshape({d.groups, d.per_group});
  torch::Tensor decay = torch::exp(delta * a_decay).unsqueeze(-1).unsqueeze(-1);  // [B, L, G, Kh, 1, 1]
  torch::Tensor delta_x = (hidden * delta.unsqueeze(-1)).unsqueeze(-1);          // [B, L, G, Kh, P, 1]
  torch::Tensor b_proj = inputs.b_proj.reshape({d.batch, d.length, d.groups, 1, 1, d.state});
  torch::Tensor c_proj = inputs.c_proj.reshape({d.batch, d.length, d.groups, 1, d.state, 1});
  torch::Tensor carried = InitialState(d, state, inputs.hidden.options());  // [B, G, Kh, P, N]
  std::vector<torch::Tensor> outputs;
  outputs.reserve(static_cast<size_t>(d.length));
  for (int64_t step = 0; step < d.length; ++step) {
    carried = decay.select(1, step) * carried + delta_x.select(1, step) * b_proj.select(1, step);
    outputs.push_back(torch::matmul(carried, c_proj.select(1, step)).squeeze(-1));  // [B, G, Kh, P]
  }
  if (state != nullptr) *state = carried.reshape({d.batch, d.heads, d.head_dim, d.state});
  return torch::stack(outputs, 1).reshape({d.batch, d.length, d.heads, d.head_dim});
}

torch::Tensor StateSpaceScanChunked(const StateSpaceInputs& inputs, int64_t chunk,
                                    torch::Tensor* state) {
  const Dims d = DimsOf(inputs);
  const int64_t q = std::clamp<int64_t>(chunk, 1, d.length);  // steps per chunk
  const int64_t chunks = (d.length + q - 1) / q;
  const int64_t pad = chunks * q - d.length;  // inert steps: Δ = 0, x = B = C = 0
  const auto options = inputs.hidden.options();

  // Time as [chunks, q]; heads as [G, Kh]; then each chunk's heads lead.
  torch::Tensor delta = PadTime(inputs.delta, pad).reshape(
      {d.batch, chunks, q, d.groups, d.per_group});  // [B, C, Q, G, Kh]
  torch::Tensor hidden = PadTime(inputs.hidden, pad).reshape(
      {d.batch, chunks, q, d.groups, d.per_group, d.head_dim});  // [B, C, Q, G, Kh, P]
  torch::Tensor delta_x =
      (hidden * delta.unsqueeze(-1)).permute({0, 1, 3, 4, 2, 5});  // [B, C, G, Kh, Q, P]
  torch::Tensor b_proj = PadTime(inputs.b_proj, pad)
                             .reshape({d.batch, chunks, q, d.groups, d.state})
                             .permute({0, 1, 3, 2, 4})
                             .unsqueeze(3);  // [B, C, G, 1, Q, N]
  torch::Tensor c_proj = PadTime(inputs.c_proj, pad)
                             .reshape({d.batch, chunks, q, d.groups, d.state})
                             .permute({0, 1, 3, 2, 4})
                             .unsqueeze(3);  // [B, C, G, 1, Q, N]
  torch::Tensor log_decay =
      (delta * inputs.a_decay.reshape({d.groups, d.per_group})).permute({0, 1, 3, 4, 2});  // [B, C, G, Kh, Q]
  torch::Tensor log_decay_from_start = log_decay.cumsum(-1);  // Σ_{r≤t}, [B, C, G, Kh, Q]

  // decay[t, s] = exp(Σ_{s<r≤t} Δ_r A) within one chunk: the exponential of
  // a sum of the segment's own terms (the steps below s in column s, summed
  // down the rows), never a difference of two running sums.
  torch::Tensor decay = torch::tril(log_decay.unsqueeze(-1).expand(
                                        {d.batch, chunks, d.groups, d.per_group, q, q}),
                                    -1)
                            .cumsum(-2)
                            .exp_();  // [B, C, G, Kh, Q(t), Q(s)]
  // decay(s→end) [B, C, G, Kh, Q, 1], copied: `decay` is scaled in place below.
  torch::Tensor to_end = decay.select(-2, q - 1).unsqueeze(-1).clone();

  // Within each chunk, from a zero state: y_t = Σ_{s≤t} (C_t·B_s) decay(s→t) Δ_s x_s
  // (above the diagonal the decay is exp(0): the causal mask zeroes it).
  torch::Tensor scores = torch::matmul(c_proj, b_proj.transpose(-1, -2));  // [B, C, G, 1, Q, Q]
  torch::Tensor within =
      torch::matmul(decay.mul_(scores).tril_(), delta_x);  // [B, C, G, Kh, Q, P]

  // Each chunk's own contribution to the state at its end, its heads side by
  // side (they share the group's B): [Kh·P, Q] @ [Q, N] per group.
  torch::Tensor contribution =
      torch::matmul((delta_x * to_end).transpose(-1, -2).reshape(
                        {d.batch, chunks, d.groups, d.per_group * d.head_dim, q}),
                    b_proj.squeeze(3))
          .reshape({d.batch, chunks, d.groups, d.per_group, d.head_dim, d.state});
  // The state entering each chunk: a recurrence over chunks only.
  torch::Tensor chunk_decay =
      torch::exp(log_decay_from_start.select(-1, q - 1)).unsqueeze(-1).unsqueeze(-1);  // [B, C, G, Kh, 1, 1]
  torch::Tensor carried = InitialState(d, state, options);  // [B, G, Kh, P, N]
  std::vector<torch::Tensor> entering;
  entering.reserve(static_cast<size_t>(chunks));
  for (int64_t c = 0; c < chunks; ++c) {
    entering.push_back(carried);
    carried = chunk_decay.select(1, c) * carried + contribution.select(1, c);
  }
  // From the state entering the chunk: y_t = decay(start→t) C_t · S, the
  // group's heads side by side: [Q, N] @ [N, Kh·P] per group.
  torch::Tensor entering_states = torch::stack(entering, 1)  // [B, C, G, Kh, P, N]
                                      .reshape({d.batch, chunks, d.groups,
                                                d.per_group * d.head_dim, d.state})
                                      .transpose(-1, -2);  // [B, C, G, N, Kh·P]
  torch::Tensor from_entering =
      torch::matmul(c_proj.squeeze(3), entering_states)
          .reshape({d.batch, chunks, d.groups, q, d.per_group, d.head_dim})
          .transpose(3, 4)  // [B, C, G, Kh, Q, P]
      * torch::exp(log_decay_from_start).unsqueeze(-1);

  if (state != nullptr) *state = carried.reshape({d.batch, d.heads, d.head_dim, d.state});
  return (within + from_entering)
      .permute({0, 1, 4, 2, 3, 5})  // [B, C, Q, G, Kh, P]
      .reshape({d.batch, chunks * q, d.heads, d.head_dim})
      .narrow(1, 0, d.length);
}

StateSpaceInputs TimeSlice(const StateSpaceInputs& inputs, int64_t start, int64_t length) {
  StateSpaceInputs slice = inputs;
  slice.hidden = inputs.hidden.narrow(1, start, length);
  slice.delta = inputs.delta.narrow(1, start, length);
  slice.b_proj = inputs.b_proj.narrow(1, start, length);
  slice.c_proj = inputs.c_proj.narrow(1, start, length);
  return slice;
}

}  // namespace icd::scan
