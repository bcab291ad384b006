// icd-server: serves icd.v1.PermutationService (plus gRPC health and server
// reflection) over one Engine. Flags: see kUsage or `icd-server --help`.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include "absl/status/statusor.h"
#include "grpc/health/v1/health.pb.h"
#include "absl/strings/str_cat.h"
#include "icd/command_line.h"
#include "icd/core/engine.h"
#include "icd/core/stale_exports.h"
#include "icd/core/host_memory.h"
#include "auth.h"
#include "metrics.h"
#include "metrics_endpoint.h"
#include "paths.h"
#include "service.h"

namespace {

constexpr char kUsage[] = R"(icd-server: a gRPC permutation service for Mamba models.

It loads Mamba checkpoints (Mamba-1, FalconMamba, Mamba-2; HuggingFace or
mamba_ssm layout) and hybrids (mamba_ssm's with attention and MLPs, NemotronH,
Bamba, Granite 4.0, Jamba, Falcon-H1, Zamba2) by name, computes channel
permutations of their symmetry groups from activation traces (streamed by the
client, or captured by running the model on tokens), applies them, checks that
the logits are unchanged, evaluates, reads and writes tensors and exports the
permuted checkpoint. The service is
icd.v1.PermutationService (proto/icd/v1/permutation.proto); gRPC health
(grpc.health.v1.Health) and server reflection are served too, so grpcurl and
`buf curl` can list and call everything without the .proto file.

Usage:
  icd-server --listen HOST:PORT --model-root DIR [--model-root DIR ...]
             --export-root DIR [--export-root DIR ...] [options]

Flags:
  --listen HOST:PORT    address to serve on; port 0 picks a free port. Once
                        serving, stdout gets one line: "listening on HOST:PORT"
                        with the real port.
  --model-root DIR      repeatable. LoadModel paths must lie under one of these
                        (after resolving `..` and symlinks), else
                        PERMISSION_DENIED; relative paths are taken relative to
                        the first.
  --export-root DIR     repeatable. ExportModel paths must lie under one of
                        these; an existing path is refused (ALREADY_EXISTS).
  --device DEV          default device of loaded models: cpu (default), cuda,
                        cuda:N. A LoadModel request may name another.
  --token-file F        every call but health (server reflection included)
                        must carry the metadata "authorization: Bearer
                        <token>", the token being F's content without its
                        trailing newline; else UNAUTHENTICATED.
  --tls-cert F --tls-key F
                        serve TLS with this PEM certificate chain and key.
  --tls-client-ca F     with TLS: require client certificates signed by F.
  --max-message-mb N    largest request or response message (default 64);
                        larger ones fail with RESOURCE_EXHAUSTED. ReadTensors
                        cuts its chunks to fit.
  --max-tokens N        most token ids one Evaluate or CapturePermutation
                        (input and held-out ids together), or one
                        MeasureLatency forward (batch x seq_len), may take
                        (default 65536: on a 2-core CPU a forward of that
                        many tokens on the 0.5 M-parameter reference models
                        takes seconds); more is RESOURCE_EXHAUSTED before any
                        work.
  --max-trace-mb N      most trace bytes one ComputePermutation stream may send
                        (default 4096); beyond it the call fails with
                        RESOURCE_EXHAUSTED. The statistics take O(channels^2)
                        memory whatever the length, so this bounds the time
                        one call may hold a thread.
  --max-threads N       most threads serving calls at once (default 64).
  --max-streams N       most streaming calls (ReadTensors, WriteTensors,
                        ComputePermutation) open at once (default: a quarter
                        of --max-threads, at least 1), so that idle streams
                        never take the threads unary calls and health need;
                        one more is RESOURCE_EXHAUSTED.
  --stream-idle-timeout-s N
                        a stream that neither sends nor takes a message for
                        N seconds is cancelled (default 60).
  --max-models N        most models loaded at once (default: no limit); one
                        more LoadModel fails with RESOURCE_EXHAUSTED.
  --memory-budget-mb SPEC
                        most memory per device, in MiB (default: no limit).
                        SPEC is N (every device), or DEVICE=N entries
                        separated by commas, DEVICE being cpu, cuda:I or
                        cuda (every CUDA device not named by index); a bare
                        N among them covers the devices not named:
                          --memory-budget-mb 70000
                          --memory-budget-mb cuda:0=70000,cpu=4000
                          --memory-budget-mb cuda=70000,8000
                        The flag may be repeated to add entries. Counted
                        on each device: loaded models' weights (in their
                        loaded dtype) and probe references, exactly, and
                        what CapturePermutation, MeasureLatency, Evaluate
                        and ComputePermutation will allocate, estimated
                        from their shapes and held while they run. A
                        LoadModel or call that would pass its device's
                        budget fails with RESOURCE_EXHAUSTED before it
                        allocates there, naming the device, the bytes
                        needed, the bytes in use and the budget.
                        ListModels reports each model's device_bytes.
  --return-freed-memory keep glibc's allocator defaults: large freed blocks go
                        back to the kernel at once. By default icd-server
                        keeps them for reuse (one arena, no mmap, heap trimmed
                        beyond 1 GiB): the large temporaries of a trace solve
                        then cost no page faults (a 5120-channel solve: 54 s
                        -> 18 s on a 2-core VM), at the price of a resident
                        size that stays near its peak.
  --model-streams       each CUDA model's calls on a CUDA stream of its own,
                        so calls on different models do not queue behind
                        each other on the device's default stream (off by
                        default: not yet run under load on a GPU).
  --shutdown-grace-s N  on SIGINT or SIGTERM, how long calls in flight may
                        run on (default 10); then they are cancelled, stop
                        within about 100 ms, and the process exits 0.
  --metrics-listen HOST:PORT
                        serve Prometheus metrics over plain HTTP at
                        http://HOST:PORT/metrics (port 0 picks a free one;
                        stdout then gets a second line, "metrics on
                        HOST:PORT"): calls and latency histograms per RPC
                        and status code, applies and refused applies, the
                        last verified rel L2 per model, trace bytes
                        received, models loaded and their bytes per device,
                        resident memory. Unauthenticated, as Triton's: bind
                        it to an address only the scraper reaches.
  --quiet               no per-call log lines on stderr (what failed inside
                        an INTERNAL error is still logged).
  --help                this text.

Long computations (forward passes, trace statistics, the solver) check the
call's deadline and cancellation every few milliseconds of work and stop
within about 100 ms with nothing changed. Client strings in the log are
quoted and cut to 256 bytes.

SIGINT or SIGTERM: health turns NOT_SERVING, calls in flight get
--shutdown-grace-s seconds (10) to finish and are then cancelled; the process
exits 0 within about a second after that. At start, temporary export directories that a
killed server left under an --export-root (named .icd-export-*) are removed,
so no partial export survives a crash.

Example:
  icd-server --listen 127.0.0.1:50051 --model-root /models --export-root /exports
  buf curl --protocol grpc --http2-prior-knowledge \
    -d '{"name":"m","path":"mamba1-small/hf"}' \
    http://127.0.0.1:50051/icd.v1.PermutationService/LoadModel
)";

struct Flags {
  std::string listen;
  std::string metrics_listen;  // empty: no metrics endpoint
  std::vector<std::string> model_roots;
  std::vector<std::string> export_roots;
  std::string device = "cpu";
  std::string token_file;
  std::string tls_cert, tls_key, tls_client_ca;
  int max_message_mb = 64;
  int max_trace_mb = 4096;
  int max_threads = 64;
  int max_tokens = 65536;
  int max_streams = 0;  // 0: a quarter of max_threads, at least 1
  int stream_idle_timeout_s = 60;
  int shutdown_grace_s = 10;
  int max_models = 0;        // 0: no limit
  bool model_streams = false;
  icd::MemoryBudget memory_budget;  // empty: no limit
  bool quiet = false;
  bool return_freed_memory = false;
  bool help = false;
};

// SIGINT and SIGTERM, written by an async-signal-safe handler into a pipe
// that the main thread reads.
int g_signal_write_fd = -1;

extern "C" void OnShutdownSignal(int sig) {
  const auto byte = static_cast<unsigned char>(sig);
  [[maybe_unused]] const ssize_t written = write(g_signal_write_fd, &byte, 1);
}

class SignalPipe {
 public:
  static absl::StatusOr<SignalPipe> Install() {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) return absl::InternalError("pipe2 failed");
    g_signal_write_fd = fds[1];
    struct sigaction action = {};
    action.sa_handler = OnShutdownSignal;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART;
    if (sigaction(SIGINT, &action, nullptr) != 0 || sigaction(SIGTERM, &action, nullptr) != 0) {
      return absl::InternalError("sigaction failed");
    }
    return SignalPipe(fds[0]);
  }
  // Blocks until a signal arrives; returns its number.
  int Wait() const {
    unsigned char byte = 0;
    while (read(read_fd_, &byte, 1) < 0 && errno == EINTR) {
    }
    return byte;
  }

 private:
  explicit SignalPipe(int read_fd) : read_fd_(read_fd) {}
  int read_fd_;
};

absl::StatusOr<int> ParsePositive(const std::string& flag,
                                  const std::string& value, long max) {
  char* end = nullptr;
  const long v = std::strtol(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0' || v <= 0 || v > max) {
    return absl::InvalidArgumentError(absl::StrCat(
        flag, ": expected an integer in 1..", max, ", got '", value, "'"));
  }
  return static_cast<int>(v);
}

absl::StatusOr<Flags> ParseFlags(int argc, char** argv) {
  Flags f;
  icd::CommandLine args(argc, argv);
  while (args.Next()) {
    const std::string arg = args.name();
    if (arg == "--help" || arg == "-h") {
      f.help = true;
      continue;
    }
    if (arg == "--quiet") {
      f.quiet = true;
      continue;
    }
    if (arg == "--return-freed-memory") {
      f.return_freed_memory = true;
      continue;
    }
    if (arg == "--model-streams") {
      f.model_streams = true;
      continue;
    }
    absl::StatusOr<std::string> v = args.Value();
    if (arg != "--listen" && arg != "--metrics-listen" && arg != "--model-root" && arg != "--export-root" &&
        arg != "--device" && arg != "--token-file" && arg != "--tls-cert" &&
        arg != "--tls-key" && arg != "--tls-client-ca" &&
        arg != "--max-message-mb" && arg != "--max-trace-mb" &&
        arg != "--max-threads" && arg != "--max-models" && arg != "--memory-budget-mb" &&
        arg != "--max-tokens" && arg != "--max-streams" && arg != "--stream-idle-timeout-s" &&
        arg != "--shutdown-grace-s") {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag ", arg));
    }
    if (!v.ok()) return v.status();
    if (arg == "--listen") f.listen = *v;
    if (arg == "--metrics-listen") f.metrics_listen = *v;
    if (arg == "--model-root") f.model_roots.push_back(*v);
    if (arg == "--export-root") f.export_roots.push_back(*v);
    if (arg == "--device") f.device = *v;
    if (arg == "--token-file") f.token_file = *v;
    if (arg == "--tls-cert") f.tls_cert = *v;
    if (arg == "--tls-key") f.tls_key = *v;
    if (arg == "--tls-client-ca") f.tls_client_ca = *v;
    if (arg == "--max-message-mb" || arg == "--max-threads") {
      auto n = ParsePositive(arg, *v, arg == "--max-threads" ? 4096 : 2047);
      if (!n.ok()) return n.status();
      (arg == "--max-threads" ? f.max_threads : f.max_message_mb) = *n;
    }
    if (arg == "--max-models") {
      auto n = ParsePositive(arg, *v, 1 << 16);
      if (!n.ok()) return n.status();
      f.max_models = *n;
    }
    if (arg == "--memory-budget-mb") {
      absl::Status added = icd::AddMemoryBudget(*v, f.memory_budget);
      if (!added.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(arg, " ", *v, ": ", added.message()));
      }
    }
    if (arg == "--max-tokens" || arg == "--max-streams" || arg == "--stream-idle-timeout-s" ||
        arg == "--shutdown-grace-s") {
      const long max = arg == "--max-tokens" ? (1L << 30) : arg == "--max-streams" ? 4096 : 86400;
      auto n = ParsePositive(arg, *v, max);
      if (!n.ok()) return n.status();
      if (arg == "--max-tokens") f.max_tokens = *n;
      if (arg == "--max-streams") f.max_streams = *n;
      if (arg == "--stream-idle-timeout-s") f.stream_idle_timeout_s = *n;
      if (arg == "--shutdown-grace-s") f.shutdown_grace_s = *n;
    }
    if (arg == "--max-trace-mb") {
      auto n = ParsePositive(arg, *v, 1 << 20);  // up to 1 TiB
      if (!n.ok()) return n.status();
      f.max_trace_mb = *n;
    }
  }
  if (f.help) return f;
  if (f.listen.empty()) return absl::InvalidArgumentError("--listen is required");
  if (f.listen.rfind(':') == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("--listen ", f.listen, ": expected HOST:PORT"));
  }
  if (f.model_roots.empty()) {
    return absl::InvalidArgumentError("at least one --model-root is required");
  }
  if (f.export_roots.empty()) {
    return absl::InvalidArgumentError("at least one --export-root is required");
  }
  if (f.tls_cert.empty() != f.tls_key.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  }
  if (!f.tls_client_ca.empty() && f.tls_cert.empty()) {
    return absl::InvalidArgumentError("--tls-client-ca needs --tls-cert");
  }
  if (f.max_streams == 0) f.max_streams = std::max(1, f.max_threads / 4);
  if (f.max_streams >= f.max_threads) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--max-streams ", f.max_streams, " leaves no thread of --max-threads ", f.max_threads,
        " for unary calls"));
  }
  return f;
}

absl::StatusOr<std::string> ReadFile(const std::string& path, const char* flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(absl::StrCat(flag, " ", path, ": cannot read"));
  }
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> Credentials(const Flags& f) {
  if (f.tls_cert.empty()) return grpc::InsecureServerCredentials();
  grpc::SslServerCredentialsOptions options(
      f.tls_client_ca.empty()
          ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
          : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  auto cert = ReadFile(f.tls_cert, "--tls-cert");
  if (!cert.ok()) return cert.status();
  auto key = ReadFile(f.tls_key, "--tls-key");
  if (!key.ok()) return key.status();
  options.pem_key_cert_pairs.push_back({*key, *cert});
  if (!f.tls_client_ca.empty()) {
    auto ca = ReadFile(f.tls_client_ca, "--tls-client-ca");
    if (!ca.ok()) return ca.status();
    options.pem_root_certs = *ca;
  }
  return grpc::SslServerCredentials(options);
}

int Fail(const absl::Status& status) {
  std::cerr << "icd-server: " << status.message() << "\n"
            << "run `icd-server --help` for the flags\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  auto flags = ParseFlags(argc, argv);
  if (!flags.ok()) return Fail(flags.status());
  if (flags->help) {
    std::cout << kUsage;
    return 0;
  }
  icd::rpc::ServiceOptions service_options;
  service_options.log_calls = !flags->quiet;
  service_options.max_trace_bytes = static_cast<std::size_t>(flags->max_trace_mb) << 20;
  service_options.max_message_bytes = static_cast<std::size_t>(flags->max_message_mb) << 20;
  service_options.max_tokens = flags->max_tokens;
  service_options.max_streams = flags->max_streams;
  service_options.stream_idle_timeout = std::chrono::seconds(flags->stream_idle_timeout_s);
  // A WriteTensors stream buffers what it replaces: never more than the
  // largest device budget, when every device has one (each tensor is also
  // held to its own size).
  service_options.max_write_bytes = static_cast<std::size_t>(flags->memory_budget.Bound());
  if (!flags->token_file.empty()) {
    auto token = ReadFile(flags->token_file, "--token-file");
    if (!token.ok()) return Fail(token.status());
    while (!token->empty() && (token->back() == '\n' || token->back() == '\r')) {
      token->pop_back();
    }
    if (token->empty()) {
      return Fail(absl::InvalidArgumentError("--token-file: the file is empty"));
    }
    service_options.token = *token;
  }
  auto paths = icd::rpc::PathPolicy::Create(flags->model_roots, flags->export_roots);
  if (!paths.ok()) return Fail(paths.status());
  auto creds = Credentials(*flags);
  if (!creds.ok()) return Fail(creds.status());

  // A handler, not a blocked mask and sigwait: libraries start threads
  // before main (OpenBLAS's pool at load time), and a process-directed
  // signal may land on any of them; a handler runs wherever it lands.
  auto signals = SignalPipe::Install();
  if (!signals.ok()) return Fail(signals.status());
  if (!flags->return_freed_memory) std::cerr << icd::KeepFreedHostMemory() << "\n";

  icd::EngineOptions engine_options;
  engine_options.default_device = flags->device;
  engine_options.max_models = flags->max_models;
  engine_options.model_streams = flags->model_streams;
  engine_options.memory_budget = flags->memory_budget;
  if (!flags->memory_budget.empty()) {
    std::cerr << "memory budget: " << icd::DescribeMemoryBudget(flags->memory_budget) << "\n";
  }
  for (const std::string& root : flags->export_roots) {
    auto removed = icd::RemoveStaleExports(root);
    if (!removed.ok()) return Fail(removed.status());
    for (const std::string& path : *removed) {
      std::cerr << "removed an unfinished export left by an earlier run: " << path << "\n";
    }
  }
  auto engine = std::make_unique<icd::Engine>(engine_options);
  icd::rpc::Metrics metrics;
  std::unique_ptr<icd::MetricsEndpoint> metrics_endpoint;
  if (!flags->metrics_listen.empty()) {
    service_options.metrics = &metrics;
    auto started = icd::MetricsEndpoint::Start(
        flags->metrics_listen,
        [&metrics, &engine] { return metrics.Render(engine->List(), engine->Memory()); });
    if (!started.ok()) {
      std::cerr << "icd-server: " << started.status().message() << "\n";
      return 1;
    }
    metrics_endpoint = *std::move(started);
  }
  {
    icd::rpc::PermutationServiceImpl service(engine.get(), std::move(*paths),
                                             service_options);
    grpc::EnableDefaultHealthCheckService(true);
    // Links the health messages into the descriptor pool, so reflection can
    // describe grpc.health.v1.Health (gRPC's default service has none).
    (void)grpc::health::v1::HealthCheckRequest::descriptor();
    grpc::reflection::InitProtoReflectionServerBuilderPlugin();

    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort(flags->listen, *creds, &port);
    builder.RegisterService(&service);
    builder.SetMaxReceiveMessageSize(flags->max_message_mb * 1024 * 1024);
    builder.SetMaxSendMessageSize(flags->max_message_mb * 1024 * 1024);
    grpc::ResourceQuota quota("icd-server");
    quota.SetMaxThreads(flags->max_threads);
    builder.SetResourceQuota(quota);
    // Reflection (and any service but health and icd's own, which checks
    // itself) answers only with the token. Without a token there is nothing
    // to check, and no interceptor: each one costs every call its hooks.
    if (!service_options.token.empty()) {
      std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>>
          interceptors;
      interceptors.push_back(icd::rpc::MakeTokenInterceptorFactory(service_options.token));
      builder.experimental().SetInterceptorCreators(std::move(interceptors));
    }
    std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
    if (!server || port == 0) {
      std::cerr << "icd-server: cannot listen on " << flags->listen << "\n";
      return 1;
    }
    grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
    if (health != nullptr) {
      health->SetServingStatus("", true);
      health->SetServingStatus("icd.v1.PermutationService", true);
    }
    const std::string host = flags->listen.substr(0, flags->listen.rfind(':'));
    std::cout << "listening on " << host << ":" << port << std::endl;
    if (metrics_endpoint != nullptr) {
      const std::string& address = flags->metrics_listen;
      std::cout << "metrics on " << address.substr(0, address.rfind(':')) << ":"
                << metrics_endpoint->port() << std::endl;
    }

    const int sig = signals->Wait();
    std::cerr << "icd-server: signal " << sig << ", shutting down\n";
    if (health != nullptr) health->Shutdown();  // every service NOT_SERVING
    // Calls still running at the deadline are cancelled; every long
    // computation checks for that, so Wait returns soon after.
    server->Shutdown(std::chrono::system_clock::now() +
                     std::chrono::seconds(flags->shutdown_grace_s));
    server->Wait();
  }
  metrics_endpoint.reset();  // no scrape can reach the engine any more
  engine.reset();            // last: no call can reach it any more
  return 0;
}
