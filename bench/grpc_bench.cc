// What the gRPC hop costs: round trips of small unary calls to a running
// icd-server (health check, ListModels) and of Evaluate on a loaded model,
// each timed on the client with a steady clock, one call at a time.
//
//   grpc_bench --server HOST:PORT [--model NAME] [--calls 2000]
//              [--evaluate-calls 50] [--tokens 128]
//
// Prints one JSON line per call kind: p50, p90, p99, mean and max in
// microseconds. Compare Evaluate's with MeasureLatency's prefill of the same
// [1, tokens] shape (the forward alone) to read off the transport's share.
//
// --bare-peer also times health checks against gRPC's own server with
// nothing of icd's (the default health service, default options, icd's
// generated service base registered unimplemented so that health is served
// synchronously as in icd-server), started in a child process: the floor of gRPC's C++ stack on the same machine, in the
// same run, so icd's share of a small call reads off as the difference.
#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <functional>
#include <iostream>
#include <numeric>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "icd/client/client.h"
#include "icd/v1/permutation.grpc.pb.h"

namespace {

double Percentile(std::vector<double> values, double q) {
  std::sort(values.begin(), values.end());
  const double rank = q * static_cast<double>(values.size() - 1);
  const auto low = static_cast<size_t>(rank);
  const size_t high = std::min(low + 1, values.size() - 1);
  return values[low] + (rank - static_cast<double>(low)) * (values[high] - values[low]);
}

// Times `calls` round trips of `call` after a tenth as many warm-up calls.
std::vector<double> TimeCalls(int calls, const std::function<bool()>& call) {
  for (int i = 0; i < std::max(1, calls / 10); ++i) {
    if (!call()) throw std::runtime_error("warm-up call failed");
  }
  std::vector<double> micros;
  micros.reserve(static_cast<size_t>(calls));
  for (int i = 0; i < calls; ++i) {
    const auto start = std::chrono::steady_clock::now();
    if (!call()) throw std::runtime_error("call failed");
    micros.push_back(
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count());
  }
  return micros;
}

void Print(const std::string& kind, const std::vector<double>& micros, const std::string& extra) {
  const double mean = std::accumulate(micros.begin(), micros.end(), 0.0) /
                      static_cast<double>(micros.size());
  std::printf(
      "{\"bench\": \"grpc\", \"call\": \"%s\", \"calls\": %zu, \"p50_us\": %.1f, "
      "\"p90_us\": %.1f, \"p99_us\": %.1f, \"mean_us\": %.1f, \"max_us\": %.1f%s}\n",
      kind.c_str(), micros.size(), Percentile(micros, 0.5), Percentile(micros, 0.9),
      Percentile(micros, 0.99), mean, *std::max_element(micros.begin(), micros.end()),
      extra.c_str());
  std::fflush(stdout);
}

// Starts gRPC's server with its default health service alone on a loopback
// port in a child process; returns the child's pid and writes the port. The
// child serves until it is killed. Called before this process touches gRPC.
pid_t StartBarePeer(int* port) {
  int pipe_ends[2];
  if (pipe(pipe_ends) != 0) throw std::runtime_error("pipe failed");
  const pid_t child = fork();
  if (child < 0) throw std::runtime_error("fork failed");
  if (child == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);  // a bench that throws leaves no server behind
    if (getppid() == 1) _exit(0);       // ... even one that died before the line above
    close(pipe_ends[0]);
    grpc::EnableDefaultHealthCheckService(true);
    icd::v1::PermutationService::Service unimplemented;
    grpc::ServerBuilder builder;
    builder.RegisterService(&unimplemented);
    int bound = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &bound);
    std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
    if (server == nullptr) bound = 0;
    (void)!write(pipe_ends[1], &bound, sizeof bound);
    close(pipe_ends[1]);
    if (server != nullptr) server->Wait();
    _exit(0);
  }
  close(pipe_ends[1]);
  const bool read_port = read(pipe_ends[0], port, sizeof *port) == sizeof *port;
  close(pipe_ends[0]);
  if (!read_port || *port == 0) throw std::runtime_error("the bare gRPC server did not start");
  return child;
}

std::vector<double> TimeHealthChecks(icd::Client& client, int calls) {
  return TimeCalls(calls, [&] {
    auto serving = client.Health();
    return serving.ok() && *serving;
  });
}

}  // namespace

int main(int argc, char** argv) {
  std::string server = "127.0.0.1:50051", model;
  int calls = 2000, evaluate_calls = 50;
  int64_t tokens = 128;
  bool bare_peer = false;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(flag + " needs a value");
      return argv[++i];
    };
    if (flag == "--server") server = value();
    else if (flag == "--model") model = value();
    else if (flag == "--calls") calls = std::stoi(value());
    else if (flag == "--evaluate-calls") evaluate_calls = std::stoi(value());
    else if (flag == "--tokens") tokens = std::stoll(value());
    else if (flag == "--bare-peer") bare_peer = true;
    else {
      std::cerr << "usage: grpc_bench --server HOST:PORT [--model NAME] [--calls N]"
                   " [--evaluate-calls N] [--tokens T] [--bare-peer]\n";
      return 2;
    }
  }
  // Without the peer (it did not start, or cannot be reached) icd's own
  // figures still come out, with a warning.
  int peer_port = 0;
  pid_t peer = 0;
  if (bare_peer) {
    try {
      peer = StartBarePeer(&peer_port);
    } catch (const std::exception& error) {
      std::cerr << "grpc_bench: no bare gRPC server (" << error.what() << "); icd's figures only\n";
    }
  }
  auto client = icd::Client::Connect(server);
  if (!client.ok()) {
    if (peer != 0) kill(peer, SIGTERM);
    std::cerr << "connect: " << client.status() << "\n";
    return 1;
  }
  icd::Client& icd = **client;
  absl::StatusOr<std::unique_ptr<icd::Client>> bare = absl::UnavailableError("no bare server");
  if (peer != 0) {
    bare = icd::Client::Connect("127.0.0.1:" + std::to_string(peer_port));
    if (!bare.ok()) std::cerr << "grpc_bench: bare gRPC server: " << bare.status() << "\n";
  }
  if (!bare.ok()) {
    Print("health_check", TimeHealthChecks(icd, calls), "");
  } else {
    // In ten rounds, the order swapped every other round, so that drift in
    // the machine's load and the order itself fall on both servers alike.
    std::vector<double> icd_micros, bare_micros;
    for (int round = 0; round < 10; ++round) {
      std::pair<icd::Client*, std::vector<double>*> turns[] = {{&icd, &icd_micros},
                                                              {bare->get(), &bare_micros}};
      if (round % 2 == 1) std::swap(turns[0], turns[1]);
      for (auto [target, micros] : turns) {
        const std::vector<double> block = TimeHealthChecks(*target, std::max(1, calls / 10));
        micros->insert(micros->end(), block.begin(), block.end());
      }
    }
    Print("health_check", icd_micros, "");
    Print("health_check", bare_micros, ", \"server\": \"bare grpc\"");
  }
  if (peer != 0) {
    kill(peer, SIGTERM);
    waitpid(peer, nullptr, 0);
  }
  Print("list_models", TimeCalls(calls, [&] { return icd.ListModels().ok(); }), "");
  if (!model.empty()) {
    icd::v1::EvaluateRequest request;
    request.set_model(model);
    for (int64_t t = 0; t < tokens; ++t) request.add_input_ids((t * 7919 + 13) % 256);  // inside any vocabulary here
    request.set_batch(1);
    Print("evaluate", TimeCalls(evaluate_calls, [&] { return icd.Evaluate(request).ok(); }),
          ", \"tokens\": " + std::to_string(tokens));
  }
  return 0;
}
