// The seams of the rpc layer without a server: the status map both ways for
// all 17 codes, the message cap, tensor chunking, the path policy.
#include <climits>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "convert.h"
#include "harness.h"
#include "log_text.h"
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

// Issue 14, item 10: at the smallest --max-message-mb (1), every chunk is a
// message under 1 MiB whole, the name, shape and dtype included.
TEST(ChunkingTest, ChunksFitTheMessageCap) {
  HostTensor t = MakeTensor(600 * 1024);  // 2.4 MB
  t.name = std::string(300, 'n');
  t.shape = {600, 1024};
  constexpr std::size_t kCap = std::size_t{1} << 20;
  const auto chunks = rpc::SplitTensor(t, kCap, kCap);
  ASSERT_GE(chunks.size(), 3u);
  std::string joined;
  for (const auto& c : chunks) {
    EXPECT_LE(c.ByteSizeLong(), kCap);
    joined += c.data();
  }
  EXPECT_EQ(joined, t.data);
}

// Issue 14, items 3 and 5: sizes are checked as chunks arrive, in checked
// arithmetic: a shape whose byte count overflows int64, data beyond the
// shape's bytes or beyond the model's tensor are refused at the chunk that
// brings them, naming the tensor.
TEST(ChunkingTest, AssemblerChecksSizesAsChunksArrive) {
  {
    rpc::TensorAssembler a;
    v1::TensorChunk huge;
    huge.set_name("w");
    huge.set_dtype("float32");
    huge.add_shape(int64_t{0x7fffffffffffffff});
    huge.add_shape(2);
    huge.set_data(std::string(8, 'x'));
    const absl::Status s = a.Add(huge);
    ExpectCode(s, absl::StatusCode::kInvalidArgument, "tensor w: shape x dtype size");
    ExpectCode(s, absl::StatusCode::kInvalidArgument, "overflows");
  }
  {
    rpc::TensorAssembler a([](const std::string&) -> absl::StatusOr<int64_t> { return 512; });
    v1::TensorChunk first;
    first.set_name("w");
    first.set_dtype("float32");
    first.add_shape(1 << 20);  // declares 4 MiB; the model's tensor holds 512 bytes
    first.set_data(std::string(1 << 20, 'x'));
    ExpectCode(a.Add(first), absl::StatusCode::kInvalidArgument,
               "more than 512 bytes sent; the model's tensor holds that many");
  }
  {
    rpc::TensorAssembler a([](const std::string& name) -> absl::StatusOr<int64_t> {
      return absl::NotFoundError("tensor '" + name + "' is not in model 'm'");
    });
    ExpectCode(a.Add(rpc::SplitTensor(MakeTensor(4), 1024)[0]), absl::StatusCode::kNotFound, "'w'");
  }
  {
    rpc::TensorAssembler a;
    v1::TensorChunk over = rpc::SplitTensor(MakeTensor(4), 1024)[0];
    over.set_data(over.data() + "x");
    ExpectCode(a.Add(over), absl::StatusCode::kInvalidArgument,
               "more than 16 bytes sent; its shape and dtype need that many");
  }
}

// Issue 14, item 6: client strings in log lines are one quoted token, with
// no line break and a bounded length.
TEST(LogTextTest, QuotesEscapesAndCuts) {
  EXPECT_EQ(rpc::QuoteForLog("m"), "\"m\"");
  EXPECT_EQ(rpc::QuoteForLog("a\nrpc=Fake \"x\"\\"), "\"a\\nrpc=Fake \\\"x\\\"\\\\\"");
  EXPECT_EQ(rpc::QuoteForLog(std::string("\r\x01\xff", 3)), "\"\\x0d\\x01\\xff\"");
  const std::string huge(4 << 20, 'n');
  const std::string quoted = rpc::QuoteForLog(huge);
  EXPECT_LT(quoted.size(), 300u);
  EXPECT_NE(quoted.find("...(4194304 bytes)"), std::string::npos);
  EXPECT_EQ(quoted.find('\n'), std::string::npos);
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
  // Issue 14, item 9: names no file system could hold are the request's
  // fault: INVALID_ARGUMENT naming the field, not PERMISSION_DENIED.
  const std::string long_name(NAME_MAX + 1, 'a');
  ExpectCode(policy->ResolveModelPath(long_name).status(), absl::StatusCode::kInvalidArgument,
             "path: a component of 256 bytes");
  ExpectCode(policy->ResolveExportPath("x/" + long_name).status(),
             absl::StatusCode::kInvalidArgument, "NAME_MAX");
  std::string deep;
  while (deep.size() < PATH_MAX) deep += "abcdefgh/";
  ExpectCode(policy->ResolveExportPath(deep).status(), absl::StatusCode::kInvalidArgument,
             "PATH_MAX");
  ExpectCode(policy->ResolveModelPath("/" + deep).status(), absl::StatusCode::kInvalidArgument,
             "PATH_MAX");
  // A legal 250-byte name is fine.
  EXPECT_TRUE(policy->ResolveExportPath(std::string(250, 'e')).ok());
}

}  // namespace
}  // namespace icd::testing
