#include "metrics_endpoint.h"

#include <netdb.h>
#include <sys/socket.h>

#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

#ifdef ICD_HAVE_MICROHTTPD
#include <microhttpd.h>
#endif

namespace icd {

#ifdef ICD_HAVE_MICROHTTPD

struct MetricsEndpoint::Daemon {
  MHD_Daemon* handle = nullptr;
  ~Daemon() {
    if (handle != nullptr) MHD_stop_daemon(handle);
  }
};

namespace {

MHD_Result Reply(MHD_Connection* connection, unsigned int code, const std::string& body,
                 const char* content_type) {
  MHD_Response* response = MHD_create_response_from_buffer(
      body.size(), const_cast<char*>(body.data()), MHD_RESPMEM_MUST_COPY);
  if (response == nullptr) return MHD_NO;
  MHD_add_response_header(response, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
  const MHD_Result queued = MHD_queue_response(connection, code, response);
  MHD_destroy_response(response);
  return queued;
}

MHD_Result Answer(void* self, MHD_Connection* connection, const char* url, const char* method,
                  const char* /*version*/, const char* /*upload_data*/,
                  size_t* upload_data_size, void** /*request_state*/) {
  constexpr char kText[] = "text/plain; charset=utf-8";
  if (std::strcmp(method, MHD_HTTP_METHOD_GET) != 0 &&
      std::strcmp(method, MHD_HTTP_METHOD_HEAD) != 0) {
    *upload_data_size = 0;  // a body is read and dropped
    return Reply(connection, MHD_HTTP_METHOD_NOT_ALLOWED, "only GET /metrics\n", kText);
  }
  if (std::strcmp(url, "/metrics") != 0) {
    return Reply(connection, MHD_HTTP_NOT_FOUND, "not found: the metrics are at /metrics\n",
                 kText);
  }
  const auto& render = *static_cast<const std::function<std::string()>*>(self);
  return Reply(connection, MHD_HTTP_OK, render(), "text/plain; version=0.0.4; charset=utf-8");
}

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsEndpoint>> MetricsEndpoint::Start(
    const std::string& host_port, std::function<std::string()> render) {
  const size_t colon = host_port.rfind(':');
  int port = -1;
  if (colon == std::string::npos || colon == 0 ||
      !absl::SimpleAtoi(host_port.substr(colon + 1), &port) || port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--metrics-listen: '", host_port, "' is not HOST:PORT (e.g. 0.0.0.0:9400)"));
  }
  std::string host = host_port.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* resolved = nullptr;
  const std::string service = std::to_string(port);
  if (const int error = getaddrinfo(host.c_str(), service.c_str(), &hints, &resolved);
      error != 0 || resolved == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("--metrics-listen: cannot resolve '", host,
                                                   "': ", gai_strerror(error)));
  }
  std::unique_ptr<MetricsEndpoint> endpoint(new MetricsEndpoint());
  endpoint->render_ = std::move(render);
  endpoint->daemon_ = std::make_unique<Daemon>();
  unsigned int flags = MHD_USE_INTERNAL_POLLING_THREAD;
  if (resolved->ai_family == AF_INET6) flags |= MHD_USE_IPv6;
  endpoint->daemon_->handle = MHD_start_daemon(
      flags, static_cast<uint16_t>(port), nullptr, nullptr, &Answer, &endpoint->render_,
      MHD_OPTION_SOCK_ADDR, resolved->ai_addr, MHD_OPTION_CONNECTION_TIMEOUT, 10u,
      MHD_OPTION_END);
  freeaddrinfo(resolved);
  if (endpoint->daemon_->handle == nullptr) {
    return absl::UnavailableError(
        absl::StrCat("--metrics-listen: cannot serve on ", host_port, " (in use, or no such address)"));
  }
  const MHD_DaemonInfo* info =
      MHD_get_daemon_info(endpoint->daemon_->handle, MHD_DAEMON_INFO_BIND_PORT);
  endpoint->port_ = info != nullptr ? info->port : port;
  return endpoint;
}

#else  // !ICD_HAVE_MICROHTTPD

struct MetricsEndpoint::Daemon {};

absl::StatusOr<std::unique_ptr<MetricsEndpoint>> MetricsEndpoint::Start(
    const std::string&, std::function<std::string()>) {
  return absl::UnimplementedError(
      "--metrics-listen: this icd-server was built without libmicrohttpd (Debian: "
      "libmicrohttpd-dev)");
}

#endif  // ICD_HAVE_MICROHTTPD

MetricsEndpoint::~MetricsEndpoint() = default;

}  // namespace icd
