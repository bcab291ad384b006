// GPU smoke test: the public engine API on "cuda" against HF's goldens.
// Every golden fixture (every layout) is loaded on cuda in float32, checked
// against the golden logits, permuted in all groups, verified, checked again,
// exported and reloaded on cuda; bfloat16 on cuda applies and verifies.
// Then icd's Mamba-1 scan kernel (scan/selective_scan.cu) and fused conv +
// SiLU and add + RMS norm kernels (fused/*.cu) against the LibTorch
// reference on the same CUDA inputs, the whole forward on cuda against the
// CPU's, and the batched permutation
// gather (gather/permute_gather.cu) against the CPU's, bit for bit, and
// Leiden on a CUDA graph (its dense passes as device GEMMs) against the CPU.
// Mamba-2's scan kernel (scan/state_space_scan.cu) against the recurrence,
// its gated norm kernel, and its whole forward on cuda against the CPU's.
// Decode sessions (decode.h): k steps replayed as one CUDA graph each equal
// one forward over the whole sequence at every position. float16 on cuda
// against the goldens, its permuted weights the float32 ones' cast bit for
// bit; a gather plan past the kernel's per-launch byte limit; MeasureLatency
// timed with CUDA events, and refused for models on two devices.
// Skipped where torch::cuda::is_available() is false (CPU CI, where ctest
// does not even run it: label gpu), failed there under ICD_REQUIRE_CUDA=1.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "blocks/shapes.h"
#include "io/checkpoint.h"
#include "io/config.h"
#include "forward/decode.h"
#include "forward/forward.h"
#include "forward/forward_internal.h"
#include "fused/fused.h"
#include "apply/gather/permute_gather.h"
#include "icd/core/engine.h"
#include "scan/selective_scan.h"
#include "scan/state_space_scan.h"
#include "apply/symmetry.h"
#include "test_util.h"
#include "traces/graph.h"
#include "traces/leiden.h"
#include "traces/stats.h"

namespace icd {
namespace {

using testing::GoldenDir;
using testing::ReadGolden;
using testing::RelL2;

using Case = testing::GoldenCase;

using testing::kGoldenTolerance;

// float16 logits against HF's float32 goldens. bfloat16's bound is 2e-2
// (design.md "Tolerances"; engine_test asserts it on the CPU, where the
// fixtures land at 6e-3 to 1.3e-2). The error is rounding of weights and
// activations, which scales with the unit roundoff: 2^-11 for float16
// against bfloat16's 2^-8, so float16 should land 8x closer (~1.6e-3 at
// worst). The bound is bfloat16's over 8 (2.5e-3), doubled because icd's
// kernels and cuBLAS sum in other orders than the CPU forward that gave the
// bfloat16 figures.
constexpr double kFloat16GoldenTolerance = 5e-3;


class CudaTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
    golden_ = ReadGolden(GetParam().fixture);
    source_ = (GoldenDir(GetParam().fixture) / GetParam().layout).string();
  }

  torch::Tensor Logits(const std::string& model) {
    EvaluateRequest request{golden_.input_ids, golden_.batch, /*return_logits=*/true};
    auto result = engine_.Evaluate(model, request);
    EXPECT_TRUE(result.ok()) << result.status();
    if (!result.ok()) return torch::zeros_like(golden_.logits);
    return torch::tensor(result->logits).reshape(result->shape);
  }

  std::string Name() const { return GetParam().fixture + "/" + GetParam().layout; }

  std::map<std::string, HostTensor> Tensors(const std::string& model) {
    return testing::TensorsByName(engine_, model);
  }

  // `path` loaded as `name` in `dtype`, which must land on cuda as
  // `expected`; `device` (optional) receives the device it landed on.
  void LoadOnCuda(const std::string& name, const std::string& path, const std::string& dtype,
                  DType expected, std::string* device = nullptr) {
    LoadOptions options;
    options.dtype = dtype;
    auto info = engine_.Load(name, path, options);
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_EQ(info->device.rfind("cuda", 0), 0u) << info->device;
    EXPECT_EQ(info->dtype, expected);
    if (device != nullptr) *device = info->device;
  }

  Engine engine_{EngineOptions{"cuda"}};
  testing::Golden golden_;
  std::string source_;
  testing::TempDir temp_;
};

TEST_P(CudaTest, Float32GoldenApplyVerifyExport) {
  std::string device;
  ASSERT_NO_FATAL_FAILURE(LoadOnCuda("m", source_, "float32", DType::kFloat32, &device));

  const double forward = RelL2(Logits("m"), golden_.logits);
  EXPECT_LE(forward, kGoldenTolerance);
  // The mean NLL as the device computes it (logsumexp less the target's
  // logit, engine.cc), against the one HF's logits give in float64.
  const int64_t positions = golden_.logits.size(1);
  const torch::Tensor ids = torch::tensor(golden_.input_ids).reshape({golden_.batch, positions});
  const torch::Tensor log_probs =
      torch::log_softmax(golden_.logits.slice(1, 0, positions - 1).to(torch::kFloat64), -1);
  const double golden_nll =
      -log_probs.gather(-1, ids.slice(1, 1, positions).unsqueeze(-1)).mean().item<double>();
  auto scored = engine_.Evaluate("m", {golden_.input_ids, golden_.batch, false});
  ASSERT_TRUE(scored.ok()) << scored.status();
  EXPECT_NEAR(scored->mean_nll, golden_nll, 1e-4 * golden_nll);
  auto verify = engine_.Verify("m");
  ASSERT_TRUE(verify.ok()) << verify.status();
  EXPECT_TRUE(verify->ok) << verify->rel_l2;

  auto groups = engine_.Symmetries("m");
  ASSERT_TRUE(groups.ok()) << groups.status();
  std::mt19937_64 rng(7);
  auto report = engine_.Apply("m", testing::RandomPermutations(*groups, rng));
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->verified);
  EXPECT_TRUE(report->correctness.ok) << report->correctness.rel_l2;
  auto verify_after = engine_.Verify("m");
  ASSERT_TRUE(verify_after.ok()) << verify_after.status();
  EXPECT_TRUE(verify_after->ok) << verify_after->rel_l2;
  const double permuted = RelL2(Logits("m"), golden_.logits);
  EXPECT_LE(permuted, kGoldenTolerance);

  // The device's memory as LibTorch's CUDA allocator has it (the metrics'
  // icd_cuda_allocator_bytes) covers the model's bytes; the CPU has none.
  auto info = engine_.Info("m");
  ASSERT_TRUE(info.ok()) << info.status();
  bool found = false;
  for (const DeviceMemory& memory : engine_.Memory()) {
    if (memory.device == "cpu") {
      EXPECT_EQ(memory.allocator_reserved_bytes, -1);
    }
    // The model's "cuda" is the ledger's "cuda:0".
    if (memory.device.rfind("cuda:", 0) != 0 || memory.models == 0) continue;
    found = true;
    EXPECT_GE(memory.allocator_allocated_bytes, info->device_bytes) << device;
    EXPECT_GE(memory.allocator_reserved_bytes, memory.allocator_allocated_bytes) << device;
  }
  EXPECT_TRUE(found) << device;

  const auto target = temp_.path() / "export";
  auto exported = engine_.Export("m", target.string());
  ASSERT_TRUE(exported.ok()) << exported.status();
  ASSERT_NO_FATAL_FAILURE(LoadOnCuda("r", target.string(), "float32", DType::kFloat32));
  const double reload = RelL2(Logits("r"), golden_.logits);
  EXPECT_LE(reload, kGoldenTolerance);

  std::printf("[cuda] %s device %s groups %zu forward rel_l2 %.3g, apply check rel_l2 %.3g, "
              "permuted rel_l2 %.3g, reloaded rel_l2 %.3g\n",
              Name().c_str(), device.c_str(), groups->size(), forward,
              report->correctness.rel_l2, permuted, reload);
}

TEST_P(CudaTest, BFloat16ApplyVerify) {
  LoadOptions options;
  options.dtype = "bfloat16";
  auto info = engine_.Load("b", source_, options);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->dtype, DType::kBFloat16);
  auto groups = engine_.Symmetries("b");
  ASSERT_TRUE(groups.ok()) << groups.status();
  std::mt19937_64 rng(8);
  auto report = engine_.Apply("b", testing::RandomPermutations(*groups, rng));
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->verified);
  EXPECT_TRUE(report->correctness.ok) << report->correctness.rel_l2;
  auto verify = engine_.Verify("b");
  ASSERT_TRUE(verify.ok()) << verify.status();
  EXPECT_TRUE(verify->ok) << verify->rel_l2;
  const double vs_golden = RelL2(Logits("b"), golden_.logits);
  std::printf("[cuda] %s bfloat16 apply check rel_l2 %.3g (tol %.3g), verify rel_l2 %.3g, "
              "vs float32 golden rel_l2 %.3g (informative)\n",
              Name().c_str(), report->correctness.rel_l2, report->correctness.tolerance,
              verify->rel_l2, vs_golden);
}

// float16 runs only on cuda (the CPU refuses it), so only here: HF's
// float32 logits within kFloat16GoldenTolerance before and after permuting
// every group, and Verify passing. The probe's 2e-2 alone cannot judge a
// half-precision apply (engine_test's bfloat16 case says why), but a gather
// only moves bytes: the permuted float16 weights must be the float32
// model's, permuted the same way, cast to float16, bit for bit.
TEST_P(CudaTest, Float16GoldenApplyBitForBit) {
  LoadOptions f32_options;
  f32_options.dtype = "float32";
  ASSERT_TRUE(engine_.Load("f32", source_, f32_options).ok());
  ASSERT_NO_FATAL_FAILURE(LoadOnCuda("h", source_, "float16", DType::kFloat16));
  const double forward = RelL2(Logits("h"), golden_.logits);
  EXPECT_LE(forward, kFloat16GoldenTolerance);
  const auto unpermuted = Tensors("h");
  const auto unpermuted_f32 = Tensors("f32");

  testing::ApplySamePermutations(engine_, {"f32", "h"}, 9);
  auto verify = engine_.Verify("h");
  ASSERT_TRUE(verify.ok()) << verify.status();
  EXPECT_TRUE(verify->ok) << verify->rel_l2;
  const double permuted = RelL2(Logits("h"), golden_.logits);
  EXPECT_LE(permuted, kFloat16GoldenTolerance);

  const auto f32 = Tensors("f32"), f16 = Tensors("h");
  testing::ExpectFloat32Cast(f32, f16, DType::kFloat16, torch::kFloat16);
  int moved = 0;
  for (const auto& [name, tensor] : f32) {
    const bool half_moved = f16.at(name).data != unpermuted.at(name).data;
    // Moved exactly where the float32 values moved as seen in float16 (on
    // the H200 mamba2-one-group's layer-0 D moved in float32 and not in
    // float16: the values its permutation swaps round to one float16).
    EXPECT_EQ(half_moved, testing::CastBytes(tensor, torch::kFloat16) !=
                              testing::CastBytes(unpermuted_f32.at(name), torch::kFloat16))
        << name;
    moved += half_moved;
  }
  // Most tensors moved: the comparison is not of untouched weights (on the
  // H200, 19 of 20 to 27 of 27 per fixture).
  EXPECT_GE(4 * moved, 3 * static_cast<int>(f32.size()));
  std::printf("[cuda] %s float16 vs float32 golden rel_l2 %.3g, permuted %.3g (tol %.3g); "
              "verify rel_l2 %.3g; %d of %zu tensors moved, bit-identical to float32 cast\n",
              Name().c_str(), forward, permuted, kFloat16GoldenTolerance, verify->rel_l2, moved,
              f32.size());
}

// Traces on the GPU: capture every group on cuda (statistics on the device),
// solve, apply all together: still HF's function.
TEST_P(CudaTest, CaptureSolvesEveryGroupAndAppliesExactly) {
  for (const char* dtype : {"float32", "bfloat16"}) {
    LoadOptions options;
    options.dtype = dtype;
    const std::string name = std::string("capture-") + dtype;
    ASSERT_TRUE(engine_.Load(name, source_, options).ok());
    CaptureRequest request;
    request.model = name;
    request.input_ids = golden_.input_ids;
    request.batch = golden_.batch;
    auto results = engine_.Capture(request);
    ASSERT_TRUE(results.ok()) << dtype << ": " << results.status();
    std::vector<Permutation> permutations;
    for (const PermutationResult& result : *results) permutations.push_back(result.permutation);
    auto report = engine_.Apply(name, permutations);
    ASSERT_TRUE(report.ok()) << report.status();
    EXPECT_TRUE(report->correctness.ok) << dtype << " rel_l2 " << report->correctness.rel_l2;
    if (std::string(dtype) == "float32") {
      EXPECT_LE(RelL2(Logits(name), golden_.logits), kGoldenTolerance);
    }
    std::printf("[cuda] %s %s capture: %zu groups solved, apply check rel_l2 %.3g\n",
                Name().c_str(), dtype, results->size(), report->correctness.rel_l2);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaTest, ::testing::ValuesIn(testing::GoldenCases()),
                         [](const auto& param_info) {
                           return testing::GoldenCaseLabel(param_info.param);
                         });
INSTANTIATE_TEST_SUITE_P(Hybrids, CudaTest, ::testing::ValuesIn(testing::HybridGoldenCases()),
                         [](const auto& param_info) {
                           return testing::GoldenCaseLabel(param_info.param);
                         });

// ---- MeasureLatency on cuda ---------------------------------------------------

class CudaLatencyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  }

  absl::StatusOr<ModelInfo> Load(const std::string& name, const std::string& fixture,
                                 const std::string& device) {
    LoadOptions options;
    options.device = device;
    options.dtype = "float32";
    return engine_.Load(name, (GoldenDir(fixture) / "hf").string(), options);
  }

  static LatencyOptions Options(const std::string& model, const std::string& compare,
                                const std::string& mode, int64_t seq_len) {
    LatencyOptions options;
    options.model = model;
    options.compare_model = compare;
    options.mode = mode;
    options.batch = 1;
    options.seq_len = seq_len;
    options.warmup = 3;
    options.iters = 20;
    return options;
  }

  // A model on cuda is timed by CudaEventTimer (latency.cc). The report
  // holds order statistics, not the samples: p10 and the low end of the
  // median's interval bound the small samples from below, p90 and the high
  // end the large ones from above.
  static void ExpectCudaEvents(const LatencyTiming& timing, const std::string& execution,
                               const std::string& what) {
    EXPECT_EQ(timing.method, "cuda_events") << what;
    EXPECT_EQ(timing.device.rfind("cuda", 0), 0u) << what << ": " << timing.device;
    EXPECT_EQ(timing.execution, execution) << what;
    EXPECT_EQ(timing.samples, 20) << what;
    for (const double ms : {timing.p10_ms, timing.median_ms, timing.p90_ms, timing.ci95_low_ms,
                            timing.ci95_high_ms}) {
      EXPECT_TRUE(std::isfinite(ms) && ms > 0) << what << ": " << ms << " ms";
    }
    EXPECT_LE(timing.p10_ms, timing.median_ms) << what;
    EXPECT_LE(timing.median_ms, timing.p90_ms) << what;
    EXPECT_LE(timing.ci95_low_ms, timing.median_ms) << what;
    EXPECT_LE(timing.median_ms, timing.ci95_high_ms) << what;
  }

  Engine engine_{EngineOptions{"cuda"}};
};

// The events time the forward itself: 512 times the tokens take longer. The
// fixture is tiny, so a short forward is bound by kernel launches; 4096
// tokens put thousands of sequential steps into each layer's scan, far above
// launch jitter (256 might not be).
TEST_F(CudaLatencyTest, CudaEventsTimeTheForward) {
  ASSERT_TRUE(Load("a", "mamba1-small", "cuda").ok());
  auto short_run = engine_.MeasureLatency(Options("a", "", "prefill", 8));
  ASSERT_TRUE(short_run.ok()) << short_run.status();
  auto long_run = engine_.MeasureLatency(Options("a", "", "prefill", 4096));
  ASSERT_TRUE(long_run.ok()) << long_run.status();
  ExpectCudaEvents(short_run->timing, "eager", "seq_len 8");
  ExpectCudaEvents(long_run->timing, "eager", "seq_len 4096");
  EXPECT_GT(long_run->timing.median_ms, short_run->timing.median_ms);
  EXPECT_FALSE(short_run->compare.has_value());
  std::printf("[cuda] latency prefill median %.4f ms (seq_len 8), %.4f ms (seq_len 4096)\n",
              short_run->timing.median_ms, long_run->timing.median_ms);
}

// A comparison on cuda: both sides timed by CUDA events, each with its own
// model's version (made to differ by an apply), in both modes (decode steps
// replayed as CUDA graphs), and a positive, finite ratio inside its interval.
TEST_F(CudaLatencyTest, ComparisonReportsEachModelsVersion) {
  ASSERT_TRUE(Load("a", "mamba1-small", "cuda").ok());
  ASSERT_TRUE(Load("b", "mamba1-bias-untied", "cuda").ok());  // same vocabulary
  auto groups = engine_.Symmetries("b");
  ASSERT_TRUE(groups.ok()) << groups.status();
  std::mt19937_64 rng(10);
  auto applied = engine_.Apply("b", testing::RandomPermutations(*groups, rng));
  ASSERT_TRUE(applied.ok()) << applied.status();
  auto a = engine_.Info("a");
  auto b = engine_.Info("b");
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_NE(a->version, b->version);
  for (const char* mode : {"prefill", "decode"}) {
    const std::string execution = std::string(mode) == "decode" ? "cuda_graph" : "eager";
    auto report = engine_.MeasureLatency(Options("a", "b", mode, 16));
    ASSERT_TRUE(report.ok()) << mode << ": " << report.status();
    ExpectCudaEvents(report->timing, execution, std::string(mode) + " model");
    ASSERT_TRUE(report->compare.has_value()) << mode;
    ExpectCudaEvents(*report->compare, execution, std::string(mode) + " compare_model");
    EXPECT_EQ(report->timing.version, a->version) << mode;
    EXPECT_EQ(report->compare->version, b->version) << mode;
    EXPECT_TRUE(std::isfinite(report->ratio) && report->ratio > 0) << mode << ": " << report->ratio;
    EXPECT_LE(report->ratio_ci95_low, report->ratio) << mode;
    EXPECT_LE(report->ratio, report->ratio_ci95_high) << mode;
    std::printf("[cuda] latency %s a (v%llu) %.4f ms vs b (v%llu) %.4f ms, ratio %.3f\n", mode,
                static_cast<unsigned long long>(report->timing.version),
                report->timing.median_ms,
                static_cast<unsigned long long>(report->compare->version),
                report->compare->median_ms, report->ratio);
  }
}

// A comparison times both models on one device: the same checkpoint on cpu
// and on cuda is FAILED_PRECONDITION, in either role, naming both devices.
TEST_F(CudaLatencyTest, ModelsOnTwoDevicesAreFailedPrecondition) {
  auto host = Load("host", "mamba1-small", "cpu");
  ASSERT_TRUE(host.ok()) << host.status();
  EXPECT_EQ(host->device, "cpu");
  auto device = Load("device", "mamba1-small", "cuda");
  ASSERT_TRUE(device.ok()) << device.status();
  EXPECT_EQ(device->device.rfind("cuda", 0), 0u) << device->device;
  for (const auto& [model, compare] :
       {std::make_pair("host", "device"), std::make_pair("device", "host")}) {
    auto report = engine_.MeasureLatency(Options(model, compare, "prefill", 8));
    ASSERT_FALSE(report.ok()) << model << " vs " << compare;
    EXPECT_EQ(report.status().code(), absl::StatusCode::kFailedPrecondition) << report.status();
    const std::string message(report.status().message());
    for (const std::string& needle : {std::string("cpu"), std::string("cuda"),
                                      "'" + std::string(model) + "'",
                                      "'" + std::string(compare) + "'"}) {
      EXPECT_NE(message.find(needle), std::string::npos) << needle << " in: " << message;
    }
  }
}

// ---- The Mamba-1 scan kernel -------------------------------------------------

constexpr double kScanFloat32Tolerance = 1e-5;  // vs the float32 reference
// bfloat16 / float16 inputs: both sides read the same rounded values and
// accumulate in float32, so only the order of float32 operations differs;
// the bound (on the float32 state) is looser for the larger magnitudes the
// rounding allows. y is rounded to the compute dtype on both sides: it must
// agree to one unit in the last place (WithinRounding).
constexpr double kScanReducedTolerance = 1e-4;

// One unit in the last place, relative, of a value in `dtype`'s precision
// (float32 here stands for "no rounding beyond float32's own").
double UnitRoundoff(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kBFloat16:
      return std::ldexp(1.0, -7);
    case torch::kFloat16:
      return std::ldexp(1.0, -10);
    default:
      return std::ldexp(1.0, -23);
  }
}

// The largest |actual - expected| in units of `ulps` last places of
// `dtype` at |expected| (plus the same at 1e-3 of the largest |expected|,
// for values near zero): at most 1 when the two differ only by where float32
// rounding fell before the final rounding to `dtype`.
double RoundingErrors(const torch::Tensor& actual, const torch::Tensor& expected,
                      torch::ScalarType dtype, double ulps = 1.0) {
  const torch::Tensor a = actual.to(torch::kFloat64).cpu();
  const torch::Tensor b = expected.to(torch::kFloat64).cpu();
  const double unit = ulps * UnitRoundoff(dtype);
  const double floor = unit * 1e-3 * b.abs().max().item<double>();
  return ((a - b).abs() / (b.abs() * unit + floor)).max().item<double>();
}

struct ScanShape {
  int64_t batch, seq_len, inner, state_size;
};

std::string Describe(const ScanShape& shape) {
  return "B" + std::to_string(shape.batch) + " L" + std::to_string(shape.seq_len) + " I" +
         std::to_string(shape.inner) + " N" + std::to_string(shape.state_size);
}

// Random inputs laid out as Mamba1Mixer passes them on cuda: x and z are
// narrow() views of one [B, L, 2I] projection, B and C of one [B, L, R + 2N]
// projection (R = 3: rows not aligned), the time step before its bias and
// softplus in the compute dtype with its bias beside it, A = -exp(A_log) in
// float32. Drawn on the CPU from `seed`, then moved to cuda.
scan::ScanInputs RandomScanInputs(const ScanShape& shape, torch::ScalarType compute,
                                  uint64_t seed) {
  torch::manual_seed(seed);
  const int64_t batch = shape.batch, seq_len = shape.seq_len, inner = shape.inner;
  const int64_t state_size = shape.state_size, rank = 3;
  const auto cuda = torch::TensorOptions().device(torch::kCUDA);
  torch::Tensor projected = torch::randn({batch, seq_len, 2 * inner}).to(cuda.dtype(compute));
  torch::Tensor ssm_params =
      torch::randn({batch, seq_len, rank + 2 * state_size}).to(cuda.dtype(compute));
  scan::ScanInputs inputs;
  inputs.hidden = projected.narrow(-1, 0, inner);                      // [B, L, I]
  inputs.gate = projected.narrow(-1, inner, inner);                    // [B, L, I]
  inputs.b_proj = ssm_params.narrow(-1, rank, state_size);             // [B, L, N]
  inputs.c_proj = ssm_params.narrow(-1, rank + state_size, state_size);  // [B, L, N]
  inputs.delta = (torch::randn({batch, seq_len, inner}) - 1.5).to(cuda.dtype(compute));
  inputs.delta_bias = (0.5 * torch::randn({inner}) - 1.5).to(cuda.dtype(compute));
  torch::Tensor a_log = torch::log(torch::arange(1, state_size + 1, torch::kFloat32))
                            .repeat({inner, 1}) +
                        0.3 * torch::randn({inner, state_size});  // [I, N], S4D-real-like
  inputs.a_decay = (-torch::exp(a_log)).to(cuda);
  inputs.d_skip = (1.0 + 0.2 * torch::randn({inner})).to(cuda);
  return inputs;
}

class ScanKernelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  }

  // Kernel vs reference on the same inputs, y and the final state; returns
  // the larger relative L2. y in a reduced compute dtype must also be
  // within one unit in the last place of the reference's.
  static double CompareWithReference(const scan::ScanInputs& inputs, const std::string& name) {
    EXPECT_TRUE(scan::UsesCudaKernel(inputs, torch::kFloat32)) << name;
    torch::Tensor kernel_state;
    torch::Tensor reference_state;
    const torch::Tensor output = scan::SelectiveScan(inputs, torch::kFloat32, &kernel_state);
    const torch::Tensor reference =
        scan::SelectiveScanReference(inputs, torch::kFloat32, &reference_state);
    const torch::ScalarType compute = inputs.hidden.scalar_type();
    EXPECT_EQ(output.scalar_type(), compute) << name;
    EXPECT_EQ(reference.scalar_type(), compute) << name;
    if (compute != torch::kFloat32) {
      EXPECT_LE(RoundingErrors(output, reference, compute), 1.0) << name;
    }
    EXPECT_TRUE(output.is_cuda()) << name;
    EXPECT_EQ(output.sizes(), reference.sizes()) << name;
    EXPECT_EQ(kernel_state.sizes(), reference_state.sizes()) << name;
    EXPECT_TRUE(torch::isfinite(output).all().item<bool>()) << name;
    return std::max(RelL2(output, reference), RelL2(kernel_state, reference_state));
  }
};

TEST_F(ScanKernelTest, Float32MatchesReference) {
  uint64_t seed = 100;
  double worst = 0.0;
  for (int64_t batch : {1, 3}) {
    for (int64_t seq_len : {1, 7, 300}) {
      for (int64_t inner : {24, 160}) {
        for (int64_t state_size : {4, 16}) {
          const ScanShape shape{batch, seq_len, inner, state_size};
          const double error = CompareWithReference(
              RandomScanInputs(shape, torch::kFloat32, seed++), Describe(shape));
          EXPECT_LE(error, kScanFloat32Tolerance) << Describe(shape);
          worst = std::max(worst, error);
        }
      }
    }
  }
  std::printf("[cuda] scan kernel float32 vs reference: worst rel_l2 %.3g (24 shapes)\n", worst);
}

// State sizes that are not powers of two, the largest the kernel takes, and
// one above it (the reference then, through the same entry point).
TEST_F(ScanKernelTest, StateSizes) {
  uint64_t seed = 200;
  for (int64_t state_size : {1, 13, 40, 64}) {
    const ScanShape shape{2, 70, 40, state_size};
    const double error =
        CompareWithReference(RandomScanInputs(shape, torch::kFloat32, seed++), Describe(shape));
    EXPECT_LE(error, kScanFloat32Tolerance) << Describe(shape);
  }
  const scan::ScanInputs too_large = RandomScanInputs({2, 20, 24, 65}, torch::kFloat32, seed++);
  EXPECT_FALSE(scan::UsesCudaKernel(too_large, torch::kFloat32));
  EXPECT_LE(RelL2(scan::SelectiveScan(too_large, torch::kFloat32),
                  scan::SelectiveScanReference(too_large, torch::kFloat32)),
            1e-12);
}

// Decoding: h_0 carried in, and L tokens in one call equal the same tokens
// in two calls passing the state on.
TEST_F(ScanKernelTest, CarriedState) {
  const ScanShape shape{3, 300, 160, 16};
  const int64_t first = 131;
  const scan::ScanInputs inputs = RandomScanInputs(shape, torch::kFloat32, 300);
  torch::manual_seed(301);
  const torch::Tensor initial =
      torch::randn({shape.batch, shape.inner, shape.state_size}).to(torch::kCUDA);

  torch::Tensor whole_state = initial.clone();
  torch::Tensor reference_state = initial.clone();
  const torch::Tensor whole = scan::SelectiveScan(inputs, torch::kFloat32, &whole_state);
  const torch::Tensor reference =
      scan::SelectiveScanReference(inputs, torch::kFloat32, &reference_state);
  EXPECT_LE(RelL2(whole, reference), kScanFloat32Tolerance);
  EXPECT_LE(RelL2(whole_state, reference_state), kScanFloat32Tolerance);

  torch::Tensor split_state = initial.clone();
  const torch::Tensor head =
      scan::SelectiveScan(scan::TimeSlice(inputs, 0, first), torch::kFloat32, &split_state);
  const torch::Tensor tail = scan::SelectiveScan(
      scan::TimeSlice(inputs, first, shape.seq_len - first), torch::kFloat32, &split_state);
  const torch::Tensor split = torch::cat({head, tail}, 1);
  const double output_split = RelL2(split, whole);
  const double state_split = RelL2(split_state, whole_state);
  EXPECT_LE(output_split, 1e-6);
  EXPECT_LE(state_split, 1e-6);

  // Without a state pointer: zeros in, nothing out, the same y as a
  // zero state passed in.
  torch::Tensor zero_state = torch::zeros_like(initial);
  EXPECT_LE(RelL2(scan::SelectiveScan(inputs, torch::kFloat32),
                  scan::SelectiveScan(inputs, torch::kFloat32, &zero_state)),
            1e-6);
  std::printf("[cuda] scan kernel carried state: vs reference rel_l2 %.3g / %.3g, "
              "one call vs %lld + %lld: %.3g / %.3g (y / h_L)\n",
              RelL2(whole, reference), RelL2(whole_state, reference_state),
              static_cast<long long>(first), static_cast<long long>(shape.seq_len - first),
              output_split, state_split);
}

TEST_F(ScanKernelTest, ReducedPrecisionInputs) {
  uint64_t seed = 400;
  for (torch::ScalarType compute : {torch::kBFloat16, torch::kFloat16}) {
    double worst = 0.0;
    for (const ScanShape& shape : {ScanShape{1, 300, 160, 16}, ScanShape{3, 7, 24, 4},
                                   ScanShape{3, 300, 24, 16}, ScanShape{1, 1, 160, 4}}) {
      const std::string name = std::string(c10::toString(compute)) + " " + Describe(shape);
      const double error = CompareWithReference(RandomScanInputs(shape, compute, seed++), name);
      EXPECT_LE(error, kScanReducedTolerance) << name;
      worst = std::max(worst, error);
    }
    std::printf("[cuda] scan kernel %s inputs vs reference: worst rel_l2 %.3g\n",
                c10::toString(compute), worst);
  }
}

// What the kernel does not take goes to the reference: float64 models, CPU
// tensors.
// One step of time with Δ's time step as dt_proj's product, taken inside
// the step kernel (a decode step's dt_proj): against the reference, which
// takes the product with torch::linear first (ResolveDelta). Longer
// sequences, which the kernel does not take this way, go the same route.
// Ranks 10, 40 and 160: held in registers (up to 10 a lane), or (160 over 4
// or 8 lanes a channel, N = 1 and 5) read in a loop; 40 at 4 lanes fills
// the registers exactly.
TEST_F(ScanKernelTest, OneStepTakesDtProjsProduct) {
  uint64_t seed = 450;
  for (const torch::ScalarType compute : {torch::kFloat32, torch::kBFloat16, torch::kFloat16}) {
    for (const int64_t state_size : {1, 5, 16, 40, 64}) {
      for (const int64_t batch : {1, 3}) {
        for (const int64_t rank : {10, 40, 160}) {
          const ScanShape shape{batch, 1, 160, state_size};
          const std::string name = std::string(c10::toString(compute)) + " " + Describe(shape) +
                                   " rank " + std::to_string(rank);
          scan::ScanInputs inputs = RandomScanInputs(shape, compute, seed++);
          const auto cuda = torch::TensorOptions().device(torch::kCUDA).dtype(compute);
          // δ a narrow() of a wider projection, as Mamba1Mixer passes x_proj's.
          inputs.delta_input = torch::randn({batch, 1, rank + 7}, cuda).narrow(-1, 2, rank);
          inputs.delta_proj_weight = 0.3 * torch::randn({shape.inner, rank}, cuda);
          inputs.delta = torch::Tensor();
          ASSERT_TRUE(scan::UsesCudaKernel(inputs, torch::kFloat32)) << name;
          torch::Tensor kernel_state =
              torch::randn({batch, shape.inner, state_size}, cuda.dtype(torch::kFloat32));
          torch::Tensor reference_state = kernel_state.clone();
          const torch::Tensor output =
              scan::SelectiveScan(inputs, torch::kFloat32, &kernel_state, /*in_place=*/true);
          const torch::Tensor reference =
              scan::SelectiveScanReference(inputs, torch::kFloat32, &reference_state);
          // float32: the dot products' order; reduced dtypes: the time step is
          // rounded to the compute dtype, which its order may move by one unit.
          const double bound =
              compute == torch::kFloat32 ? kScanFloat32Tolerance : UnitRoundoff(compute);
          EXPECT_LE(RelL2(output, reference), bound) << name;
          EXPECT_LE(RelL2(kernel_state, reference_state), bound) << name;
        }
      }
    }
  }
  scan::ScanInputs longer = RandomScanInputs({2, 7, 24, 16}, torch::kFloat32, seed++);
  const auto cuda = torch::TensorOptions().device(torch::kCUDA);
  longer.delta_input = torch::randn({2, 7, 6}, cuda);
  longer.delta_proj_weight = 0.3 * torch::randn({24, 6}, cuda);
  longer.delta = torch::Tensor();
  EXPECT_FALSE(scan::UsesCudaKernel(longer, torch::kFloat32));
  EXPECT_LE(RelL2(scan::SelectiveScan(longer, torch::kFloat32),
                  scan::SelectiveScanReference(longer, torch::kFloat32)),
            kScanFloat32Tolerance);
}

// A_log, D and dt_proj's bias as a bfloat16 model holds them, widened in the
// kernels (a prefill launches nothing to widen them): the sequence kernel
// and the step kernel give what they give on A = -exp(A_log) and D widened
// first by LibTorch (the forward's path before), bitwise; a parameter in a
// third dtype goes to the reference, which widens it itself.
TEST_F(ScanKernelTest, ParametersAsTheModelHoldsThem) {
  uint64_t seed = 480;
  struct HeldCase {
    ScanShape shape;
    torch::ScalarType compute, a_log, skip;  // the bias in `compute`
    bool projected;                          // Δ's time step as dt_proj's product (L = 1)
  };
  const torch::ScalarType bf16 = torch::kBFloat16, f16 = torch::kFloat16, f32 = torch::kFloat32;
  for (const HeldCase& c : {HeldCase{{1, 300, 160, 16}, bf16, bf16, bf16, false},
                            HeldCase{{2, 1, 160, 16}, bf16, bf16, bf16, false},
                            HeldCase{{3, 37, 24, 5}, bf16, bf16, bf16, false},
                            HeldCase{{2, 90, 160, 16}, bf16, f32, bf16, false},
                            HeldCase{{2, 90, 160, 16}, f16, f16, f32, false},
                            HeldCase{{2, 90, 40, 16}, f32, f32, f32, false},
                            HeldCase{{2, 1, 160, 16}, bf16, bf16, f32, true}}) {
    const ScanShape& shape = c.shape;
    const std::string name = Describe(shape) + " " + c10::toString(c.compute) + " A_log " +
                             c10::toString(c.a_log) + " D " + c10::toString(c.skip) +
                             (c.projected ? " dt_proj in the kernel" : "");
    scan::ScanInputs widened_source = RandomScanInputs(shape, c.compute, seed++);
    if (c.projected) {
      const auto cuda = torch::TensorOptions().device(torch::kCUDA).dtype(c.compute);
      widened_source.delta_input = torch::randn({shape.batch, 1, 12}, cuda);
      widened_source.delta_proj_weight = 0.3 * torch::randn({shape.inner, 12}, cuda);
      widened_source.delta = torch::Tensor();
    }
    scan::ScanInputs held = widened_source;  // the bias already in the compute dtype
    held.a_log = torch::log(-widened_source.a_decay).to(c.a_log);
    held.a_decay = torch::Tensor();
    held.d_skip = widened_source.d_skip.to(c.skip);
    scan::ScanInputs widened = widened_source;
    widened.a_decay = -torch::exp(held.a_log.to(torch::kFloat32));
    widened.d_skip = held.d_skip.to(torch::kFloat32);
    widened.delta_bias = widened_source.delta_bias.to(torch::kFloat32);
    ASSERT_TRUE(scan::UsesCudaKernel(held, torch::kFloat32)) << name;
    const torch::Tensor start =
        torch::randn({shape.batch, shape.inner, shape.state_size}, torch::kCUDA);
    torch::Tensor held_state = start.clone();
    torch::Tensor widened_state = start.clone();
    const torch::Tensor from_held = scan::SelectiveScan(held, torch::kFloat32, &held_state);
    const torch::Tensor from_widened =
        scan::SelectiveScan(widened, torch::kFloat32, &widened_state);
    EXPECT_TRUE(torch::equal(from_held, from_widened)) << name;
    EXPECT_TRUE(torch::equal(held_state, widened_state)) << name;
    // The LibTorch reference resolves A_log the same way.
    torch::Tensor reference_state = start.clone();
    const torch::Tensor reference =
        scan::SelectiveScanReference(held, torch::kFloat32, &reference_state);
    if (c.compute == torch::kFloat32) {
      EXPECT_LE(RelL2(from_held, reference), kScanFloat32Tolerance) << name;
    } else if (c.projected) {
      EXPECT_LE(RelL2(from_held, reference), UnitRoundoff(c.compute)) << name;
    } else {
      EXPECT_LE(RoundingErrors(from_held, reference, c.compute), 1.0) << name;
    }
  }
  // A_log in a third dtype: declined, and the reference widens it itself,
  // bit for bit the reference on A given.
  scan::ScanInputs odd = RandomScanInputs({1, 30, 24, 16}, torch::kBFloat16, seed++);
  odd.a_log = torch::log(-odd.a_decay).to(torch::kFloat16);
  odd.a_decay = torch::Tensor();
  EXPECT_FALSE(scan::UsesCudaKernel(odd, torch::kFloat32));
  scan::ScanInputs odd_given = odd;
  odd_given.a_decay = -torch::exp(odd.a_log.to(torch::kFloat32));
  odd_given.a_log = torch::Tensor();
  EXPECT_TRUE(torch::equal(scan::SelectiveScan(odd, torch::kFloat32),
                           scan::SelectiveScanReference(odd_given, torch::kFloat32)));
}

TEST_F(ScanKernelTest, FallsBackToReference) {
  const ScanShape shape{2, 30, 24, 16};
  scan::ScanInputs wide = RandomScanInputs(shape, torch::kFloat64, 500);
  for (torch::Tensor* tensor : {&wide.a_decay, &wide.d_skip}) {
    *tensor = tensor->to(torch::kFloat64);
  }
  EXPECT_FALSE(scan::UsesCudaKernel(wide, torch::kFloat64));
  const torch::Tensor wide_output = scan::SelectiveScan(wide, torch::kFloat64);
  EXPECT_EQ(wide_output.scalar_type(), torch::kFloat64);
  EXPECT_LE(RelL2(wide_output, scan::SelectiveScanReference(wide, torch::kFloat64)), 1e-12);

  scan::ScanInputs host = RandomScanInputs(shape, torch::kFloat32, 501);
  for (torch::Tensor* tensor : {&host.hidden, &host.delta, &host.delta_bias, &host.a_decay,
                                &host.b_proj, &host.c_proj, &host.d_skip, &host.gate}) {
    *tensor = tensor->cpu();
  }
  EXPECT_FALSE(scan::UsesCudaKernel(host, torch::kFloat32));
  EXPECT_TRUE(scan::SelectiveScan(host, torch::kFloat32).device().is_cpu());
}

// ---- The fused conv + SiLU and add + RMS norm kernels -------------------------

// float32: the same float32 operations as LibTorch's, up to their order.
constexpr double kFusedFloat32Tolerance = 1e-6;

struct ConvCase {
  int64_t batch, seq_len, channels, width;
  bool bias, history;
};

// Against the LibTorch reference on the CPU (the oracle): x a narrow() view
// of a [B, L, 2C] projection, as Mamba1Mixer passes it; sequences shorter
// than the conv's width, a carried history, odd widths and channel counts.
TEST(FusedConvTest, MatchesCausalDepthwiseConvThenSilu) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  const std::vector<ConvCase> cases = {
      {1, 1, 7, 4, true, false},    {1, 1, 7, 4, true, true},      {2, 2, 13, 4, false, true},
      {3, 300, 160, 4, true, false}, {3, 300, 160, 4, true, true}, {2, 70, 41, 3, true, true},
      {1, 33, 130, 2, false, false}, {2, 65, 1537, 4, true, true}, {1, 40, 24, 1, true, true},
      {1, 2048, 768, 4, true, false}};
  uint64_t seed = 600;
  for (torch::ScalarType dtype : {torch::kFloat32, torch::kBFloat16, torch::kFloat16}) {
    double worst = 0.0;
    for (const ConvCase& c : cases) {
      const std::string name = std::string(c10::toString(dtype)) + " B" + std::to_string(c.batch) +
                               " L" + std::to_string(c.seq_len) + " C" +
                               std::to_string(c.channels) + " K" + std::to_string(c.width) +
                               (c.bias ? " bias" : "") + (c.history ? " history" : "");
      torch::manual_seed(seed++);
      const auto host = torch::TensorOptions().dtype(dtype);
      const torch::Tensor projected = torch::randn({c.batch, c.seq_len, 2 * c.channels}).to(host);
      const torch::Tensor weight = (0.5 * torch::randn({c.channels, 1, c.width})).to(host);
      const torch::Tensor bias = c.bias ? (0.3 * torch::randn({c.channels})).to(host) : torch::Tensor();
      const torch::Tensor history =
          c.history ? torch::randn({c.batch, c.channels, c.width - 1}).to(host) : torch::Tensor();
      auto on_cuda = [](const torch::Tensor& t) { return t.defined() ? t.to(torch::kCUDA) : t; };
      const torch::Tensor values = on_cuda(projected).narrow(-1, 0, c.channels);  // [B, L, C]

      torch::Tensor fused_next;
      std::optional<torch::Tensor> fused = fused::CausalConvSilu(
          values, on_cuda(weight), on_cuda(bias), on_cuda(history), &fused_next);
      ASSERT_TRUE(fused.has_value()) << name;
      // float16: conv1d on the CPU has no float16 kernel in every LibTorch the
      // project builds against, so the reference convolves the same float16
      // values in float32 and rounds where the float16 path would.
      const bool half = dtype == torch::kFloat16;
      auto widened = [half](const torch::Tensor& t) {
        return half && t.defined() ? t.to(torch::kFloat32) : t;
      };
      torch::Tensor reference_next;
      torch::Tensor reference = forward_internal::CausalDepthwiseConv(
          widened(projected.narrow(-1, 0, c.channels)), widened(weight), widened(bias),
          widened(history), &reference_next);
      if (half) reference = reference.to(dtype).to(torch::kFloat32);
      reference = torch::silu(reference).to(dtype);
      reference_next = reference_next.to(dtype);
      EXPECT_TRUE(fused->is_cuda() && fused->is_contiguous()) << name;
      EXPECT_EQ(fused->scalar_type(), dtype) << name;
      EXPECT_EQ(fused->sizes(), reference.sizes()) << name;
      // The next history is a copy of inputs: bit for bit.
      EXPECT_TRUE(torch::equal(fused_next.cpu(), reference_next)) << name;
      // Reduced dtypes: two roundings (the conv, then silu), each where the
      // reference rounds, so up to 2 units in the last place apart.
      const double error = dtype == torch::kFloat32 ? RelL2(fused->cpu(), reference)
                                                    : RoundingErrors(*fused, reference, dtype, 2.0);
      EXPECT_LE(error, dtype == torch::kFloat32 ? kFusedFloat32Tolerance : 1.0) << name;
      worst = std::max(worst, error);
    }
    std::printf("[cuda] fused conv + silu %s vs CPU reference: worst %s %.3g (%zu cases)\n",
                c10::toString(dtype), dtype == torch::kFloat32 ? "rel_l2" : "error in 2 ulps",
                worst, cases.size());
  }
  // What the kernel does not take is declined, for the LibTorch ops to run.
  const torch::Tensor host_values = torch::randn({1, 5, 8});
  EXPECT_FALSE(fused::CausalConvSilu(host_values, torch::randn({8, 1, 4}), torch::Tensor(),
                                     torch::Tensor(), nullptr)
                   .has_value());
  const torch::Tensor wide = torch::randn({1, 5, 8}, torch::kFloat64).to(torch::kCUDA);
  EXPECT_FALSE(fused::CausalConvSilu(wide, torch::randn({8, 1, 4}, torch::kFloat64).to(torch::kCUDA),
                                     torch::Tensor(), torch::Tensor(), nullptr)
                   .has_value());
}

TEST(FusedNormTest, MatchesResidualAddThenRmsNorm) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  const double eps = 1e-5;
  uint64_t seed = 700;
  for (torch::ScalarType dtype : {torch::kFloat32, torch::kBFloat16, torch::kFloat16}) {
    double worst = 0.0;
    for (const std::vector<int64_t>& sizes :
         std::vector<std::vector<int64_t>>{{1, 1, 1}, {2, 3, 40}, {1, 7, 768}, {1, 5, 2560}, {2, 2, 1001}}) {
      for (bool with_mixed : {false, true}) {
        torch::manual_seed(seed++);
        const torch::Tensor residual = torch::randn(sizes);
        const torch::Tensor mixed = with_mixed ? torch::randn(sizes).to(dtype) : torch::Tensor();
        const torch::Tensor weight = (1 + 0.3 * torch::randn({sizes.back()})).to(dtype);
        const torch::Tensor summed = with_mixed ? residual + mixed.to(torch::kFloat32) : residual;
        const torch::Tensor reference =
            forward_internal::RmsNormalize(summed, eps, torch::kFloat32).to(dtype) * weight;
        const torch::Tensor on_cuda = residual.to(torch::kCUDA);
        std::optional<fused::AddRmsNormResult> result = fused::AddRmsNorm(
            on_cuda, with_mixed ? mixed.to(torch::kCUDA) : torch::Tensor(),
            weight.to(torch::kCUDA), eps);
        const std::string name = std::string(c10::toString(dtype)) + " D" +
                                 std::to_string(sizes.back()) + (with_mixed ? " + mixed" : "");
        ASSERT_TRUE(result.has_value()) << name;
        EXPECT_TRUE(torch::equal(result->residual.cpu(), summed)) << name;  // one float32 add
        EXPECT_TRUE(torch::equal(on_cuda.cpu(), residual)) << name;         // input untouched
        EXPECT_EQ(result->normed.scalar_type(), dtype) << name;
        // Two roundings (normalised, scaled), each where the reference rounds.
        const double error = dtype == torch::kFloat32
                                 ? RelL2(result->normed.cpu(), reference)
                                 : RoundingErrors(result->normed, reference, dtype, 2.0);
        EXPECT_LE(error, dtype == torch::kFloat32 ? kFusedFloat32Tolerance : 1.0) << name;
        worst = std::max(worst, error);
      }
    }
    std::printf("[cuda] fused add + RMS norm %s vs CPU reference: worst %s %.3g\n",
                c10::toString(dtype), dtype == torch::kFloat32 ? "rel_l2" : "error in 2 ulps",
                worst);
  }
}

// `config_json`'s forward on CUDA (icd's kernels) against the CPU's, float32
// and bfloat16 (whose CPU and cuBLAS matmuls round differently, each layer's
// output rounded to bf16: a few bf16 units, 2^-8, apart), and the same tokens
// in calls of `pieces` tokens carrying the recurrent state against one call.
// with_bfloat16 false: float32 only (experts: a bfloat16 rounding may send a
// position to another expert on one device, a discontinuity, not an error).
void ExpectCudaForwardMatchesCpu(const std::string& label, const std::string& config_json,
                                 uint64_t seed, int64_t batch, const std::vector<int64_t>& pieces,
                                 bool with_bfloat16 = true) {
  auto config = ParseConfig(config_json, "config");
  ASSERT_TRUE(config.ok()) << config.status();
  torch::manual_seed(seed);
  const int64_t length = std::accumulate(pieces.begin(), pieces.end(), int64_t{0});
  const torch::Tensor ids = torch::randint(0, config->vocab_size, {batch, length}, torch::kInt64);
  const torch::Tensor cuda_ids = ids.to(torch::kCUDA);
  for (const auto& [dtype, bound] : std::vector<std::pair<torch::ScalarType, double>>{
           {torch::kFloat32, 1e-5}, {torch::kBFloat16, 3e-2}}) {
    if (dtype == torch::kBFloat16 && !with_bfloat16) continue;
    const Weights weights = testing::RandomWeights(*config, seed + 1, dtype);
    Weights on_cuda;
    for (const auto& [name, tensor] : weights) on_cuda[name] = tensor.to(torch::kCUDA);
    auto cpu = Forward(*config, weights, ids);
    auto cuda = Forward(*config, on_cuda, cuda_ids);
    ASSERT_TRUE(cpu.ok() && cuda.ok());
    const double vs_cpu = RelL2(cuda->cpu(), *cpu);
    EXPECT_LE(vs_cpu, bound) << label << " " << c10::toString(dtype);

    RecurrentState state;
    std::vector<torch::Tensor> outputs;
    int64_t start = 0;
    for (const int64_t piece_length : pieces) {
      auto piece = Forward(*config, on_cuda, cuda_ids.narrow(1, start, piece_length), {}, nullptr,
                           &state);
      ASSERT_TRUE(piece.ok()) << piece.status();
      outputs.push_back(*piece);
      start += piece_length;
    }
    const double split = RelL2(torch::cat(outputs, 1).cpu(), cuda->cpu());
    EXPECT_LE(split, dtype == torch::kFloat32 ? 1e-5 : bound) << label << " " << c10::toString(dtype);
    std::printf("[cuda] %s forward %s on cuda vs cpu rel_l2 %.3g (bound %.g); "
                "in pieces with state vs one call %.3g\n",
                label.c_str(), c10::toString(dtype), vs_cpu, bound, split);
  }
}

// The whole Mamba-1 forward on cuda (fused conv, scan with Δ's bias and
// softplus, fused add + norm) against the CPU's LibTorch forward, and the
// same tokens in several calls carrying the recurrent state (prefill, then
// single tokens: histories shorter than the conv) against one call.
TEST(FusedForwardTest, Mamba1OnCudaMatchesTheCpu) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  ExpectCudaForwardMatchesCpu(
      "Mamba-1",
      R"({"model_type": "mamba", "hidden_size": 40, "num_hidden_layers": 3, "vocab_size": 300,
          "state_size": 16, "expand": 2, "time_step_rank": 5, "use_bias": true,
          "use_conv_bias": true, "tie_word_embeddings": false})",
      800, 2, {20, 1, 1, 15});
}

// The batched gather moves every weight of every group, composed, exactly
// as the CPU's LibTorch indexing does, in every dtype; a tensor it does not
// take (not contiguous) sends the whole apply to LibTorch, just as exact.
class GatherKernelTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  }

  // Applies every group twice over (random permutations) to `weights` on
  // the CPU and on CUDA; expects the same bits.
  void ExpectSameAsCpu(const ModelConfig& config, const Weights& weights,
                       const Weights& on_cuda) {
    const FamilySpec spec = BuildSpec(config);
    const testing::GroupsTwiceOver groups(spec, 3);
    Weights cpu = testing::Clone(weights);
    ApplyGathers(groups.perms(), cpu);
    Weights cuda = on_cuda;
    ApplyGathers(groups.perms(), cuda);
    for (const auto& [name, tensor] : cpu) {
      ASSERT_TRUE(cuda.at(name).is_cuda()) << name;
      EXPECT_TRUE(torch::equal(cuda.at(name).cpu(), tensor)) << name;
    }
  }
};

TEST_P(GatherKernelTest, EveryDtypeBitForBit) {
  auto config = ParseConfig(GetParam(), "config");
  ASSERT_TRUE(config.ok()) << config.status();
  for (torch::ScalarType dtype :
       {torch::kFloat32, torch::kBFloat16, torch::kFloat16, torch::kFloat64}) {
    const Weights weights = testing::RandomWeights(*config, 11, dtype);
    Weights on_cuda;
    for (const auto& [name, tensor] : weights) on_cuda[name] = tensor.to(torch::kCUDA);
    // The kernel takes contiguous CUDA tensors; with no axis moving it copies.
    std::vector<gather::TensorGather> plan;
    Weights copied = on_cuda;
    for (auto& [name, tensor] : copied) plan.push_back({&tensor, {}});
    ASSERT_TRUE(gather::GatherWithCuda(plan));
    for (const auto& [name, tensor] : copied) {
      EXPECT_NE(tensor.data_ptr(), on_cuda.at(name).data_ptr()) << name;
      EXPECT_TRUE(torch::equal(tensor, on_cuda.at(name))) << name;
    }
    ExpectSameAsCpu(*config, weights, on_cuda);
  }
}

TEST_P(GatherKernelTest, NonContiguousTensorFallsBackExactly) {
  auto config = ParseConfig(GetParam(), "config");
  ASSERT_TRUE(config.ok()) << config.status();
  const Weights weights = testing::RandomWeights(*config, 12, torch::kFloat32);
  Weights on_cuda;
  for (const auto& [name, tensor] : weights) on_cuda[name] = tensor.to(torch::kCUDA);
  torch::Tensor& head = on_cuda.at("backbone.embeddings.weight");
  head = head.t().contiguous().t();  // same values, column-major
  ASSERT_FALSE(head.is_contiguous());
  std::vector<gather::TensorGather> plan{{&head, {}}};
  EXPECT_FALSE(gather::GatherWithCuda(plan));
  ExpectSameAsCpu(*config, weights, on_cuda);
}

// The kernel's row paths on shapes chosen for them: rows staged in shared
// memory (16-byte and unaligned rows, an inner axis), rows too large to
// stage, whole-row moves, a vector; every dtype size; against LibTorch's
// indexing on the same device, bit for bit; both ways of gathering moving
// columns (staged through shared memory, direct).
TEST(GatherKernelRowsTest, EveryRowPathMatchesIndexSelect) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  struct Shape {
    std::vector<int64_t> sizes;
    bool rows_move, cols_move;
  };
  const std::vector<Shape> shapes = {
      {{7, 3000}, true, true},     // staged; 16-byte rows in every dtype but uint8
      {{5, 4001}, true, true},     // staged, rows not a multiple of 16 bytes
      {{3, 9000}, false, true},    // 9000 x 8 bytes: too large to stage in float64
      {{300, 700}, true, false},   // whole rows move
      {{33, 257, 2}, true, true},  // an inner axis behind the columns
      {{9000}, false, true},       // a vector: one row whose columns move
  };
  std::mt19937_64 rng(7);
  auto shuffled = [&](int64_t n) {
    std::vector<int64_t> index(static_cast<size_t>(n));
    std::iota(index.begin(), index.end(), 0);
    std::shuffle(index.begin(), index.end(), rng);
    return index;
  };
  for (const gather::GatherColumns columns :
       {gather::GatherColumns::kStaged, gather::GatherColumns::kDirect}) {
    gather::SetCudaGatherColumns(columns);
    for (torch::ScalarType dtype : {torch::kUInt8, torch::kBFloat16, torch::kFloat32, torch::kFloat64}) {
      for (const Shape& shape : shapes) {
        const torch::Tensor source =
            torch::randint(0, 250, shape.sizes, torch::kInt64).to(dtype).to(torch::kCUDA);
        const bool vector = shape.sizes.size() == 1;
        const std::vector<int64_t> rows = shuffled(shape.sizes[0]);
        const std::vector<int64_t> cols = shuffled(shape.sizes[vector ? 0 : 1]);
        gather::TensorGather gather{nullptr, {}};
        torch::Tensor expected = source;
        auto device_index = [](const std::vector<int64_t>& index) {
          return torch::tensor(index, torch::kInt64).to(torch::kCUDA);
        };
        if (vector) {
          gather.index_of[0] = &cols;
          expected = source.index_select(0, device_index(cols));
        } else {
          if (shape.rows_move) {
            gather.index_of[0] = &rows;
            expected = expected.index_select(0, device_index(rows));
          }
          if (shape.cols_move) {
            gather.index_of[1] = &cols;
            expected = expected.index_select(1, device_index(cols));
          }
        }
        torch::Tensor moved = source.clone();
        gather.tensor = &moved;
        ASSERT_TRUE(gather::GatherWithCuda({gather}));
        EXPECT_TRUE(torch::equal(moved, expected))
            << c10::toString(dtype) << " " << source.sizes()
            << (columns == gather::GatherColumns::kStaged ? " staged" : " direct");
      }
    }
  }
  gather::SetCudaGatherColumns(gather::GatherColumns::kStaged);
}

// The gather launches at most kBatchBytes = 512 MiB of tensors at a time
// (permute_gather_cuda.cc), so that an apply holds at most that much extra;
// a larger plan runs as several launches, each replacing its tensors. The
// sizes are chosen to cross that limit: three float32 tensors of 240 MB and
// a small float16 one; the first two (458 MiB) go in one launch, the third
// would pass 512 MiB and starts the next. Every tensor must still be
// LibTorch's index_select on its moved axes, bit for bit. About 2 GB of
// device memory at the peak: the expected tensors, the gathered ones, and
// one launch's new tensors.
TEST(GatherKernelBatchTest, PlanOverTheLaunchLimitMatchesIndexSelect) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  struct Spec {
    std::vector<int64_t> sizes;
    torch::ScalarType dtype;
    bool rows_move, cols_move;
  };
  const std::vector<Spec> specs = {
      {{6000, 10000}, torch::kFloat32, true, true},   // 40 KB rows: too large to stage
      {{12000, 5000}, torch::kFloat32, true, false},  // whole rows move
      {{5000, 12000}, torch::kFloat32, false, true},  // past 512 MiB: the next launch
      {{300, 700}, torch::kFloat16, true, true},      // staged, with the third
  };
  std::mt19937_64 rng(12);
  auto shuffled = [&](int64_t n) {
    std::vector<int64_t> index(static_cast<size_t>(n));
    std::iota(index.begin(), index.end(), 0);
    std::shuffle(index.begin(), index.end(), rng);
    return index;
  };
  auto device_index = [](const std::vector<int64_t>& index) {
    return torch::tensor(index, torch::kInt64).to(torch::kCUDA);
  };
  std::vector<std::vector<int64_t>> rows(specs.size()), cols(specs.size());
  std::vector<torch::Tensor> moved, expected;
  std::vector<const void*> old_data;
  int64_t total_bytes = 0;
  torch::manual_seed(903);
  for (size_t i = 0; i < specs.size(); ++i) {
    const Spec& spec = specs[i];
    const torch::Tensor source = torch::randn(
        spec.sizes, torch::TensorOptions().device(torch::kCUDA).dtype(spec.dtype));
    rows[i] = shuffled(spec.sizes[0]);
    cols[i] = shuffled(spec.sizes[1]);
    torch::Tensor result = source;
    if (spec.rows_move) result = result.index_select(0, device_index(rows[i]));
    if (spec.cols_move) result = result.index_select(1, device_index(cols[i]));
    expected.push_back(result);
    moved.push_back(source);  // the only reference left: replaced by the gather
    old_data.push_back(source.data_ptr());
    total_bytes += source.numel() * source.element_size();
  }
  ASSERT_GT(total_bytes, int64_t{512} << 20) << "the plan must cross the launch limit";

  std::vector<gather::TensorGather> plan;
  for (size_t i = 0; i < specs.size(); ++i) {
    gather::TensorGather gather{&moved[i], {}};
    if (specs[i].rows_move) gather.index_of[0] = &rows[i];
    if (specs[i].cols_move) gather.index_of[1] = &cols[i];
    plan.push_back(gather);
  }
  ASSERT_TRUE(gather::GatherWithCuda(plan));
  for (size_t i = 0; i < specs.size(); ++i) {
    EXPECT_TRUE(moved[i].is_cuda()) << "tensor " << i;
    EXPECT_NE(moved[i].data_ptr(), old_data[i]) << "tensor " << i << " was not replaced";
    EXPECT_EQ(moved[i].sizes(), expected[i].sizes()) << "tensor " << i;
    EXPECT_TRUE(torch::equal(moved[i], expected[i]))
        << "tensor " << i << " " << c10::toString(specs[i].dtype) << " " << moved[i].sizes();
  }
  std::printf("[cuda] gather over the launch limit: %zu tensors, %.1f MiB in all\n",
              specs.size(), static_cast<double>(total_bytes) / (1 << 20));
}

// A graph on the GPU runs Leiden's dense passes as device GEMMs: the same
// partitions as the CPU's loops (planted), the same modularity to rounding
// (noise), and the same labels on every run for a seed.
TEST(LeidenCudaTest, SamePartitionsAsTheCpu) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  const int64_t groups = 8, size = 40, n = groups * size;
  const torch::Tensor keys = traces::UniformKeys(n, n, 5);
  const torch::Tensor label = torch::arange(n) % groups;
  const torch::Tensor same = label.unsqueeze(1) == label.unsqueeze(0);
  torch::Tensor planted = torch::where(same, 0.5 + 0.5 * keys, 0.3 * keys);
  planted = (planted + planted.t()) / 2;
  planted.fill_diagonal_(0);
  torch::Tensor noise = (keys + keys.t()) / 2;
  noise.fill_diagonal_(0);
  for (const torch::Tensor& graph : {planted, noise}) {
    for (uint64_t seed : {1, 2}) {
      const traces::LeidenOptions options{1.0, seed};
      auto on_cpu = traces::LeidenCluster(graph, options);
      auto on_cuda = traces::LeidenCluster(graph.to(torch::kCUDA), options);
      auto again = traces::LeidenCluster(graph.to(torch::kCUDA), options);
      ASSERT_TRUE(on_cpu.ok() && on_cuda.ok() && again.ok());
      EXPECT_EQ(*on_cuda, *again) << "seed " << seed;
      const double expected = traces::Modularity(graph, *on_cpu, 1.0);
      EXPECT_NEAR(traces::Modularity(graph, *on_cuda, 1.0), expected, 1e-9 * std::abs(expected));
      if (graph.data_ptr() == planted.data_ptr()) {
        EXPECT_EQ(*on_cuda, *on_cpu) << "seed " << seed;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Configs, GatherKernelTest,
    ::testing::Values(
        R"({"model_type": "mamba", "hidden_size": 40, "num_hidden_layers": 2, "vocab_size": 300,
            "state_size": 16, "expand": 2, "time_step_rank": 5, "use_bias": true,
            "tie_word_embeddings": false})",
        // Rows of 300 and 600 elements: the kernel's shared-memory path.
        R"({"model_type": "mamba", "hidden_size": 300, "num_hidden_layers": 1, "vocab_size": 1000,
            "state_size": 16, "expand": 2, "time_step_rank": 19, "tie_word_embeddings": true})",
        R"({"model_type": "mamba2", "hidden_size": 48, "num_hidden_layers": 2,
            "vocab_size": 70, "state_size": 12, "num_heads": 12, "head_dim": 8, "n_groups": 3})",
        R"({"d_model": 24, "n_layer": 2, "vocab_size": 50, "pad_vocab_size_multiple": 8,
            "rms_norm": false, "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 12,
            "ngroups": 2}})"));


// The few-rows linear (a decode step's projections) against cuBLAS's
// torch::linear: 1 to 8 rows, with and without bias, rows that are a
// narrow() of a wider tensor; float32 to float32 rounding (another summation
// order), bf16/fp16 within one unit of the output's last place. Shapes it
// does not take (9 rows, an unaligned width) decline.
TEST(FewRowsLinearTest, MatchesTorchLinear) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  torch::manual_seed(802);
  for (const torch::ScalarType dtype : {torch::kFloat32, torch::kBFloat16, torch::kFloat16}) {
    const auto options = torch::TensorOptions().device(torch::kCUDA).dtype(dtype);
    const torch::Tensor weight = torch::randn({301, 2560}, options) * 0.02;
    const torch::Tensor bias = torch::randn({301}, options);
    const torch::Tensor wide = torch::randn({8, 1, 2600}, options);
    for (int64_t rows = 1; rows <= 8; ++rows) {
      for (const bool with_bias : {false, true}) {
        // Rows 2600 elements apart: a view, not a copy.
        const torch::Tensor input = wide.narrow(0, 0, rows).narrow(2, 8, 2560);
        const torch::Tensor b = with_bias ? bias : torch::Tensor();
        std::optional<torch::Tensor> few = fused::FewRowsLinear(input, weight, b);
        ASSERT_TRUE(few.has_value()) << c10::toString(dtype) << " rows " << rows;
        const torch::Tensor expected = torch::linear(input.to(torch::kFloat64),
                                                     weight.to(torch::kFloat64),
                                                     with_bias ? b.to(torch::kFloat64) : b);
        ASSERT_EQ(few->sizes(), expected.sizes());
        // Errors relative to the sum of the terms' magnitudes: float32
        // accumulation, then the output's rounding (2^-9 bf16, 2^-12 fp16).
        const torch::Tensor magnitude =
            torch::linear(input.to(torch::kFloat64).abs(), weight.to(torch::kFloat64).abs(),
                          with_bias ? b.to(torch::kFloat64).abs() : b);
        const double bound =
            dtype == torch::kFloat32 ? 1e-5 : (dtype == torch::kBFloat16 ? 4e-3 : 1e-3);
        const double worst =
            ((few->to(torch::kFloat64) - expected).abs() / magnitude).max().item<double>();
        EXPECT_LE(worst, bound) << c10::toString(dtype) << " rows " << rows << " bias " << with_bias;
      }
    }
    EXPECT_FALSE(fused::FewRowsLinear(torch::randn({9, 2560}, options), weight, {}).has_value());
    const torch::Tensor odd_weight = torch::randn({7, 2561}, options);
    EXPECT_FALSE(fused::FewRowsLinear(torch::randn({1, 2561}, options), odd_weight, {}).has_value());
  }
}

// ---- Decode sessions: a CUDA graph per step ----------------------------------

// Logits of a decode session over `ids` [B, L]: a prefill of `prefill`
// tokens, then one step per remaining token, concatenated [B, L, V] (cpu).
// Each step's logits come to the host as it ends, or with `queued` all at
// the end (the steps then follow each other on the device with no wait on
// the host between them).
torch::Tensor SessionLogits(const ModelConfig& config, const Weights& weights,
                            const torch::Tensor& ids, int64_t prefill,
                            decode::Execution execution, bool queued = false) {
  auto prefill_logits = Forward(config, weights, ids.narrow(1, 0, prefill));
  EXPECT_TRUE(prefill_logits.ok()) << prefill_logits.status();
  auto session = decode::Session::Start(config, weights, ids.narrow(1, 0, prefill), execution, {});
  EXPECT_TRUE(session.ok()) << session.status();
  if (!prefill_logits.ok() || !session.ok()) return torch::Tensor();
  EXPECT_EQ((*session)->execution(), execution);
  std::vector<torch::Tensor> pieces = {queued ? *prefill_logits : prefill_logits->cpu()};
  for (int64_t position = prefill; position < ids.size(1); ++position) {
    auto step = (*session)->Step(ids.narrow(1, position, 1).contiguous(), {});
    EXPECT_TRUE(step.ok()) << "position " << position << ": " << step.status();
    if (!step.ok()) return torch::Tensor();
    // A graph's output is overwritten by the next step.
    pieces.push_back(queued ? step->clone() : step->cpu());
  }
  return torch::cat(pieces, 1).cpu();
}

// A decode step's in_proj and conv in one kernel: bit for bit what the two
// kernels give one after the other (the same dot products, the same conv
// arithmetic on the same rounded inputs), the history moved in place. With
// conv_settled the conv's operands are read before the wait (early conv
// operands, on unless ICD_FEW_ROWS_EARLY_CONV=0), a lane each, where they
// number at most 32 (not for K 8 over 4 rows); 2112 channels give a warp a
// feature, 300 split a feature over warps.
TEST(FewRowsLinearTest, ConvStepIsTheLinearThenTheConv) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  torch::manual_seed(803);
  const char* early_conv = std::getenv("ICD_FEW_ROWS_EARLY_CONV");
  const bool early_conv_on = early_conv == nullptr || std::strcmp(early_conv, "0") != 0;
  for (const torch::ScalarType dtype : {torch::kFloat32, torch::kBFloat16, torch::kFloat16}) {
    const auto options = torch::TensorOptions().device(torch::kCUDA).dtype(dtype);
    for (const int64_t channels : {int64_t{300}, int64_t{2112}}) {
      for (const int64_t batch : {1, 3, 4}) {
        for (const int64_t width : {1, 2, 4, 8}) {
          for (const bool with_bias : {false, true}) {
            // Mamba-1's conv channels come first in in_proj's output, Mamba-2's after z.
            const int64_t offset = with_bias ? 0 : 100;
            const std::string name = std::string(c10::toString(dtype)) + " C" +
                                     std::to_string(channels) + " B" + std::to_string(batch) +
                                     " K" + std::to_string(width) + (with_bias ? " bias" : "") +
                                     " offset " + std::to_string(offset);
            const int64_t model = 256;
            const torch::Tensor weight = torch::randn({2 * channels, model}, options) * 0.05;
            const torch::Tensor bias =
                with_bias ? torch::randn({2 * channels}, options) : torch::Tensor();
            const torch::Tensor conv_weight = 0.5 * torch::randn({channels, 1, width}, options);
            const torch::Tensor conv_bias =
                with_bias ? 0.3 * torch::randn({channels}, options) : torch::Tensor();
            const torch::Tensor input = torch::randn({batch, 1, model}, options);
            const torch::Tensor history = torch::randn({batch, channels, width - 1}, options);

            std::optional<torch::Tensor> projected = fused::FewRowsLinear(input, weight, bias);
            ASSERT_TRUE(projected.has_value()) << name;
            torch::Tensor next_history;
            std::optional<torch::Tensor> convolved =
                fused::CausalConvSilu(projected->narrow(-1, offset, channels), conv_weight,
                                      conv_bias, history, &next_history);
            ASSERT_TRUE(convolved.has_value()) << name;
            for (const bool settled : {false, true}) {
              const std::string what = name + (settled ? " settled" : "");
              torch::Tensor fused_history = history.clone();
              const int64_t early_before = fused::FewRowsLinearEarlyConvLaunches();
              std::optional<fused::LinearConvStepResult> step = fused::FewRowsLinearConvStep(
                  input, weight, bias, conv_weight, conv_bias, &fused_history, offset, false,
                  settled);
              ASSERT_TRUE(step.has_value()) << what;
              const bool fits = width + batch * (width - 1) + 1 <= 32;
              EXPECT_EQ(fused::FewRowsLinearEarlyConvLaunches() - early_before,
                        settled && fits && early_conv_on ? 1 : 0)
                  << what;
              EXPECT_TRUE(torch::equal(step->projected, *projected)) << what;
              EXPECT_TRUE(torch::equal(step->convolved, *convolved)) << what;
              EXPECT_TRUE(torch::equal(fused_history, next_history)) << what;
              // The history moved: the newest input is the step's own.
              if (width > 1) {
                EXPECT_TRUE(torch::equal(fused_history.select(2, width - 2),
                                         projected->select(1, 0).narrow(-1, offset, channels)))
                    << what;
              }
            }
          }
        }
    }
    }
    // Declined, the history untouched: a history of the wrong width.
    const torch::Tensor weight = torch::randn({64, 128}, options);
    torch::Tensor wrong = torch::randn({1, 32, 2}, options);
    const torch::Tensor before = wrong.clone();
    EXPECT_FALSE(fused::FewRowsLinearConvStep(torch::randn({1, 1, 128}, options), weight, {},
                                              torch::randn({32, 1, 4}, options), {}, &wrong)
                     .has_value());
    EXPECT_TRUE(torch::equal(wrong, before));
  }
}

// ---- Mamba-2: the scan kernel (scan/state_space_scan.cu), the gated norm
// (fused/rms_norm.cu), the whole mixer on CUDA.

struct StateSpaceCase {
  int64_t batch, heads, groups, head_dim, state, length;
  bool initial_state;
  int skip;  // 0 none, 1 per head, 2 per channel
};

// Random inputs of `c` on `device` in float64; Δ = softplus(randn) and A in
// [-4.5, -0.5], so states both persist and decay within a chunk.
scan::StateSpaceInputs RandomStateSpaceInputs(const StateSpaceCase& c, torch::Device device) {
  const auto options = torch::TensorOptions().dtype(torch::kFloat64).device(device);
  scan::StateSpaceInputs inputs;
  inputs.hidden = torch::randn({c.batch, c.length, c.heads, c.head_dim}, options);
  inputs.delta = torch::softplus(torch::randn({c.batch, c.length, c.heads}, options) - 1.0);
  inputs.a_decay = -(torch::rand({c.heads}, options) * 4 + 0.5);
  inputs.b_proj = torch::randn({c.batch, c.length, c.groups, c.state}, options);
  inputs.c_proj = torch::randn({c.batch, c.length, c.groups, c.state}, options);
  if (c.skip == 1) inputs.skip = torch::randn({c.heads}, options);
  if (c.skip == 2) inputs.skip = torch::randn({c.heads * c.head_dim}, options);
  return inputs;
}

scan::StateSpaceInputs Cast(const scan::StateSpaceInputs& inputs, torch::ScalarType dtype,
                            torch::Device device) {
  scan::StateSpaceInputs cast = inputs;
  for (torch::Tensor* t : {&cast.hidden, &cast.delta, &cast.a_decay, &cast.b_proj, &cast.c_proj,
                           &cast.skip, &cast.time_step, &cast.time_step_bias}) {
    if (t->defined()) *t = t->to(device, dtype);
  }
  return cast;
}

std::string Describe(const StateSpaceCase& c) {
  return "B" + std::to_string(c.batch) + " H" + std::to_string(c.heads) + " G" +
         std::to_string(c.groups) + " P" + std::to_string(c.head_dim) + " N" +
         std::to_string(c.state) + " L" + std::to_string(c.length) +
         (c.initial_state ? " S0" : "") + " skip" + std::to_string(c.skip);
}

// float32 on CUDA against the recurrence in float64 on the CPU (the oracle):
// y and S_L within 1e-5 over group counts, head dims and state sizes, lengths
// around the kernel's 32-step chunk and long ones, with and without S_0, D
// per head, per channel and none.
TEST(StateSpaceKernelTest, MatchesTheRecurrence) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  torch::manual_seed(901);
  std::vector<StateSpaceCase> cases;
  for (const int64_t length : {1, 7, 31, 32, 33, 100}) {
    cases.push_back({2, 8, 2, 32, 16, length, length % 2 == 1, 1});
    cases.push_back({1, 4, 1, 64, 128, length, length % 2 == 0, 2});
  }
  for (const auto& [groups, head_dim, state] :
       std::vector<std::tuple<int64_t, int64_t, int64_t>>{
           {1, 64, 128}, {2, 32, 16}, {4, 128, 64}, {8, 64, 128}, {2, 16, 8}, {1, 8, 5}}) {
    cases.push_back({1, 8, groups, head_dim, state, 2048, true, 1});
  }
  cases.push_back({1, 2, 1, 64, 128, 4099, true, 0});
  cases.push_back({3, 6, 3, 24, 33, 67, true, 2});  // odd sizes: padded rows and states
  for (const StateSpaceCase& c : cases) {
    const scan::StateSpaceInputs inputs = RandomStateSpaceInputs(c, torch::kCPU);
    torch::Tensor reference_state =
        c.initial_state
            ? torch::randn({c.batch, c.heads, c.head_dim, c.state}, torch::kFloat64)
            : torch::Tensor();
    torch::Tensor kernel_state =
        reference_state.defined() ? reference_state.to(torch::kCUDA, torch::kFloat32)
                                  : torch::Tensor();
    const torch::Tensor expected = scan::StateSpaceScanSequential(inputs, &reference_state);
    std::optional<torch::Tensor> output = scan::StateSpaceScanCuda(
        Cast(inputs, torch::kFloat32, torch::kCUDA), &kernel_state);
    ASSERT_TRUE(output.has_value()) << Describe(c);
    EXPECT_LE(RelL2(output->cpu(), expected), 1e-5) << Describe(c);
    EXPECT_LE(RelL2(kernel_state.cpu(), reference_state), 1e-5) << Describe(c);
  }
}

// Strong decays over long chunks (Σ Δ·A ≈ -1,500 within 256 steps, as
// state_space_scan_test's precision case): the recurrence has no
// differences of running sums to lose precision in.
TEST(StateSpaceKernelTest, StrongDecays) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  torch::manual_seed(902);
  const StateSpaceCase c{1, 4, 1, 32, 64, 512, true, 1};
  scan::StateSpaceInputs inputs = RandomStateSpaceInputs(c, torch::kCPU);
  inputs.a_decay = torch::full({c.heads}, -16.0, torch::kFloat64);
  inputs.delta = torch::rand({1, c.length, c.heads}, torch::kFloat64) * 0.7;
  torch::Tensor state = torch::randn({1, c.heads, c.head_dim, c.state}, torch::kFloat64);
  torch::Tensor kernel_state = state.to(torch::kCUDA, torch::kFloat32);
  const torch::Tensor expected = scan::StateSpaceScanSequential(inputs, &state);
  std::optional<torch::Tensor> output =
      scan::StateSpaceScanCuda(Cast(inputs, torch::kFloat32, torch::kCUDA), &kernel_state);
  ASSERT_TRUE(output.has_value());
  EXPECT_LE(RelL2(output->cpu(), expected), 1e-6);
  EXPECT_LE(RelL2(kernel_state.cpu(), state), 1e-6);
}

// x, B, C in bfloat16 / float16 and Δ as its raw time step with the bias
// (and a dt limit) taken inside the kernel: the same function as the
// LibTorch path that widens first (scan::Widened), within float32 rounding.
TEST(StateSpaceKernelTest, ComputeDtypeInputsAndRawTimeStep) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  torch::manual_seed(903);
  const StateSpaceCase c{2, 8, 2, 64, 128, 77, true, 1};
  for (const torch::ScalarType dtype : {torch::kBFloat16, torch::kFloat16, torch::kFloat32}) {
    for (const bool limited : {false, true}) {
      scan::StateSpaceInputs inputs =
          Cast(RandomStateSpaceInputs(c, torch::kCUDA), dtype, torch::kCUDA);
      inputs.a_decay = inputs.a_decay.to(torch::kFloat32);
      inputs.skip = inputs.skip.to(torch::kFloat32);
      inputs.time_step = (torch::randn({c.batch, c.length, c.heads}, torch::kCUDA) * 2).to(dtype);
      inputs.time_step_bias = torch::randn({c.heads}, torch::kCUDA).to(dtype);
      inputs.delta = torch::Tensor();
      if (limited) inputs.delta_limit = std::make_pair(0.05, 0.9);
      const torch::Tensor start = torch::randn({c.batch, c.heads, c.head_dim, c.state}, torch::kCUDA);
      torch::Tensor kernel_state = start.clone();
      torch::Tensor reference_state = start.clone();
      std::optional<torch::Tensor> output = scan::StateSpaceScanCuda(inputs, &kernel_state);
      ASSERT_TRUE(output.has_value()) << c10::toString(dtype);
      const torch::Tensor expected = scan::StateSpaceScanSequential(
          scan::Widened(inputs, torch::kFloat32), &reference_state);
      const std::string name = std::string(c10::toString(dtype)) + (limited ? " limited" : "");
      EXPECT_LE(RelL2(*output, expected), 1e-5) << name;
      EXPECT_LE(RelL2(kernel_state, reference_state), 1e-5) << name;
      // The bias widened to float32, as a decode session keeps it: the same.
      scan::StateSpaceInputs widened_bias = inputs;
      widened_bias.time_step_bias = inputs.time_step_bias.to(torch::kFloat32);
      torch::Tensor again_state = start.clone();
      std::optional<torch::Tensor> again = scan::StateSpaceScanCuda(widened_bias, &again_state);
      ASSERT_TRUE(again.has_value()) << name;
      EXPECT_TRUE(torch::equal(*again, *output)) << name;
    }
  }
}

// A sequence in pieces, the state carried and written in place (a decode
// session), equals one call.
TEST(StateSpaceKernelTest, PiecesInPlaceEqualOneCall) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  torch::manual_seed(904);
  const StateSpaceCase c{2, 4, 2, 64, 128, 45, false, 1};
  const scan::StateSpaceInputs inputs =
      Cast(RandomStateSpaceInputs(c, torch::kCUDA), torch::kFloat32, torch::kCUDA);
  torch::Tensor whole_state;
  std::optional<torch::Tensor> whole = scan::StateSpaceScanCuda(inputs, &whole_state);
  ASSERT_TRUE(whole.has_value());
  torch::Tensor state = torch::zeros({c.batch, c.heads, c.head_dim, c.state}, torch::kCUDA);
  const void* storage = state.data_ptr();
  std::vector<torch::Tensor> pieces;
  int64_t start = 0;
  for (const int64_t length : {20, 1, 1, 23}) {
    std::optional<torch::Tensor> piece =
        scan::StateSpaceScanCuda(scan::TimeSlice(inputs, start, length), &state, true);
    ASSERT_TRUE(piece.has_value());
    EXPECT_EQ(state.data_ptr(), storage);
    pieces.push_back(*piece);
    start += length;
  }
  EXPECT_LE(RelL2(torch::cat(pieces, 1), *whole), 1e-6);
  EXPECT_LE(RelL2(state, whole_state), 1e-6);
}

// bfloat16 inputs as the forward gives them (x, B, C, the raw time step
// and its bias in bfloat16, A and D in float32) for the chunked form's
// cases; `strong`: A = -16 and Δ up to 0.7 (Σ Δ·A down to -700 in a chunk).
scan::StateSpaceInputs ChunkedCaseInputs(const StateSpaceCase& c, bool limited, bool strong) {
  scan::StateSpaceInputs inputs =
      Cast(RandomStateSpaceInputs(c, torch::kCUDA), torch::kBFloat16, torch::kCUDA);
  inputs.a_decay = strong ? torch::full({c.heads}, -16.0f, torch::kCUDA)
                          : inputs.a_decay.to(torch::kFloat32);
  if (inputs.skip.defined()) inputs.skip = inputs.skip.to(torch::kFloat32);
  inputs.time_step =
      (torch::randn({c.batch, c.length, c.heads}, torch::kCUDA) * 2 - (strong ? 0 : 1))
          .to(torch::kBFloat16);
  inputs.time_step_bias = torch::randn({c.heads}, torch::kCUDA).to(torch::kBFloat16);
  inputs.delta = torch::Tensor();
  if (limited || strong) inputs.delta_limit = std::make_pair(0.001, strong ? 0.7 : 0.9);
  return inputs;
}

// The chunked form (bfloat16 on tensor cores, state_space_chunked.cu)
// against the recurrence in float64 on the same inputs widened: y and S_L
// within 1e-5 over group counts, head dims and state sizes on and off its
// tiles, lengths around its 64-step chunk and long ones, with and without
// S_0, D per head, per channel and none, strong decays; the forward's
// default (kAuto) picks it for bfloat16 past one chunk.
TEST(StateSpaceKernelTest, ChunkedFormMatchesTheRecurrence) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  torch::manual_seed(906);
  std::vector<std::pair<StateSpaceCase, bool>> cases;  // (case, strong decays)
  for (const int64_t length : {1, 7, 63, 64, 65, 130, 2048, 4099}) {
    cases.push_back({{1, 4, 1, 64, 128, length, length % 2 == 1, 1}, false});
  }
  for (const auto& [groups, head_dim, state] :
       std::vector<std::tuple<int64_t, int64_t, int64_t>>{
           {2, 32, 16}, {4, 128, 64}, {8, 64, 128}, {1, 24, 33}, {2, 8, 5}}) {
    cases.push_back({{2, 8, groups, head_dim, state, 333, true, 2}, false});
  }
  cases.push_back({{1, 4, 1, 64, 128, 300, true, 0}, true});
  cases.push_back({{1, 4, 2, 32, 64, 513, false, 1}, true});
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto& [c, strong] = cases[i];
    const std::string name = Describe(c) + (strong ? " strong" : "");
    const scan::StateSpaceInputs inputs = ChunkedCaseInputs(c, i % 2 == 1, strong);
    const torch::Tensor initial =
        c.initial_state
            ? torch::randn({c.batch, c.heads, c.head_dim, c.state}, torch::kFloat64)
            : torch::Tensor();
    auto on_device = [&] {
      return initial.defined() ? initial.to(torch::kCUDA, torch::kFloat32) : torch::Tensor();
    };
    torch::Tensor reference_state = initial.defined() ? initial.clone() : torch::Tensor();
    torch::Tensor kernel_state = on_device();
    std::optional<torch::Tensor> output =
        scan::StateSpaceScanCuda(inputs, &kernel_state, false, scan::StateSpaceForm::kChunked);
    ASSERT_TRUE(output.has_value()) << name;
    const torch::Tensor expected = scan::StateSpaceScanSequential(
        Cast(scan::Widened(inputs, torch::kFloat32), torch::kFloat64, torch::kCPU),
        &reference_state);
    EXPECT_LE(RelL2(output->cpu().to(torch::kFloat64), expected), 1e-5) << name;
    EXPECT_LE(RelL2(kernel_state.cpu().to(torch::kFloat64), reference_state), 1e-5) << name;
    // Past one chunk the default is this form: the same bits.
    if (c.length > 64 && std::getenv("ICD_STATE_SPACE_FORM") == nullptr) {
      torch::Tensor auto_state = on_device();
      std::optional<torch::Tensor> picked = scan::StateSpaceScanCuda(inputs, &auto_state);
      ASSERT_TRUE(picked.has_value()) << name;
      EXPECT_TRUE(torch::equal(*picked, *output)) << name;
      EXPECT_TRUE(torch::equal(auto_state, kernel_state)) << name;
    }
  }
}

// A_log, D and dt_bias as a bfloat16 model holds them, widened in the
// kernels (a prefill launches nothing to widen them): both forms give what
// they give on float32 parameters widened first by LibTorch (A =
// -exp(A_log) in float32 as HF computes it).
TEST(StateSpaceKernelTest, ParametersAsTheModelHoldsThem) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  torch::manual_seed(908);
  const StateSpaceCase c{1, 8, 2, 64, 128, 200, true, 1};
  const scan::StateSpaceInputs given = ChunkedCaseInputs(c, false, false);
  scan::StateSpaceInputs held = given;  // bias already bfloat16
  held.a_log = torch::log(torch::rand({c.heads}, torch::kCUDA) * 4 + 0.5).to(torch::kBFloat16);
  held.a_decay = torch::Tensor();
  held.skip = given.skip.to(torch::kBFloat16);
  scan::StateSpaceInputs widened = given;
  widened.a_decay = -torch::exp(held.a_log.to(torch::kFloat32));
  widened.skip = held.skip.to(torch::kFloat32);
  widened.time_step_bias = given.time_step_bias.to(torch::kFloat32);
  const torch::Tensor start =
      torch::randn({c.batch, c.heads, c.head_dim, c.state}, torch::kCUDA);
  for (const auto form : {scan::StateSpaceForm::kRecurrence, scan::StateSpaceForm::kChunked}) {
    torch::Tensor held_state = start.clone();
    torch::Tensor widened_state = start.clone();
    std::optional<torch::Tensor> from_held = scan::StateSpaceScanCuda(held, &held_state, false, form);
    std::optional<torch::Tensor> from_widened =
        scan::StateSpaceScanCuda(widened, &widened_state, false, form);
    ASSERT_TRUE(from_held.has_value() && from_widened.has_value());
    const double distance = RelL2(*from_held, *from_widened);
    std::printf("[cuda] scan parameters held in bf16 vs widened first, %s form: rel_l2 %.3g, "
                "bitwise %s\n",
                form == scan::StateSpaceForm::kChunked ? "chunked" : "recurrence", distance,
                torch::equal(*from_held, *from_widened) ? "equal" : "different");
    EXPECT_LE(distance, 1e-6);
    EXPECT_LE(RelL2(held_state, widened_state), 1e-6);
  }
  // A parameter in a third dtype is declined.
  scan::StateSpaceInputs odd = held;
  odd.a_log = held.a_log.to(torch::kFloat16);
  EXPECT_FALSE(scan::StateSpaceScanCuda(odd).has_value());
}

// A sequence in pieces through the chunked form, the state carried and
// written in place, equals one call; float32 inputs are declined, the
// state untouched.
TEST(StateSpaceKernelTest, ChunkedPiecesInPlaceAndDeclines) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  torch::manual_seed(907);
  const StateSpaceCase c{2, 4, 2, 64, 128, 300, false, 1};
  const scan::StateSpaceInputs inputs = ChunkedCaseInputs(c, false, false);
  constexpr auto kChunked = scan::StateSpaceForm::kChunked;
  torch::Tensor whole_state;
  std::optional<torch::Tensor> whole = scan::StateSpaceScanCuda(inputs, &whole_state, false, kChunked);
  ASSERT_TRUE(whole.has_value());
  torch::Tensor state = torch::zeros({c.batch, c.heads, c.head_dim, c.state}, torch::kCUDA);
  const void* storage = state.data_ptr();
  std::vector<torch::Tensor> pieces;
  int64_t start = 0;
  for (const int64_t length : {100, 1, 70, 129}) {
    std::optional<torch::Tensor> piece = scan::StateSpaceScanCuda(
        scan::TimeSlice(inputs, start, length), &state, true, kChunked);
    ASSERT_TRUE(piece.has_value());
    EXPECT_EQ(state.data_ptr(), storage);
    pieces.push_back(*piece);
    start += length;
  }
  EXPECT_LE(RelL2(torch::cat(pieces, 1), *whole), 1e-5);
  EXPECT_LE(RelL2(state, whole_state), 1e-5);

  const scan::StateSpaceInputs wide =
      Cast(RandomStateSpaceInputs(c, torch::kCUDA), torch::kFloat32, torch::kCUDA);
  const torch::Tensor before = state.clone();
  EXPECT_FALSE(scan::StateSpaceScanCuda(wide, &state, true, kChunked).has_value());
  EXPECT_TRUE(torch::equal(state, before));
}

// One step (a decode step) runs the step form by default: against the
// recurrence kernel on the same inputs within float32 rounding, the state
// written in place, on shapes off its lane tiles (N 5 to 128, odd head dims,
// batches, groups, D per head, per channel and none), bfloat16 with the raw
// time step and float32 with Δ; and against float64 as MatchesTheRecurrence.
TEST(StateSpaceKernelTest, StepFormMatchesTheRecurrence) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  torch::manual_seed(909);
  const std::vector<StateSpaceCase> cases = {
      {1, 80, 1, 64, 128, 1, true, 1}, {2, 8, 2, 32, 16, 1, true, 2},
      {3, 6, 3, 24, 33, 1, true, 0},   {1, 8, 4, 128, 64, 1, false, 1},
      {2, 8, 1, 5, 5, 1, true, 2},     {1, 4, 2, 16, 8, 1, true, 1}};
  for (const StateSpaceCase& c : cases) {
    for (const bool bf16 : {true, false}) {
      const std::string name = Describe(c) + (bf16 ? " bf16" : " f32");
      const scan::StateSpaceInputs inputs =
          bf16 ? ChunkedCaseInputs(c, true, false)
               : Cast(RandomStateSpaceInputs(c, torch::kCUDA), torch::kFloat32, torch::kCUDA);
      const torch::Tensor start =
          c.initial_state ? torch::randn({c.batch, c.heads, c.head_dim, c.state}, torch::kCUDA)
                          : torch::zeros({c.batch, c.heads, c.head_dim, c.state}, torch::kCUDA);
      torch::Tensor step_state = start.clone();
      const void* storage = step_state.data_ptr();
      torch::Tensor recurrence_state = start.clone();
      std::optional<torch::Tensor> step = scan::StateSpaceScanCuda(inputs, &step_state, true);
      std::optional<torch::Tensor> recurrence = scan::StateSpaceScanCuda(
          inputs, &recurrence_state, false, scan::StateSpaceForm::kRecurrence);
      ASSERT_TRUE(step.has_value() && recurrence.has_value()) << name;
      EXPECT_EQ(step_state.data_ptr(), storage) << name;
      EXPECT_LE(RelL2(*step, *recurrence), 1e-6) << name;
      EXPECT_LE(RelL2(step_state, recurrence_state), 1e-6) << name;
      if (!bf16) {
        torch::Tensor reference_state = start.cpu().to(torch::kFloat64);
        const torch::Tensor expected = scan::StateSpaceScanSequential(
            Cast(inputs, torch::kFloat64, torch::kCPU), &reference_state);
        EXPECT_LE(RelL2(step->cpu().to(torch::kFloat64), expected), 1e-5) << name;
        EXPECT_LE(RelL2(step_state.cpu().to(torch::kFloat64), reference_state), 1e-5) << name;
      }
    }
  }
}

// What the kernel does not take goes back to the caller, state untouched.
TEST(StateSpaceKernelTest, DeclinesWhatItDoesNotTake) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  const StateSpaceCase wide{1, 2, 1, 16, 256, 5, false, 1};
  EXPECT_FALSE(scan::StateSpaceScanCuda(Cast(RandomStateSpaceInputs(wide, torch::kCUDA),
                                             torch::kFloat32, torch::kCUDA))
                   .has_value());
  const StateSpaceCase c{1, 2, 1, 16, 16, 5, false, 1};
  EXPECT_FALSE(scan::StateSpaceScanCuda(RandomStateSpaceInputs(c, torch::kCUDA)).has_value());
  EXPECT_FALSE(scan::StateSpaceScanCuda(RandomStateSpaceInputs(c, torch::kCPU)).has_value());
}

// GatedNorm's LibTorch formula in float32: values [1, rows, width], the
// gate, the weight, `groups` groups, the norm before the gate or after.
torch::Tensor GatedNormReference(const torch::Tensor& values, const torch::Tensor& gate,
                                 const torch::Tensor& weight, int64_t groups, bool before) {
  const int64_t rows = values.size(1);
  const int64_t width = values.size(2);
  const torch::Tensor activated = torch::silu(gate.to(torch::kFloat32));
  const torch::Tensor to_norm = before ? values : values * activated;
  const torch::Tensor grouped = to_norm.reshape({1, rows, groups, width / groups});
  torch::Tensor expected =
      (grouped * torch::rsqrt(grouped.pow(2).mean(-1, true) + 1e-5)).reshape({1, rows, width}) *
      weight.to(torch::kFloat32);
  if (before) expected = expected * activated;
  return expected;
}

// The gated norm kernel against GatedNorm's LibTorch formula in float32:
// both gate orders, one group and several, a gate that is a narrow() view.
TEST(FusedNormTest, GatedRmsNormMatchesTheReference) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  torch::manual_seed(905);
  for (const torch::ScalarType dtype : {torch::kFloat32, torch::kBFloat16, torch::kFloat16}) {
    // Group widths 640 and 160 (one quad a thread), 5120 (six: a
    // 2.7b-shaped row), 7168 and 1792 (eight, and two); 163 and 1630 are no
    // whole quads (the scalar kernel: 4 per thread, and 8) and 9000 is past
    // the quads' widest (two passes); 37 rows and one (a decode step).
    for (const auto& [width, groups] : std::vector<std::pair<int64_t, int64_t>>{
             {640, 1}, {640, 4}, {5120, 1}, {7168, 1}, {7168, 4}, {326, 2}, {1630, 1},
             {9000, 1}}) {
      for (const auto& [before, rows] : std::vector<std::pair<bool, int64_t>>{
               {false, 37}, {true, 37}, {false, 1}, {true, 1}}) {
        const auto options = torch::TensorOptions().device(torch::kCUDA).dtype(dtype);
        const torch::Tensor values = torch::randn({1, rows, width}, torch::kCUDA);
        const torch::Tensor projected = torch::randn({1, rows, 3 * width}, options);
        const torch::Tensor gate = projected.narrow(-1, width, width);
        const torch::Tensor weight = (1 + 0.3 * torch::randn({width}, torch::kCUDA)).to(dtype);
        std::optional<torch::Tensor> fused =
            fused::GatedRmsNorm(values, gate, weight, groups, 1e-5, before);
        const std::string name = std::string(c10::toString(dtype)) + " width " +
                                 std::to_string(width) + " groups " + std::to_string(groups) +
                                 " rows " + std::to_string(rows) + (before ? " norm first" : "");
        ASSERT_TRUE(fused.has_value()) << name;
        const torch::Tensor expected = GatedNormReference(values, gate, weight, groups, before);
        const double rel = RelL2(*fused, expected.to(dtype));
        // One rounding to the dtype either side: at most a unit apart.
        EXPECT_LE(rel, dtype == torch::kFloat32 ? kFusedFloat32Tolerance : 1e-2) << name;
        EXPECT_LE(RelL2(*fused, expected), dtype == torch::kFloat32 ? 1e-6 : 5e-3) << name;
      }
    }
  }
}

// Mamba-2 on CUDA (conv, scan and gated norm kernels; in_proj + conv in one
// kernel in a decode step) against the CPU's forward.
TEST(FusedForwardTest, Mamba2OnCudaMatchesTheCpu) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  ExpectCudaForwardMatchesCpu(
      "Mamba-2",
      R"({"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 300,
          "state_size": 64, "expand": 2, "head_dim": 16, "num_heads": 8, "n_groups": 2,
          "conv_kernel": 4, "use_bias": true, "use_conv_bias": true, "chunk_size": 16,
          "tie_word_embeddings": false})",
      906, 2, {20, 1, 1, 19});
}

struct DecodeCase {
  std::string name;
  ModelConfig config;
  Weights weights;  // float32, on the CPU
  torch::Tensor ids;  // int64 [B, L], on the CPU
};

std::vector<DecodeCase> DecodeCases() {
  std::vector<DecodeCase> cases;
  for (const Case& golden_case : testing::GoldenCases()) {
    auto checkpoint = ReadCheckpoint(GoldenDir(golden_case.fixture) / golden_case.layout);
    EXPECT_TRUE(checkpoint.ok()) << checkpoint.status();
    if (!checkpoint.ok()) continue;
    const testing::Golden golden = ReadGolden(golden_case.fixture);
    cases.push_back({golden_case.fixture + "/" + golden_case.layout, checkpoint->config,
                     checkpoint->weights,
                     torch::tensor(golden.input_ids).reshape({golden.batch, -1})});
  }
  // A random Mamba-1 of odd widths, batch 3, longer than a conv tile.
  auto config = ParseConfig(
      R"({"model_type": "mamba", "hidden_size": 52, "num_hidden_layers": 3, "vocab_size": 301,
          "state_size": 16, "expand": 2, "time_step_rank": 7, "use_bias": true,
          "use_conv_bias": true, "tie_word_embeddings": false})",
      "config");
  EXPECT_TRUE(config.ok()) << config.status();
  // A random Mamba-2 with the kernel's largest state and a dt limit, batch 2.
  auto mamba2 = ParseConfig(
      R"({"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 301,
          "state_size": 128, "expand": 2, "head_dim": 16, "num_heads": 8, "n_groups": 2,
          "conv_kernel": 4, "use_bias": false, "use_conv_bias": true, "chunk_size": 16,
          "time_step_limit": [0.01, 2.0], "tie_word_embeddings": false})",
      "config");
  EXPECT_TRUE(mamba2.ok()) << mamba2.status();
  if (mamba2.ok()) {
    torch::manual_seed(802);
    cases.push_back({"random-mamba2", *mamba2, testing::RandomWeights(*mamba2, 24, torch::kFloat32),
                     torch::randint(0, 301, {2, 40}, torch::kInt64)});
  }
  if (config.ok()) {
    torch::manual_seed(801);
    cases.push_back({"random-mamba1", *config, testing::RandomWeights(*config, 23, torch::kFloat32),
                     torch::randint(0, 301, {3, 45}, torch::kInt64)});
  }
  return cases;
}

// On the device, an in-place session's Rewind puts back what its kernels
// wrote in place (the conv history written by the fused in_proj + conv, the
// scan's state): the steps after Rewind repeat the steps after Mark bit for
// bit, as the hardware counters' user replay needs.
TEST(DecodeSessionTest, InPlaceRewindOnTheDevice) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  for (const DecodeCase& c : DecodeCases()) {
    Weights weights;
    for (const auto& [name, tensor] : c.weights) {
      weights[name] = tensor.to(torch::kCUDA, torch::kBFloat16);
    }
    const torch::Tensor ids = c.ids.to(torch::kCUDA);
    auto token = [&](int64_t position) { return ids.narrow(1, position, 1).contiguous(); };
    auto session = decode::Session::Start(c.config, weights, ids.narrow(1, 0, 5),
                                          decode::Execution::kInPlace, {});
    ASSERT_TRUE(session.ok()) << c.name << ": " << session.status();
    decode::Session& steps = **session;
    ASSERT_TRUE(steps.Step(token(5), {}).ok()) << c.name;
    ASSERT_TRUE(steps.Mark().ok()) << c.name;
    auto first = steps.Step(token(6), {});
    ASSERT_TRUE(first.ok()) << c.name;
    const torch::Tensor first_logits = first->cpu();
    auto second = steps.Step(token(7), {});
    ASSERT_TRUE(second.ok()) << c.name;
    const torch::Tensor second_logits = second->cpu();
    ASSERT_TRUE(steps.Rewind().ok()) << c.name;
    auto again = steps.Step(token(6), {});
    auto second_again = steps.Step(token(7), {});
    ASSERT_TRUE(again.ok() && second_again.ok()) << c.name;
    EXPECT_TRUE(torch::equal(again->cpu(), first_logits)) << c.name;
    EXPECT_TRUE(torch::equal(second_again->cpu(), second_logits)) << c.name;
  }
}

// float32: the step replayed as a graph is the forward over the whole
// sequence at every position (rel L2 <= 1e-5, forward.h's decode bound), and
// the graph's steps are the eager steps'. bfloat16: within the gap between
// the eager steps and one forward (the same rounding points, other matmul
// shapes), times two. Prefill 9 (longer than the conv history) and 1.
TEST(DecodeSessionTest, GraphStepsMatchOneForward) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  const std::vector<DecodeCase> cases = DecodeCases();
  ASSERT_EQ(cases.size(), testing::GoldenCases().size() + 2);
  for (const DecodeCase& c : cases) {
    for (const torch::ScalarType dtype : {torch::kFloat32, torch::kBFloat16}) {
      Weights weights;
      for (const auto& [name, tensor] : c.weights) weights[name] = tensor.to(torch::kCUDA, dtype);
      const torch::Tensor ids = c.ids.to(torch::kCUDA);
      auto whole = Forward(c.config, weights, ids);
      ASSERT_TRUE(whole.ok()) << whole.status();
      const torch::Tensor expected = whole->cpu();
      for (const int64_t prefill : {int64_t{9}, int64_t{1}}) {
        const torch::Tensor graph =
            SessionLogits(c.config, weights, ids, prefill, decode::Execution::kCudaGraph);
        const torch::Tensor eager =
            SessionLogits(c.config, weights, ids, prefill, decode::Execution::kEager);
        // The graph's kernels launched one by one (what the counters count).
        const torch::Tensor in_place =
            SessionLogits(c.config, weights, ids, prefill, decode::Execution::kInPlace);
        ASSERT_TRUE(graph.defined() && eager.defined() && in_place.defined()) << c.name;
        EXPECT_TRUE(torch::equal(in_place, graph))
            << c.name << " prefill " << prefill << ": rel " << RelL2(in_place, graph);
        ASSERT_EQ(graph.sizes(), expected.sizes()) << c.name;
        const double graph_rel = RelL2(graph, expected);
        const double eager_rel = RelL2(eager, expected);
        const double graph_vs_eager = RelL2(graph, eager);
        std::printf("[decode] %s %s prefill %ld: graph vs one forward %.3g, eager %.3g, "
                    "graph vs eager %.3g\n",
                    c.name.c_str(), c10::toString(dtype), static_cast<long>(prefill), graph_rel,
                    eager_rel, graph_vs_eager);
        if (dtype == torch::kFloat32) {
          EXPECT_LE(graph_rel, 1e-5) << c.name << " prefill " << prefill;
          EXPECT_LE(graph_vs_eager, 1e-6) << c.name << " prefill " << prefill;
        } else {
          EXPECT_LE(graph_rel, std::max(2 * eager_rel, 1e-3)) << c.name << " prefill " << prefill;
        }
      }
    }
  }
}

// Issue 19's hybrids on CUDA: each architecture's forward against the CPU's,
// in pieces carrying the state (attention's cache, Mamba's) against one call,
// every group alone and all together exact on CUDA (float32), and a decode
// session asked for CUDA graphs running eagerly (a growing cache, experts
// routing by value) with the logits of one forward.
TEST(HybridCudaTest, EveryArchitectureMatchesTheCpuAndStaysExact) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  const std::vector<std::pair<std::string, std::string>> hybrids = {
      {"mamba_ssm attention",
       R"({"d_model": 32, "n_layer": 3, "vocab_size": 96, "d_intermediate": 24,
           "attn_layer_idx": [1], "attn_cfg": {"causal": true, "num_heads": 4, "num_heads_kv": 2,
           "head_dim": 8, "d_conv": 4, "rotary_emb_dim": 4, "mlp_dim": 16},
           "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 8, "ngroups": 2}})"},
      {"nemotron_h",
       R"({"model_type": "nemotron_h", "hybrid_override_pattern": "M*-E", "hidden_size": 32,
           "vocab_size": 96, "mamba_num_heads": 8, "mamba_head_dim": 8, "n_groups": 2,
           "ssm_state_size": 16, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 8, "intermediate_size": 40, "n_routed_experts": 4,
           "num_experts_per_tok": 2, "moe_intermediate_size": 12,
           "moe_shared_expert_intermediate_size": 16})"},
      {"bamba",
       R"({"model_type": "bamba", "hidden_size": 32, "num_hidden_layers": 3, "vocab_size": 96,
           "attn_layer_indices": [1], "num_attention_heads": 4, "num_key_value_heads": 2,
           "mamba_n_heads": 8, "mamba_n_groups": 2, "mamba_d_state": 16,
           "intermediate_size": 40})"},
      {"granite 4.0",
       R"({"model_type": "granitemoehybrid", "hidden_size": 32, "vocab_size": 96,
           "layer_types": ["mamba", "attention", "mamba"], "num_attention_heads": 4,
           "num_key_value_heads": 2, "position_embedding_type": "rope",
           "attention_multiplier": 0.2, "mamba_n_heads": 8, "mamba_n_groups": 2,
           "mamba_d_state": 16, "shared_intermediate_size": 24, "num_local_experts": 4,
           "num_experts_per_tok": 2, "intermediate_size": 12, "embedding_multiplier": 2.0,
           "residual_multiplier": 0.5, "logits_scaling": 2.0})"},
      {"falcon_h1",
       R"({"model_type": "falcon_h1", "hidden_size": 32, "num_hidden_layers": 2,
           "vocab_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
           "mamba_d_ssm": 64, "mamba_n_heads": 8, "mamba_n_groups": 2, "mamba_d_state": 16,
           "mamba_rms_norm": true, "intermediate_size": 40, "key_multiplier": 0.5,
           "ssm_multipliers": [0.5, 2.0, 0.8, 1.5, 0.9], "mlp_multipliers": [0.7, 1.4]})"},
      {"nemotron_h mlp and mamba",  // no attention, no experts: a CUDA graph
       R"({"model_type": "nemotron_h", "hybrid_override_pattern": "-M-", "hidden_size": 32,
           "vocab_size": 96, "mamba_num_heads": 8, "mamba_head_dim": 8, "n_groups": 2,
           "ssm_state_size": 16, "intermediate_size": 40})"},
      {"jamba",
       R"({"model_type": "jamba", "hidden_size": 32, "num_hidden_layers": 4, "vocab_size": 96,
           "attn_layer_period": 4, "attn_layer_offset": 2, "expert_layer_period": 2,
           "expert_layer_offset": 1, "num_experts": 4, "num_experts_per_tok": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "mamba_d_state": 16,
           "intermediate_size": 40})"},
      {"zamba2",  // two shared blocks taking turns, adapters, a rotary
       R"({"model_type": "zamba2", "hidden_size": 32, "num_hidden_layers": 5, "vocab_size": 96,
           "layers_block_type": ["mamba", "hybrid", "hybrid", "mamba", "hybrid"],
           "num_mem_blocks": 2, "mamba_d_state": 16, "n_mamba_heads": 8, "mamba_ngroups": 2,
           "num_attention_heads": 8, "intermediate_size": 40, "adapter_rank": 4,
           "use_shared_attention_adapter": true, "use_mem_rope": true})"}};
  for (const auto& [label, json] : hybrids) {
    SCOPED_TRACE(label);
    ExpectCudaForwardMatchesCpu(label, json, 900, 2, {9, 1, 1, 6},
                                /*with_bfloat16=*/label.find("experts") == std::string::npos &&
                                    label != "nemotron_h" && label != "granite 4.0" &&
                                    label != "jamba");
    auto config = ParseConfig(json, label);
    ASSERT_TRUE(config.ok()) << config.status();
    Weights weights;
    for (const auto& [name, tensor] : testing::RandomWeights(*config, 901, torch::kFloat32)) {
      weights[name] = tensor.to(torch::kCUDA);
    }
    torch::manual_seed(902);
    const torch::Tensor ids =
        torch::randint(0, config->vocab_size, {2, 13}, torch::kInt64).to(torch::kCUDA);
    const torch::Tensor reference = Forward(*config, weights, ids)->cpu();
    const FamilySpec spec = BuildSpec(*config);
    ASSERT_TRUE(CheckSpec(spec, weights).ok());
    const testing::GroupsTwiceOver groups(spec, 5);
    Weights permuted = testing::Clone(weights);
    ApplyGathers(groups.perms(), permuted);
    const double all = RelL2(Forward(*config, permuted, ids)->cpu(), reference);
    EXPECT_LE(all, 1e-5);
    const torch::Tensor session =
        SessionLogits(*config, weights, ids, 5, decode::Execution::kEager);
    const double decoded = RelL2(session, reference);
    EXPECT_LE(decoded, 1e-5);
    auto graphed = decode::Session::Start(*config, weights, ids.narrow(1, 0, 5),
                                          decode::Execution::kCudaGraph, {});
    ASSERT_TRUE(graphed.ok()) << graphed.status();
    const bool replayable = !blocks::Attends(*config) && config->moe.experts == 0;
    EXPECT_EQ((*graphed)->execution(),
              replayable ? decode::Execution::kCudaGraph : decode::Execution::kEager);
    if (replayable) {  // layers without state (the MLP's) in a captured step
      EXPECT_LE(RelL2(SessionLogits(*config, weights, ids, 5, decode::Execution::kCudaGraph),
                      reference),
                1e-5);
    }
    std::printf("[hybrid] %s on cuda: every group twice over %.3g, decode vs one forward %.3g\n",
                label.c_str(), all, decoded);
  }
}

// A launch setting (fused::ReloadLaunchSettings re-reads them) set for a
// test and put back as the caller had it however the test ends.
class ScopedLaunchSetting {
 public:
  explicit ScopedLaunchSetting(const char* name) : name_(name) {
    if (const char* value = std::getenv(name)) saved_ = value;
  }
  ScopedLaunchSetting(const ScopedLaunchSetting&) = delete;
  ScopedLaunchSetting& operator=(const ScopedLaunchSetting&) = delete;
  ~ScopedLaunchSetting() { Set(saved_.has_value() ? saved_->c_str() : nullptr); }
  void Set(const char* value) {  // null: unset
    if (value == nullptr) {
      unsetenv(name_);
    } else {
      setenv(name_, value, 1);
    }
    fused::ReloadLaunchSettings();
  }

 private:
  const char* name_;
  std::optional<std::string> saved_;
};

// Early loads (a settled weight's first loads before the kernel ahead ends;
// ICD_FEW_ROWS_EARLY_LOADS=0 turns them off) change no bit of a graph's
// steps, and are taken: by the projections of a decode step whose weights
// are the model's own (out_proj in every case; in_proj, x_proj and the head
// where their widths suit the kernel), and not for a weight not said to be
// settled. Rows of several iterations (the reload after the early one) and
// a row shorter than one iteration alike. Which weights are settled:
// forward_test's OnlyTheModelsOwnTensorIsSettled.
TEST(DecodeSessionTest, EarlyLoadsLeaveTheStepsBitForBit) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  ScopedLaunchSetting setting("ICD_FEW_ROWS_EARLY_LOADS");
  auto early = [&](bool on) { setting.Set(on ? "1" : "0"); };
  for (const DecodeCase& c : DecodeCases()) {
    Weights weights;
    for (const auto& [name, tensor] : c.weights) {
      weights[name] = tensor.to(torch::kCUDA, torch::kBFloat16);
    }
    const torch::Tensor ids = c.ids.to(torch::kCUDA);
    early(false);
    const int64_t before = fused::FewRowsLinearEarlyLaunches();
    const torch::Tensor plain = SessionLogits(c.config, weights, ids, 5, decode::Execution::kCudaGraph);
    EXPECT_EQ(fused::FewRowsLinearEarlyLaunches(), before) << c.name << ": off";
    early(true);
    const torch::Tensor loaded_early =
        SessionLogits(c.config, weights, ids, 5, decode::Execution::kCudaGraph);
    const int64_t taken = fused::FewRowsLinearEarlyLaunches() - before;
    early(false);
    ASSERT_TRUE(plain.defined() && loaded_early.defined()) << c.name;
    EXPECT_TRUE(torch::equal(plain, loaded_early)) << c.name << ": rel " << RelL2(plain, loaded_early);
    // The warm-up step's launches and the capture's (replays launch none):
    // out_proj at least, in every layer, twice.
    EXPECT_GE(taken, 2 * c.config.n_layer) << c.name;
    std::printf("[decode] %s: %ld early few-rows launches\n", c.name.c_str(),
                static_cast<long>(taken));
  }
  // mamba-2.8b's out_proj row (5120: several iterations of a lane's loads),
  // a row of one partial iteration (200), and rows of three inputs.
  torch::manual_seed(804);
  for (const torch::ScalarType dtype : {torch::kBFloat16, torch::kFloat32}) {
    for (const int64_t in_features : {int64_t{5120}, int64_t{200}}) {
      for (const int64_t rows : {int64_t{1}, int64_t{3}}) {
        const auto on_cuda = torch::TensorOptions(dtype).device(torch::kCUDA);
        const torch::Tensor input = torch::randn({rows, 1, in_features}, on_cuda);
        const torch::Tensor weight = torch::randn({640, in_features}, on_cuda);
        const torch::Tensor bias = torch::randn({640}, on_cuda);
        early(true);
        const int64_t before = fused::FewRowsLinearEarlyLaunches();
        const auto unsettled = fused::FewRowsLinear(input, weight, bias);
        const int64_t after_unsettled = fused::FewRowsLinearEarlyLaunches();
        const auto settled = fused::FewRowsLinear(input, weight, bias, true);
        const int64_t after_settled = fused::FewRowsLinearEarlyLaunches();
        early(false);
        const auto off = fused::FewRowsLinear(input, weight, bias, true);
        const int64_t after_off = fused::FewRowsLinearEarlyLaunches();
        const std::string what = std::string(c10::toString(dtype)) + " " +
                                 std::to_string(rows) + " x " + std::to_string(in_features);
        ASSERT_TRUE(unsettled.has_value() && settled.has_value() && off.has_value()) << what;
        EXPECT_EQ(after_unsettled, before) << what << ": a weight not said to be settled";
        EXPECT_EQ(after_settled, before + 1) << what;
        EXPECT_EQ(after_off, after_settled) << what << ": off";
        EXPECT_TRUE(torch::equal(*unsettled, *settled)) << what;
        EXPECT_TRUE(torch::equal(*off, *settled)) << what;
        EXPECT_LE(RelL2(settled->to(torch::kFloat64).cpu(),
                        torch::linear(input.to(torch::kFloat64), weight.to(torch::kFloat64),
                                      bias.to(torch::kFloat64))
                            .cpu()),
                  dtype == torch::kFloat32 ? 1e-6 : 1e-2)
            << what;
      }
    }
  }
}

// Every decode case with its weights in bf16 on CUDA, stepped both ways (a
// CUDA graph, and launched in place), for the tests of launch settings that
// must leave a session's steps bit for bit. `what` names the case and way.
void ForEachBFloat16Session(
    const std::function<void(const DecodeCase& c, const Weights& weights,
                             const torch::Tensor& ids, decode::Execution execution,
                             const std::string& what)>& run) {
  for (const DecodeCase& c : DecodeCases()) {
    Weights weights;
    for (const auto& [name, tensor] : c.weights) {
      weights[name] = tensor.to(torch::kCUDA, torch::kBFloat16);
    }
    const torch::Tensor ids = c.ids.to(torch::kCUDA);
    for (const decode::Execution execution :
         {decode::Execution::kCudaGraph, decode::Execution::kInPlace}) {
      run(c, weights, ids, execution,
          c.name + (execution == decode::Execution::kCudaGraph ? " graph" : " in place"));
    }
  }
}

// Early conv operands (in_proj's conv step reads its taps, bias and history
// before the kernel ahead ends; the default, ICD_FEW_ROWS_EARLY_CONV=0
// turns it off) change no bit of a session's steps, in a graph or launched
// in place, and are taken: by every layer's in_proj where the conv step is
// in it (a d_model of whole 16-byte bf16 loads; the odd widths of
// random-mamba1 take cuBLAS and the conv kernel), and by none when off.
TEST(DecodeSessionTest, EarlyConvLeavesTheStepsBitForBit) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  ScopedLaunchSetting setting("ICD_FEW_ROWS_EARLY_CONV");
  ForEachBFloat16Session([&](const DecodeCase& c, const Weights& weights, const torch::Tensor& ids,
                             decode::Execution execution, const std::string& what) {
    setting.Set("0");
    const int64_t before = fused::FewRowsLinearEarlyConvLaunches();
    const torch::Tensor plain = SessionLogits(c.config, weights, ids, 5, execution);
    EXPECT_EQ(fused::FewRowsLinearEarlyConvLaunches(), before) << what << ": none when off";
    setting.Set("1");
    const torch::Tensor early = SessionLogits(c.config, weights, ids, 5, execution);
    const int64_t taken = fused::FewRowsLinearEarlyConvLaunches() - before;
    ASSERT_TRUE(plain.defined() && early.defined()) << what;
    EXPECT_TRUE(torch::equal(plain, early)) << what << ": rel " << RelL2(plain, early);
    if (c.config.d_model % 8 == 0) {
      EXPECT_GE(taken, c.config.n_layer) << what;
    } else {
      EXPECT_EQ(taken, 0) << what;
    }
    std::printf("[decode] %s: %ld early conv launches\n", what.c_str(),
                static_cast<long>(taken));
  });
}

// Early dependents (each decode kernel lets the next be scheduled before its
// own wait ends; the default, ICD_EARLY_DEPENDENTS=0 turns it off) change
// no bit of a session's steps, in a graph or launched in place, with the
// steps queued on the device one after another (no host wait between
// them). Bit equality checks that no kernel reads what the chain ahead has
// not yet written; a race would show as a difference only by chance.
TEST(DecodeSessionTest, EarlyDependentsLeaveTheStepsBitForBit) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  ScopedLaunchSetting dependents("ICD_EARLY_DEPENDENTS");
  ForEachBFloat16Session([&](const DecodeCase& c, const Weights& weights, const torch::Tensor& ids,
                             decode::Execution execution, const std::string& what) {
    dependents.Set("0");
    const torch::Tensor plain = SessionLogits(c.config, weights, ids, 5, execution);
    dependents.Set(nullptr);  // the default
    const torch::Tensor early =
        SessionLogits(c.config, weights, ids, 5, execution, /*queued=*/true);
    ASSERT_TRUE(plain.defined() && early.defined()) << what;
    EXPECT_TRUE(torch::equal(plain, early)) << what << ": rel " << RelL2(plain, early);
  });
}

// Early operands (the gated norm's weight; the state steps' state, A,
// D, and Mamba-1's dt_proj bias and weight, read before the kernel ahead
// ends) changes no bit of a session's steps, in a graph or launched in
// place (every step after the first reads early there), and is taken: by
// the state step of every layer once A and D are the session's own, and by
// Mamba-2's gated norm in decode steps (its weight the model's own). On by
// default; ICD_EARLY_OPERANDS=0: none taken. Bit equality checks the
// arithmetic, not timing.
TEST(DecodeSessionTest, EarlyOperandsLeaveTheStepsBitForBit) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  ScopedLaunchSetting setting("ICD_EARLY_OPERANDS");
  auto early = [&](const char* value) { setting.Set(value); };
  // A form forced for measuring (ICD_STATE_SPACE_FORM) runs no step kernel.
  const bool step_form = std::getenv("ICD_STATE_SPACE_FORM") == nullptr;
  int mamba2_cases = 0;
  ForEachBFloat16Session([&](const DecodeCase& c, const Weights& weights, const torch::Tensor& ids,
                             decode::Execution execution, const std::string& what) {
    const bool mamba2 = c.config.family == Family::kMamba2;
    if (execution == decode::Execution::kCudaGraph) mamba2_cases += mamba2 ? 1 : 0;
    auto state_steps = [&] {
      return mamba2 ? scan::StateSpaceStepEarlyLaunches()
                    : scan::SelectiveStateStepEarlyLaunches();
    };
    early("0");
    const int64_t steps_before = state_steps();
    const int64_t norms_before = fused::GatedRmsNormEarlyLaunches();
    const torch::Tensor plain = SessionLogits(c.config, weights, ids, 5, execution);
    EXPECT_EQ(state_steps(), steps_before) << what << ": none taken when off";
    EXPECT_EQ(fused::GatedRmsNormEarlyLaunches(), norms_before) << what << ": none taken when off";
    early(nullptr);  // the default
    const torch::Tensor loaded_early = SessionLogits(c.config, weights, ids, 5, execution);
    const int64_t steps = state_steps() - steps_before;
    const int64_t norms = fused::GatedRmsNormEarlyLaunches() - norms_before;
    ASSERT_TRUE(plain.defined() && loaded_early.defined()) << what;
    EXPECT_TRUE(torch::equal(plain, loaded_early))
        << what << ": rel " << RelL2(plain, loaded_early);
    // A graph: the captured step's, one a layer. In place: every step's
    // after the first (which computes A and D).
    const int64_t settled_steps = execution == decode::Execution::kCudaGraph
                                      ? 1
                                      : ids.size(1) - 5 - 1;
    if (step_form || !mamba2) {
      EXPECT_GE(steps, settled_steps * c.config.n_layer) << what;
    }
    if (mamba2) {
      EXPECT_GT(norms, 0) << what;
    }
    std::printf("[decode] %s: %ld early state steps, %ld early gated norms\n", what.c_str(),
                static_cast<long>(steps), static_cast<long>(norms));
  });
  EXPECT_GE(mamba2_cases, 2);
}

// The check bites: a session whose state is lost (a fresh prefill of one
// token, then the rest) is another function.
TEST(DecodeSessionTest, StepsWithoutTheirHistoryDiffer) {
  ICD_SKIP_OR_FAIL_WITHOUT_CUDA();
  const DecodeCase c = DecodeCases().back();
  Weights weights;
  for (const auto& [name, tensor] : c.weights) weights[name] = tensor.to(torch::kCUDA);
  const torch::Tensor ids = c.ids.to(torch::kCUDA);
  auto whole = Forward(c.config, weights, ids);
  ASSERT_TRUE(whole.ok()) << whole.status();
  // Tokens 9.. decoded after a prefill of token 8 alone: no history before it.
  const torch::Tensor tail = SessionLogits(c.config, weights, ids.narrow(1, 8, ids.size(1) - 8),
                                           1, decode::Execution::kCudaGraph);
  ASSERT_TRUE(tail.defined());
  EXPECT_GT(RelL2(tail.narrow(1, 1, tail.size(1) - 1),
                  whole->cpu().narrow(1, 9, ids.size(1) - 9)),
            1e-3);
}

}  // namespace
}  // namespace icd
