// The bearer token: one check, for icd's own service and, through a server
// interceptor, for every other service but health (reflection).
#ifndef ICD_RPC_AUTH_H_
#define ICD_RPC_AUTH_H_

#include <map>
#include <memory>
#include <string>

#include <grpcpp/support/server_interceptor.h>
#include <grpcpp/support/string_ref.h>

#include "absl/status/status.h"

namespace icd::rpc {

// OK when `token` is empty or the metadata carries `authorization: Bearer
// <token>` (compared in constant time); else Unauthenticated.
absl::Status CheckBearerToken(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata,
                              const std::string& token);

// Interceptors that hold every call of a service other than
// grpc.health.v1.Health and icd.v1.PermutationService (which checks the
// token itself, and logs) to the token: server reflection, above all. A call
// without it gets UNAUTHENTICATED, and the messages the service sends it are
// replaced by empty ones, so nothing it would answer leaks. The sync API
// cannot refuse a call before its handler runs, hence this shape.
std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> MakeTokenInterceptorFactory(
    std::string token);

}  // namespace icd::rpc

#endif  // ICD_RPC_AUTH_H_
