#include "auth.h"

#include <cstring>
#include <utility>

#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/slice.h>
#include <grpcpp/support/status.h>

namespace icd::rpc {
namespace {

// Compares without an early exit, so the time does not leak the prefix.
bool SameSecret(const std::string& a, const std::string& b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff = static_cast<unsigned char>(diff | (a[i] ^ (i < b.size() ? b[i] : 0)));
  }
  return diff == 0;
}

bool StartsWith(const char* text, const char* prefix) {
  return text != nullptr && std::strncmp(text, prefix, std::strlen(prefix)) == 0;
}

class TokenInterceptor final : public grpc::experimental::Interceptor {
 public:
  explicit TokenInterceptor(const std::string* token) : token_(token) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    using grpc::experimental::InterceptionHookPoints;
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::POST_RECV_INITIAL_METADATA)) {
      const auto* metadata = methods->GetRecvInitialMetadata();
      refusal_ = metadata == nullptr
                     ? absl::UnauthenticatedError("no metadata")
                     : CheckBearerToken(*metadata, *token_);
    }
    if (!refusal_.ok()) {
      if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_MESSAGE)) {
        if (grpc::ByteBuffer* message = methods->GetSerializedSendMessage()) {
          grpc::Slice empty;
          grpc::ByteBuffer replacement(&empty, 1);
          message->Swap(&replacement);
        }
      }
      if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
        methods->ModifySendStatus(
            grpc::Status(grpc::StatusCode::UNAUTHENTICATED, std::string(refusal_.message())));
      }
    }
    methods->Proceed();
  }

 private:
  const std::string* token_;
  absl::Status refusal_;
};

class TokenInterceptorFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit TokenInterceptorFactory(std::string token) : token_(std::move(token)) {}

  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    if (token_.empty() || StartsWith(info->method(), "/grpc.health.v1.Health/") ||
        StartsWith(info->method(), "/icd.v1.PermutationService/")) {
      return nullptr;
    }
    return new TokenInterceptor(&token_);
  }

 private:
  std::string token_;
};

}  // namespace

absl::Status CheckBearerToken(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata,
                              const std::string& token) {
  if (token.empty()) return absl::OkStatus();
  const auto it = metadata.find("authorization");
  if (it == metadata.end()) {
    return absl::UnauthenticatedError("missing `authorization: Bearer <token>` metadata");
  }
  const std::string value(it->second.data(), it->second.size());
  if (!SameSecret(value, "Bearer " + token)) {
    return absl::UnauthenticatedError("wrong bearer token");
  }
  return absl::OkStatus();
}

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> MakeTokenInterceptorFactory(
    std::string token) {
  return std::make_unique<TokenInterceptorFactory>(std::move(token));
}

}  // namespace icd::rpc
