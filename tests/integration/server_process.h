// The icd-server binary as a child process, for black-box tests: spawn it on
// 127.0.0.1:0, read its port, read its log, its CPU time and resident size,
// stop it with SIGTERM.
#ifndef ICD_TESTS_INTEGRATION_SERVER_PROCESS_H_
#define ICD_TESTS_INTEGRATION_SERVER_PROCESS_H_

#include <sys/types.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

namespace icd::testing {

namespace fs = std::filesystem;

struct Child {
  pid_t pid = -1;
  int out = -1;  // the child's stdout
};

// stderr goes to `stderr_file` when one is named.
Child Spawn(const std::vector<std::string>& args, const std::string& stderr_file = "");

// Reads one line (without '\n'); waits at most `timeout` for each byte.
std::string ReadLine(int fd, std::chrono::milliseconds timeout);
std::string ReadAll(int fd);
// The exit status, or 128 + the signal that ended it.
int WaitExit(pid_t pid);

// Lists services through grpc.reflection.v1alpha (what grpcurl and buf curl
// use), with hand-encoded messages: ServerReflectionRequest{list_services=7:
// ""}; the answer's bytes hold the service names. `token`, when not empty,
// goes as `authorization: Bearer <token>`; `status` (optional) receives the
// call's status.
std::string ReflectionListServices(const std::string& address, const std::string& token = "",
                                   grpc::Status* status = nullptr);

// Every file and directory under `dir`, relative, with file sizes: equal
// listings before and after mean nothing was added, removed or resized.
std::vector<std::string> TreeListing(const fs::path& dir);

// SIGTERM, then the exit status must be 0 (graceful shutdown).
void StopWithSigterm(Child& child);

// <tmp>/models holding mamba1-small/hf, and an empty <tmp>/exports.
struct ServerRoots {
  fs::path models, exports;
};
ServerRoots MakeRoots(const fs::path& tmp);

// The port of a spawned server from its first stdout line ("listening on
// 127.0.0.1:PORT"); empty when that line did not come.
std::string ListeningPort(const Child& child);

// From /proc/<pid>: user + system CPU seconds, and the resident set in
// bytes (VmRSS).
double CpuSeconds(pid_t pid);
int64_t ResidentBytes(pid_t pid);

std::string Slurp(const fs::path& path);

}  // namespace icd::testing

#endif  // ICD_TESTS_INTEGRATION_SERVER_PROCESS_H_
