#include "status.h"

#include <string>

namespace icd::rpc {
namespace {

template <absl::StatusCode A, grpc::StatusCode G>
constexpr bool SameCode() {
  return static_cast<int>(A) == static_cast<int>(G);
}

using absl::StatusCode;
static_assert(SameCode<StatusCode::kOk, grpc::OK>());
static_assert(SameCode<StatusCode::kCancelled, grpc::CANCELLED>());
static_assert(SameCode<StatusCode::kUnknown, grpc::UNKNOWN>());
static_assert(SameCode<StatusCode::kInvalidArgument, grpc::INVALID_ARGUMENT>());
static_assert(SameCode<StatusCode::kDeadlineExceeded, grpc::DEADLINE_EXCEEDED>());
static_assert(SameCode<StatusCode::kNotFound, grpc::NOT_FOUND>());
static_assert(SameCode<StatusCode::kAlreadyExists, grpc::ALREADY_EXISTS>());
static_assert(SameCode<StatusCode::kPermissionDenied, grpc::PERMISSION_DENIED>());
static_assert(SameCode<StatusCode::kResourceExhausted, grpc::RESOURCE_EXHAUSTED>());
static_assert(SameCode<StatusCode::kFailedPrecondition, grpc::FAILED_PRECONDITION>());
static_assert(SameCode<StatusCode::kAborted, grpc::ABORTED>());
static_assert(SameCode<StatusCode::kOutOfRange, grpc::OUT_OF_RANGE>());
static_assert(SameCode<StatusCode::kUnimplemented, grpc::UNIMPLEMENTED>());
static_assert(SameCode<StatusCode::kInternal, grpc::INTERNAL>());
static_assert(SameCode<StatusCode::kUnavailable, grpc::UNAVAILABLE>());
static_assert(SameCode<StatusCode::kDataLoss, grpc::DATA_LOSS>());
static_assert(SameCode<StatusCode::kUnauthenticated, grpc::UNAUTHENTICATED>());

constexpr char kCut[] = "... (truncated)";

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  std::string message(status.message());
  if (message.size() > kMaxStatusMessageBytes) {
    message.resize(kMaxStatusMessageBytes - (sizeof(kCut) - 1));
    message += kCut;
  }
  const int code = static_cast<int>(status.code());
  // Codes outside the canonical range (absl allows any int) become UNKNOWN.
  if (code < 0 || code > static_cast<int>(grpc::UNAUTHENTICATED)) {
    return grpc::Status(grpc::UNKNOWN, message);
  }
  return grpc::Status(static_cast<grpc::StatusCode>(code), message);
}

}  // namespace icd::rpc
