// Mamba-1's scan on the CPU: the native loop (scan::SelectiveScanLoop)
// against the LibTorch reference, over shapes with and without a whole
// vector of channels, state sizes, a carried state and dt_proj's product.
#include "scan/selective_scan.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <optional>
#include <string>

#include "test_util.h"

namespace icd {
namespace {

struct Shape {
  int64_t batch, seq_len, inner, state_size;
};

std::string Describe(const Shape& s) {
  return "B" + std::to_string(s.batch) + " L" + std::to_string(s.seq_len) + " I" +
         std::to_string(s.inner) + " N" + std::to_string(s.state_size);
}

// Inputs laid out as Mamba1Mixer passes them: x and z narrow()s of one
// projection, B and C of another, the time step before bias and softplus.
scan::ScanInputs RandomInputs(const Shape& s, uint64_t seed) {
  torch::manual_seed(seed);
  const torch::Tensor projected = torch::randn({s.batch, s.seq_len, 2 * s.inner});
  const torch::Tensor params = torch::randn({s.batch, s.seq_len, 3 + 2 * s.state_size});
  scan::ScanInputs in;
  in.hidden = projected.narrow(-1, 0, s.inner);
  in.gate = projected.narrow(-1, s.inner, s.inner);
  in.b_proj = params.narrow(-1, 3, s.state_size);
  in.c_proj = params.narrow(-1, 3 + s.state_size, s.state_size);
  in.delta = torch::randn({s.batch, s.seq_len, s.inner}) - 1.0;
  in.delta_bias = 0.5 * torch::randn({s.inner});
  in.a_decay = -torch::exp(torch::log(torch::arange(1, s.state_size + 1, torch::kFloat32))
                               .repeat({s.inner, 1}) +
                           0.3 * torch::randn({s.inner, s.state_size}));
  in.d_skip = 1.0 + 0.2 * torch::randn({s.inner});
  return in;
}

TEST(SelectiveScanLoopTest, MatchesTheReference) {
  uint64_t seed = 900;
  for (const Shape& s : {Shape{1, 1, 8, 16}, Shape{3, 7, 24, 16}, Shape{2, 300, 13, 16},
                         Shape{2, 65, 40, 1}, Shape{1, 33, 16, 40}, Shape{2, 200, 256, 16}}) {
    for (const bool with_state : {false, true}) {
      const scan::ScanInputs in = RandomInputs(s, seed++);
      torch::Tensor loop_state, reference_state;
      if (with_state) {
        loop_state = torch::randn({s.batch, s.inner, s.state_size});
        reference_state = loop_state.clone();
      }
      std::optional<torch::Tensor> loop = scan::SelectiveScanLoop(in, torch::kFloat32, &loop_state);
      ASSERT_TRUE(loop.has_value()) << Describe(s);
      const torch::Tensor reference =
          scan::SelectiveScanReference(in, torch::kFloat32, &reference_state);
      EXPECT_EQ(loop->sizes(), reference.sizes()) << Describe(s);
      EXPECT_LE(testing::RelL2(*loop, reference), 1e-5) << Describe(s) << " state " << with_state;
      EXPECT_LE(testing::RelL2(loop_state, reference_state), 1e-5) << Describe(s);
    }
  }
}

// dt_proj's product given instead of Δ (a decode step's inputs), and a
// sequence in two calls, the state carried, bit for bit one call.
TEST(SelectiveScanLoopTest, DeltaFromItsProjectionAndTwoCalls) {
  const Shape s{2, 50, 24, 16};
  scan::ScanInputs in = RandomInputs(s, 950);
  in.delta_input = torch::randn({s.batch, s.seq_len, 5});
  in.delta_proj_weight = 0.3 * torch::randn({s.inner, 5});
  in.delta = torch::Tensor();
  std::optional<torch::Tensor> loop = scan::SelectiveScanLoop(in, torch::kFloat32);
  ASSERT_TRUE(loop.has_value());
  EXPECT_LE(testing::RelL2(*loop, scan::SelectiveScanReference(in, torch::kFloat32)), 1e-5);

  scan::ScanInputs plain = RandomInputs(s, 951);
  torch::Tensor whole_state, split_state;
  const torch::Tensor whole = *scan::SelectiveScanLoop(plain, torch::kFloat32, &whole_state);
  const torch::Tensor first =
      *scan::SelectiveScanLoop(scan::TimeSlice(plain, 0, 17), torch::kFloat32, &split_state);
  const torch::Tensor second =
      *scan::SelectiveScanLoop(scan::TimeSlice(plain, 17, 33), torch::kFloat32, &split_state);
  EXPECT_TRUE(torch::equal(torch::cat({first, second}, 1), whole));
  EXPECT_TRUE(torch::equal(split_state, whole_state));
}

// The result does not depend on LibTorch's thread count; what the loop does
// not take (float64, bf16 compute) is declined for the reference.
TEST(SelectiveScanLoopTest, ThreadsAndWhatItDeclines) {
  const Shape s{3, 120, 40, 16};
  const scan::ScanInputs in = RandomInputs(s, 960);
  const int threads = torch::get_num_threads();
  torch::set_num_threads(1);
  const torch::Tensor one = *scan::SelectiveScanLoop(in, torch::kFloat32);
  torch::set_num_threads(4);
  const torch::Tensor four = *scan::SelectiveScanLoop(in, torch::kFloat32);
  torch::set_num_threads(threads);
  EXPECT_TRUE(torch::equal(one, four));
  EXPECT_FALSE(scan::SelectiveScanLoop(in, torch::kFloat64).has_value());
  scan::ScanInputs low = in;
  low.hidden = in.hidden.to(torch::kBFloat16);
  EXPECT_FALSE(scan::SelectiveScanLoop(low, torch::kFloat32).has_value());
}

// A_log given instead of A (the forward's prefill hands the parameters over
// as the model holds them): both CPU paths resolve A = -exp(A_log) and D in
// `accumulate` first, bit for bit A given; float64 stays float64.
TEST(SelectiveScanLoopTest, ALogResolvesAsAGiven) {
  const Shape s{2, 40, 24, 16};
  for (const torch::ScalarType accumulate : {torch::kFloat32, torch::kFloat64}) {
    scan::ScanInputs given = RandomInputs(s, 970);
    if (accumulate == torch::kFloat64) {
      for (torch::Tensor* t : {&given.hidden, &given.gate, &given.b_proj, &given.c_proj,
                               &given.delta, &given.delta_bias}) {
        *t = t->to(torch::kFloat64);
      }
    }
    scan::ScanInputs held = given;
    held.a_log = torch::log(-given.a_decay);  // float32 as a checkpoint holds it
    held.a_decay = torch::Tensor();
    scan::ScanInputs widened = given;
    widened.a_decay = -torch::exp(held.a_log.to(accumulate));
    widened.d_skip = given.d_skip.to(accumulate);
    const scan::ScanInputs resolved = scan::ResolveParameters(held, accumulate);
    EXPECT_FALSE(resolved.a_log.defined());
    EXPECT_EQ(resolved.a_decay.scalar_type(), accumulate);
    EXPECT_EQ(resolved.d_skip.scalar_type(), accumulate);
    torch::Tensor held_state, widened_state;
    EXPECT_TRUE(torch::equal(scan::SelectiveScan(held, accumulate, &held_state),
                             scan::SelectiveScan(widened, accumulate, &widened_state)))
        << c10::toString(accumulate);
    EXPECT_TRUE(torch::equal(held_state, widened_state));
    EXPECT_TRUE(torch::equal(scan::SelectiveScanReference(held, accumulate),
                             scan::SelectiveScanReference(widened, accumulate)));
  }
}

}  // namespace
}  // namespace icd
