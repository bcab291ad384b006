// Black box: the icd-server binary on 127.0.0.1:0. Parse "listening on",
// call it through icd::Client (token from --token-file), SIGTERM, exit 0.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <memory>
#include <iterator>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/credentials.h>
#include <gtest/gtest.h>

#include "harness.h"
#include "server_process.h"

namespace icd::testing {
namespace {

TEST(ServerBinaryTest, HelpTeachesAndExitsZero) {
  Child child = Spawn({ICD_SERVER_BINARY, "--help"});
  ASSERT_GT(child.pid, 0);
  const std::string out = ReadAll(child.out);
  close(child.out);
  EXPECT_EQ(WaitExit(child.pid), 0);
  for (const char* needle : {"--listen", "--model-root", "--export-root",
                             "--device", "--token-file", "--max-message-mb",
                             "--return-freed-memory", "--max-tokens", "--max-streams",
                             "--stream-idle-timeout-s", "--shutdown-grace-s",
                             "--memory-budget-mb", "cuda:0=70000,cpu=4000", "Example",
                             "listening on"}) {
    EXPECT_NE(out.find(needle), std::string::npos) << needle;
  }
}

TEST(ServerBinaryTest, BadFlagsExitTwo) {
  Child child = Spawn({ICD_SERVER_BINARY, "--listen", "127.0.0.1:0", "--bogus", "1"});
  ASSERT_GT(child.pid, 0);
  close(child.out);
  EXPECT_EQ(WaitExit(child.pid), 2);
  Child no_root = Spawn({ICD_SERVER_BINARY, "--listen", "127.0.0.1:0"});
  close(no_root.out);
  EXPECT_EQ(WaitExit(no_root.pid), 2);
}

TEST(ServerBinaryTest, ServesThenStopsCleanlyOnSigterm) {
  TempDir tmp;
  const auto [models, exports] = MakeRoots(tmp.path());
  const fs::path token_file = tmp.path() / "token";
  std::ofstream(token_file) << "t0ken\n";

  Child child = Spawn({ICD_SERVER_BINARY, "--listen", "127.0.0.1:0",
                       "--model-root", models.string(), "--export-root",
                       exports.string(), "--token-file", token_file.string()});
  ASSERT_GT(child.pid, 0);
  const std::string port = ListeningPort(child);
  ASSERT_FALSE(port.empty());
  EXPECT_GT(std::stoi(port), 0);
  const std::string address = "127.0.0.1:" + port;

  ClientOptions options;
  options.token = "t0ken";
  options.deadline = std::chrono::seconds(60);
  auto client = Client::Connect(address, options);
  ASSERT_TRUE(client.ok()) << client.status();
  auto serving = (*client)->Health();
  ASSERT_TRUE(serving.ok()) << serving.status();
  EXPECT_TRUE(*serving);
  auto info = (*client)->LoadModel("m", "mamba1-small/hf");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->version(), 1u);
  auto exported = (*client)->ExportModel("m", "e1");
  ASSERT_TRUE(exported.ok()) << exported.status();
  EXPECT_TRUE(fs::exists(exports / "e1" / "config.json"));

  const std::string services = ReflectionListServices(address, "t0ken");
  EXPECT_NE(services.find("icd.v1.PermutationService"), std::string::npos);
  EXPECT_NE(services.find("grpc.health.v1.Health"), std::string::npos);

  auto anonymous = Client::Connect(address, {});
  ASSERT_TRUE(anonymous.ok());
  EXPECT_EQ((*anonymous)->ListModels().status().code(),
            absl::StatusCode::kUnauthenticated);

  StopWithSigterm(child);
}

// The server keeps freed host memory for reuse unless told not to, and its
// log says which (icd/core/host_memory.h).
TEST(ServerBinaryTest, KeepsFreedHostMemoryUnlessToldNot) {
  TempDir tmp;
  const auto [models, exports] = MakeRoots(tmp.path());
  for (const bool opt_out : {false, true}) {
    const fs::path log = tmp.path() / (opt_out ? "opt-out.log" : "default.log");
    std::vector<std::string> args = {ICD_SERVER_BINARY, "--listen", "127.0.0.1:0",
                                     "--model-root", models.string(), "--export-root",
                                     exports.string()};
    if (opt_out) args.push_back("--return-freed-memory");
    Child child = Spawn(args, log.string());
    ASSERT_GT(child.pid, 0);
    ASSERT_FALSE(ListeningPort(child).empty());
    StopWithSigterm(child);
    std::ifstream in(log);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    EXPECT_EQ(text.find("host memory: freed blocks kept for reuse") != std::string::npos, !opt_out)
        << text;
  }
}

// What a server killed during an export leaves (its temporary directory
// beside the target, at any depth) is gone after a restart; everything else
// under the export root, and the model root, are untouched.
TEST(ServerBinaryTest, RestartRemovesUnfinishedExports) {
  TempDir tmp;
  const auto [models, exports] = MakeRoots(tmp.path());
  const fs::path stale_top = exports / ".icd-export-e1.8f3a";
  const fs::path stale_nested = exports / "runs" / ".icd-export-e2.77c1";
  fs::create_directories(stale_top);
  fs::create_directories(stale_nested);
  std::ofstream(stale_top / "model.safetensors") << "half written";
  fs::create_directories(exports / "finished");
  std::ofstream(exports / "finished" / "config.json") << "{}";
  const auto models_before = TreeListing(models);

  Child child = Spawn({ICD_SERVER_BINARY, "--listen", "127.0.0.1:0", "--model-root",
                       models.string(), "--export-root", exports.string(), "--quiet"});
  ASSERT_GT(child.pid, 0);
  ASSERT_FALSE(ListeningPort(child).empty());
  EXPECT_FALSE(fs::exists(stale_top));
  EXPECT_FALSE(fs::exists(stale_nested));
  EXPECT_TRUE(fs::exists(exports / "runs"));
  EXPECT_TRUE(fs::exists(exports / "finished" / "config.json"));
  EXPECT_EQ(TreeListing(models), models_before);
  StopWithSigterm(child);
}

// The export temporaries (.icd-export-*) directly under `dir`.
std::vector<fs::path> ExportTemporaries(const fs::path& dir) {
  std::vector<fs::path> found;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    if (entry.path().filename().string().rfind(".icd-export-", 0) == 0) {
      found.push_back(entry.path());
    }
  }
  return found;
}

// A server that dies in the middle of an export leaves its temporary
// directory and never the target; a restart removes the temporary; every
// target on disk is complete and loads; the model root is untouched.
//
// The death is placed, not raced (a SIGKILL timed against a 0.3 ms write
// missed 200 times in a row on a loaded CI machine): the parent lowers the
// running server's file-size limit (prlimit), so the write that crosses it
// ends the process with SIGXFSZ, whose default action, like SIGKILL's, runs
// no handler and no destructor. The limits cut the export at its first byte,
// inside config.json, in model.safetensors' header, halfway through its
// tensors, and one byte before its end.
TEST(ServerBinaryTest, KilledDuringExportsLeavesOnlyCompleteOnes) {
  TempDir tmp;
  const auto [models, exports] = MakeRoots(tmp.path());
  const auto models_before = TreeListing(models);
  const fs::path source = models / "mamba1-small" / "hf";
  const auto weights_size = static_cast<rlim_t>(fs::file_size(source / "model.safetensors"));
  const std::vector<std::string> server_args = {ICD_SERVER_BINARY, "--listen", "127.0.0.1:0",
                                                "--model-root", models.string(),
                                                "--export-root", exports.string(), "--quiet"};
  const std::vector<rlim_t> cuts = {1, 300, 1100, weights_size / 2, weights_size - 1};
  int round = 0;
  for (const rlim_t cut : cuts) {
    SCOPED_TRACE(::testing::Message() << "file-size limit " << cut << " bytes");
    const std::string name = "r" + std::to_string(round++);
    Child child = Spawn(server_args);
    ASSERT_GT(child.pid, 0);
    const std::string port = ListeningPort(child);
    ASSERT_FALSE(port.empty());
    auto client = Client::Connect("127.0.0.1:" + port, {});
    ASSERT_TRUE(client.ok()) << client.status();
    ASSERT_TRUE((*client)->LoadModel("m", "mamba1-small/hf").ok());
    ASSERT_TRUE((*client)->ExportModel("m", name + "-complete").ok());

    const rlimit no_core{0, 0};
    const rlimit file_size{cut, cut};
    ASSERT_EQ(prlimit(child.pid, RLIMIT_CORE, &no_core, nullptr), 0) << std::strerror(errno);
    ASSERT_EQ(prlimit(child.pid, RLIMIT_FSIZE, &file_size, nullptr), 0) << std::strerror(errno);
    auto cut_short = (*client)->ExportModel("m", name + "-cut");
    EXPECT_EQ(cut_short.status().code(), absl::StatusCode::kUnavailable) << cut_short.status();
    EXPECT_EQ(WaitExit(child.pid), 128 + SIGXFSZ);
    close(child.out);

    // What the server was writing is still there, cut at the limit, and the
    // target was never renamed into place.
    EXPECT_FALSE(fs::exists(exports / (name + "-cut")));
    const std::vector<fs::path> temporaries = ExportTemporaries(exports);
    ASSERT_EQ(temporaries.size(), 1u);
    int cut_files = 0;
    for (const auto& file : fs::directory_iterator(temporaries[0])) {
      const auto size = fs::file_size(file.path());
      const auto whole = fs::file_size(source / file.path().filename());
      EXPECT_LE(size, whole) << file.path();
      if (size < whole) {
        ++cut_files;
        EXPECT_EQ(size, cut) << file.path();
      }
    }
    EXPECT_EQ(cut_files, 1) << temporaries[0];
  }

  // Restarted, with the export root also a model root so that exports load.
  std::vector<std::string> restart_args = server_args;
  restart_args.insert(restart_args.end(), {"--model-root", exports.string()});
  Child child = Spawn(restart_args);
  ASSERT_GT(child.pid, 0);
  const std::string port = ListeningPort(child);
  ASSERT_FALSE(port.empty());
  auto client = Client::Connect("127.0.0.1:" + port, {});
  ASSERT_TRUE(client.ok());
  const std::vector<std::string> complete = {"config.json", "generation_config.json",
                                             "model.safetensors"};
  int finished = 0;
  for (const auto& entry : fs::directory_iterator(exports)) {
    const std::string name = entry.path().filename().string();
    EXPECT_EQ(name.rfind(".icd-export-", 0), std::string::npos) << "left after restart: " << name;
    std::vector<std::string> files;
    for (const auto& file : fs::directory_iterator(entry.path())) {
      files.push_back(file.path().filename().string());
    }
    std::sort(files.begin(), files.end());
    EXPECT_EQ(files, complete) << name;
    auto reloaded = (*client)->LoadModel(name, entry.path().string());
    EXPECT_TRUE(reloaded.ok()) << name << ": " << reloaded.status();
    ++finished;
  }
  EXPECT_EQ(finished, static_cast<int>(cuts.size()));
  EXPECT_EQ(TreeListing(models), models_before);
  StopWithSigterm(child);
}

// --max-models and --memory-budget-mb: a load past either is
// RESOURCE_EXHAUSTED, loads nothing, and the server keeps serving.
TEST(ServerBinaryTest, ModelLimitsAreRefusedAndTheServerStaysHealthy) {
  TempDir tmp;
  const auto [models, exports] = MakeRoots(tmp.path());
  // mamba1-small: 67,520 parameters, 270 KB in float32, 540 KB in float64.
  Child child = Spawn({ICD_SERVER_BINARY, "--listen", "127.0.0.1:0", "--model-root",
                       models.string(), "--export-root", exports.string(), "--max-models",
                       "2", "--memory-budget-mb", "1", "--quiet"});
  ASSERT_GT(child.pid, 0);
  const std::string port = ListeningPort(child);
  ASSERT_FALSE(port.empty());
  auto client = Client::Connect("127.0.0.1:" + port, {});
  ASSERT_TRUE(client.ok()) << client.status();
  Client& icd = **client;

  ASSERT_TRUE(icd.LoadModel("wide", "mamba1-small/hf", "", "float64").ok());
  auto over_budget = icd.LoadModel("wide2", "mamba1-small/hf", "", "float64");
  EXPECT_EQ(over_budget.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(over_budget.status().message().find("memory budget"), std::string::npos)
      << over_budget.status();
  ASSERT_TRUE(icd.LoadModel("narrow", "mamba1-small/hf").ok());  // 810 KB in all
  auto over_count = icd.LoadModel("third", "mamba1-small/hf");
  EXPECT_EQ(over_count.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(over_count.status().message().find("--max-models"), std::string::npos)
      << over_count.status();

  auto serving = icd.Health();
  ASSERT_TRUE(serving.ok()) << serving.status();
  EXPECT_TRUE(*serving);
  auto list = icd.ListModels();
  ASSERT_TRUE(list.ok()) << list.status();
  EXPECT_EQ(list->size(), 2u);
  // Unloading gives the room back.
  ASSERT_TRUE(icd.UnloadModel("wide").ok());
  EXPECT_TRUE(icd.LoadModel("third", "mamba1-small/hf").ok());
  EXPECT_TRUE(icd.Verify("third").ok());

  StopWithSigterm(child);
}

// --memory-budget-mb per device: a value naming devices starts the server
// (its log says the budget), a load past the CPU's budget is refused naming
// the device; a value it cannot read stops it at start with exit 2 and says
// why.
TEST(ServerBinaryTest, MemoryBudgetIsPerDeviceAndBadValuesStopTheStart) {
  TempDir tmp;
  const auto [models, exports] = MakeRoots(tmp.path());
  const fs::path log = tmp.path() / "budget.log";
  Child child = Spawn({ICD_SERVER_BINARY, "--listen", "127.0.0.1:0", "--model-root",
                       models.string(), "--export-root", exports.string(), "--memory-budget-mb",
                       "cuda:0=70000,cpu=1", "--quiet"},
                      log.string());
  ASSERT_GT(child.pid, 0);
  const std::string port = ListeningPort(child);
  ASSERT_FALSE(port.empty());
  auto client = Client::Connect("127.0.0.1:" + port, {});
  ASSERT_TRUE(client.ok()) << client.status();
  Client& icd = **client;
  // mamba1-small in float64: 573,440 bytes with its probe reference.
  ASSERT_TRUE(icd.LoadModel("wide", "mamba1-small/hf", "", "float64").ok());
  auto refused = icd.LoadModel("wide2", "mamba1-small/hf", "", "float64");
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  for (const char* needle : {"memory budget of device cpu", "needs 573440 bytes",
                             "573440 bytes (0.5 MiB) are in use", "the budget is 1048576 bytes"}) {
    EXPECT_NE(refused.status().message().find(needle), std::string::npos)
        << needle << " not in: " << refused.status();
  }
  auto list = icd.ListModels();
  ASSERT_TRUE(list.ok()) << list.status();
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ((*list)[0].device_bytes(), 573440);
  StopWithSigterm(child);
  std::ifstream in(log);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("memory budget: cpu 1 MiB, cuda:0 70000 MiB"), std::string::npos) << text;

  for (const char* bad : {"0", "cpu=", "gpu=5", "cpu=5,cpu=6", "5MB"}) {
    const fs::path bad_log = tmp.path() / "bad.log";
    Child refused_start = Spawn({ICD_SERVER_BINARY, "--listen", "127.0.0.1:0", "--model-root",
                                 models.string(), "--export-root", exports.string(),
                                 "--memory-budget-mb", bad},
                                bad_log.string());
    ASSERT_GT(refused_start.pid, 0);
    close(refused_start.out);
    EXPECT_EQ(WaitExit(refused_start.pid), 2) << bad;
    std::ifstream bad_in(bad_log);
    const std::string said((std::istreambuf_iterator<char>(bad_in)),
                           std::istreambuf_iterator<char>());
    EXPECT_NE(said.find(std::string("--memory-budget-mb ") + bad + ": "), std::string::npos)
        << said;
  }
}

// Runs a shell command (openssl, for test certificates); true on exit 0.
bool Shell(const std::string& command) { return std::system(command.c_str()) == 0; }

// Test PKI under `dir`: a self-signed server certificate for localhost and
// 127.0.0.1, and a CA with one client certificate it signed.
bool MakeCertificates(const fs::path& dir) {
  const std::string d = dir.string();
  const std::string quiet = " > /dev/null 2>&1";
  return Shell("openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost"
               " -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout " + d +
               "/server.key -out " + d + "/server.pem" + quiet) &&
         Shell("openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=icd-test-ca -keyout " +
               d + "/ca.key -out " + d + "/ca.pem" + quiet) &&
         Shell("openssl req -newkey rsa:2048 -nodes -subj /CN=client -keyout " + d +
               "/client.key -out " + d + "/client.csr" + quiet) &&
         Shell("openssl x509 -req -days 2 -in " + d + "/client.csr -CA " + d + "/ca.pem -CAkey " +
               d + "/ca.key -CAcreateserial -out " + d + "/client.pem" + quiet);
}


// A client over TLS trusting the server's certificate, optionally with a
// client certificate; or a plaintext one (`tls` false).
absl::StatusOr<std::unique_ptr<Client>> ConnectTo(const std::string& address, const fs::path& pki,
                                                  bool tls, bool client_certificate) {
  ClientOptions options;
  options.connect_timeout = std::chrono::seconds(3);
  options.deadline = std::chrono::seconds(30);
  if (tls) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = Slurp(pki / "server.pem");
    if (client_certificate) {
      ssl.pem_private_key = Slurp(pki / "client.key");
      ssl.pem_cert_chain = Slurp(pki / "client.pem");
    }
    options.credentials = grpc::SslCredentials(ssl);
  }
  return Client::Connect(address, options);
}

// Whether a client can complete a call (connect and ListModels).
bool CanTalk(const absl::StatusOr<std::unique_ptr<Client>>& client) {
  return client.ok() && (*client)->ListModels().ok();
}

// --tls-cert/--tls-key: TLS clients trusting the certificate talk (health
// too), plaintext clients cannot; with --tls-client-ca, only clients with a
// certificate signed by that CA can.
TEST(ServerBinaryTest, TlsRefusesPlaintextAndMutualTlsRefusesUnknownClients) {
  TempDir tmp;
  const fs::path pki = tmp.path() / "pki";
  fs::create_directories(pki);
  fs::create_directories(tmp.path() / "models");
  fs::create_directories(tmp.path() / "exports");
  ASSERT_TRUE(MakeCertificates(pki)) << "openssl failed";
  for (const bool mutual : {false, true}) {
    SCOPED_TRACE(mutual ? "mutual TLS" : "TLS");
    std::vector<std::string> args = {ICD_SERVER_BINARY, "--listen", "127.0.0.1:0",
                                     "--model-root", (tmp.path() / "models").string(),
                                     "--export-root", (tmp.path() / "exports").string(),
                                     "--tls-cert", (pki / "server.pem").string(),
                                     "--tls-key", (pki / "server.key").string(), "--quiet"};
    if (mutual) {
      args.push_back("--tls-client-ca");
      args.push_back((pki / "ca.pem").string());
    }
    Child child = Spawn(args);
    ASSERT_GT(child.pid, 0);
    const std::string port = ListeningPort(child);
    ASSERT_FALSE(port.empty());
    const std::string address = "localhost:" + port;

    auto trusted = ConnectTo(address, pki, /*tls=*/true, /*client_certificate=*/true);
    ASSERT_TRUE(CanTalk(trusted)) << trusted.status();
    auto serving = (*trusted)->Health();
    ASSERT_TRUE(serving.ok()) << serving.status();
    EXPECT_TRUE(*serving);
    EXPECT_FALSE(CanTalk(ConnectTo(address, pki, /*tls=*/false, false)));
    EXPECT_EQ(CanTalk(ConnectTo(address, pki, /*tls=*/true, /*client_certificate=*/false)),
              !mutual);

    StopWithSigterm(child);
  }
}

}  // namespace
}  // namespace icd::testing
