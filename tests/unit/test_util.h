// Helpers shared by the core unit tests: golden fixtures, random valid
// permutations, file snapshots.
#ifndef ICD_TESTS_UNIT_TEST_UTIL_H_
#define ICD_TESTS_UNIT_TEST_UTIL_H_

#include "torch_api.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <ostream>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "apply/symmetry.h"
#include "icd/core/engine.h"
#include "icd/core/types.h"
#include "io/config.h"
#include "io/safetensors.h"

namespace icd::testing {

// ICD_REQUIRE_CUDA=1 (deploy/build-gpu.sh on GPU machines): a GPU test that
// finds no CUDA device fails instead of skipping, so a machine that lost its
// GPU cannot pass the GPU tests by skipping them all.
inline bool CudaRequired() {
  const char* value = std::getenv("ICD_REQUIRE_CUDA");
  return value != nullptr && std::string(value) == "1";
}

// First statement of a GPU test (or its SetUp): skips without CUDA, or fails
// when CUDA is required.
#define ICD_SKIP_OR_FAIL_WITHOUT_CUDA()                                            \
  do {                                                                             \
    if (!torch::cuda::is_available()) {                                            \
      if (::icd::testing::CudaRequired()) {                                        \
        GTEST_FAIL() << "no CUDA device, and ICD_REQUIRE_CUDA=1 requires one";     \
      }                                                                            \
      GTEST_SKIP() << "no CUDA device";                                            \
    }                                                                              \
  } while (false)

inline std::filesystem::path GoldenDir(const std::string& fixture) {
  return std::filesystem::path(ICD_FIXTURES_DIR) / "golden" / fixture;
}

// A trained reference model of models/ (README: reference models) in the HF
// layout: larger than the golden fixtures (mamba1-pydoc: 4 MB in float32).
inline std::string ReferenceModelDir(const std::string& name) {
  return (std::filesystem::path(ICD_FIXTURES_DIR).parent_path().parent_path() / "models" / name /
          "hf")
      .string();
}

// Every golden fixture in every layout it ships.
struct GoldenCase {
  std::string fixture;
  std::string layout;  // sub-directory: "hf" or "mamba_ssm"
};

inline void PrintTo(const GoldenCase& c, std::ostream* os) { *os << c.fixture << "/" << c.layout; }

// "fixture_layout" with every character gtest does not take in a test name
// as '_': the parameterised suites' name generator.
inline std::string GoldenCaseLabel(const GoldenCase& c) {
  std::string name = c.fixture + "_" + c.layout;
  for (char& ch : name) {
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  }
  return name;
}

inline std::vector<GoldenCase> GoldenCases() {
  return {{"mamba1-small", "hf"},       {"mamba1-small", "mamba_ssm"},
          {"mamba1-bias-untied", "hf"}, {"mamba2-groups", "hf"},
          {"mamba2-one-group", "hf"},   {"mamba2-one-group", "mamba_ssm"},
          {"falcon-mamba-small", "hf"},
          // mamba_ssm's own logits (fixtures/golden/make_mamba_ssm_goldens.py):
          // configurations HF has no twin of, mamba_ssm layout only.
          {"mamba_ssm-mamba1-layernorm", "mamba_ssm"},
          {"mamba_ssm-mamba2-groups", "mamba_ssm"},
          {"mamba_ssm-mamba2-gate-first", "mamba_ssm"}};
}

// Issue 19's hybrids: transformers' (make_hybrid_goldens.py) and mamba_ssm's
// MLP and attention hybrids (make_mamba_ssm_goldens.py); the tests that hold
// for every model take them beside GoldenCases().
inline std::vector<GoldenCase> HybridGoldenCases() {
  return {{"mamba_ssm-mamba2-mlp", "mamba_ssm"},
          {"mamba_ssm-hybrid-attention", "mamba_ssm"},
          {"nemotron_h-small", "hf"},
          {"nemotron_h-gqa4", "hf"},
          {"nemotron_h-experts", "hf"},
          {"bamba-small", "hf"},
          {"granite4-moe", "hf"},
          {"granite4-dense-nope", "hf"},
          {"jamba-small", "hf"},
          {"falcon_h1-small", "hf"},
          {"zamba2-small", "hf"},
          {"zamba2-blocks", "hf"}};
}

struct Golden {
  std::vector<int64_t> input_ids;  // row-major [batch, seq]
  int64_t batch = 0;
  torch::Tensor logits;  // float32 [batch, seq, vocab]
};

// The oracle's logits for fixed ids (HF's, or mamba_ssm's for the mamba_ssm-*
// fixtures); a missing fixture fails the test (never skipped).
inline Golden ReadGolden(const std::string& fixture) {
  auto tensors = io::ReadSafetensors(GoldenDir(fixture) / "golden.safetensors");
  if (!tensors.ok()) throw std::runtime_error(std::string(tensors.status().message()));
  Golden golden;
  for (const auto& [name, tensor] : *tensors) {
    if (name == "input_ids") {
      golden.batch = tensor.size(0);
      torch::Tensor ids = tensor.to(torch::kInt64).contiguous();
      golden.input_ids.assign(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + ids.numel());
    } else if (name == "logits") {
      golden.logits = tensor.to(torch::kFloat32);
    }
  }
  return golden;
}

// Random weights of the right shapes, scaled so activations stay O(1).
inline Weights RandomWeights(const ModelConfig& config, uint64_t seed, torch::ScalarType dtype) {
  torch::manual_seed(seed);
  Weights weights;
  for (const auto& [name, shape] : ExpectedShapes(config)) {
    torch::Tensor t = torch::randn(shape, torch::kFloat64);
    if (name.find("A_log") != std::string::npos) {
      t = torch::log(torch::rand(shape, torch::kFloat64) * 8 + 0.5);
    } else if (name.find("norm") != std::string::npos && name.find("weight") != std::string::npos) {
      t = 1 + 0.3 * t;
    } else if (name.find(".D") != std::string::npos) {
      t = 1 + 0.3 * t;
    } else if (t.dim() == 2) {
      t = t / std::sqrt(static_cast<double>(shape[1]));
    } else {
      t = 0.3 * t;
    }
    weights[name] = t.to(dtype);
  }
  return weights;
}

inline Weights Clone(const Weights& weights) {
  Weights copy;
  for (const auto& [name, t] : weights) copy[name] = t.clone();
  return copy;
}

// Largest relative L2 of icd's float32 logits from the goldens (design.md).
inline constexpr double kGoldenTolerance = 1e-4;

// The float32 bytes of one tensor as ReadTensors returns them (raw,
// little-endian), rounded to `dtype` by LibTorch's cast: what a bf16 or
// float16 model's bytes must be after the same permutation.
inline std::string CastBytes(const HostTensor& f32, torch::ScalarType dtype) {
  const torch::Tensor cast =
      torch::from_blob(const_cast<char*>(f32.data.data()), f32.shape, torch::kFloat32)
          .to(dtype)
          .contiguous();
  return std::string(static_cast<const char*>(cast.data_ptr()), cast.nbytes());
}

// Every tensor of `low` (the same model loaded in `dtype`, LibTorch's `cast`)
// has its float32 twin's shape and exactly the twin's bytes cast: a
// permutation moved the reduced model's bytes as it moved the float32 ones.
inline void ExpectFloat32Cast(const std::map<std::string, HostTensor>& f32,
                              const std::map<std::string, HostTensor>& low, DType dtype,
                              torch::ScalarType cast) {
  ASSERT_EQ(f32.size(), low.size());
  for (const auto& [name, tensor] : f32) {
    ASSERT_EQ(low.count(name), 1u) << name;
    const HostTensor& reduced = low.at(name);
    EXPECT_EQ(reduced.dtype, dtype) << name;
    EXPECT_EQ(reduced.shape, tensor.shape) << name;
    EXPECT_TRUE(reduced.data == CastBytes(tensor, cast))
        << name << ": the " << c10::toString(cast)
        << " model's bytes are not the float32 permutation's";
  }
}

inline double RelL2(const torch::Tensor& now, const torch::Tensor& reference) {
  torch::Tensor a = now.to(torch::kFloat64), b = reference.to(torch::kFloat64);
  return (a - b).norm().item<double>() / b.norm().item<double>();
}

// A uniformly random permutation that satisfies the group's block / whole
// constraint (design.md "Groups and permutations").
inline std::vector<int64_t> RandomPermutation(const GroupInfo& group, std::mt19937_64& rng) {
  std::vector<int64_t> index(static_cast<size_t>(group.size));
  for (int64_t j = 0; j < group.size; ++j) index[static_cast<size_t>(j)] = j;
  auto shuffle = [&rng](auto first, auto last) { std::shuffle(first, last, rng); };
  if (group.block > 0) {
    for (int64_t start = 0; start < group.size; start += group.block) {
      shuffle(index.begin() + start, index.begin() + start + group.block);
    }
  } else if (group.whole > 0) {
    const int64_t w = group.whole;
    std::vector<int64_t> blocks(static_cast<size_t>(group.size / w));
    for (size_t k = 0; k < blocks.size(); ++k) blocks[k] = static_cast<int64_t>(k);
    shuffle(blocks.begin(), blocks.end());
    for (size_t k = 0; k < blocks.size(); ++k) {
      auto first = index.begin() + static_cast<int64_t>(k) * w;
      for (int64_t a = 0; a < w; ++a) first[a] = blocks[k] * w + a;
      shuffle(first, first + w);
    }
  } else {
    shuffle(index.begin(), index.end());
  }
  return index;
}

// One random valid permutation per group, in the groups' order.
// A random valid permutation of every group of `spec`, and the list that
// applies them all twice over, in spec order (so that some axes compose a
// permutation with itself): what ApplyGathers takes. Holds pointers into
// itself and into `spec`, so it is neither copied nor moved.
class GroupsTwiceOver {
 public:
  GroupsTwiceOver(const FamilySpec& spec, uint64_t seed) {
    std::mt19937_64 rng(seed);
    for (const GroupInfo& group : spec) indices_.push_back(RandomPermutation(group, rng));
    for (int round = 0; round < 2; ++round) {
      for (size_t g = 0; g < spec.size(); ++g) perms_.push_back({&spec[g], &indices_[g]});
    }
  }
  GroupsTwiceOver(const GroupsTwiceOver&) = delete;
  GroupsTwiceOver& operator=(const GroupsTwiceOver&) = delete;
  const std::vector<GroupPermutation>& perms() const { return perms_; }

 private:
  std::vector<std::vector<int64_t>> indices_;
  std::vector<GroupPermutation> perms_;
};

inline std::vector<Permutation> RandomPermutations(const std::vector<GroupInfo>& groups,
                                                   std::mt19937_64& rng) {
  std::vector<Permutation> perms;
  for (const GroupInfo& group : groups) perms.push_back({group.name, RandomPermutation(group, rng)});
  return perms;
}

inline bool IsIdentity(const std::vector<int64_t>& index) {
  for (size_t j = 0; j < index.size(); ++j) {
    if (index[j] != static_cast<int64_t>(j)) return false;
  }
  return true;
}

// Every regular file under `dir` with its bytes: equal snapshots mean the
// directory was not touched.
inline std::map<std::string, std::string> Snapshot(const std::filesystem::path& dir) {
  std::map<std::string, std::string> files;
  for (const auto& entry : std::filesystem::recursive_directory_iterator(dir)) {
    if (!entry.is_regular_file()) continue;
    std::ifstream in(entry.path(), std::ios::binary);
    std::stringstream bytes;
    bytes << in.rdbuf();
    files[std::filesystem::relative(entry.path(), dir).string()] = bytes.str();
  }
  return files;
}

// A fresh directory under the system temp dir, removed at scope exit.
class TempDir {
 public:
  TempDir() {
    std::random_device random;
    path_ = std::filesystem::temp_directory_path() /
            ("icd-test-" + std::to_string(random()) + std::to_string(random()));
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// One random permutation of every group of `models[0]`, drawn from `seed`
// and applied to each of `models` (the same model in other dtypes), every
// apply verified and within the probe's tolerance.
inline void ApplySamePermutations(Engine& engine, const std::vector<std::string>& models,
                                  uint64_t seed) {
  auto groups = engine.Symmetries(models.front());
  ASSERT_TRUE(groups.ok()) << groups.status();
  std::mt19937_64 rng(seed);
  const std::vector<Permutation> perms = RandomPermutations(*groups, rng);
  for (const std::string& model : models) {
    auto report = engine.Apply(model, perms);
    ASSERT_TRUE(report.ok()) << model << ": " << report.status();
    EXPECT_TRUE(report->verified && report->correctness.ok)
        << model << " rel_l2 " << report->correctness.rel_l2;
  }
}

// Every tensor of `model` (ReadTensors: raw little-endian bytes on the
// host), by name.
inline std::map<std::string, HostTensor> TensorsByName(const Engine& engine,
                                                       const std::string& model) {
  auto tensors = engine.ReadTensors(model, {});
  EXPECT_TRUE(tensors.ok()) << tensors.status();
  std::map<std::string, HostTensor> by_name;
  if (tensors.ok()) {
    for (HostTensor& t : *tensors) by_name[t.name] = std::move(t);
  }
  return by_name;
}

// `status` has `code` and a message that names `needle`.
inline void ExpectError(const absl::Status& status, absl::StatusCode code,
                        const std::string& needle) {
  EXPECT_EQ(status.code(), code) << status;
  EXPECT_NE(std::string(status.message()).find(needle), std::string::npos)
      << "message lacks '" << needle << "': " << status;
}

// Contexts that stop a call at its first check: the caller has gone away,
// or the deadline has passed.
inline CallContext CancelledContext() {
  CallContext ctx;
  ctx.cancelled = [] { return true; };
  return ctx;
}
inline CallContext PastDeadlineContext() {
  CallContext ctx;
  ctx.deadline = std::chrono::steady_clock::now() - std::chrono::seconds(1);
  return ctx;
}

// Every tensor's raw bytes, by name: equal maps mean identical weights.
inline std::map<std::string, std::string> TensorBytes(const Engine& engine,
                                                      const std::string& model) {
  std::map<std::string, std::string> bytes;
  for (auto& [name, tensor] : TensorsByName(engine, model)) bytes[name] = std::move(tensor.data);
  return bytes;
}

}  // namespace icd::testing

#endif  // ICD_TESTS_UNIT_TEST_UTIL_H_
