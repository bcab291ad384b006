// io::ReadSafetensors / WriteSafetensors: round trips and the strict
// parser's refusals (code, file and reason in the message).
#include "io/safetensors.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "test_util.h"

namespace icd::io {
namespace {

using ::testing::HasSubstr;

class SafetensorsTest : public ::testing::Test {
 protected:
  // Writes [u64 little-endian header length][header][data] by hand.
  std::filesystem::path WriteRaw(const std::string& header, const std::string& data,
                                 uint64_t declared_length = UINT64_MAX) {
    const std::filesystem::path path = temp_.path() / "model.safetensors";
    std::ofstream out(path, std::ios::binary);
    uint64_t length = declared_length == UINT64_MAX ? header.size() : declared_length;
    for (int i = 0; i < 8; ++i) {
      out.put(static_cast<char>(length & 0xFF));
      length >>= 8;
    }
    out << header << data;
    return path;
  }

  // Reads `path` and expects InvalidArgument naming the file and `reason`.
  static void ExpectRefused(const std::filesystem::path& path, const std::string& reason) {
    const absl::StatusOr<TensorList> result = ReadSafetensors(path);
    ASSERT_FALSE(result.ok());
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << result.status();
    EXPECT_THAT(std::string(result.status().message()), HasSubstr(path.string()));
    EXPECT_THAT(std::string(result.status().message()), HasSubstr(reason));
  }

  testing::TempDir temp_;
};

TensorList SampleTensors() {
  TensorList tensors;
  tensors.push_back({"z.first", torch::arange(6, torch::kFloat).reshape({2, 3}) / 7});
  tensors.push_back({"a.bf16", (torch::arange(5, torch::kFloat) * 0.37).to(torch::kBFloat16)});
  tensors.push_back({"m.half", (torch::arange(3, torch::kFloat) - 1.5).to(torch::kHalf)});
  tensors.push_back({"empty", torch::zeros({0, 3}, torch::kFloat)});
  tensors.push_back({"b.double", torch::arange(4, torch::kDouble).reshape({2, 2}) / 3});
  tensors.push_back({"i64", torch::arange(-2, 2, torch::kLong)});
  tensors.push_back({"i32", torch::arange(3, torch::kInt)});
  tensors.push_back({"i8", torch::arange(-3, 0, torch::kChar)});
  tensors.push_back({"u8", torch::arange(250, 256, torch::kInt).to(torch::kByte)});
  tensors.push_back({"flags", torch::tensor({true, false, true})});
  tensors.push_back({"scalar", torch::tensor(2.5)});
  // Non-contiguous input is written as its contiguous values.
  tensors.push_back({"transposed", torch::arange(6, torch::kFloat).reshape({2, 3}).t()});
  return tensors;
}

void ExpectSameTensors(const TensorList& expected, const TensorList& actual) {
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    SCOPED_TRACE(expected[i].name);
    EXPECT_EQ(actual[i].name, expected[i].name);
    EXPECT_EQ(actual[i].tensor.scalar_type(), expected[i].tensor.scalar_type());
    EXPECT_EQ(actual[i].tensor.sizes(), expected[i].tensor.sizes());
    EXPECT_TRUE(actual[i].tensor.is_contiguous());
    const torch::Tensor want = expected[i].tensor.contiguous();
    ASSERT_EQ(actual[i].tensor.nbytes(), want.nbytes());
    if (want.nbytes() > 0) {
      EXPECT_EQ(std::memcmp(actual[i].tensor.data_ptr(), want.data_ptr(), want.nbytes()), 0);
    }
  }
}

TEST_F(SafetensorsTest, RoundTripKeepsNamesOrderDtypesAndBytes) {
  const TensorList tensors = SampleTensors();
  const std::filesystem::path path = temp_.path() / "out.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, tensors, {{"format", "pt"}}).ok());
  const absl::StatusOr<TensorList> read = ReadSafetensors(path);
  ASSERT_TRUE(read.ok()) << read.status();
  ExpectSameTensors(tensors, *read);
}

TEST_F(SafetensorsTest, HeaderIsSortedPaddedJsonWithMetadata) {
  const std::filesystem::path path = temp_.path() / "out.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, SampleTensors(), {{"format", "pt"}}).ok());
  std::ifstream in(path, std::ios::binary);
  unsigned char length_bytes[8];
  in.read(reinterpret_cast<char*>(length_bytes), 8);
  uint64_t length = 0;
  for (int i = 7; i >= 0; --i) length = (length << 8) | length_bytes[i];
  EXPECT_EQ(length % 8, 0u);
  std::string header(length, '\0');
  in.read(header.data(), static_cast<std::streamsize>(length));
  const std::string compact = header.substr(0, header.find_last_not_of(' ') + 1);
  EXPECT_LT(header.size() - compact.size(), 8u);
  const nlohmann::json json = nlohmann::json::parse(compact);
  EXPECT_EQ(json.dump(), compact);  // compact and key-sorted
  EXPECT_EQ(json["__metadata__"], nlohmann::json({{"format", "pt"}}));
  EXPECT_EQ(json["a.bf16"]["dtype"], "BF16");
  EXPECT_EQ(json["z.first"]["data_offsets"], nlohmann::json({0, 24}));  // first in list order
  EXPECT_EQ(json["a.bf16"]["data_offsets"], nlohmann::json({24, 34}));
  EXPECT_EQ(json["scalar"]["shape"], nlohmann::json::array());
}

TEST_F(SafetensorsTest, ReadsHfFixtureAndRewritesIt) {
  const std::filesystem::path fixture =
      std::filesystem::path(ICD_FIXTURES_DIR) / "golden/mamba1-small/hf/model.safetensors";
  const absl::StatusOr<TensorList> read = ReadSafetensors(fixture);
  ASSERT_TRUE(read.ok()) << read.status();
  ASSERT_EQ(read->size(), 22u);
  bool found_embeddings = false;
  for (const NamedTensor& named : *read) {
    EXPECT_EQ(named.tensor.scalar_type(), torch::kFloat) << named.name;
    if (named.name == "backbone.embeddings.weight") {
      found_embeddings = true;
      EXPECT_EQ(named.tensor.dim(), 2);
    }
  }
  EXPECT_TRUE(found_embeddings);
  const std::filesystem::path copy = temp_.path() / "copy.safetensors";
  ASSERT_TRUE(WriteSafetensors(copy, *read).ok());
  const absl::StatusOr<TensorList> again = ReadSafetensors(copy);
  ASSERT_TRUE(again.ok()) << again.status();
  ExpectSameTensors(*read, *again);
}

TEST_F(SafetensorsTest, MissingFileIsNotFound) {
  const std::filesystem::path path = temp_.path() / "absent.safetensors";
  testing::ExpectError(ReadSafetensors(path).status(), absl::StatusCode::kNotFound, path.string());
}

TEST_F(SafetensorsTest, RefusesTruncatedFile) {
  const std::filesystem::path path = temp_.path() / "short.safetensors";
  std::ofstream(path, std::ios::binary) << "abcde";
  ExpectRefused(path, "file is 5 bytes, shorter than the 8-byte header length");
}

TEST_F(SafetensorsTest, RefusesHeaderLengthPastEnd) {
  ExpectRefused(WriteRaw("{}", "", 1000), "header length 1000 past the end of the file (10 bytes)");
}

TEST_F(SafetensorsTest, RefusesHeaderOver100MB) {
  const std::filesystem::path path = WriteRaw("{}", "", 100'000'001);
  std::filesystem::resize_file(path, 100'000'100);  // sparse: cheap
  ExpectRefused(path, "header length 100000001 over the limit");
}

TEST_F(SafetensorsTest, RefusesBadJson) { ExpectRefused(WriteRaw("{\"x\": ", ""), "header is not valid JSON"); }

TEST_F(SafetensorsTest, RefusesNonObjectHeader) {
  ExpectRefused(WriteRaw("[1, 2]", ""), "header is a JSON array, not an object");
}

TEST_F(SafetensorsTest, RefusesUnknownDtype) {
  ExpectRefused(WriteRaw(R"({"x.weight":{"dtype":"Q4","shape":[2],"data_offsets":[0,2]}})", "ab"),
                "tensor 'x.weight': unknown dtype 'Q4'");
}

TEST_F(SafetensorsTest, RefusesShapeBytesMismatch) {
  ExpectRefused(WriteRaw(R"({"x.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}})",
                         std::string(16, '\0')),
                "tensor 'x.weight': shape [2, 2] of F32 needs 16 bytes but data_offsets [0, 12] hold 12");
}

TEST_F(SafetensorsTest, RefusesShapeWhoseByteCountOverflows) {
  ExpectRefused(WriteRaw(R"({"x":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,0]}})", ""),
                "needs more than 2^64 bytes");
}

TEST_F(SafetensorsTest, RefusesOffsetsPastEnd) {
  ExpectRefused(WriteRaw(R"({"x.weight":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})",
                         std::string(8, '\0')),
                "tensor 'x.weight': data_offsets [0, 16] past the end of the data (8 bytes)");
}

TEST_F(SafetensorsTest, RefusesOverlappingTensors) {
  ExpectRefused(WriteRaw(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                         R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                         std::string(12, '\0')),
                "tensor 'b' data_offsets [4, 12] overlap tensor 'a' data_offsets [0, 8]");
}

TEST_F(SafetensorsTest, RefusesUnknownField) {
  ExpectRefused(WriteRaw(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"extra":1}})", "x"),
                "tensor 'a': unknown field 'extra'");
}

TEST_F(SafetensorsTest, RefusesMissingField) {
  ExpectRefused(WriteRaw(R"({"a":{"dtype":"U8","shape":[1]}})", "x"), "tensor 'a': missing field 'data_offsets'");
}

TEST_F(SafetensorsTest, RefusesBadOffsetsAndDims) {
  ExpectRefused(WriteRaw(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[1,0]}})", "x"),
                "tensor 'a': data_offsets [1,0] is not [begin, end]");
  ExpectRefused(WriteRaw(R"({"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}})", "x"),
                "tensor 'a': shape [-1] has a dimension that is not a non-negative integer");
  ExpectRefused(WriteRaw(R"({"a":{"dtype":"U8","shape":"1","data_offsets":[0,1]}})", "x"),
                "tensor 'a': shape is \"1\", not an array");
}

TEST_F(SafetensorsTest, RefusesDuplicateNames) {
  ExpectRefused(WriteRaw(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                         R"("a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
                         "xy"),
                "header names 'a' twice");
}

TEST_F(SafetensorsTest, RefusesNonStringMetadata) {
  ExpectRefused(WriteRaw(R"({"__metadata__":{"format":3}})", ""), "__metadata__ 'format' is 3, not a string");
}

TEST_F(SafetensorsTest, RefusesInvalidBool) {
  ExpectRefused(WriteRaw(R"({"flags":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]}})", std::string("\x01\x07")),
                "tensor 'flags': BOOL byte 1 is 7");
}

TEST_F(SafetensorsTest, WriteRefusesDuplicateAndReservedNames) {
  const std::filesystem::path path = temp_.path() / "out.safetensors";
  TensorList twice = {{"a", torch::ones({1})}, {"a", torch::ones({1})}};
  absl::Status status = WriteSafetensors(path, twice);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr("tensor 'a': name given twice"));
  status = WriteSafetensors(path, {{"__metadata__", torch::ones({1})}});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace icd::io
