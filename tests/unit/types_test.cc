#include "icd/core/types.h"

#include <gtest/gtest.h>

namespace icd {
namespace {

TEST(TypesTest, DTypeNamesRoundTrip) {
  for (DType dtype : {DType::kFloat32, DType::kBFloat16, DType::kFloat16, DType::kFloat64}) {
    auto parsed = ParseDType(DTypeName(dtype));
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, dtype);
  }
  EXPECT_EQ(DTypeSize(DType::kBFloat16), 2);
  EXPECT_EQ(DTypeSize(DType::kFloat64), 8);
}

TEST(TypesTest, UnknownDTypeNamesTheValue) {
  auto parsed = ParseDType("int8");
  ASSERT_FALSE(parsed.ok());
  EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(parsed.status().message().find("int8"), std::string::npos);
}

TEST(TypesTest, FamilyAndLayoutWireNames) {
  EXPECT_EQ(FamilyName(Family::kFalconMamba), "falcon_mamba");
  EXPECT_EQ(LayoutName(Layout::kMambaSsm), "mamba_ssm");
}

}  // namespace
}  // namespace icd
