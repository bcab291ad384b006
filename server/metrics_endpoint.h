// icd-server's Prometheus endpoint (--metrics-listen HOST:PORT): GET /metrics
// over plain HTTP, served by libmicrohttpd on its own thread; the body is
// built at each scrape (rpc/metrics.h). Anything else is 404, a method
// other than GET or HEAD 405.
#ifndef ICD_SERVER_METRICS_ENDPOINT_H_
#define ICD_SERVER_METRICS_ENDPOINT_H_

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace icd {

class MetricsEndpoint {
 public:
  // Listens on `host_port` ("127.0.0.1:9400"; port 0 picks a free one).
  // Errors: InvalidArgument for an address that does not parse or resolve,
  // Unavailable when it cannot be bound, Unimplemented in a build without
  // libmicrohttpd.
  static absl::StatusOr<std::unique_ptr<MetricsEndpoint>> Start(
      const std::string& host_port, std::function<std::string()> render);
  ~MetricsEndpoint();  // stops serving; a scrape in progress finishes first
  MetricsEndpoint(const MetricsEndpoint&) = delete;
  MetricsEndpoint& operator=(const MetricsEndpoint&) = delete;

  int port() const { return port_; }

 private:
  MetricsEndpoint() = default;
  struct Daemon;
  std::unique_ptr<Daemon> daemon_;
  std::function<std::string()> render_;
  int port_ = 0;
};

}  // namespace icd

#endif  // ICD_SERVER_METRICS_ENDPOINT_H_
