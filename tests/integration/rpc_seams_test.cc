// The seams of the rpc layer without a server: the status map both ways for
// all 17 codes, the message cap, tensor chunking, the path policy.
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "convert.h"
#include "harness.h"
#include "paths.h"
#include "status.h"

namespace icd::testing {
namespace {

TEST(StatusMapTest, AllSeventeenCodesRoundTrip) {
  for (int code = 0; code <= 16; ++code) {
    const absl::Status s(static_cast<absl::StatusCode>(code),
                         code == 0 ? "" : "msg " + std::to_string(code));
    const grpc::Status g = rpc::ToGrpcStatus(s);
    EXPECT_EQ(static_cast<int>(g.error_code()), code);
    EXPECT_EQ(g.error_message(), std::string(s.message()));
    EXPECT_EQ(FromGrpcStatus(g), s);
  }
}

TEST(StatusMapTest, LongMessagesAreCapped) {
  const absl::Status s = absl::InvalidArgumentError(std::string(100000, 'x'));
  const grpc::Status g = rpc::ToGrpcStatus(s);
  EXPECT_EQ(g.error_code(), grpc::INVALID_ARGUMENT);
  EXPECT_EQ(g.error_message().size(), rpc::kMaxStatusMessageBytes);
  EXPECT_NE(g.error_message().find("truncated"), std::string::npos);
}

TEST(StatusMapTest, NonCanonicalCodeIsUnknown) {
  const absl::Status s(static_cast<absl::StatusCode>(99), "odd");
  EXPECT_EQ(rpc::ToGrpcStatus(s).error_code(), grpc::UNKNOWN);
}

HostTensor MakeTensor(std::size_t floats) {
  HostTensor t;
  t.name = "w";
  t.shape = {static_cast<int64_t>(floats)};
  t.dtype = DType::kFloat32;
  for (std::size_t i = 0; i < floats * 4; ++i) {
    t.data.push_back(static_cast<char>(i % 251));
  }
  return t;
}

TEST(ChunkingTest, SplitAndReassemble) {
  const HostTensor t = MakeTensor(1000);  // 4000 bytes
  const auto chunks = rpc::SplitTensor(t, 1024);
  ASSERT_EQ(chunks.size(), 4u);
  for (std::size_t i = 0; i < chunks.size(); ++i) {
    EXPECT_LE(chunks[i].data().size(), 1024u);
    EXPECT_EQ(chunks[i].last(), i + 1 == chunks.size());
    EXPECT_EQ(chunks[i].dtype(), "float32");
  }
  rpc::TensorAssembler assembler;
  for (const auto& c : chunks) ASSERT_TRUE(assembler.Add(c).ok());
  auto out = assembler.Finish();
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(out->size(), 1u);
  EXPECT_EQ((*out)[0].data, t.data);
  EXPECT_EQ((*out)[0].shape, t.shape);
}

TEST(ChunkingTest, EmptyTensorIsOneLastChunk) {
  const auto chunks = rpc::SplitTensor(MakeTensor(0), 1024);
  ASSERT_EQ(chunks.size(), 1u);
  EXPECT_TRUE(chunks[0].last());
}

TEST(ChunkingTest, AssemblerRefusesBrokenStreams) {
  const auto chunks = rpc::SplitTensor(MakeTensor(1000), 1024);
  {
    rpc::TensorAssembler a;
    ASSERT_TRUE(a.Add(chunks[0]).ok());
    EXPECT_EQ(a.Finish().status().code(), absl::StatusCode::kInvalidArgument);
  }
  {
    rpc::TensorAssembler a;
    ASSERT_TRUE(a.Add(chunks[0]).ok());
    v1::TensorChunk other = chunks[1];
    other.set_name("v");
    EXPECT_EQ(a.Add(other).code(), absl::StatusCode::kInvalidArgument);
  }
  {
    rpc::TensorAssembler a;
    v1::TensorChunk short_one = chunks[3];
    short_one.set_last(true);
    EXPECT_EQ(a.Add(short_one).code(), absl::StatusCode::kInvalidArgument);
  }
  {
    rpc::TensorAssembler a;
    v1::TensorChunk bad = chunks[0];
    bad.set_dtype("int7");
    EXPECT_EQ(a.Add(bad).code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST(PathPolicyTest, ResolvesAndConfines) {
  TempDir tmp;
  const fs::path models = tmp.path() / "models";
  const fs::path exports = tmp.path() / "exports";
  fs::create_directories(models / "a" / "b");
  fs::create_directories(exports);
  fs::create_directories(tmp.path() / "models2");
  auto policy = rpc::PathPolicy::Create({models.string()}, {exports.string()});
  ASSERT_TRUE(policy.ok()) << policy.status();
  EXPECT_EQ(*policy->ResolveModelPath("a/b"), (models / "a" / "b").string());
  EXPECT_EQ(*policy->ResolveModelPath((models / "a" / ".." / "a").string()),
            (models / "a").string());
  EXPECT_EQ(policy->ResolveModelPath("a/missing").status().code(),
            absl::StatusCode::kNotFound);
  // A sibling whose name starts with the root's is not under it.
  EXPECT_EQ(policy->ResolveModelPath((tmp.path() / "models2").string()).status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(policy->ResolveModelPath("../models2").status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(policy->ResolveModelPath("missing/../../models2").status().code(),
            absl::StatusCode::kPermissionDenied);
  fs::create_directory_symlink(tmp.path() / "models2", models / "link");
  EXPECT_EQ(policy->ResolveModelPath("link").status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(policy->ResolveExportPath("new").value(), (exports / "new").string());
  EXPECT_EQ(policy->ResolveExportPath("../models/new").status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_FALSE(rpc::PathPolicy::Create({(tmp.path() / "nope").string()}, {}).ok());
}

}  // namespace
}  // namespace icd::testing
