// Integration test helpers: the real service on 127.0.0.1:0 over a temp
// model root and export root, golden fixtures, a tiny safetensors reader,
// random valid permutations. No LibTorch here.
#ifndef ICD_TESTS_INTEGRATION_HARNESS_H_
#define ICD_TESTS_INTEGRATION_HARNESS_H_

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "absl/status/statusor.h"
#include "icd/client/client.h"
#include "icd/core/engine.h"
#include "icd/v1/permutation.pb.h"
#include "service.h"

namespace icd::testing {

namespace fs = std::filesystem;

// `auto& lhs = *expr`, failing the test (with the status) when expr is not ok.
#define ASSERT_OK_AND_ASSIGN(lhs, expr)                \
  auto lhs##_or = (expr);                              \
  ASSERT_TRUE(lhs##_or.ok()) << lhs##_or.status(); \
  auto& lhs = *lhs##_or

// Expects `code`, and `substring` in the message when given.
inline void ExpectCode(const absl::Status& s, absl::StatusCode code,
                       const std::string& substring = "") {
  EXPECT_EQ(s.code(), code) << s;
  if (!substring.empty()) {
    EXPECT_NE(std::string(s.message()).find(substring), std::string::npos)
        << "message '" << s.message() << "' lacks '" << substring << "'";
  }
}

// tests/fixtures/golden
fs::path GoldenDir();

// A fresh directory under the system temp dir, removed on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// One tensor of a safetensors file (float32 or int64 only).
struct StTensor {
  std::string dtype;  // "F32" | "I64"
  std::vector<int64_t> shape;
  std::vector<float> f32;
  std::vector<int64_t> i64;
};
absl::StatusOr<std::map<std::string, StTensor>> ReadSafetensors(
    const fs::path& file);

// golden.safetensors of one fixture: input_ids [2, 17], logits [2, 17, V].
struct Golden {
  std::vector<int64_t> input_ids;
  int64_t batch = 0;
  std::vector<float> logits;
  std::vector<int64_t> logits_shape;
};
Golden LoadGolden(const std::string& fixture);  // fails the test if missing

// ||a - b|| / ||b||; +inf when the sizes differ.
double RelL2(const std::vector<float>& a, const std::vector<float>& b);

// A uniformly drawn permutation that satisfies the group's block and whole
// constraints (design.md: p[j]/b == j/b; chunks of `whole` map to one block).
std::vector<int64_t> RandomPermutation(const v1::Group& group,
                                       std::mt19937_64& rng);
// One permutation per group, in GetSymmetries order.
std::vector<v1::Permutation> RandomPermutations(const v1::Symmetries& syms,
                                                std::mt19937_64& rng);

// The engine and the service on 127.0.0.1:0, started on the calling thread.
// Model roots: <tmp>/models (fixtures copied in: <fixture>/hf and, where it
// exists, <fixture>/mamba_ssm) and <tmp>/exports; export root: <tmp>/exports.
class Harness {
 public:
  explicit Harness(rpc::ServiceOptions options = {}, EngineOptions engine_options = {});
  ~Harness();
  Harness(const Harness&) = delete;
  Harness& operator=(const Harness&) = delete;

  const std::string& address() const { return address_; }
  const fs::path& model_root() const { return model_root_; }
  const fs::path& export_root() const { return export_root_; }
  const fs::path& tmp() const { return tmp_.path(); }
  // A client sending exactly this token (empty: none).
  std::unique_ptr<Client> NewClient(const std::string& token) const;
  // The harness's own client (with the service's token, if any).
  Client& client() { return *client_; }

 private:
  TempDir tmp_;
  fs::path model_root_, export_root_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<rpc::PermutationServiceImpl> service_;
  std::unique_ptr<grpc::Server> server_;
  std::string address_;
  std::unique_ptr<Client> client_;
  std::string token_;
};

// Evaluate on the fixture's golden ids with logits.
absl::StatusOr<v1::EvaluateResponse> EvaluateGolden(Client& client,
                                                    const std::string& model,
                                                    const Golden& golden);

// What a refused or stopped call must leave as it was.
struct ModelState {
  uint64_t version = 0;       // 0: not listed
  std::vector<float> logits;  // on the golden ids
};
// `model`'s version (ListModels) and its logits on `golden`'s ids.
ModelState Snapshot(Client& client, const std::string& model, const Golden& golden);

// A harness with mamba1-small/hf loaded as "m", and that fixture's golden
// ids and logits: the set-up of the service's own test suites.
class LoadedModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    golden_ = LoadGolden("mamba1-small");
    auto info = client().LoadModel("m", "mamba1-small/hf");
    ASSERT_TRUE(info.ok()) << info.status();
  }
  Client& client() { return harness_.client(); }
  ModelState Snapshot() { return icd::testing::Snapshot(client(), "m", golden_); }

  Harness harness_;
  Golden golden_;
};

}  // namespace icd::testing

#endif  // ICD_TESTS_INTEGRATION_HARNESS_H_
