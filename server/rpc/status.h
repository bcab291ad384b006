// The one mapping of engine (absl) status to gRPC status.
#ifndef ICD_RPC_STATUS_H_
#define ICD_RPC_STATUS_H_

#include <cstddef>

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace icd::rpc {

// Longest error message sent to a client; longer ones are cut and marked.
inline constexpr std::size_t kMaxStatusMessageBytes = 2048;

// Same code (absl and gRPC share the canonical numbering; status.cc asserts
// every pair), message capped at kMaxStatusMessageBytes.
grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace icd::rpc

#endif  // ICD_RPC_STATUS_H_
