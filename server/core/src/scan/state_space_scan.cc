#include "scan/state_space_scan.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_vector.h"

namespace icd::scan {
namespace {

using cpu_vector::kLanes;
using cpu_vector::Load;
using cpu_vector::Store;
using cpu_vector::Vector;

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

// The loop's operands: each a pointer and its batch and time strides in
// elements, the axes after time contiguous (x [B, L, H, P], Δ [B, L, H],
// B/C [B, L, G, N]); y [B, L, H, P] contiguous.
template <class Scalar>
struct LoopOperands {
  const Scalar* hidden;
  int64_t hidden_batch, hidden_time;
  const Scalar* delta;
  int64_t delta_batch, delta_time;
  const Scalar* b_proj;
  int64_t b_batch, b_time;
  const Scalar* c_proj;
  int64_t c_batch, c_time;
  const Scalar* a_decay;  // [H]
  const Scalar* skip;     // D: [H], or [H, P] when skip_per_channel; null: none
  bool skip_per_channel;
  Scalar* output;
};

// D of a pair's head for StepVectors: per channel (`channels`, the vectors'
// own D) or one for the head; none where the model has no D.
template <class Scalar>
struct Skip {
  bool present = false;
  const Scalar* channels = nullptr;
  Scalar head = 0;
};

// One time step of kVectors vectors of a pair's channels: the state's rows
// (`rows`, N of them, P apart) advanced, y = C·S summed row by row into
// registers (a sum kept in y's memory between rows chained each add through
// a store and a load), then y += D x, after C·S as the other forms add it.
template <int kVectors, class Scalar>
[[gnu::always_inline]] inline void StepVectors(const Scalar* x, const Scalar* b, const Scalar* c,
                                               Scalar dt, Scalar decay, int64_t N, int64_t P,
                                               const Skip<Scalar>& skip,
                                               Scalar* __restrict__ rows,
                                               Scalar* __restrict__ y) {
  Vector<Scalar> inputs[kVectors];
  Vector<Scalar> sums[kVectors];
#pragma GCC unroll 4
  for (int j = 0; j < kVectors; ++j) {
    Load(inputs[j], x + j * kLanes<Scalar>);
    sums[j] = Vector<Scalar>{};
  }
  for (int64_t n = 0; n < N; ++n) {
    const Scalar drive = dt * b[n];
    const Scalar read = c[n];
    Scalar* row = rows + n * P;
#pragma GCC unroll 4
    for (int j = 0; j < kVectors; ++j) {
      Vector<Scalar> held;
      Load(held, row + j * kLanes<Scalar>);
      held = decay * held + drive * inputs[j];
      Store(row + j * kLanes<Scalar>, held);
      sums[j] = sums[j] + held * read;
    }
  }
  if (skip.present) {
#pragma GCC unroll 4
    for (int j = 0; j < kVectors; ++j) {
      Vector<Scalar> factor = skip.head - Vector<Scalar>{};  // (a D of -0 stays -0)
      if (skip.channels != nullptr) Load(factor, skip.channels + j * kLanes<Scalar>);
      sums[j] = sums[j] + factor * inputs[j];
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < kVectors; ++j) Store(y + j * kLanes<Scalar>, sums[j]);
}

// One (batch, head) pair's scan over L steps: the state [N, P] in `work`,
// from and into `state` [P, N] (null: zeros in, not kept).
// (y and the state are restrict parameters, not the struct's fields: GCC
// honours restrict on parameters only, and without it does not vectorize.)
template <class Scalar>
[[gnu::always_inline]] inline void ScanPair(const Dims& d, const LoopOperands<Scalar>& o,
                                            int64_t batch, int64_t head, Scalar* state,
                                            Scalar* __restrict__ output,
                                            Scalar* __restrict__ work) {
  const int64_t P = d.head_dim, N = d.state, H = d.heads;
  const int64_t group = head / d.per_group;
  const int64_t blocked = P - P % kLanes<Scalar>;
  if (state != nullptr) {
    for (int64_t p = 0; p < P; ++p) {
      for (int64_t n = 0; n < N; ++n) work[n * P + p] = state[p * N + n];
    }
  } else {
    std::fill(work, work + N * P, Scalar(0));
  }
  const Scalar decay_rate = o.a_decay[head];
  Skip<Scalar> skip;
  skip.present = o.skip != nullptr;
  if (skip.present && o.skip_per_channel) skip.channels = o.skip + head * P;
  if (skip.present && !o.skip_per_channel) skip.head = o.skip[head];
  // The pair's rows of each operand, and their time strides, as locals.
  const Scalar* const hidden = o.hidden + batch * o.hidden_batch + head * P;
  const Scalar* const delta = o.delta + batch * o.delta_batch + head;
  const Scalar* const b_proj = o.b_proj + batch * o.b_batch + group * N;
  const Scalar* const c_proj = o.c_proj + batch * o.c_batch + group * N;
  const int64_t hidden_time = o.hidden_time, delta_time = o.delta_time;
  const int64_t b_time = o.b_time, c_time = o.c_time;
  for (int64_t t = 0; t < d.length; ++t) {
    const Scalar dt = delta[t * delta_time];
    const Scalar decay = std::exp(dt * decay_rate);
    const Scalar* x = hidden + t * hidden_time;
    const Scalar* b = b_proj + t * b_time;
    const Scalar* c = c_proj + t * c_time;
    Scalar* y = output + ((batch * d.length + t) * H + head) * P;
    // Four vectors of y at a time (then one), their sums in registers over
    // the state's rows, in the same order as before (n = 0, 1, ...).
    int64_t p0 = 0;
    auto skip_at = [&skip](int64_t first) {
      Skip<Scalar> part = skip;
      if (part.channels != nullptr) part.channels += first;
      return part;
    };
    for (; p0 + 4 * kLanes<Scalar> <= blocked; p0 += 4 * kLanes<Scalar>) {
      StepVectors<4>(x + p0, b, c, dt, decay, N, P, skip_at(p0), work + p0, y + p0);
    }
    for (; p0 < blocked; p0 += kLanes<Scalar>) {
      StepVectors<1>(x + p0, b, c, dt, decay, N, P, skip_at(p0), work + p0, y + p0);
    }
    for (int64_t p = blocked; p < P; ++p) {
      Scalar sum = 0;
      for (int64_t n = 0; n < N; ++n) {
        Scalar& held = work[n * P + p];
        held = decay * held + (dt * b[n]) * x[p];
        sum += held * c[n];
      }
      y[p] = sum;
    }
    if (skip.present) {
      // y += D x for the channels past the last vector (StepVectors took the rest's).
      for (int64_t p = blocked; p < P; ++p) {
        y[p] += (skip.channels != nullptr ? skip.channels[p] : skip.head) * x[p];
      }
    }
  }
  if (state != nullptr) {
    for (int64_t p = 0; p < P; ++p) {
      for (int64_t n = 0; n < N; ++n) state[p * N + n] = work[n * P + p];
    }
  }
}

// Pairs [begin, end): the work of one thread.
template <class Scalar>
[[gnu::always_inline]] inline void ScanPairRange(const Dims& d, const LoopOperands<Scalar>& o,
                                                 int64_t begin, int64_t end, Scalar* state,
                                                 Scalar* work) {
  for (int64_t pair = begin; pair < end; ++pair) {
    ScanPair<Scalar>(d, o, pair / d.heads, pair % d.heads,
                     state != nullptr ? state + pair * d.head_dim * d.state : nullptr, o.output,
                     work);
  }
}

// The range compiled twice per type (cpu_vector.h): target_clones takes no
// templates.
ICD_VECTOR_CLONES void ScanPairs(const Dims& d, const LoopOperands<float>& o, int64_t begin,
                                 int64_t end, float* state, float* work) {
  ScanPairRange(d, o, begin, end, state, work);
}
ICD_VECTOR_CLONES void ScanPairs(const Dims& d, const LoopOperands<double>& o, int64_t begin,
                                 int64_t end, double* state, double* work) {
  ScanPairRange(d, o, begin, end, state, work);
}

// `tensor` if its axes from `first` on are contiguous, else a contiguous copy.
torch::Tensor InnerContiguous(const torch::Tensor& tensor, int64_t first) {
  int64_t expected = 1;
  for (int64_t axis = tensor.dim() - 1; axis >= first; --axis) {
    if (tensor.size(axis) != 1 && tensor.stride(axis) != expected) return tensor.contiguous();
    expected *= tensor.size(axis);
  }
  return tensor;
}

template <class Scalar>
torch::Tensor ScanLoop(const StateSpaceInputs& inputs, const Dims& d, torch::Tensor* state) {
  const torch::Tensor hidden = InnerContiguous(inputs.hidden, 2);  // [B, L, H, P]
  const torch::Tensor delta = InnerContiguous(inputs.delta, 2);    // [B, L, H]
  const torch::Tensor b_proj = InnerContiguous(inputs.b_proj, 2);  // [B, L, G, N]
  const torch::Tensor c_proj = InnerContiguous(inputs.c_proj, 2);  // [B, L, G, N]
  const torch::Tensor a_decay = inputs.a_decay.contiguous();       // [H]
  const torch::Tensor skip =
      inputs.skip.defined() ? inputs.skip.contiguous() : torch::Tensor();  // [H] or [H·P]
  torch::Tensor output = torch::empty({d.batch, d.length, d.heads, d.head_dim}, hidden.options());
  torch::Tensor carried;  // [B, H, P, N]
  if (state != nullptr) {
    carried = state->defined() ? state->to(hidden.scalar_type()).contiguous().clone()
                               : torch::zeros({d.batch, d.heads, d.head_dim, d.state},
                                              hidden.options());
  }
  LoopOperands<Scalar> operands{
      hidden.data_ptr<Scalar>(), hidden.stride(0), hidden.stride(1),
      delta.data_ptr<Scalar>(),  delta.stride(0),  delta.stride(1),
      b_proj.data_ptr<Scalar>(), b_proj.stride(0), b_proj.stride(1),
      c_proj.data_ptr<Scalar>(), c_proj.stride(0), c_proj.stride(1),
      a_decay.data_ptr<Scalar>(),
      skip.defined() ? skip.data_ptr<Scalar>() : nullptr,
      skip.defined() && skip.numel() == d.heads * d.head_dim && d.head_dim > 1,
      output.data_ptr<Scalar>()};
  Scalar* s = carried.defined() ? carried.data_ptr<Scalar>() : nullptr;
  at::parallel_for(0, d.batch * d.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<Scalar> work(static_cast<size_t>(d.head_dim * d.state));
    ScanPairs(d, operands, begin, end, s, work.data());
  });
  if (state != nullptr) *state = carried;
  return output;
}

// y + D x for y, x [B, L, H, P] (the forms in LibTorch ops).
torch::Tensor AddSkip(const torch::Tensor& output, const StateSpaceInputs& inputs) {
  if (!inputs.skip.defined()) return output;
  const Dims d = DimsOf(inputs);
  const torch::Tensor skip = inputs.skip.numel() == d.heads * d.head_dim
                                 ? inputs.skip.reshape({d.heads, d.head_dim})
                                 : inputs.skip.reshape({d.heads, 1});
  return output + inputs.hidden * skip;
}

}  // namespace

std::optional<torch::Tensor> StateSpaceScanLoop(const StateSpaceInputs& inputs,
                                                torch::Tensor* state) {
  const torch::Tensor* operands[] = {&inputs.hidden, &inputs.delta, &inputs.a_decay,
                                     &inputs.b_proj, &inputs.c_proj, &inputs.skip};
  const torch::ScalarType dtype = inputs.hidden.scalar_type();
  for (const torch::Tensor* operand : operands) {
    if (operand == &inputs.skip && !operand->defined()) continue;
    if (!operand->defined() || !operand->device().is_cpu() || operand->scalar_type() != dtype) {
      return std::nullopt;
    }
  }
  if (state != nullptr && state->defined() && !state->device().is_cpu()) return std::nullopt;
  const Dims d = DimsOf(inputs);
  if (dtype == torch::kFloat32) return ScanLoop<float>(inputs, d, state);
  if (dtype == torch::kFloat64) return ScanLoop<double>(inputs, d, state);
  return std::nullopt;
}

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
  return AddSkip(torch::stack(outputs, 1).reshape({d.batch, d.length, d.heads, d.head_dim}),
                 inputs);
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
  return AddSkip((within + from_entering)
                     .permute({0, 1, 4, 2, 3, 5})  // [B, C, Q, G, Kh, P]
                     .reshape({d.batch, chunks * q, d.heads, d.head_dim})
                     .narrow(1, 0, d.length),
                 inputs);
}

StateSpaceInputs TimeSlice(const StateSpaceInputs& inputs, int64_t start, int64_t length) {
  StateSpaceInputs slice = inputs;
  slice.hidden = inputs.hidden.narrow(1, start, length);
  if (inputs.delta.defined()) slice.delta = inputs.delta.narrow(1, start, length);
  if (inputs.time_step.defined()) slice.time_step = inputs.time_step.narrow(1, start, length);
  slice.b_proj = inputs.b_proj.narrow(1, start, length);
  slice.c_proj = inputs.c_proj.narrow(1, start, length);
  return slice;
}

StateSpaceInputs Widened(const StateSpaceInputs& inputs, torch::ScalarType accumulate) {
  StateSpaceInputs wide = inputs;
  if (!inputs.delta.defined()) {
    // As HF: the sum and softplus in the compute dtype, the bias cast back to
    // it (exactly, when a decode session widened it).
    const torch::Tensor& time_step = inputs.time_step;
    torch::Tensor delta =
        inputs.time_step_bias.defined()
            ? torch::softplus(time_step + inputs.time_step_bias.to(time_step.scalar_type()))
            : torch::softplus(time_step);  // [B, L, H]
    if (inputs.delta_limit.has_value()) {
      delta = torch::clamp(delta, inputs.delta_limit->first, inputs.delta_limit->second);
    }
    wide.delta = delta;
    wide.time_step = torch::Tensor();
    wide.time_step_bias = torch::Tensor();
    wide.delta_limit.reset();
  }
  if (!inputs.a_decay.defined() && inputs.a_log.defined()) {
    wide.a_decay = -torch::exp(inputs.a_log.to(accumulate));
    wide.a_log = torch::Tensor();
  }
  if (wide.a_decay.defined()) wide.a_decay = wide.a_decay.to(accumulate);
  if (wide.skip.defined()) wide.skip = wide.skip.to(accumulate);
  wide.hidden = wide.hidden.to(accumulate);
  wide.delta = wide.delta.to(accumulate);
  wide.b_proj = wide.b_proj.to(accumulate);
  wide.c_proj = wide.c_proj.to(accumulate);
  return wide;
}

#ifndef ICD_HAVE_CUDA_SCAN
std::optional<torch::Tensor> StateSpaceScanCuda(const StateSpaceInputs&, torch::Tensor*, bool,
                                                StateSpaceForm) {
  return std::nullopt;
}

int64_t StateSpaceStepEarlyLaunches() { return 0; }
#endif  // ICD_HAVE_CUDA_SCAN

}  // namespace icd::scan
