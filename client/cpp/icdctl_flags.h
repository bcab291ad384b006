// icdctl's command line: global flags, the command, its positional
// arguments and options, parsed and checked; the solver flags shared by
// capture and compute; the help text.
#ifndef ICD_CLIENT_CPP_ICDCTL_FLAGS_H_
#define ICD_CLIENT_CPP_ICDCTL_FLAGS_H_

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "icd/v1/permutation.pb.h"

namespace icd::ctl {

extern const char kHelp[];

struct Line {
  std::string server;
  bool json = false;
  double timeout_s = 0;
  std::string token_file;
  bool help = false;
  std::string command;
  std::vector<std::string> positional;
  std::map<std::string, std::string> options;  // --opt VALUE
  std::set<std::string> switches;              // --opt
};

absl::Status Usage(const std::string& what);

absl::StatusOr<Line> ParseLine(int argc, char** argv);

// Only `allowed` options and switches may appear; `n` positionals exactly.
absl::Status Expect(const Line& line, size_t n, const std::set<std::string>& allowed);

std::string Option(const Line& line, const std::string& name);

absl::StatusOr<int64_t> ParseInt(const std::string& what, const std::string& text);

absl::StatusOr<uint64_t> ParseUint(const std::string& what, const std::string& text);

std::vector<std::string> SplitList(const std::string& text);

absl::StatusOr<double> ParseDouble(const std::string& what, const std::string& text);

absl::StatusOr<int32_t> ParseInt32(const std::string& what, const std::string& text);

// The solver flags of capture and compute; unset ones stay zero (the
// server's defaults).
absl::StatusOr<v1::SolverOptions> ParseSolver(const Line& line);

const std::set<std::string>& SolverFlags();

std::set<std::string> With(std::set<std::string> a, const std::set<std::string>& b);

}  // namespace icd::ctl

#endif  // ICD_CLIENT_CPP_ICDCTL_FLAGS_H_
