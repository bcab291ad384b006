#include "scan/selective_scan.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "cpu_vector.h"

namespace icd::scan {
namespace {

using cpu_vector::kLanes;
using cpu_vector::Load;
using cpu_vector::Store;
using cpu_vector::Vector;

// The loop's operands, contiguous, in float32: Δ (after bias and softplus),
// x, silu(z), y [B, L, I]; B, C [B, L, N]; A transposed [N, I]; D [I]; the
// state [B, I, N] (null: zeros in, not kept).
struct Mamba1LoopOperands {
  int64_t seq_len, inner, state_size;
  const float* delta;
  const float* hidden;
  const float* gate_act;
  const float* b_proj;
  const float* c_proj;
  const float* decay_rate;  // A [N, I]
  const float* skip;        // D [I]
  float* state;
  float* output;
};

// Channels [first, first + kLanes) of one batch row over all steps: the
// state of those channels, [N] vectors, in `held`.
[[gnu::always_inline]] inline void ScanChannelBlock(const Mamba1LoopOperands& o, int64_t batch,
                                                    int64_t first, float* __restrict__ held) {
  constexpr int64_t kWidth = kLanes<float>;
  const int64_t inner = o.inner, state_size = o.state_size;
  float* const state = o.state != nullptr ? o.state + batch * inner * state_size : nullptr;
  for (int64_t n = 0; n < state_size; ++n) {
    for (int64_t j = 0; j < kWidth; ++j) {
      held[n * kWidth + j] = state != nullptr ? state[(first + j) * state_size + n] : 0.0f;
    }
  }
  Vector<float> skip, rate;
  Load(skip, o.skip + first);
  for (int64_t t = 0; t < o.seq_len; ++t) {
    const int64_t row = (batch * o.seq_len + t) * inner + first;
    const float* b = o.b_proj + (batch * o.seq_len + t) * state_size;
    const float* c = o.c_proj + (batch * o.seq_len + t) * state_size;
    Vector<float> delta, x, act;
    Load(delta, o.delta + row);
    Load(x, o.hidden + row);
    Load(act, o.gate_act + row);
    const Vector<float> delta_x = delta * x;
    Vector<float> y = {}, h;
    for (int64_t n = 0; n < state_size; ++n) {
      Load(rate, o.decay_rate + n * inner + first);
      Vector<float> decay = delta * rate;
      cpu_vector::Exp(decay);
      Load(h, held + n * kWidth);
      h = decay * h + delta_x * b[n];
      Store(held + n * kWidth, h);
      y += h * c[n];
    }
    Store(o.output + row, (y + x * skip) * act);
  }
  if (state != nullptr) {
    for (int64_t n = 0; n < state_size; ++n) {
      for (int64_t j = 0; j < kWidth; ++j) state[(first + j) * state_size + n] = held[n * kWidth + j];
    }
  }
}

// Channels past the last whole block, one at a time with std::exp.
void ScanChannel(const Mamba1LoopOperands& o, int64_t batch, int64_t channel,
                 std::vector<float>& held) {
  const int64_t inner = o.inner, state_size = o.state_size;
  float* const state = o.state != nullptr ? o.state + (batch * inner + channel) * state_size : nullptr;
  for (int64_t n = 0; n < state_size; ++n) held[n] = state != nullptr ? state[n] : 0.0f;
  for (int64_t t = 0; t < o.seq_len; ++t) {
    const int64_t at = (batch * o.seq_len + t) * inner + channel;
    const float* b = o.b_proj + (batch * o.seq_len + t) * state_size;
    const float* c = o.c_proj + (batch * o.seq_len + t) * state_size;
    const float delta = o.delta[at], x = o.hidden[at];
    float y = 0.0f;
    for (int64_t n = 0; n < state_size; ++n) {
      held[n] = std::exp(delta * o.decay_rate[n * inner + channel]) * held[n] + delta * x * b[n];
      y += held[n] * c[n];
    }
    o.output[at] = (y + x * o.skip[channel]) * o.gate_act[at];
  }
  if (state != nullptr) std::copy(held.begin(), held.end(), state);
}

ICD_VECTOR_CLONES void ScanTasks(const Mamba1LoopOperands& o, int64_t blocks, int64_t begin,
                                 int64_t end) {
  // (Plain floats: std::vector of 32-byte vectors crashed on misaligned storage.)
  std::vector<float> held(static_cast<size_t>(o.state_size * kLanes<float>));
  std::vector<float> scalar_held(static_cast<size_t>(o.state_size));
  for (int64_t task = begin; task < end; ++task) {
    const int64_t batch = task / blocks, block = task % blocks;
    const int64_t first = block * kLanes<float>;
    if (first + kLanes<float> <= o.inner) {
      ScanChannelBlock(o, batch, first, held.data());
    } else {
      for (int64_t channel = first; channel < o.inner; ++channel) {
        ScanChannel(o, batch, channel, scalar_held);
      }
    }
  }
}

}  // namespace

std::optional<torch::Tensor> SelectiveScanLoop(const ScanInputs& given,
                                               torch::ScalarType accumulate,
                                               torch::Tensor* state) {
  if (accumulate != torch::kFloat32 || !given.hidden.defined() || !given.hidden.device().is_cpu() ||
      given.hidden.scalar_type() != torch::kFloat32 ||
      (!given.delta.defined() && !given.delta_input.defined())) {
    return std::nullopt;
  }
  const ScanInputs inputs = ResolveParameters(ResolveDelta(given), accumulate);
  const torch::Tensor* operands[] = {&inputs.delta,  &inputs.a_decay, &inputs.b_proj,
                                     &inputs.c_proj, &inputs.d_skip,  &inputs.gate};
  for (const torch::Tensor* operand : operands) {
    if (!operand->defined() || !operand->device().is_cpu()) return std::nullopt;
  }
  const int64_t batch = inputs.hidden.size(0), seq_len = inputs.hidden.size(1);
  const int64_t inner = inputs.hidden.size(2), state_size = inputs.a_decay.size(1);
  // Δ = softplus(dt_proj(δ) + bias) in the compute dtype and silu(z) as the
  // reference takes them: one vectorised LibTorch pass each.
  const torch::Tensor delta =
      torch::softplus(inputs.delta_bias.defined() ? inputs.delta + inputs.delta_bias : inputs.delta)
          .to(torch::kFloat32)
          .contiguous();                                                         // [B, L, I]
  const torch::Tensor hidden = inputs.hidden.contiguous();                       // [B, L, I]
  const torch::Tensor gate_act = torch::silu(inputs.gate.to(torch::kFloat32)).contiguous();
  const torch::Tensor b_proj = inputs.b_proj.to(torch::kFloat32).contiguous();  // [B, L, N]
  const torch::Tensor c_proj = inputs.c_proj.to(torch::kFloat32).contiguous();  // [B, L, N]
  const torch::Tensor rate = inputs.a_decay.to(torch::kFloat32).t().contiguous();  // [N, I]
  const torch::Tensor skip = inputs.d_skip.to(torch::kFloat32).contiguous();      // [I]
  torch::Tensor carried;  // [B, I, N]
  if (state != nullptr) {
    carried = state->defined()
                  ? state->to(torch::kFloat32).contiguous().clone()
                  : torch::zeros({batch, inner, state_size}, hidden.options());
  }
  torch::Tensor output = torch::empty({batch, seq_len, inner}, hidden.options());  // [B, L, I]
  const Mamba1LoopOperands o{seq_len,
                             inner,
                             state_size,
                             delta.data_ptr<float>(),
                             hidden.data_ptr<float>(),
                             gate_act.data_ptr<float>(),
                             b_proj.data_ptr<float>(),
                             c_proj.data_ptr<float>(),
                             rate.data_ptr<float>(),
                             skip.data_ptr<float>(),
                             carried.defined() ? carried.data_ptr<float>() : nullptr,
                             output.data_ptr<float>()};
  const int64_t blocks = (inner + kLanes<float> - 1) / kLanes<float>;
  at::parallel_for(0, batch * blocks, 1,
                   [&](int64_t begin, int64_t end) { ScanTasks(o, blocks, begin, end); });
  if (state != nullptr) *state = carried;
  return output;
}

ScanInputs ResolveDelta(const ScanInputs& inputs) {
  if (inputs.delta.defined() || !inputs.delta_proj_weight.defined()) return inputs;
  ScanInputs resolved = inputs;
  resolved.delta = torch::linear(inputs.delta_input, inputs.delta_proj_weight);  // [B, L, I]
  resolved.delta_input = torch::Tensor();
  resolved.delta_proj_weight = torch::Tensor();
  return resolved;
}

ScanInputs ResolveParameters(const ScanInputs& inputs, torch::ScalarType accumulate) {
  ScanInputs resolved = inputs;
  if (!inputs.a_decay.defined() && inputs.a_log.defined()) {
    resolved.a_decay = -torch::exp(inputs.a_log.to(accumulate));  // [I, N]
    resolved.a_log = torch::Tensor();
  }
  if (inputs.d_skip.defined()) resolved.d_skip = inputs.d_skip.to(accumulate);  // [I]
  return resolved;
}

torch::Tensor SelectiveScanReference(const ScanInputs& given, torch::ScalarType accumulate,
                                     torch::Tensor* state) {
  const ScanInputs inputs = ResolveParameters(ResolveDelta(given), accumulate);
  const int64_t batch = inputs.hidden.size(0);
  const int64_t seq_len = inputs.hidden.size(1);
  const int64_t inner = inputs.hidden.size(2);
  const int64_t state_size = inputs.a_decay.size(1);
  torch::Tensor hidden_wide = inputs.hidden.to(accumulate);  // [B, L, I]
  // Δ = softplus(dt_proj(δ)) in the compute dtype, as HF.
  torch::Tensor delta = torch::softplus(inputs.delta_bias.defined()
                                            ? inputs.delta + inputs.delta_bias
                                            : inputs.delta)
                            .to(accumulate);               // [B, L, I]
  torch::Tensor delta_x = delta * hidden_wide;             // [B, L, I]
  torch::Tensor b_wide = inputs.b_proj.to(accumulate);                // [B, L, N]
  torch::Tensor c_wide = inputs.c_proj.to(accumulate).unsqueeze(-1);  // [B, L, N, 1]

  // Sequential over time: one [B, I, N] state, no [B, I, L, N] tensor.
  torch::Tensor ssm_state =
      state != nullptr && state->defined()
          ? state->to(accumulate)
          : torch::zeros({batch, inner, state_size}, hidden_wide.options());  // [B, I, N]
  std::vector<torch::Tensor> scan_outputs;
  scan_outputs.reserve(static_cast<size_t>(seq_len));
  for (int64_t step = 0; step < seq_len; ++step) {
    torch::Tensor decay =
        torch::exp(delta.select(1, step).unsqueeze(-1) * inputs.a_decay);  // [B, I, N]
    torch::Tensor drive =
        delta_x.select(1, step).unsqueeze(-1) * b_wide.select(1, step).unsqueeze(1);  // [B, I, N]
    ssm_state = decay * ssm_state + drive;
    scan_outputs.push_back(torch::matmul(ssm_state, c_wide.select(1, step)).squeeze(-1));  // [B, I]
  }
  if (state != nullptr) *state = ssm_state;
  torch::Tensor scan_output = torch::stack(scan_outputs, 1);  // [B, L, I]
  // Skip connection D·x, then the gate silu(z).
  scan_output = scan_output + hidden_wide * inputs.d_skip;
  return (scan_output * torch::silu(inputs.gate.to(accumulate))).to(inputs.hidden.scalar_type());
}

ScanInputs TimeSlice(const ScanInputs& inputs, int64_t start, int64_t length) {
  ScanInputs slice = inputs;
  slice.hidden = inputs.hidden.narrow(1, start, length);
  if (inputs.delta.defined()) slice.delta = inputs.delta.narrow(1, start, length);
  if (inputs.delta_input.defined()) slice.delta_input = inputs.delta_input.narrow(1, start, length);
  slice.b_proj = inputs.b_proj.narrow(1, start, length);
  slice.c_proj = inputs.c_proj.narrow(1, start, length);
  slice.gate = inputs.gate.narrow(1, start, length);
  return slice;
}

#ifndef ICD_HAVE_CUDA_SCAN
bool UsesCudaKernel(const ScanInputs&, torch::ScalarType) { return false; }

torch::Tensor SelectiveScan(const ScanInputs& inputs, torch::ScalarType accumulate,
                            torch::Tensor* state, bool /*in_place*/) {
  if (std::optional<torch::Tensor> loop = SelectiveScanLoop(inputs, accumulate, state)) {
    return *std::move(loop);
  }
  return SelectiveScanReference(inputs, accumulate, state);
}

int64_t SelectiveStateStepEarlyLaunches() { return 0; }
#endif  // The CUDA build defines these in selective_scan_cuda.cc.

}  // namespace icd::scan
