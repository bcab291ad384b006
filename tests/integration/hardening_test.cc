// Issue 14: the icd-server binary against hostile and careless clients. Each
// test drives the real binary on 127.0.0.1:0 and checks one numbered item;
// after every refused or stopped call the model's version and logits are
// unchanged (ExpectUnchanged). Timings are bounded generously and printed.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "harness.h"
#include "icd/v1/permutation.grpc.pb.h"
#include "server_process.h"

namespace icd::testing {
namespace {

using Clock = std::chrono::steady_clock;
using StatusCode = absl::StatusCode;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// The binary under test; ICD_TEST_SERVER_BINARY may name another build (to
// run these tests against an older server and watch them fail).
std::string ServerBinary() {
  const char* other = std::getenv("ICD_TEST_SERVER_BINARY");
  return other != nullptr && *other != '\0' ? other : ICD_SERVER_BINARY;
}

// The exit status of `pid` if it exits within `timeout` (its time in
// `elapsed`); otherwise it is killed and -1 returned.
int WaitExitWithin(pid_t pid, std::chrono::milliseconds timeout, double* elapsed) {
  const auto start = Clock::now();
  while (Clock::now() - start < timeout) {
    int status = 0;
    const pid_t got = waitpid(pid, &status, WNOHANG);
    if (got == pid) {
      *elapsed = Seconds(Clock::now() - start);
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  kill(pid, SIGKILL);
  WaitExit(pid);
  *elapsed = Seconds(Clock::now() - start);
  return -1;
}

// One icd-server on 127.0.0.1:0 over a model root holding mamba1-small/hf,
// its stderr in a file, with a client (and a raw stub) that carry the token.
class Server {
 public:
  explicit Server(std::vector<std::string> flags = {}, std::string token = "")
      : roots_(MakeRoots(tmp_.path())), token_(std::move(token)) {
    log_ = tmp_.path() / "server.log";
    std::vector<std::string> args = {ServerBinary(),        "--listen",
                                     "127.0.0.1:0",         "--model-root",
                                     roots_.models.string(), "--export-root",
                                     roots_.exports.string()};
    if (!token_.empty()) {
      std::ofstream(tmp_.path() / "token") << token_ << "\n";
      args.insert(args.end(), {"--token-file", (tmp_.path() / "token").string()});
    }
    args.insert(args.end(), flags.begin(), flags.end());
    child_ = Spawn(args, log_.string());
    if (child_.pid <= 0) return;
    const std::string port = ListeningPort(child_);
    if (port.empty()) return;
    address_ = "127.0.0.1:" + port;
    ClientOptions options;
    options.token = token_;
    options.deadline = std::chrono::seconds(60);
    auto client = Client::Connect(address_, options);
    if (!client.ok()) {
      ADD_FAILURE() << client.status();
      return;
    }
    client_ = std::move(*client);
    stub_ = v1::PermutationService::NewStub(
        grpc::CreateChannel(address_, grpc::InsecureChannelCredentials()));
  }

  ~Server() {
    if (running()) {
      kill(child_.pid, SIGKILL);
      WaitExit(child_.pid);
    }
    if (child_.out >= 0) close(child_.out);
  }

  bool ok() const { return client_ != nullptr; }
  bool running() const { return child_.pid > 0 && !exited_; }
  pid_t pid() const { return child_.pid; }
  const std::string& address() const { return address_; }
  const std::string& token() const { return token_; }
  const ServerRoots& roots() const { return roots_; }
  const fs::path& tmp() const { return tmp_.path(); }
  Client& client() { return *client_; }
  v1::PermutationService::Stub& stub() { return *stub_; }
  std::string Log() const { return Slurp(log_); }

  // A context with the token and a deadline.
  std::unique_ptr<grpc::ClientContext> Context(
      std::chrono::milliseconds deadline = std::chrono::seconds(60)) const {
    auto context = std::make_unique<grpc::ClientContext>();
    if (!token_.empty()) context->AddMetadata("authorization", "Bearer " + token_);
    context->set_deadline(std::chrono::system_clock::now() + deadline);
    return context;
  }

  // Waits (bounded, polling every 2 ms) until the log holds `needle`; when
  // it first saw it.
  Clock::time_point WaitForLog(const std::string& needle, std::chrono::seconds timeout) const {
    const auto start = Clock::now();
    while (Clock::now() - start < timeout) {
      if (Log().find(needle) != std::string::npos) return Clock::now();
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    ADD_FAILURE() << "the log never showed '" << needle << "':\n" << Log().substr(0, 4000);
    return Clock::now();
  }

  // Waits (bounded, polling every 2 ms) until the log after `from` holds
  // `first` or, when not empty, `second`; returns the one it saw.
  std::string WaitForEither(const std::string& first, const std::string& second, size_t from,
                            std::chrono::seconds timeout) const {
    const auto start = Clock::now();
    while (Clock::now() - start < timeout) {
      const std::string log = Log();
      if (log.find(first, from) != std::string::npos) return first;
      if (!second.empty() && log.find(second, from) != std::string::npos) return second;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    ADD_FAILURE() << "the log never showed '" << first << "' or '" << second << "':\n"
                  << Log().substr(0, 4000);
    return first;
  }

  // SIGTERM; the exit status (bounded wait) and the seconds it took.
  int Terminate(std::chrono::milliseconds timeout, double* elapsed) {
    kill(child_.pid, SIGTERM);
    const int code = WaitExitWithin(child_.pid, timeout, elapsed);
    exited_ = true;
    return code;
  }

 private:
  TempDir tmp_;
  ServerRoots roots_;
  std::string token_;
  fs::path log_;
  Child child_;
  bool exited_ = false;
  std::string address_;
  std::unique_ptr<Client> client_;
  std::unique_ptr<v1::PermutationService::Stub> stub_;
};

// Every model here is mamba1-small, scored on its golden ids.
ModelState Snapshot(Client& client, const std::string& model) {
  return icd::testing::Snapshot(client, model, LoadGolden("mamba1-small"));
}

// A started server with mamba1-small/hf loaded as "m", and its state then:
// the set-up of every test that checks a refused call changed nothing.
::testing::AssertionResult StartedWithModel(Server& server, ModelState* before) {
  if (!server.ok()) return ::testing::AssertionFailure() << "icd-server did not start";
  absl::StatusOr<v1::ModelInfo> loaded = server.client().LoadModel("m", "mamba1-small/hf");
  if (!loaded.ok()) return ::testing::AssertionFailure() << "load: " << loaded.status();
  *before = Snapshot(server.client(), "m");
  return ::testing::AssertionSuccess();
}

void ExpectUnchanged(Client& client, const std::string& model, const ModelState& before) {
  const ModelState now = Snapshot(client, model);
  EXPECT_EQ(now.version, before.version) << model;
  EXPECT_EQ(now.logits, before.logits) << model << ": the logits moved";
}

void ExpectGrpc(const grpc::Status& status, grpc::StatusCode code, const std::string& needle) {
  EXPECT_EQ(status.error_code(), code) << status.error_message();
  EXPECT_NE(status.error_message().find(needle), std::string::npos)
      << "message '" << status.error_message() << "' lacks '" << needle << "'";
}

v1::EvaluateRequest RandomEvaluate(const std::string& model, int64_t tokens, uint32_t seed) {
  v1::EvaluateRequest request;
  request.set_model(model);
  std::mt19937 rng(seed);
  request.mutable_input_ids()->Reserve(static_cast<int>(tokens));
  for (int64_t i = 0; i < tokens; ++i) request.add_input_ids(rng() % 128);
  return request;
}

// ---------------------------------------------------------------- item 1

// After the caller's deadline passes or it cancels, the server stops within
// a bounded time and burns (almost) no CPU afterwards. Measured from the
// moment the client gets its status to the server's log line for the call,
// and the server's CPU seconds in the second after.
struct StopFigures {
  double log_after_s = 0;  // client's status -> server's log line
  double cpu_after_s = 0;  // server CPU seconds in the second after
  std::string server_ms;   // the call's time on the server (its log line)
};

// `rpc` ended by its deadline: gRPC cancels a call whose deadline passed, at
// the same instant within its timer's precision, so the server may log either
// code for the same event. Only log text after `log_from` counts.
StopFigures MeasureStop(Server& server, const std::string& rpc, bool by_deadline,
                        size_t log_from, Clock::time_point ended) {
  StopFigures figures;
  const double cpu_at_end = CpuSeconds(server.pid());
  const std::string cancelled = "rpc=" + rpc + " status=CANCELLED";
  const std::string deadline = "rpc=" + rpc + " status=DEADLINE_EXCEEDED";
  const std::string needle =
      server.WaitForEither(by_deadline ? deadline : cancelled, by_deadline ? cancelled : "",
                           log_from, std::chrono::seconds(10));
  figures.log_after_s = Seconds(Clock::now() - ended);
  std::this_thread::sleep_until(ended + std::chrono::seconds(1));
  figures.cpu_after_s = CpuSeconds(server.pid()) - cpu_at_end;
  const std::string log = server.Log();
  const auto line = log.find(needle, log_from);
  if (line != std::string::npos) {
    const auto ms = log.find("ms=", line);
    figures.server_ms = log.substr(ms + 3, log.find(' ', ms) - ms - 3);
  }
  std::printf("[stop]   the server's log line: %s ms=%s\n", needle.c_str(),
              figures.server_ms.c_str());
  return figures;
}

// A call that ended at `ended` with `code` (DEADLINE_EXCEEDED: by its
// deadline; CANCELLED: by the client): the server logs it within 1 s and
// burns under 0.2 CPU seconds in the second after. `what` names the call.
void ExpectStopsSoon(Server& server, const std::string& rpc, const std::string& what,
                     const grpc::Status& status, grpc::StatusCode code, size_t log_from,
                     Clock::time_point ended) {
  SCOPED_TRACE(what);
  EXPECT_EQ(status.error_code(), code) << status.error_message();
  const StopFigures f = MeasureStop(server, rpc, code == grpc::StatusCode::DEADLINE_EXCEEDED,
                                    log_from, ended);
  std::printf("[stop] %s: server log line %.3f s after the client's status; server CPU in the "
              "next second %.3f s\n",
              what.c_str(), f.log_after_s, f.cpu_after_s);
  EXPECT_LT(f.log_after_s, 1.0);
  EXPECT_LT(f.cpu_after_s, 0.2);
}

TEST(HardeningTest, LongCallsStopSoonAfterTheirDeadlineOrCancellation) {
  Server server({"--max-tokens", "2000000"});
  ModelState before;
  ASSERT_TRUE(StartedWithModel(server, &before));

  {  // Evaluate of 2,000,000 tokens (a forward of many seconds), 1 s deadline.
    const v1::EvaluateRequest request = RandomEvaluate("m", 2'000'000, 1);
    const size_t log_from = server.Log().size();
    auto context = server.Context(std::chrono::milliseconds(1000));
    v1::EvaluateResponse response;
    const auto start = Clock::now();
    const grpc::Status status = server.stub().Evaluate(context.get(), request, &response);
    const auto ended = Clock::now();
    ExpectStopsSoon(server, "Evaluate", "Evaluate 2e6 tokens, deadline 1 s", status,
                    grpc::StatusCode::DEADLINE_EXCEEDED, log_from, ended);
    std::printf("[stop] Evaluate 2e6 tokens, deadline 1 s: client status after %.3f s\n",
                Seconds(ended - start));
    ExpectUnchanged(server.client(), "m", before);
  }
  {  // The same, cancelled by the client after 1 s.
    const v1::EvaluateRequest request = RandomEvaluate("m", 2'000'000, 2);
    const size_t log_from = server.Log().size();
    auto context = server.Context();
    grpc::ClientContext* raw = context.get();
    std::thread canceller([raw] {
      std::this_thread::sleep_for(std::chrono::seconds(1));
      raw->TryCancel();
    });
    v1::EvaluateResponse response;
    const grpc::Status status = server.stub().Evaluate(context.get(), request, &response);
    const auto ended = Clock::now();
    canceller.join();
    ExpectStopsSoon(server, "Evaluate", "Evaluate 2e6 tokens, cancelled at 1 s", status,
                    grpc::StatusCode::CANCELLED, log_from, ended);
    ExpectUnchanged(server.client(), "m", before);
  }
  {  // MeasureLatency at its token limit: one forward of 1,000,000 tokens.
    v1::LatencyRequest request;
    request.set_model("m");
    request.set_seq_len(1'000'000);
    request.set_iters(1);
    const size_t log_from = server.Log().size();
    auto context = server.Context(std::chrono::milliseconds(1000));
    v1::LatencyReport response;
    const grpc::Status status = server.stub().MeasureLatency(context.get(), request, &response);
    const auto ended = Clock::now();
    ExpectStopsSoon(server, "MeasureLatency", "MeasureLatency 1e6 tokens, deadline 1 s", status,
                    grpc::StatusCode::DEADLINE_EXCEEDED, log_from, ended);
  }
  {  // CapturePermutation: forward and statistics of every group, 0.5 s deadline.
    v1::CaptureRequest request;
    request.set_model("m");
    std::mt19937 rng(3);
    for (int i = 0; i < 131072; ++i) request.add_input_ids(rng() % 128);
    request.set_batch(4);
    const size_t log_from = server.Log().size();
    auto context = server.Context(std::chrono::milliseconds(500));
    v1::PermutationSet response;
    const grpc::Status status =
        server.stub().CapturePermutation(context.get(), request, &response);
    const auto ended = Clock::now();
    ExpectStopsSoon(server, "CapturePermutation",
                    "CapturePermutation 4 x 32768 tokens, deadline 0.5 s", status,
                    grpc::StatusCode::DEADLINE_EXCEEDED, log_from, ended);
  }
  ExpectUnchanged(server.client(), "m", before);
}

// SIGTERM during a long call: the call gets --shutdown-grace-s, is then
// cancelled, and the process exits 0 within grace + 1 s.
TEST(HardeningTest, SigtermEndsALongCallAfterTheGraceAndExitsZero) {
  Server server({"--max-tokens", "2000000", "--shutdown-grace-s", "1"});
  ASSERT_TRUE(server.ok());
  ASSERT_TRUE(server.client().LoadModel("m", "mamba1-small/hf").ok());
  const v1::EvaluateRequest request = RandomEvaluate("m", 2'000'000, 4);
  grpc::Status call_status;
  std::atomic<bool> started{false};
  std::thread caller([&] {
    auto context = server.Context(std::chrono::seconds(120));
    v1::EvaluateResponse response;
    started = true;
    call_status = server.stub().Evaluate(context.get(), request, &response);
  });
  while (!started) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // the forward is running
  double elapsed = 0;
  const int code = server.Terminate(std::chrono::seconds(30), &elapsed);
  caller.join();
  std::printf("[stop] SIGTERM during a 2e6-token Evaluate, --shutdown-grace-s 1: exit %d after "
              "%.3f s; the call ended %s\n",
              code, elapsed, call_status.error_message().c_str());
  EXPECT_EQ(code, 0);
  EXPECT_LT(elapsed, 2.0);
  EXPECT_FALSE(call_status.ok());
}

// --max-tokens refuses oversized requests before any work, naming the flag;
// sizes that overflow are INVALID_ARGUMENT.
TEST(HardeningTest, OversizedRequestsAreRefusedBeforeAnyWork) {
  Server server;  // default --max-tokens 65536
  ModelState before;
  ASSERT_TRUE(StartedWithModel(server, &before));
  const double cpu_before = CpuSeconds(server.pid());
  const auto start = Clock::now();

  const v1::EvaluateRequest evaluate = RandomEvaluate("m", 65537, 5);
  ExpectCode(server.client().Evaluate(evaluate).status(), StatusCode::kResourceExhausted,
             "input_ids: 65537 tokens, more than this server's limit of 65536");
  v1::CaptureRequest capture;
  capture.set_model("m");
  capture.mutable_input_ids()->CopyFrom(evaluate.input_ids());
  ExpectCode(server.client().CapturePermutation(capture).status(), StatusCode::kResourceExhausted,
             "--max-tokens");
  v1::LatencyRequest latency;
  latency.set_model("m");
  latency.set_batch(2);
  latency.set_seq_len(65536);
  ExpectCode(server.client().MeasureLatency(latency).status(), StatusCode::kResourceExhausted,
             "batch x seq_len: 131072 tokens");
  latency.set_batch(int64_t{1} << 40);
  latency.set_seq_len(int64_t{1} << 40);
  ExpectCode(server.client().MeasureLatency(latency).status(), StatusCode::kInvalidArgument,
             "overflows");
  const double seconds = Seconds(Clock::now() - start);
  const double cpu = CpuSeconds(server.pid()) - cpu_before;
  std::printf("[limits] 4 oversized requests refused in %.3f s, server CPU %.3f s\n", seconds,
              cpu);
  EXPECT_LT(cpu, 1.0);  // no forward ran: one of 65537 tokens takes seconds
  ExpectUnchanged(server.client(), "m", before);
}

// ---------------------------------------------------------------- item 2

// 63 idle streams (of 64 threads): at most --max-streams (16) are held, the
// rest are refused at once, and unary calls and health keep answering.
TEST(HardeningTest, IdleStreamsLeaveUnaryCallsAndHealthAnswering) {
  Server server;
  ModelState before;
  ASSERT_TRUE(StartedWithModel(server, &before));
  constexpr int kStreams = 63;
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<v1::WriteReport> write_reports(kStreams);
  std::vector<v1::PermutationResult> trace_results(kStreams);
  std::vector<std::unique_ptr<grpc::ClientWriter<v1::TensorChunk>>> writes;
  std::vector<std::unique_ptr<grpc::ClientWriter<v1::TraceChunk>>> traces;
  for (int i = 0; i < kStreams; ++i) {
    contexts.push_back(server.Context(std::chrono::seconds(120)));
    if (i % 2 == 0) {
      writes.push_back(server.stub().WriteTensors(contexts.back().get(),
                                                  &write_reports[static_cast<size_t>(i)]));
    } else {
      traces.push_back(server.stub().ComputePermutation(contexts.back().get(),
                                                        &trace_results[static_cast<size_t>(i)]));
    }
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // every stream reached the server
  ClientOptions options;
  options.deadline = std::chrono::seconds(10);
  auto unary = Client::Connect(server.address(), options);
  ASSERT_TRUE(unary.ok()) << unary.status();
  const auto start = Clock::now();
  for (int round = 0; round < 3; ++round) {
    auto serving = (*unary)->Health();
    ASSERT_TRUE(serving.ok()) << serving.status();
    EXPECT_TRUE(*serving);
    EXPECT_TRUE((*unary)->ListModels().ok());
    auto verify = (*unary)->Verify("m");
    ASSERT_TRUE(verify.ok()) << verify.status();
    EXPECT_TRUE(verify->ok());
  }
  std::printf("[streams] with 63 streams open, 9 unary calls answered in %.3f s\n",
              Seconds(Clock::now() - start));
  int refused = 0, held = 0;
  auto tally = [&](const grpc::Status& status) {
    if (status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
      ++refused;
      EXPECT_NE(status.error_message().find("--max-streams"), std::string::npos);
    } else {
      ++held;  // ended by WritesDone: an empty stream
      EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
    }
  };
  for (auto& w : writes) {
    w->WritesDone();
    tally(w->Finish());
  }
  for (auto& t : traces) {
    t->WritesDone();
    tally(t->Finish());
  }
  std::printf("[streams] %d held, %d refused with RESOURCE_EXHAUSTED\n", held, refused);
  EXPECT_EQ(held, 16);
  EXPECT_EQ(refused, kStreams - 16);
  ExpectUnchanged(server.client(), "m", before);
}

// A stream that sends nothing for --stream-idle-timeout-s is cancelled and
// its slot freed.
TEST(HardeningTest, IdleStreamIsCancelledAfterTheTimeout) {
  Server server({"--stream-idle-timeout-s", "1", "--max-streams", "1"});
  ModelState before;
  ASSERT_TRUE(StartedWithModel(server, &before));
  for (int round = 0; round < 2; ++round) {  // the one slot is freed each time
    const size_t log_from = server.Log().size();
    auto context = server.Context(std::chrono::seconds(60));
    v1::WriteReport report;
    const auto start = Clock::now();
    auto writer = server.stub().WriteTensors(context.get(), &report);
    const grpc::Status status = writer->Finish();  // the client sends nothing
    const double waited = Seconds(Clock::now() - start);
    std::printf("[streams] an idle stream ended after %.3f s (%s)\n", waited,
                status.error_message().c_str());
    EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED) << status.error_message();
    EXPECT_GE(waited, 0.9);
    EXPECT_LT(waited, 5.0);
    // The client hears CANCELLED when the watchdog cancels; the slot is free
    // once the handler has returned, which its log line marks.
    server.WaitForEither("rpc=WriteTensors status=", "", log_from, std::chrono::seconds(5));
  }
  server.WaitForLog("rpc=WriteTensors status=DEADLINE_EXCEEDED", std::chrono::seconds(5));
  ExpectUnchanged(server.client(), "m", before);
}

// ---------------------------------------------------------------- item 3

// 1.5 GiB of 1 MiB chunks for a 256-byte tensor: refused at the first chunk,
// the server's resident size grows by less than 100 MB.
TEST(HardeningTest, OversizedWriteTensorsIsRefusedAsItArrives) {
  Server server;
  ModelState before;
  ASSERT_TRUE(StartedWithModel(server, &before));
  const int64_t rss_before = ResidentBytes(server.pid());
  auto context = server.Context(std::chrono::seconds(120));
  v1::WriteReport report;
  auto writer = server.stub().WriteTensors(context.get(), &report);
  v1::TensorChunk chunk;
  chunk.set_model("m");
  chunk.set_name("backbone.norm_f.weight");  // [64] float32: 256 bytes
  chunk.add_shape(64);
  chunk.set_dtype("float32");
  chunk.set_data(std::string(std::size_t{1} << 20, '\x01'));
  int sent = 0;
  const auto start = Clock::now();
  while (sent < 1536 && writer->Write(chunk)) {
    ++sent;
    chunk.clear_model();
  }
  const grpc::Status status = writer->Finish();
  const int64_t rss_after = ResidentBytes(server.pid());
  std::printf("[write] 1.5 GiB stream for a 256-byte tensor: %d MiB accepted by the transport "
              "before the refusal (%.3f s); server RSS %.1f -> %.1f MB (+%.1f MB)\n",
              sent, Seconds(Clock::now() - start), static_cast<double>(rss_before) / 1e6,
              static_cast<double>(rss_after) / 1e6,
              static_cast<double>(rss_after - rss_before) / 1e6);
  ExpectGrpc(status, grpc::StatusCode::INVALID_ARGUMENT,
             "tensor backbone.norm_f.weight: more than 256 bytes sent");
  EXPECT_LT(sent, 1536);
  EXPECT_LT(rss_after - rss_before, 100'000'000);
  ExpectUnchanged(server.client(), "m", before);
}

// ---------------------------------------------------------------- items 4, 9, 13

void WriteFile(const fs::path& path, const std::string& text) {
  fs::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary) << text;
}

// config.json and shard indexes are capped; a directory without config.json
// and a config with a syntax error are INVALID_ARGUMENT naming the file (and
// the line); the server keeps serving.
TEST(HardeningTest, MalformedCheckpointsAreInvalidArgumentNamingTheFile) {
  Server server;
  ASSERT_TRUE(server.ok());
  const fs::path& models = server.roots().models;
  const std::string small_config = Slurp(models / "mamba1-small" / "hf" / "config.json");
  // An 80 MB config.json in the issue; 2 MiB is past the 1 MiB cap.
  WriteFile(models / "big-config" / "config.json",
            "{\"model_type\": \"mamba\", \"pad\": \"" + std::string(2 << 20, 'x') + "\"}");
  WriteFile(models / "big-index" / "config.json", small_config);
  WriteFile(models / "big-index" / "model.safetensors.index.json",
            "{\"weight_map\": {}, \"pad\": \"" + std::string(17 << 20, 'x') + "\"}");
  WriteFile(models / "no-config" / "model.safetensors", "x");
  WriteFile(models / "bad-json" / "config.json", "{\n  \"model_type\": \"mamba\",\n}\n");
  const int64_t rss_before = ResidentBytes(server.pid());
  ExpectCode(server.client().LoadModel("a", "big-config").status(), StatusCode::kInvalidArgument,
             "big-config/config.json: larger than 1 MiB");
  ExpectCode(server.client().LoadModel("b", "big-index").status(), StatusCode::kInvalidArgument,
             "model.safetensors.index.json: larger than 16 MiB");
  ExpectCode(server.client().LoadModel("c", "no-config").status(), StatusCode::kInvalidArgument,
             "no-config/config.json: missing");
  ExpectCode(server.client().LoadModel("d", "bad-json").status(), StatusCode::kInvalidArgument,
             "config.json: not valid JSON: parse error at line 3");
  std::printf("[config] RSS %.1f -> %.1f MB over the refused loads\n",
              static_cast<double>(rss_before) / 1e6,
              static_cast<double>(ResidentBytes(server.pid())) / 1e6);
  auto list = server.client().ListModels();
  ASSERT_TRUE(list.ok()) << list.status();
  EXPECT_TRUE(list->empty());
  EXPECT_TRUE(server.client().LoadModel("m", "mamba1-small/hf").ok());
}

// ---------------------------------------------------------------- item 5

// Sizes from the wire in checked 64-bit arithmetic: products that wrap are
// INVALID_ARGUMENT naming the field, never INTERNAL with LibTorch's text.
TEST(HardeningTest, SizesThatOverflowAreInvalidArgumentNotInternal) {
  Server server;
  ModelState before;
  ASSERT_TRUE(StartedWithModel(server, &before));
  auto trace = [&](int64_t rows, std::size_t bytes) {
    auto context = server.Context();
    v1::PermutationResult result;
    auto writer = server.stub().ComputePermutation(context.get(), &result);
    v1::TraceChunk header;
    header.mutable_header()->set_model("m");
    header.mutable_header()->set_group("residual");  // 64 channels
    header.mutable_header()->set_channels(64);
    writer->Write(header);
    v1::TraceChunk rows_chunk;
    rows_chunk.set_rows(rows);
    rows_chunk.set_f32_le(std::string(bytes, '\0'));
    writer->Write(rows_chunk);
    writer->WritesDone();
    return writer->Finish();
  };
  // (2^57 + 100) x 64 x 4 wraps to the bytes of 100 real rows.
  for (const grpc::Status& status :
       {trace((int64_t{1} << 57) + 100, 100 * 64 * 4), trace(int64_t{1} << 62, 0)}) {
    ExpectGrpc(status, grpc::StatusCode::INVALID_ARGUMENT, "rows x channels x 4 bytes");
    ExpectGrpc(status, grpc::StatusCode::INVALID_ARGUMENT, "overflows a 64-bit size");
  }
  {
    auto context = server.Context();
    v1::WriteReport report;
    auto writer = server.stub().WriteTensors(context.get(), &report);
    v1::TensorChunk chunk;
    chunk.set_model("m");
    chunk.set_name("backbone.norm_f.weight");
    chunk.add_shape(std::numeric_limits<int64_t>::max());
    chunk.add_shape(2);
    chunk.set_dtype("float32");
    chunk.set_last(true);
    writer->Write(chunk);
    writer->WritesDone();
    ExpectGrpc(writer->Finish(), grpc::StatusCode::INVALID_ARGUMENT,
               "tensor backbone.norm_f.weight: shape x dtype size");
  }
  EXPECT_EQ(server.Log().find("status=INTERNAL"), std::string::npos) << server.Log();
  ExpectUnchanged(server.client(), "m", before);
}

// ---------------------------------------------------------------- items 6, 7

// Client strings in the log are quoted and cut: a name with a newline
// forges no line, a 4 MiB name writes a bounded line; also for calls
// refused UNAUTHENTICATED. Reflection answers only with the token; health
// without it.
TEST(HardeningTest, LogLinesCannotBeForgedAndReflectionNeedsTheToken) {
  Server server({}, "t0ken");
  ASSERT_TRUE(server.ok());
  const std::string forged = "m\nrpc=Forged status=OK ms=0.00 model=\"x\"";
  const std::string huge(4 << 20, 'n');
  auto anonymous = Client::Connect(server.address(), {});
  ASSERT_TRUE(anonymous.ok());
  for (const std::string& name : {forged, huge}) {
    ExpectCode((*anonymous)->LoadModel(name, "mamba1-small/hf").status(),
               StatusCode::kUnauthenticated);
    ExpectCode(server.client().GetSymmetries(name).status(), StatusCode::kNotFound);
  }
  auto serving = (*anonymous)->Health();
  ASSERT_TRUE(serving.ok()) << serving.status();
  EXPECT_TRUE(*serving);

  grpc::Status status;
  const std::string refused = ReflectionListServices(server.address(), "", &status);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED) << status.error_message();
  EXPECT_EQ(refused.find("icd.v1.PermutationService"), std::string::npos);
  const std::string wrong = ReflectionListServices(server.address(), "guess", &status);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED) << status.error_message();
  EXPECT_EQ(wrong.find("icd.v1.PermutationService"), std::string::npos);
  const std::string listed = ReflectionListServices(server.address(), "t0ken", &status);
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_NE(listed.find("icd.v1.PermutationService"), std::string::npos);

  const std::string log = server.Log();
  std::istringstream lines(log);
  std::string line;
  int with_forged = 0, lines_seen = 0;
  while (std::getline(lines, line)) {
    ++lines_seen;
    EXPECT_NE(line.rfind("rpc=Forged", 0), 0u) << "forged line: " << line;
    EXPECT_LT(line.size(), 1024u) << line.substr(0, 200);
    if (line.find("rpc=Forged") != std::string::npos) ++with_forged;
  }
  EXPECT_EQ(with_forged, 2) << log.substr(0, 4000);  // logged, inside the quotes
  EXPECT_LT(log.size(), std::size_t{64} << 10);
}

// ---------------------------------------------------------------- item 8

// A weight file (or config.json) inside a checkpoint directory under the
// model root that links outside every root: PERMISSION_DENIED naming it. A
// link that stays inside a root is fine.
TEST(HardeningTest, CheckpointFilesLinkingOutsideTheRootsAreRefused) {
  Server server;
  ASSERT_TRUE(server.ok());
  const fs::path& models = server.roots().models;
  const fs::path source = models / "mamba1-small" / "hf";
  const fs::path outside = server.tmp() / "outside";
  fs::create_directories(outside);
  fs::copy_file(source / "model.safetensors", outside / "model.safetensors");
  fs::copy_file(source / "config.json", outside / "config.json");

  fs::create_directories(models / "weights-out");
  fs::copy_file(source / "config.json", models / "weights-out" / "config.json");
  fs::create_symlink(outside / "model.safetensors", models / "weights-out" / "model.safetensors");
  ExpectCode(server.client().LoadModel("a", "weights-out").status(),
             StatusCode::kPermissionDenied, "weights-out/model.safetensors resolves to");

  fs::create_directories(models / "config-out");
  fs::create_symlink(outside / "config.json", models / "config-out" / "config.json");
  fs::copy_file(source / "model.safetensors", models / "config-out" / "model.safetensors");
  ExpectCode(server.client().LoadModel("b", "config-out").status(),
             StatusCode::kPermissionDenied, "config-out/config.json");

  fs::create_directories(models / "inside");
  fs::copy_file(source / "config.json", models / "inside" / "config.json");
  fs::create_symlink(source / "model.safetensors", models / "inside" / "model.safetensors");
  auto inside = server.client().LoadModel("c", "inside");
  EXPECT_TRUE(inside.ok()) << inside.status();
  auto list = server.client().ListModels();
  ASSERT_TRUE(list.ok());
  EXPECT_EQ(list->size(), 1u);
}

// ---------------------------------------------------------------- item 9

TEST(HardeningTest, CodesAsTheContractSays) {
  Server server;
  ModelState before;
  ASSERT_TRUE(StartedWithModel(server, &before));
  // A legal 250-byte name exports (its staging directory's name stays
  // within NAME_MAX); 256 bytes, or a path past PATH_MAX, is the request's
  // fault.
  auto exported = server.client().ExportModel("m", std::string(250, 'e'));
  EXPECT_TRUE(exported.ok()) << exported.status();
  ExpectCode(server.client().ExportModel("m", std::string(256, 'f')).status(),
             StatusCode::kInvalidArgument, "NAME_MAX");
  std::string deep;
  while (deep.size() < 4200) deep += "abcdefghij/";
  ExpectCode(server.client().ExportModel("m", deep).status(), StatusCode::kInvalidArgument,
             "PATH_MAX");
  ExpectCode(server.client().LoadModel("x", std::string(300, 'g')).status(),
             StatusCode::kInvalidArgument, "NAME_MAX");
  // NaN tolerance is refused, as a negative one is.
  auto syms = server.client().GetSymmetries("m");
  ASSERT_TRUE(syms.ok());
  std::mt19937_64 rng(9);
  v1::ApplyRequest apply;
  apply.set_model("m");
  for (const auto& p : RandomPermutations(*syms, rng)) *apply.add_permutations() = p;
  apply.set_tolerance(std::nan(""));
  ExpectCode(server.client().ApplyPermutation(apply).status(), StatusCode::kInvalidArgument,
             "tolerance");
  ExpectUnchanged(server.client(), "m", before);
}

// ---------------------------------------------------------------- item 10

// A Mamba-1 checkpoint with a 2 MiB embedding (vocab 4096 x 128), written at
// test time with deterministic values.
void WriteWideCheckpoint(const fs::path& dir) {
  const int64_t vocab = 4096, d = 128, inner = 256, state = 16, rank = 8, kernel = 4;
  nlohmann::json config = {{"architectures", nlohmann::json::array({"MambaForCausalLM"})},
                           {"model_type", "mamba"},
                           {"hidden_size", d},
                           {"intermediate_size", inner},
                           {"num_hidden_layers", 1},
                           {"state_size", state},
                           {"time_step_rank", rank},
                           {"conv_kernel", kernel},
                           {"vocab_size", vocab},
                           {"layer_norm_epsilon", 1e-5},
                           {"tie_word_embeddings", true},
                           {"use_bias", false},
                           {"use_conv_bias", true},
                           {"residual_in_fp32", true},
                           {"dtype", "float32"}};
  WriteFile(dir / "config.json", config.dump(2));
  struct Spec {
    std::string name;
    std::vector<int64_t> shape;
    int kind;  // 0: small noise, 1: ones, 2: log(1..N) per row, 3: -4
  };
  const std::string layer = "backbone.layers.0.";
  const std::vector<Spec> specs = {
      {"backbone.embeddings.weight", {vocab, d}, 0},
      {"backbone.norm_f.weight", {d}, 1},
      {layer + "norm.weight", {d}, 1},
      {layer + "mixer.in_proj.weight", {2 * inner, d}, 0},
      {layer + "mixer.conv1d.weight", {inner, 1, kernel}, 0},
      {layer + "mixer.conv1d.bias", {inner}, 0},
      {layer + "mixer.x_proj.weight", {rank + 2 * state, inner}, 0},
      {layer + "mixer.dt_proj.weight", {inner, rank}, 0},
      {layer + "mixer.dt_proj.bias", {inner}, 3},
      {layer + "mixer.A_log", {inner, state}, 2},
      {layer + "mixer.D", {inner}, 1},
      {layer + "mixer.out_proj.weight", {d, inner}, 0}};
  nlohmann::json header = nlohmann::json::object();
  std::string body;
  for (const Spec& spec : specs) {
    int64_t count = 1;
    for (int64_t n : spec.shape) count *= n;
    std::vector<float> values(static_cast<std::size_t>(count));
    for (int64_t i = 0; i < count; ++i) {
      float v = 0;
      if (spec.kind == 0) v = 0.05f * static_cast<float>(std::sin(0.37 * static_cast<double>(i) + 1.0));
      if (spec.kind == 1) v = 1.0f;
      if (spec.kind == 2) v = std::log(static_cast<float>(i % state + 1));
      if (spec.kind == 3) v = -4.0f;
      values[static_cast<std::size_t>(i)] = v;
    }
    const std::size_t begin = body.size();
    body.append(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
    header[spec.name] = {{"dtype", "F32"}, {"shape", spec.shape}, {"data_offsets", {begin, body.size()}}};
  }
  std::string text = header.dump();
  while (text.size() % 8 != 0) text += ' ';
  std::string file(8, '\0');
  uint64_t length = text.size();
  for (int i = 0; i < 8; ++i) file[static_cast<std::size_t>(i)] = static_cast<char>((length >> (8 * i)) & 0xff);
  WriteFile(dir / "model.safetensors", file + text + body);
}

// At the smallest --max-message-mb (1), a 2 MiB tensor goes out through
// ReadTensors and back in through WriteTensors, both chunked to fit.
TEST(HardeningTest, TensorsTravelAtTheSmallestMessageCap) {
  Server server({"--max-message-mb", "1"});
  ASSERT_TRUE(server.ok());
  WriteWideCheckpoint(server.roots().models / "wide");
  auto info = server.client().LoadModel("w", "wide");
  ASSERT_TRUE(info.ok()) << info.status();
  auto tensors = server.client().ReadTensors("w");
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  std::size_t largest = 0;
  for (const auto& t : *tensors) largest = std::max(largest, t.data.size());
  EXPECT_EQ(largest, std::size_t{4096} * 128 * 4);
  auto version = server.client().WriteTensors("w", *tensors, info->version());
  ASSERT_TRUE(version.ok()) << version.status();
  EXPECT_EQ(*version, info->version() + 1);
}

// ---------------------------------------------------------------- item 11

TEST(HardeningTest, NonFiniteWeightsAreRefusedByName) {
  Server server;
  ModelState before;
  ASSERT_TRUE(StartedWithModel(server, &before));
  auto tensors = server.client().ReadTensors("m", {"backbone.layers.1.mixer.out_proj.weight"});
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  for (const float bad : {std::numeric_limits<float>::quiet_NaN(),
                          std::numeric_limits<float>::infinity()}) {
    Tensor tensor = (*tensors)[0];
    std::memcpy(tensor.data.data() + 40, &bad, sizeof bad);  // element 10
    ExpectCode(server.client().WriteTensors("m", {tensor}).status(), StatusCode::kInvalidArgument,
               "tensor 'backbone.layers.1.mixer.out_proj.weight': element 10 is NaN or infinite");
    ExpectUnchanged(server.client(), "m", before);
  }
  auto verify = server.client().Verify("m");
  ASSERT_TRUE(verify.ok()) << verify.status();
  EXPECT_TRUE(verify->ok());
  EXPECT_EQ(verify->rel_l2(), 0.0);
}

// ---------------------------------------------------------------- item 12

// Blocks touched only from held-out rows: none held out (4 rows; one-token
// sequences in a capture) means no blocks and a note saying so; a
// holdout_rows that leaves no training rows is refused naming the field.
TEST(HardeningTest, HeldOutScoresComeOnlyFromHeldOutRows) {
  Server server;
  ModelState before;
  ASSERT_TRUE(StartedWithModel(server, &before));
  std::mt19937 rng(12);
  std::normal_distribution<float> normal;
  std::vector<float> rows(4 * 64);
  for (float& v : rows) v = normal(rng);
  v1::TraceHeader header;
  header.set_model("m");
  header.set_group("residual");
  header.set_channels(64);
  auto few = server.client().ComputePermutation(header, rows);
  ASSERT_TRUE(few.ok()) << few.status();
  EXPECT_EQ(few->blocks_size(), 0);
  EXPECT_EQ(few->holdout_tokens(), 0);
  EXPECT_NE(few->scores_note().find("no held-out rows"), std::string::npos) << few->scores_note();
  header.set_holdout_rows(3);
  ExpectCode(server.client().ComputePermutation(header, rows).status(),
             StatusCode::kInvalidArgument, "holdout_rows: 3 of the stream's 4 rows");

  v1::CaptureRequest capture;
  capture.set_model("m");
  for (int64_t id : {3, 9, 27, 81}) capture.add_input_ids(id);
  capture.set_batch(4);  // four sequences of one token
  capture.add_groups("residual");
  auto set = server.client().CapturePermutation(capture);
  ASSERT_TRUE(set.ok()) << set.status();
  ASSERT_EQ(set->results_size(), 1);
  EXPECT_EQ(set->results(0).blocks_size(), 0);
  EXPECT_FALSE(set->results(0).scores_note().empty());
  ExpectUnchanged(server.client(), "m", before);
}

// ---------------------------------------------------------------- item 13

// A reload under the same name never repeats a version, so an
// expected_version from the earlier instance cannot match; Evaluate on one
// token says there is nothing to score.
TEST(HardeningTest, InstancesAreDistinguishableAndOneTokenHasNothingToScore) {
  Server server;
  ASSERT_TRUE(server.ok());
  ASSERT_TRUE(server.client().LoadModel("m", "mamba1-small/hf").ok());
  auto syms = server.client().GetSymmetries("m");
  ASSERT_TRUE(syms.ok());
  std::mt19937_64 rng(13);
  auto applied = server.client().ApplyPermutation("m", RandomPermutations(*syms, rng), 1);
  ASSERT_TRUE(applied.ok()) << applied.status();
  EXPECT_EQ(applied->version(), 2u);
  ASSERT_TRUE(server.client().UnloadModel("m").ok());
  auto again = server.client().LoadModel("m", "mamba1-small/hf");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->version(), 3u);
  const ModelState before = Snapshot(server.client(), "m");
  ExpectCode(
      server.client().ApplyPermutation("m", RandomPermutations(*syms, rng), 2).status(),
      StatusCode::kFailedPrecondition, "version 3");
  ExpectCode(server.client().Evaluate(RandomEvaluate("m", 1, 14)).status(),
             StatusCode::kInvalidArgument, "nothing to score");
  ExpectUnchanged(server.client(), "m", before);
}

}  // namespace
}  // namespace icd::testing
