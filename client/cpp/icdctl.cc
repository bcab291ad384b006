// icdctl: the command-line client of icd.v1.PermutationService, one command
// per RPC, on top of icd::Client. Human-readable output by default, the
// response message as JSON with --json. The exit code is the gRPC status code
// (0: OK); errors go to stderr as "icdctl: CODE: message".
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <google/protobuf/util/json_util.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "icd/client/client.h"
#include "icdctl_permutations.h"

namespace icd::ctl {
namespace {

constexpr char kHelp[] = R"(icdctl: command-line client of the icd permutation service.

The server (icd-server) holds Mamba checkpoints by name; icdctl loads them,
shows their symmetry groups, applies channel permutations, checks that the
logits did not change, evaluates and exports the permuted checkpoint.

Usage:
  icdctl --server HOST:PORT [--json] [--timeout S] [--token-file F] COMMAND ...

Global flags (anywhere on the line):
  --server HOST:PORT  the server (default: $ICD_SERVER)
  --json              print the response message as JSON (proto field names,
                      defaults included; 64-bit integers are JSON strings)
  --timeout S         deadline of the call in seconds (also bounds connecting;
                      default: 10 s to connect, no call deadline)
  --token-file F      send "authorization: Bearer <F's content>"
  --help              this text

Commands:
  load NAME PATH [--device D] [--dtype T]
      Load a checkpoint directory (under the server's --model-root; relative
      paths are taken from the first root) as NAME. D: cpu | cuda | cuda:N,
      T: float32 | bfloat16 | float16 | float64 (default: the checkpoint's).
        icdctl --server 127.0.0.1:50051 load m mamba1-small/hf --dtype float32

  models
      List the loaded models.
        icdctl --server 127.0.0.1:50051 models

  unload NAME
      Unload a model.
        icdctl --server 127.0.0.1:50051 unload m

  symmetries NAME
      Table of the symmetry groups: name, size, block, whole, members.
        icdctl --server 127.0.0.1:50051 symmetries m

  apply NAME (--perm FILE | --random SEED) [--groups g1,g2]
             [--expected-version V] [--skip-verify]
      Apply permutations (gathers: new index j holds old index p[j]), all or
      nothing, then check the logits against the probe reference.
      --perm FILE     JSON {"group": [indices...], ...}, applied in file order
      --random SEED   a random valid permutation of every group (or of
                      --groups, in that order), respecting block and whole;
                      the same seed draws the same permutations as the Python
                      client's random_permutations()
      --groups LIST   only these groups (comma-separated)
      --expected-version V   refuse (FAILED_PRECONDITION) unless the model is
                      at version V
      --skip-verify   no post-apply check
        icdctl --server 127.0.0.1:50051 apply m --random 7
        icdctl --server 127.0.0.1:50051 apply m --perm perm.json --expected-version 1
        icdctl --server 127.0.0.1:50051 apply m --random 3 --groups residual,layers.0.inner

  verify NAME
      Compare the current logits with the probe reference taken at load.
      Exits 0 whatever the verdict: read "ok" (or the OK/MISMATCH line).
        icdctl --server 127.0.0.1:50051 --json verify m

  evaluate NAME --ids 1,2,3 [--batch B] [--logits]
      Next-token mean NLL over the token ids (row-major [B, seq]); with
      --logits also the logits [B, seq, vocab].
        icdctl --server 127.0.0.1:50051 evaluate m --ids 5,17,3,9,2,41 --batch 2

  export NAME PATH
      Write the current weights as a new checkpoint directory (same layout and
      format) under the server's --export-root; PATH must not exist.
        icdctl --server 127.0.0.1:50051 export m m-permuted

Exit code: the gRPC status code (0 OK, 3 INVALID_ARGUMENT, 5 NOT_FOUND,
6 ALREADY_EXISTS, 7 PERMISSION_DENIED, 9 FAILED_PRECONDITION, 10 ABORTED,
14 UNAVAILABLE, 16 UNAUTHENTICATED, ...); a bad command line is
INVALID_ARGUMENT.

A session:
  icd-server --listen 127.0.0.1:50051 --model-root /models --export-root /exports &
  icdctl --server 127.0.0.1:50051 load m mamba2/hf
  icdctl --server 127.0.0.1:50051 symmetries m
  icdctl --server 127.0.0.1:50051 apply m --random 1
  icdctl --server 127.0.0.1:50051 verify m
  icdctl --server 127.0.0.1:50051 export m mamba2-permuted
)";

absl::Status Usage(const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(what, " (see icdctl --help)"));
}

// ---------------------------------------------------------------- the line

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

const std::set<std::string>& ValuedOptions() {
  static const auto* options = new std::set<std::string>{
      "--device", "--dtype", "--perm", "--random", "--groups",
      "--expected-version", "--ids", "--batch"};
  return *options;
}

absl::StatusOr<Line> ParseLine(int argc, char** argv) {
  Line line;
  if (const char* env = std::getenv("ICD_SERVER")) line.server = env;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::string value;
    bool has_value = false;
    if (const auto eq = arg.find('='); arg.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
      has_value = true;
    }
    auto next = [&]() -> absl::StatusOr<std::string> {
      if (has_value) return value;
      if (i + 1 >= argc) return Usage(absl::StrCat(arg, " needs a value"));
      return std::string(argv[++i]);
    };
    if (arg == "--help" || arg == "-h" || (line.command.empty() && arg == "help")) {
      line.help = true;
    } else if (arg == "--json") {
      line.json = true;
    } else if (arg == "--server" || arg == "--timeout" || arg == "--token-file" ||
               ValuedOptions().count(arg) > 0) {
      auto v = next();
      if (!v.ok()) return v.status();
      if (arg == "--server") {
        line.server = *v;
      } else if (arg == "--token-file") {
        line.token_file = *v;
      } else if (arg == "--timeout") {
        char* end = nullptr;
        line.timeout_s = std::strtod(v->c_str(), &end);
        if (v->empty() || *end != '\0' || !(line.timeout_s > 0)) {
          return Usage(absl::StrCat("--timeout: expected seconds > 0, got '", *v, "'"));
        }
      } else {
        line.options[arg] = *v;
      }
    } else if (arg == "--skip-verify" || arg == "--logits") {
      line.switches.insert(arg);
    } else if (arg.rfind("--", 0) == 0) {
      return Usage(absl::StrCat("unknown flag ", arg));
    } else if (line.command.empty()) {
      line.command = arg;
    } else {
      line.positional.push_back(arg);
    }
  }
  return line;
}

// Only `allowed` options and switches may appear; `n` positionals exactly.
absl::Status Expect(const Line& line, size_t n, const std::set<std::string>& allowed) {
  if (line.positional.size() != n) {
    return Usage(absl::StrCat(line.command, ": expected ", n, " argument",
                              n == 1 ? "" : "s", ", got ", line.positional.size()));
  }
  for (const auto& [k, v] : line.options) {
    if (allowed.count(k) == 0) return Usage(absl::StrCat(line.command, ": unexpected ", k));
  }
  for (const auto& k : line.switches) {
    if (allowed.count(k) == 0) return Usage(absl::StrCat(line.command, ": unexpected ", k));
  }
  return absl::OkStatus();
}

std::string Option(const Line& line, const std::string& name) {
  auto it = line.options.find(name);
  return it == line.options.end() ? "" : it->second;
}

absl::StatusOr<int64_t> ParseInt(const std::string& what, const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno != 0) {
    return Usage(absl::StrCat(what, ": expected an integer, got '", text, "'"));
  }
  return static_cast<int64_t>(v);
}

absl::StatusOr<uint64_t> ParseUint(const std::string& what, const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const unsigned long long v = std::strtoull(text.c_str(), &end, 10);
  if (text.empty() || text[0] == '-' || *end != '\0' || errno != 0) {
    return Usage(absl::StrCat(what, ": expected an unsigned integer, got '", text, "'"));
  }
  return static_cast<uint64_t>(v);
}

std::vector<std::string> SplitList(const std::string& text) {
  return absl::StrSplit(text, ',', absl::SkipWhitespace());
}

absl::StatusOr<std::string> ReadFile(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(what, ": cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// ---------------------------------------------------------------- output

absl::Status PrintJson(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.always_print_primitive_fields = true;
  options.preserve_proto_field_names = true;
  std::string out;
  const auto s = google::protobuf::util::MessageToJsonString(message, &out, options);
  if (!s.ok()) {
    return absl::InternalError(absl::StrCat("JSON encoding: ", std::string(s.message())));
  }
  std::cout << out << "\n";
  return absl::OkStatus();
}

std::string Fmt(double v, int precision = 4) {
  std::ostringstream os;
  os << std::setprecision(precision) << v;
  return os.str();
}

// Columns padded to their widest cell; `right` marks right-aligned columns.
void PrintTable(const std::vector<std::vector<std::string>>& rows,
                const std::vector<bool>& right) {
  std::vector<size_t> width(right.size(), 0);
  for (const auto& row : rows) {
    for (size_t c = 0; c < row.size() && c < width.size(); ++c) {
      width[c] = std::max(width[c], row[c].size());
    }
  }
  for (const auto& row : rows) {
    std::string line;
    for (size_t c = 0; c < row.size() && c < width.size(); ++c) {
      const std::string pad(width[c] - row[c].size(), ' ');
      if (c > 0) line += "  ";
      line += right[c] ? pad + row[c] : row[c] + (c + 1 < row.size() ? pad : "");
    }
    std::cout << line << "\n";
  }
}

void PrintModel(const v1::ModelInfo& m) {
  std::cout << m.name() << ": " << m.family() << " (" << m.layout() << " layout) on "
            << m.device() << ", " << m.dtype() << ", " << m.parameters()
            << " parameters, version " << m.version() << "\n";
  std::cout << "  path        " << m.path() << "\n";
  std::cout << "  fingerprint " << m.fingerprint() << "\n";
  std::map<std::string, int64_t> dims(m.dims().begin(), m.dims().end());
  std::cout << "  dims       ";
  for (const auto& [k, v] : dims) std::cout << " " << k << "=" << v;
  std::cout << "\n";
}

void PrintCorrectness(const v1::CorrectnessReport& c) {
  std::cout << (c.ok() ? "OK" : "MISMATCH") << ": rel_l2 " << Fmt(c.rel_l2(), 3)
            << (c.ok() ? " <= " : " > ") << "tolerance " << Fmt(c.tolerance(), 3)
            << ", max_abs " << Fmt(c.max_abs(), 3) << ", max_rel " << Fmt(c.max_rel(), 3)
            << ", top-1 agreement " << Fmt(100.0 * c.top1_agreement(), 5) << "% over "
            << c.tokens() << " probe tokens\n";
}

// ---------------------------------------------------------------- commands

struct Context {
  Client* client;
  bool json;
};

absl::Status Load(const Line& line, Context& ctx) {
  if (auto s = Expect(line, 2, {"--device", "--dtype"}); !s.ok()) return s;
  auto info = ctx.client->LoadModel(line.positional[0], line.positional[1],
                                    Option(line, "--device"), Option(line, "--dtype"));
  if (!info.ok()) return info.status();
  if (ctx.json) return PrintJson(*info);
  std::cout << "loaded ";
  PrintModel(*info);
  return absl::OkStatus();
}

absl::Status Models(const Line& line, Context& ctx) {
  if (auto s = Expect(line, 0, {}); !s.ok()) return s;
  auto models = ctx.client->ListModels();
  if (!models.ok()) return models.status();
  if (ctx.json) {
    v1::ListModelsResponse response;
    for (const auto& m : *models) *response.add_models() = m;
    return PrintJson(response);
  }
  if (models->empty()) {
    std::cout << "no models loaded\n";
    return absl::OkStatus();
  }
  std::vector<std::vector<std::string>> rows = {
      {"NAME", "FAMILY", "LAYOUT", "DEVICE", "DTYPE", "PARAMETERS", "VERSION", "PATH"}};
  for (const auto& m : *models) {
    rows.push_back({m.name(), m.family(), m.layout(), m.device(), m.dtype(),
                    std::to_string(m.parameters()), std::to_string(m.version()), m.path()});
  }
  PrintTable(rows, {false, false, false, false, false, true, true, false});
  return absl::OkStatus();
}

absl::Status Unload(const Line& line, Context& ctx) {
  if (auto s = Expect(line, 1, {}); !s.ok()) return s;
  if (auto s = ctx.client->UnloadModel(line.positional[0]); !s.ok()) return s;
  if (ctx.json) return PrintJson(v1::UnloadModelResponse());
  std::cout << "unloaded " << line.positional[0] << "\n";
  return absl::OkStatus();
}

absl::Status Symmetries(const Line& line, Context& ctx) {
  if (auto s = Expect(line, 1, {}); !s.ok()) return s;
  auto syms = ctx.client->GetSymmetries(line.positional[0]);
  if (!syms.ok()) return syms.status();
  if (ctx.json) return PrintJson(*syms);
  std::cout << syms->model() << " (version " << syms->version() << "): "
            << syms->groups_size() << " symmetry groups\n";
  std::vector<std::vector<std::string>> rows = {{"GROUP", "SIZE", "BLOCK", "WHOLE", "MEMBERS"}};
  for (const auto& g : syms->groups()) {
    rows.push_back({g.name(), std::to_string(g.size()), std::to_string(g.block()),
                    std::to_string(g.whole()), std::to_string(g.members_size())});
  }
  PrintTable(rows, {false, true, true, true, true});
  std::cout << "block b: each index stays in its block of b; whole w: each aligned run "
               "of w takes\nits indices from one run of w (whole runs move); 0: no "
               "constraint\n";
  return absl::OkStatus();
}

absl::Status Apply(const Line& line, Context& ctx) {
  if (auto s = Expect(line, 1, {"--perm", "--random", "--groups", "--expected-version",
                                "--skip-verify"});
      !s.ok()) {
    return s;
  }
  const std::string& model = line.positional[0];
  const std::string perm_file = Option(line, "--perm");
  const std::string seed_text = Option(line, "--random");
  if (perm_file.empty() == seed_text.empty()) {
    return Usage("apply: give exactly one of --perm FILE and --random SEED");
  }
  const std::vector<std::string> groups = SplitList(Option(line, "--groups"));
  v1::ApplyRequest request;
  request.set_model(model);
  request.set_skip_verify(line.switches.count("--skip-verify") > 0);
  if (const std::string v = Option(line, "--expected-version"); !v.empty()) {
    auto version = ParseUint("--expected-version", v);
    if (!version.ok()) return version.status();
    request.set_expected_version(*version);
  }
  absl::StatusOr<std::vector<v1::Permutation>> perms;
  if (!perm_file.empty()) {
    auto text = ReadFile(perm_file, "--perm");
    if (!text.ok()) return text.status();
    perms = ParsePermutationJson(*text, groups);
  } else {
    auto seed = ParseUint("--random", seed_text);
    if (!seed.ok()) return seed.status();
    auto syms = ctx.client->GetSymmetries(model);
    if (!syms.ok()) return syms.status();
    perms = RandomPermutations(*syms, groups, *seed);
  }
  if (!perms.ok()) return perms.status();
  for (auto& p : *perms) *request.add_permutations() = std::move(p);
  auto report = ctx.client->ApplyPermutation(request);
  if (!report.ok()) return report.status();
  if (ctx.json) return PrintJson(*report);
  std::cout << "applied " << report->groups_size() << " permutation"
            << (report->groups_size() == 1 ? "" : "s") << " to " << model << ": version "
            << report->version() << ", apply " << Fmt(report->apply_ms()) << " ms\n";
  if (report->verified()) {
    std::cout << "verified in " << Fmt(report->verify_ms()) << " ms: ";
    PrintCorrectness(report->correctness());
  } else {
    std::cout << "not verified (--skip-verify); run `icdctl verify " << model << "`\n";
  }
  return absl::OkStatus();
}

absl::Status Verify(const Line& line, Context& ctx) {
  if (auto s = Expect(line, 1, {}); !s.ok()) return s;
  auto report = ctx.client->Verify(line.positional[0]);
  if (!report.ok()) return report.status();
  if (ctx.json) return PrintJson(*report);
  PrintCorrectness(*report);
  return absl::OkStatus();
}

absl::Status Evaluate(const Line& line, Context& ctx) {
  if (auto s = Expect(line, 1, {"--ids", "--batch", "--logits"}); !s.ok()) return s;
  v1::EvaluateRequest request;
  request.set_model(line.positional[0]);
  const std::string ids = Option(line, "--ids");
  if (ids.empty()) return Usage("evaluate: --ids 1,2,3 is required");
  for (const auto& id : SplitList(ids)) {
    auto v = ParseInt("--ids", id);
    if (!v.ok()) return v.status();
    request.add_input_ids(*v);
  }
  if (const std::string b = Option(line, "--batch"); !b.empty()) {
    auto batch = ParseInt("--batch", b);
    if (!batch.ok()) return batch.status();
    request.set_batch(*batch);
  }
  request.set_return_logits(line.switches.count("--logits") > 0);
  auto response = ctx.client->Evaluate(request);
  if (!response.ok()) return response.status();
  if (ctx.json) return PrintJson(*response);
  std::cout << request.model() << ": mean NLL " << Fmt(response->mean_nll(), 6)
            << " nats (perplexity " << Fmt(std::exp(response->mean_nll()), 6) << ") over "
            << response->tokens() << " predicted tokens\n";
  if (request.return_logits() && response->shape_size() == 3) {
    const int64_t vocab = response->shape(2);
    std::cout << "logits [" << response->shape(0) << ", " << response->shape(1) << ", "
              << vocab << "], one row per (batch, position):\n";
    for (int64_t row = 0; vocab > 0 && row * vocab < response->logits_size(); ++row) {
      std::cout << row / response->shape(1) << " " << row % response->shape(1) << ":";
      for (int64_t v = 0; v < vocab; ++v) {
        std::cout << " " << Fmt(response->logits(static_cast<int>(row * vocab + v)), 6);
      }
      std::cout << "\n";
    }
  }
  return absl::OkStatus();
}

absl::Status Export(const Line& line, Context& ctx) {
  if (auto s = Expect(line, 2, {}); !s.ok()) return s;
  auto report = ctx.client->ExportModel(line.positional[0], line.positional[1]);
  if (!report.ok()) return report.status();
  if (ctx.json) return PrintJson(*report);
  std::cout << "exported " << line.positional[0] << " (version " << report->version()
            << ") to " << report->path() << ":\n";
  for (const auto& f : report->files()) std::cout << "  " << f << "\n";
  return absl::OkStatus();
}

absl::Status Run(int argc, char** argv) {
  auto line = ParseLine(argc, argv);
  if (!line.ok()) return line.status();
  if (line->help || argc == 1) {
    std::cout << kHelp;
    return absl::OkStatus();
  }
  using Command = absl::Status (*)(const Line&, Context&);
  static const std::map<std::string, Command> kCommands = {
      {"load", Load},     {"models", Models},     {"unload", Unload},
      {"symmetries", Symmetries}, {"apply", Apply}, {"verify", Verify},
      {"evaluate", Evaluate},     {"export", Export}};
  if (line->command.empty()) return Usage("no command");
  auto it = kCommands.find(line->command);
  if (it == kCommands.end()) return Usage(absl::StrCat("unknown command '", line->command, "'"));
  if (line->server.empty()) return Usage("--server HOST:PORT is required");

  ClientOptions options;
  if (line->timeout_s > 0) {
    options.deadline = std::chrono::milliseconds(static_cast<int64_t>(line->timeout_s * 1000));
    options.connect_timeout = options.deadline;
  }
  if (!line->token_file.empty()) {
    auto token = ReadFile(line->token_file, "--token-file");
    if (!token.ok()) return token.status();
    while (!token->empty() && (token->back() == '\n' || token->back() == '\r')) {
      token->pop_back();
    }
    options.token = *std::move(token);
  }
  auto client = Client::Connect(line->server, options);
  if (!client.ok()) return client.status();
  Context ctx{client->get(), line->json};
  return it->second(*line, ctx);
}

}  // namespace
}  // namespace icd::ctl

int main(int argc, char** argv) {
  const absl::Status status = icd::ctl::Run(argc, argv);
  if (status.ok()) return 0;
  std::cout.flush();
  std::cerr << "icdctl: " << absl::StatusCodeToString(status.code()) << ": "
            << status.message() << std::endl;
  return static_cast<int>(status.code());
}
