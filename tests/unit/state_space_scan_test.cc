// Mamba-2's chunked scan and its native CPU loop against the recurrence
// (scan/state_space_scan.h):
// the same function, summed in another order, over groups, head dims, state
// sizes, chunk sizes, lengths around and far past a chunk, with and without
// a carried state.
#include "scan/state_space_scan.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <optional>
#include <ostream>
#include <tuple>
#include <utility>
#include <vector>

#include "test_util.h"

namespace icd {
namespace {

using scan::StateSpaceInputs;
using scan::StateSpaceScanChunked;
using scan::StateSpaceScanSequential;

struct ScanShape {
  int64_t groups, heads_per_group, head_dim, state, chunk, length;
  bool initial_state = false;
};

void PrintTo(const ScanShape& s, std::ostream* os) {
  *os << "G" << s.groups << " Kh" << s.heads_per_group << " P" << s.head_dim << " N" << s.state
      << " chunk " << s.chunk << " L" << s.length << (s.initial_state ? " with S0" : "");
}

// Random inputs with the ranges a trained Mamba-2 sees: Δ in (0, ~1], A in
// [-16, -1], so decays run from near 1 to near 0 within a chunk.
StateSpaceInputs RandomInputs(const ScanShape& s, torch::ScalarType dtype, uint64_t seed,
                              int64_t batch = 2) {
  torch::manual_seed(seed);
  const auto options = torch::TensorOptions().dtype(dtype);
  const int64_t heads = s.groups * s.heads_per_group;
  StateSpaceInputs in;
  in.hidden = torch::randn({batch, s.length, heads, s.head_dim}, options);
  in.delta = torch::softplus(torch::randn({batch, s.length, heads}, options) - 1.0);
  in.a_decay = -torch::exp(torch::rand({heads}, options) * 2.77);
  in.b_proj = torch::randn({batch, s.length, s.groups, s.state}, options);
  in.c_proj = torch::randn({batch, s.length, s.groups, s.state}, options);
  in.skip = 1.0 + 0.3 * torch::randn({heads}, options);  // D, one per head
  return in;
}

torch::Tensor RandomState(const ScanShape& s, torch::ScalarType dtype, int64_t batch = 2) {
  return torch::randn({batch, s.groups * s.heads_per_group, s.head_dim, s.state},
                      torch::TensorOptions().dtype(dtype));
}

// Rel L2 of the chunked scan from the recurrence, on the outputs and on the
// final state, both started from `initial` (undefined: zeros).
struct Agreement {
  double output, state;
};

Agreement ChunkedAgainstRecurrence(const StateSpaceInputs& in, int64_t chunk,
                                   const torch::Tensor& initial) {
  torch::Tensor sequential_state, chunked_state;
  if (initial.defined()) {
    sequential_state = initial.clone();
    chunked_state = initial.clone();
  }
  const torch::Tensor reference = StateSpaceScanSequential(in, &sequential_state);
  const torch::Tensor chunked = StateSpaceScanChunked(in, chunk, &chunked_state);
  EXPECT_EQ(chunked.sizes(), reference.sizes());
  EXPECT_TRUE(torch::isfinite(chunked).all().item<bool>());
  return {testing::RelL2(chunked, reference), testing::RelL2(chunked_state, sequential_state)};
}

class StateSpaceScanTest : public ::testing::TestWithParam<ScanShape> {};

TEST_P(StateSpaceScanTest, ChunkedEqualsTheRecurrence) {
  const ScanShape s = GetParam();
  const StateSpaceInputs in = RandomInputs(s, torch::kFloat32, 11);
  const Agreement rel = ChunkedAgainstRecurrence(
      in, s.chunk, s.initial_state ? RandomState(s, torch::kFloat32) : torch::Tensor());
  EXPECT_LE(rel.output, 1e-5);
  EXPECT_LE(rel.state, 1e-5);
}

std::vector<ScanShape> Shapes() {
  std::vector<ScanShape> shapes;
  // Lengths around one chunk and far past it, with and without S0.
  for (const int64_t chunk : {64, 256}) {
    for (const int64_t length : {int64_t{1}, int64_t{7}, chunk - 1, chunk, chunk + 1,
                                 int64_t{2048}, int64_t{4099}}) {
      for (const bool initial_state : {false, true}) {
        shapes.push_back({2, 2, 32, 16, chunk, length, initial_state});
      }
    }
  }
  // Groups, head dims and state sizes, each across its range.
  for (const int64_t groups : {1, 2, 4, 8}) shapes.push_back({groups, 2, 16, 16, 64, 300, true});
  for (const int64_t head_dim : {32, 64, 128}) shapes.push_back({2, 2, head_dim, 16, 64, 200, true});
  for (const int64_t state : {16, 64, 128}) shapes.push_back({2, 2, 32, state, 64, 200, true});
  return shapes;
}

// The native loop (the CPU's form) against the recurrence in LibTorch ops,
// on the same shapes.
TEST_P(StateSpaceScanTest, LoopEqualsTheRecurrence) {
  const ScanShape s = GetParam();
  const StateSpaceInputs in = RandomInputs(s, torch::kFloat32, 16);
  torch::Tensor reference_state, loop_state;
  if (s.initial_state) {
    reference_state = RandomState(s, torch::kFloat32);
    loop_state = reference_state.clone();
  }
  const torch::Tensor before = loop_state.defined() ? loop_state.clone() : torch::Tensor();
  const torch::Tensor reference = StateSpaceScanSequential(in, &reference_state);
  std::optional<torch::Tensor> loop = scan::StateSpaceScanLoop(in, &loop_state);
  ASSERT_TRUE(loop.has_value());
  EXPECT_EQ(loop->sizes(), reference.sizes());
  EXPECT_LE(testing::RelL2(*loop, reference), 1e-5);
  EXPECT_LE(testing::RelL2(loop_state, reference_state), 1e-5);
  if (before.defined()) {
    // The state is carried, not written into the caller's tensor.
    EXPECT_FALSE(loop_state.is_same(before));
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, StateSpaceScanTest, ::testing::ValuesIn(Shapes()));

// Float64 to float64's rounding; views of wider tensors (as the forward's
// narrow()s of xBC) read as their values; CUDA and other dtypes declined.
TEST(StateSpaceScanLoopTest, Float64ViewsAndWhatItDeclines) {
  const ScanShape s{2, 2, 32, 16, 64, 333, true};
  StateSpaceInputs in = RandomInputs(s, torch::kFloat64, 17);
  in.b_proj = torch::cat({in.b_proj, in.c_proj}, -1).narrow(-1, 0, s.state);
  torch::Tensor reference_state = RandomState(s, torch::kFloat64);
  torch::Tensor loop_state = reference_state.clone();
  const torch::Tensor reference = StateSpaceScanSequential(in, &reference_state);
  std::optional<torch::Tensor> loop = scan::StateSpaceScanLoop(in, &loop_state);
  ASSERT_TRUE(loop.has_value());
  EXPECT_LE(testing::RelL2(*loop, reference), 1e-13);
  EXPECT_LE(testing::RelL2(loop_state, reference_state), 1e-13);
  StateSpaceInputs half = RandomInputs(s, torch::kFloat32, 18);
  half.hidden = half.hidden.to(torch::kBFloat16);
  EXPECT_FALSE(scan::StateSpaceScanLoop(half).has_value());
}

// D per channel (mamba_ssm's D_has_hdim) and no D at all, in all three forms.
TEST(StateSpaceScanLoopTest, SkipPerChannelAndNone) {
  // Head dims of whole vectors and of vectors and a tail (18 in float64's
  // 4 lanes, 20 in float32's 8): the loop adds D x in both places.
  for (const auto& [dtype, head_dim, tolerance] :
       {std::tuple{torch::kFloat64, int64_t{16}, 1e-13}, std::tuple{torch::kFloat64, int64_t{18}, 1e-13},
        std::tuple{torch::kFloat32, int64_t{20}, 1e-5}}) {
    const ScanShape shape{2, 2, head_dim, 16, 64, 150, true};
    StateSpaceInputs widths = RandomInputs(shape, dtype, 20);
    // D per channel, per head, none.
    for (const int64_t skips : {4 * head_dim, int64_t{4}, int64_t{0}}) {
      widths.skip = skips > 0 ? torch::randn({skips}, dtype) : torch::Tensor();
      const torch::Tensor reference = StateSpaceScanSequential(widths);
      const torch::Tensor chunked = StateSpaceScanChunked(widths, 64);
      const torch::Tensor loop = *scan::StateSpaceScanLoop(widths);
      EXPECT_LE(testing::RelL2(chunked, reference), tolerance) << skips << " " << head_dim;
      EXPECT_LE(testing::RelL2(loop, reference), tolerance) << skips << " " << head_dim;
    }
  }
  const ScanShape s{2, 2, 16, 16, 64, 150, true};
  StateSpaceInputs in = RandomInputs(s, torch::kFloat64, 20);
  // The skip is y's own term: without it the outputs differ by D x.
  in.skip = torch::full({4}, 2.0, torch::kFloat64);
  StateSpaceInputs bare = in;
  bare.skip = torch::Tensor();
  const torch::Tensor difference = *scan::StateSpaceScanLoop(in) - *scan::StateSpaceScanLoop(bare);
  EXPECT_LE(testing::RelL2(difference, 2.0 * in.hidden), 1e-13);
}

// A as A_log and D in the model's dtype, as the forward now passes them:
// Widened resolves A = -exp(A_log) and widens D with the ops the forward
// used before (-exp(A_log.to(accumulate)), D.to(accumulate)), so every
// form's result keeps its bits.
TEST(StateSpaceScanWidenedTest, ResolvesDecayFromItsLog) {
  const ScanShape s{2, 2, 16, 16, 64, 150, true};
  const StateSpaceInputs given = RandomInputs(s, torch::kFloat32, 21);
  StateSpaceInputs held = given;
  held.a_log = torch::log(torch::rand({4}) * 4 + 0.5).to(torch::kBFloat16);
  held.a_decay = torch::Tensor();
  held.skip = given.skip.to(torch::kBFloat16);
  for (const torch::ScalarType accumulate : {torch::kFloat32, torch::kFloat64}) {
    StateSpaceInputs before = given;  // as the forward built them before
    before.a_decay = -torch::exp(held.a_log.to(accumulate));
    before.skip = held.skip.to(accumulate);
    const StateSpaceInputs widened = scan::Widened(held, accumulate);
    EXPECT_FALSE(widened.a_log.defined());
    EXPECT_TRUE(torch::equal(widened.a_decay, before.a_decay)) << c10::toString(accumulate);
    EXPECT_TRUE(torch::equal(widened.skip, before.skip)) << c10::toString(accumulate);
    EXPECT_TRUE(torch::equal(*scan::StateSpaceScanLoop(widened),
                             *scan::StateSpaceScanLoop(scan::Widened(before, accumulate))))
        << c10::toString(accumulate);
  }
}

// A sequence in two calls of the loop is the sequence in one.
TEST(StateSpaceScanLoopTest, CarriedStateJoinsTwoCalls) {
  const ScanShape s{2, 2, 32, 16, 64, 500, false};
  const StateSpaceInputs in = RandomInputs(s, torch::kFloat32, 19);
  torch::Tensor whole_state, split_state;
  const torch::Tensor whole = *scan::StateSpaceScanLoop(in, &whole_state);
  const torch::Tensor first = *scan::StateSpaceScanLoop(scan::TimeSlice(in, 0, 130), &split_state);
  const torch::Tensor second =
      *scan::StateSpaceScanLoop(scan::TimeSlice(in, 130, 370), &split_state);
  // The same operations in the same order: bit for bit.
  EXPECT_TRUE(torch::equal(torch::cat({first, second}, 1), whole));
  EXPECT_TRUE(torch::equal(split_state, whole_state));
}

// In float64 the two orders agree to float64's own rounding.
TEST(StateSpaceScanPrecisionTest, Float64AgreesToItsRounding) {
  const ScanShape s{2, 2, 32, 16, 64, 333, true};
  const StateSpaceInputs in = RandomInputs(s, torch::kFloat64, 12);
  const Agreement rel = ChunkedAgainstRecurrence(in, 64, RandomState(s, torch::kFloat64));
  EXPECT_LE(rel.output, 1e-13);
  EXPECT_LE(rel.state, 1e-13);
}

// Strong decays over a long chunk: Σ Δ·A reaches about -1,500 within a
// chunk of 256, where a decay taken as a difference of two running sums
// carries their rounding (docs/mamba2-scan.md: 40x the error measured here);
// the segment sums do not.
TEST(StateSpaceScanPrecisionTest, StrongDecayOverALongChunk) {
  const ScanShape s{1, 2, 16, 16, 256, 700, true};
  StateSpaceInputs in = RandomInputs(s, torch::kFloat32, 13);
  in.a_decay = torch::full({2}, -16.0f);
  const Agreement rel = ChunkedAgainstRecurrence(in, 256, RandomState(s, torch::kFloat32));
  EXPECT_LE(rel.output, 1e-6);
  EXPECT_LE(rel.state, 1e-6);
}

// A sequence in two calls, the state carried between them, is the sequence
// in one call (what a chunked prefill in slices and a decode rely on).
TEST(StateSpaceScanPrecisionTest, CarriedStateJoinsTwoCalls) {
  const ScanShape s{2, 2, 32, 16, 64, 500, false};
  const StateSpaceInputs in = RandomInputs(s, torch::kFloat32, 14);
  torch::Tensor whole_state, split_state;
  const torch::Tensor whole = StateSpaceScanChunked(in, 64, &whole_state);
  const torch::Tensor first = StateSpaceScanChunked(scan::TimeSlice(in, 0, 130), 64, &split_state);
  const torch::Tensor second =
      StateSpaceScanChunked(scan::TimeSlice(in, 130, 370), 64, &split_state);
  EXPECT_LE(testing::RelL2(torch::cat({first, second}, 1), whole), 1e-6);
  EXPECT_LE(testing::RelL2(split_state, whole_state), 1e-6);
}

// The CPU result does not depend on how many threads LibTorch uses.
TEST(StateSpaceScanPrecisionTest, BitwiseTheSameOnOneAndOnFourThreads) {
  const ScanShape s{2, 4, 32, 16, 64, 1000, true};
  const StateSpaceInputs in = RandomInputs(s, torch::kFloat32, 15);
  const torch::Tensor initial = RandomState(s, torch::kFloat32);
  const int threads = torch::get_num_threads();
  torch::Tensor results[2], states[2];
  const int counts[2] = {1, 4};
  for (int i = 0; i < 2; ++i) {
    torch::set_num_threads(counts[i]);
    states[i] = initial.clone();
    results[i] = StateSpaceScanChunked(in, 64, &states[i]);
  }
  torch::Tensor loop_results[2], loop_states[2];
  for (int i = 0; i < 2; ++i) {
    torch::set_num_threads(counts[i]);
    loop_states[i] = initial.clone();
    loop_results[i] = *scan::StateSpaceScanLoop(in, &loop_states[i]);
  }
  torch::set_num_threads(threads);
  EXPECT_TRUE(torch::equal(results[0], results[1]));
  EXPECT_TRUE(torch::equal(states[0], states[1]));
  EXPECT_TRUE(torch::equal(loop_results[0], loop_results[1]));
  EXPECT_TRUE(torch::equal(loop_states[0], loop_states[1]));
}

// Widened: Δ from the raw time step as HF computes it (the sum and the
// softplus in the compute dtype, then the dt limit), a bias already widened
// to float32 (as a decode session keeps it) giving the same bits, x / B / C
// cast to the accumulate dtype; TimeSlice slices the raw time step too.
TEST(StateSpaceWidenedTest, ResolvesTheTimeStepAsHf) {
  torch::manual_seed(31);
  StateSpaceInputs inputs;
  inputs.hidden = torch::randn({2, 9, 4, 8}).to(torch::kBFloat16);
  inputs.b_proj = torch::randn({2, 9, 2, 16}).to(torch::kBFloat16);
  inputs.c_proj = torch::randn({2, 9, 2, 16}).to(torch::kBFloat16);
  inputs.a_decay = -torch::rand({4}) - 0.5;
  inputs.time_step = (torch::randn({2, 9, 4}) * 3).to(torch::kBFloat16);
  inputs.time_step_bias = torch::randn({4}).to(torch::kBFloat16);
  for (const bool limited : {false, true}) {
    if (limited) inputs.delta_limit = std::make_pair(0.05, 0.8);
    const StateSpaceInputs wide = scan::Widened(inputs, torch::kFloat32);
    torch::Tensor expected = torch::softplus(inputs.time_step + inputs.time_step_bias);
    if (limited) expected = torch::clamp(expected, 0.05, 0.8);
    ASSERT_EQ(wide.delta.scalar_type(), torch::kFloat32);
    EXPECT_TRUE(torch::equal(wide.delta, expected.to(torch::kFloat32))) << limited;
    EXPECT_FALSE(wide.time_step.defined());
    EXPECT_FALSE(wide.delta_limit.has_value());
    if (limited) {
      EXPECT_GE(wide.delta.min().item<float>(), 0.0499f);
      EXPECT_LE(wide.delta.max().item<float>(), 0.801f);
    }
    // The same bias widened: the same Δ, bit for bit.
    StateSpaceInputs widened_bias = inputs;
    widened_bias.time_step_bias = inputs.time_step_bias.to(torch::kFloat32);
    EXPECT_TRUE(torch::equal(scan::Widened(widened_bias, torch::kFloat32).delta, wide.delta));
    EXPECT_TRUE(torch::equal(wide.hidden, inputs.hidden.to(torch::kFloat32)));
    EXPECT_TRUE(torch::equal(wide.b_proj, inputs.b_proj.to(torch::kFloat32)));
    EXPECT_EQ(wide.c_proj.scalar_type(), torch::kFloat32);
  }
  const StateSpaceInputs slice = scan::TimeSlice(inputs, 3, 4);
  EXPECT_TRUE(torch::equal(slice.time_step, inputs.time_step.narrow(1, 3, 4)));
  EXPECT_FALSE(slice.delta.defined());
  // A float32 widening of the bf16 Δ computed in float32 would differ: the
  // check above sees the compute dtype's rounding.
  const torch::Tensor in_float32 = torch::softplus(inputs.time_step.to(torch::kFloat32) +
                                                   inputs.time_step_bias.to(torch::kFloat32));
  EXPECT_FALSE(torch::equal(scan::Widened(StateSpaceInputs(inputs), torch::kFloat32).delta,
                            torch::clamp(in_float32, 0.05, 0.8)));
}

}  // namespace
}  // namespace icd
