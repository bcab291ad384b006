// Helpers for black-box tests of the icd-server binary (server_process.h).
#include "server_process.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <iterator>
#include <sstream>

#include <grpcpp/generic/generic_stub.h>
#include <gtest/gtest.h>

#include "harness.h"

namespace icd::testing {

Child Spawn(const std::vector<std::string>& args, const std::string& stderr_file) {
  // Built before fork: the child only calls async-signal-safe functions.
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  int fds[2];
  if (pipe(fds) != 0) return {};
  const pid_t pid = fork();
  if (pid == 0) {
    if (!stderr_file.empty()) {
      const int err = open(stderr_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
      if (err >= 0) dup2(err, STDERR_FILENO);
    }
    dup2(fds[1], STDOUT_FILENO);
    close(fds[0]);
    close(fds[1]);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(fds[1]);
  return {pid, fds[0]};
}

// Reads one line (without '\n'); waits at most `timeout` for each byte.
std::string ReadLine(int fd, std::chrono::milliseconds timeout) {
  std::string line;
  char c = 0;
  pollfd p{fd, POLLIN, 0};
  while (poll(&p, 1, static_cast<int>(timeout.count())) > 0 &&
         read(fd, &c, 1) == 1 && c != '\n') {
    line.push_back(c);
  }
  return line;
}

std::string ReadAll(int fd) {
  std::string out;
  char buf[4096];
  ssize_t n = 0;
  while ((n = read(fd, buf, sizeof buf)) > 0) out.append(buf, static_cast<std::size_t>(n));
  return out;
}

int WaitExit(pid_t pid) {
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// Lists services through grpc.reflection.v1alpha (what grpcurl and buf curl
// use), with hand-encoded messages: ServerReflectionRequest{list_services=7:
// ""}; the answer's bytes hold the service names.
std::string ReflectionListServices(const std::string& address, const std::string& token,
                                   grpc::Status* status_out) {
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto call = stub.PrepareCall(
      &ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  auto step = [&cq](void* tag) {
    void* got = nullptr;
    bool ok = false;
    return cq.Next(&got, &ok) && got == tag && ok;
  };
  int tags[5];
  std::string out;
  call->StartCall(&tags[0]);
  if (step(&tags[0])) {
    const char request[] = {0x3A, 0x00};
    grpc::Slice slice(request, sizeof request);
    grpc::ByteBuffer buffer(&slice, 1);
    call->Write(buffer, &tags[1]);
    if (step(&tags[1])) {
      call->WritesDone(&tags[2]);
      step(&tags[2]);
      grpc::ByteBuffer response;
      call->Read(&response, &tags[3]);
      if (step(&tags[3])) {
        std::vector<grpc::Slice> slices;
        if (response.Dump(&slices).ok()) {
          for (const auto& sl : slices) {
            out.append(reinterpret_cast<const char*>(sl.begin()), sl.size());
          }
        }
      }
    }
  }
  grpc::Status status;
  call->Finish(&status, &tags[4]);
  void* got = nullptr;
  bool ok = false;
  while (cq.Next(&got, &ok) && got != &tags[4]) {
  }
  cq.Shutdown();
  while (cq.Next(&got, &ok)) {
  }
  if (status_out != nullptr) *status_out = status;
  return out;
}

// Every file and directory under `dir`, relative, with file sizes: equal
// listings before and after mean nothing was added, removed or resized.
std::vector<std::string> TreeListing(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& entry : fs::recursive_directory_iterator(dir)) {
    names.push_back(fs::relative(entry.path(), dir).string() + ":" +
                    (entry.is_regular_file() ? std::to_string(entry.file_size()) : "d"));
  }
  std::sort(names.begin(), names.end());
  return names;
}

// SIGTERM, then the exit status must be 0 (graceful shutdown).
void StopWithSigterm(Child& child) {
  ASSERT_EQ(kill(child.pid, SIGTERM), 0);
  EXPECT_EQ(WaitExit(child.pid), 0);
  close(child.out);
}

ServerRoots MakeRoots(const fs::path& tmp) {
  ServerRoots roots{tmp / "models", tmp / "exports"};
  fs::create_directories(roots.models / "mamba1-small");
  fs::create_directories(roots.exports);
  fs::copy(GoldenDir() / "mamba1-small" / "hf", roots.models / "mamba1-small" / "hf",
           fs::copy_options::recursive);
  return roots;
}

// The port of a spawned server from its first stdout line ("listening on
// 127.0.0.1:PORT"); empty when that line did not come.
std::string ListeningPort(const Child& child) {
  const std::string line = ReadLine(child.out, std::chrono::seconds(120));
  const std::string prefix = "listening on 127.0.0.1:";
  if (line.rfind(prefix, 0) != 0) {
    ADD_FAILURE() << "the server did not start: got '" << line << "'";
    return "";
  }
  return line.substr(prefix.size());
}


double CpuSeconds(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  const std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  // Fields after the command's closing parenthesis; utime and stime are the
  // 14th and 15th fields of the line, the 12th and 13th after it.
  const auto close = stat.rfind(')');
  if (close == std::string::npos) return -1;
  std::istringstream rest(stat.substr(close + 2));
  std::string field;
  double ticks = 0;
  for (int i = 1; i <= 13 && rest >> field; ++i) {
    if (i >= 12) ticks += std::stod(field);
  }
  return ticks / static_cast<double>(sysconf(_SC_CLK_TCK));
}

int64_t ResidentBytes(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stoll(line.substr(6)) * 1024;  // kB
  }
  return -1;
}

std::string Slurp(const fs::path& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

}  // namespace icd::testing
