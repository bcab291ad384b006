#include "icd/core/types.h"

#include <chrono>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace icd {

absl::Status CheckCall(const CallContext& ctx, absl::string_view where) {
  // The deadline first: gRPC also cancels a call whose deadline passed, and
  // the log should say which it was.
  if (ctx.deadline.has_value() && std::chrono::steady_clock::now() >= *ctx.deadline) {
    return absl::DeadlineExceededError(absl::StrCat(where, ": the call's deadline passed"));
  }
  if (ctx.cancelled && ctx.cancelled()) {
    return absl::CancelledError(absl::StrCat(where, ": cancelled by the caller"));
  }
  return absl::OkStatus();
}

void ReportProgress(const CallContext& ctx, absl::string_view stage, int64_t done,
                    int64_t total) {
  if (ctx.progress) ctx.progress(stage, done, total);
}

std::string_view FamilyName(Family family) {
  switch (family) {
    case Family::kMamba1: return "mamba1";
    case Family::kFalconMamba: return "falcon_mamba";
    case Family::kMamba2: return "mamba2";
  }
  return "unknown";
}

std::string_view LayoutName(Layout layout) {
  switch (layout) {
    case Layout::kHf: return "hf";
    case Layout::kMambaSsm: return "mamba_ssm";
  }
  return "unknown";
}

std::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
    case DType::kFloat64: return "float64";
  }
  return "unknown";
}

absl::StatusOr<DType> ParseDType(std::string_view name) {
  if (name == "float32" || name == "fp32" || name == "F32") return DType::kFloat32;
  if (name == "bfloat16" || name == "bf16" || name == "BF16") return DType::kBFloat16;
  if (name == "float16" || name == "fp16" || name == "F16") return DType::kFloat16;
  if (name == "float64" || name == "fp64" || name == "F64") return DType::kFloat64;
  return absl::InvalidArgumentError(absl::StrCat(
      "dtype: unknown '", std::string(name), "' (supported: float32, bfloat16, float16, float64)"));
}

int64_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kBFloat16: return 2;
    case DType::kFloat16: return 2;
    case DType::kFloat64: return 8;
  }
  return 0;
}

}  // namespace icd
