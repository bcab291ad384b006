// icdctl: the command-line client of icd.v1.PermutationService, one command
// per RPC, on top of icd::Client. Human-readable output by default, the
// response message as JSON with --json. The exit code is the gRPC status code
// (0: OK); errors go to stderr as "icdctl: CODE: message".
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <google/protobuf/util/json_util.h>
#include <nlohmann/json.hpp>

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
shows their symmetry groups, computes channel permutations from activation
traces, applies them, checks that the logits did not change, evaluates and
exports the permuted checkpoint.

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
  health [SERVICE]
      grpc.health.v1 check (needs no token): prints SERVING and exits 0, or
      prints the status and exits 1. For container health checks and probes.
        icdctl --server 127.0.0.1:50051 --timeout 3 health

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
             [--expected-version V] [--tolerance T] [--skip-verify]
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
      --tolerance T   the post-apply check's bound on the logits' rel L2
                      (default: the dtype's, float32 1e-5, bf16 2e-2)
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

  latency NAME [--compare M] [--mode prefill|decode] [--batch B] [--seq-len L]
          [--warmup W] [--iters N] [--eager]
      Time the model's forward on the server, on token ids the server draws
      (fixed seed). prefill (default): a sample is one forward over [B, L];
      decode: after an untimed prefill of L tokens, a sample is one
      single-token step of the whole batch. W samples run first and are
      discarded (default 3), N are timed (default 20; B 1, L 128). Reported:
      median, p10, p90 and the 95% interval of the median in ms (CUDA events
      on a GPU, a steady clock on the CPU). --compare M times M in the same
      rounds, alternating which runs first, and reports NAME / M per round:
      median and 95% interval. On a GPU a decode step is replayed as one CUDA
      graph (captured after the prefill); --eager launches its kernels one by
      one instead. The report names how samples ran and the models' versions.
        icdctl --server 127.0.0.1:50051 latency m --mode decode --batch 8 --seq-len 512
        icdctl --server 127.0.0.1:50051 latency m-permuted --compare m --iters 50

  capture --model M (--tokens FILE | --random-tokens N) [--batch B]
          [--holdout-tokens FILE | --random-holdout N] [--groups g1,g2]
          [--token-seed S] [solver flags] [--apply]
      The server runs M on the tokens, records the activations of each
      symmetry group (outputs unchanged), and solves a permutation per group,
      scored on the held-out tokens (default: the last fifth of the rows).
      --tokens FILE       token ids, row-major [B, seq]: text (integers
                          separated by spaces, commas or newlines) or .npy
                          (int64/int32, 1-D or 2-D; 2-D sets B)
      --random-tokens N   B sequences of N ids drawn uniformly from the
                          model's vocabulary (SplitMix64, seeded by
                          --token-seed, default 0)
      --batch B           sequences in --tokens / --random-tokens (default 1)
      --holdout-tokens FILE, --random-holdout N
                          the same for the tokens the result is scored on
                          (also B sequences)
      --groups LIST       only these groups (default: every group)
        icdctl --server 127.0.0.1:50051 capture --model m --random-tokens 256 --batch 4
        icdctl --server 127.0.0.1:50051 capture --model m --tokens ids.txt --batch 2 \
            --groups layers.0.inner,residual --seeds 5 --apply

  compute --model M --group G --traces FILE [--channels C]
          [--holdout-rows R] [solver flags] [--apply]
      A permutation of one group from activations recorded elsewhere,
      streamed to the server in chunks of about 1 MiB (any file size).
      --traces FILE       rows of activations, [rows, channels] with channels
                          = the group's size: .npy (float32 '<f4' or float64
                          '<f8', 2-D, C order: np.save(f, np.ascontiguousarray(a)))
                          or raw little-endian float32 with --channels C
      --holdout-rows R    the last R rows are held out for scoring (default:
                          min(1024, rows / 5))
        icdctl --server 127.0.0.1:50051 compute --model m --group layers.0.inner \
            --traces acts.npy --apply

  Solver flags (capture and compute; zero / unset takes the default):
      --objective O       coactivation (default): cluster channels that fire
                          together, lay clusters out contiguously;
                          nm_sparsity: keep the most saliency under N:M pruning
      --statistic S       correlation (default, |Pearson r|) | coactivation |
                          pmi: the weight of the edge between two channels
      --quantile Q        a channel is active above this quantile of its |a|
                          (default 0.9)
      --resolution G      modularity resolution (default 1.0; higher: smaller
                          clusters)
      --seed S            solver seed
      --seeds K           also solve with K-1 more seeds and report their mean
                          adjusted Rand index (stability of the clusters)
      --nm N:M            pattern for nm_sparsity (default 2:4)
      --preserve-block K  keep aligned blocks of K channels valid (whole blocks
                          move, or channels inside their block)
      --blocks 16,64      block sizes for the blocks-touched score
      --apply             apply the returned permutation(s) with
                          ApplyPermutation and print the verification (capture:
                          refused if the model changed since the capture began)

  Output of capture and compute, one row per group:
      Q, NULL Q    modularity of the solved clusters, and what the same solver
                   reaches on the rows with each channel shuffled on its own
      STRUCTURE    yes: Q beats the null by more than its noise; no: the
                   clusters are not evidence of structure (no gain claimed)
      ARI          agreement of the clusters across --seeds (- : not measured)
      BLOCKS@b     mean aligned blocks of b channels holding an active channel
                   per held-out row, identity -> solved order (lower is better)
      N:M          nm_sparsity: share of the gap between plain N:M pruning and
                   its upper bound that the permutation closes
      TOKENS       rows the statistics came from (+ held-out rows scored)

Exit code: the gRPC status code (0 OK, 3 INVALID_ARGUMENT, 5 NOT_FOUND,
6 ALREADY_EXISTS, 7 PERMISSION_DENIED, 9 FAILED_PRECONDITION, 10 ABORTED,
14 UNAVAILABLE, 16 UNAUTHENTICATED, ...); a bad command line is
INVALID_ARGUMENT.

A session:
  icd-server --listen 127.0.0.1:50051 --model-root /models --export-root /exports &
  icdctl --server 127.0.0.1:50051 load m mamba2/hf
  icdctl --server 127.0.0.1:50051 symmetries m
  icdctl --server 127.0.0.1:50051 apply m --random 1
  icdctl --server 127.0.0.1:50051 capture --model m --random-tokens 512 --batch 4 --apply
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
      "--expected-version", "--tolerance", "--ids", "--batch",
      // latency
      "--compare", "--mode", "--seq-len", "--warmup", "--iters",
      // capture / compute
      "--model", "--tokens", "--random-tokens", "--holdout-tokens",
      "--random-holdout", "--token-seed", "--group", "--traces", "--channels",
      "--holdout-rows",
      // solver
      "--objective", "--statistic", "--quantile", "--resolution", "--seed",
      "--seeds", "--nm", "--preserve-block", "--blocks"};
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
    } else if (arg == "--skip-verify" || arg == "--logits" || arg == "--apply" ||
               arg == "--eager") {
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

// Proto field names, defaults included (see kHelp on --json).
absl::StatusOr<std::string> JsonText(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.always_print_primitive_fields = true;
  options.preserve_proto_field_names = true;
  std::string out;
  const auto s = google::protobuf::util::MessageToJsonString(message, &out, options);
  if (!s.ok()) {
    return absl::InternalError(absl::StrCat("JSON encoding: ", std::string(s.message())));
  }
  return out;
}

absl::Status PrintJson(const google::protobuf::Message& message) {
  auto text = JsonText(message);
  if (!text.ok()) return text.status();
  std::cout << *text << "\n";
  return absl::OkStatus();
}

// A message as a JSON value, to combine several into one printed object.
absl::StatusOr<nlohmann::json> MessageJson(const google::protobuf::Message& message) {
  auto text = JsonText(message);
  if (!text.ok()) return text.status();
  return nlohmann::json::parse(*text);
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

void PrintApplyReport(const std::string& model, const v1::ApplyReport& report) {
  std::cout << "applied " << report.groups_size() << " permutation"
            << (report.groups_size() == 1 ? "" : "s") << " to " << model << ": version "
            << report.version() << ", apply " << Fmt(report.apply_ms()) << " ms\n";
  if (report.verified()) {
    std::cout << "verified in " << Fmt(report.verify_ms()) << " ms: ";
    PrintCorrectness(report.correctness());
  } else {
    std::cout << "not verified (--skip-verify); run `icdctl verify " << model << "`\n";
  }
}

// One row per group: the columns kHelp explains under "Output of capture and
// compute". Block sizes are the union over the results, in first-seen order.
void PrintPermutationResults(const std::vector<v1::PermutationResult>& results) {
  std::vector<int32_t> block_sizes;
  bool any_nm = false;
  for (const auto& r : results) {
    for (const auto& b : r.blocks()) {
      if (std::find(block_sizes.begin(), block_sizes.end(), b.block()) == block_sizes.end()) {
        block_sizes.push_back(b.block());
      }
    }
    any_nm = any_nm || r.nm_upper_bound() > 0;
  }
  std::vector<std::string> header = {"GROUP", "Q", "NULL Q", "STRUCTURE", "CLUSTERS", "ARI"};
  for (int32_t b : block_sizes) header.push_back(absl::StrCat("BLOCKS@", b));
  if (any_nm) header.push_back("N:M");
  for (const char* h : {"TOKENS", "MS"}) header.push_back(h);
  std::vector<std::vector<std::string>> rows = {header};
  for (const auto& r : results) {
    std::vector<std::string> row = {
        r.permutation().group(), Fmt(r.modularity(), 3), Fmt(r.modularity_null(), 3),
        r.structure_found() ? "yes" : "no", std::to_string(r.clusters()),
        r.ari() != 0 ? Fmt(r.ari(), 3) : "-"};
    for (int32_t size : block_sizes) {
      std::string cell = "-";
      for (const auto& b : r.blocks()) {
        if (b.block() == size) cell = Fmt(b.identity(), 3) + " -> " + Fmt(b.solved(), 3);
      }
      row.push_back(cell);
    }
    if (any_nm) {
      row.push_back(r.nm_upper_bound() > 0 ? Fmt(100.0 * r.nm_efficacy(), 3) + "%" : "-");
    }
    row.push_back(absl::StrCat(r.tokens(), " + ", r.holdout_tokens()));
    row.push_back(Fmt(r.solve_ms(), 4));
    rows.push_back(std::move(row));
  }
  std::vector<bool> right(header.size(), true);
  right[0] = false;
  PrintTable(rows, right);
  std::cout << "Q vs NULL Q: modularity of the clusters found and of shuffled rows; "
               "STRUCTURE no: no gain claimed.\nBLOCKS@b: blocks touched per held-out "
               "row, identity -> solved (lower is better). TOKENS: rows + held-out rows.\n";
}


// ---------------------------------------------------------------- traces

absl::StatusOr<double> ParseDouble(const std::string& what, const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || errno != 0 || !std::isfinite(v)) {
    return Usage(absl::StrCat(what, ": expected a number, got '", text, "'"));
  }
  return v;
}

absl::StatusOr<int32_t> ParseInt32(const std::string& what, const std::string& text) {
  auto v = ParseInt(what, text);
  if (!v.ok()) return v.status();
  if (*v < 0 || *v > std::numeric_limits<int32_t>::max()) {
    return Usage(absl::StrCat(what, ": expected 0..", std::numeric_limits<int32_t>::max(),
                              ", got ", *v));
  }
  return static_cast<int32_t>(*v);
}

// The solver flags of capture and compute; unset ones stay zero (the
// server's defaults).
absl::StatusOr<v1::SolverOptions> ParseSolver(const Line& line) {
  v1::SolverOptions out;
  out.set_objective(Option(line, "--objective"));
  out.set_statistic(Option(line, "--statistic"));
  if (const std::string v = Option(line, "--quantile"); !v.empty()) {
    auto q = ParseDouble("--quantile", v);
    if (!q.ok()) return q.status();
    out.set_activation_quantile(*q);
  }
  if (const std::string v = Option(line, "--resolution"); !v.empty()) {
    auto r = ParseDouble("--resolution", v);
    if (!r.ok()) return r.status();
    out.set_resolution(*r);
  }
  if (const std::string v = Option(line, "--seed"); !v.empty()) {
    auto seed = ParseUint("--seed", v);
    if (!seed.ok()) return seed.status();
    out.set_seed(*seed);
  }
  if (const std::string v = Option(line, "--seeds"); !v.empty()) {
    auto k = ParseInt32("--seeds", v);
    if (!k.ok()) return k.status();
    out.set_seeds(*k);
  }
  if (const std::string v = Option(line, "--nm"); !v.empty()) {
    const std::vector<std::string> parts = absl::StrSplit(v, ':');
    if (parts.size() != 2) return Usage(absl::StrCat("--nm: expected N:M, e.g. 2:4, got '", v, "'"));
    auto n = ParseInt32("--nm N", parts[0]);
    if (!n.ok()) return n.status();
    auto m = ParseInt32("--nm M", parts[1]);
    if (!m.ok()) return m.status();
    out.set_nm_n(*n);
    out.set_nm_m(*m);
  }
  if (const std::string v = Option(line, "--preserve-block"); !v.empty()) {
    auto k = ParseInt32("--preserve-block", v);
    if (!k.ok()) return k.status();
    out.set_preserve_block(*k);
  }
  for (const auto& b : SplitList(Option(line, "--blocks"))) {
    auto size = ParseInt32("--blocks", b);
    if (!size.ok()) return size.status();
    out.add_block_sizes(*size);
  }
  return out;
}

const std::set<std::string>& SolverFlags() {
  static const auto* flags = new std::set<std::string>{
      "--objective", "--statistic", "--quantile", "--resolution", "--seed",
      "--seeds", "--nm", "--preserve-block", "--blocks", "--apply"};
  return *flags;
}

std::set<std::string> With(std::set<std::string> a, const std::set<std::string>& b) {
  a.insert(b.begin(), b.end());
  return a;
}

// Little-endian bytes of one value, whatever the host's byte order.
template <typename T, typename Bits>
T LoadLe(const char* p) {
  Bits bits = 0;
  for (std::size_t b = 0; b < sizeof(Bits); ++b) {
    bits |= static_cast<Bits>(static_cast<unsigned char>(p[b])) << (8 * b);
  }
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// The header of a .npy file (NumPy format 1.0 to 3.0): the element type
// ("descr"), the order and the shape; `data_offset` is where the data start.
struct NpyHeader {
  std::string descr;
  bool fortran_order = false;
  std::vector<int64_t> shape;
  int64_t data_offset = 0;
};

constexpr char kNpyMagic[] = "\x93NUMPY";

bool IsNpy(std::istream& in) {
  char magic[6] = {};
  in.seekg(0);
  in.read(magic, 6);
  const bool yes = in.gcount() == 6 && std::memcmp(magic, kNpyMagic, 6) == 0;
  in.clear();
  in.seekg(0);
  return yes;
}

// Parses the Python-literal dict of a .npy header, e.g.
//   {'descr': '<f4', 'fortran_order': False, 'shape': (1000, 128), }
absl::StatusOr<NpyHeader> ReadNpyHeader(std::istream& in, const std::string& path) {
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a readable .npy file: ", why));
  };
  char prefix[8] = {};
  in.seekg(0);
  in.read(prefix, 8);
  if (in.gcount() != 8 || std::memcmp(prefix, kNpyMagic, 6) != 0) return bad("no \\x93NUMPY magic");
  const int major = static_cast<unsigned char>(prefix[6]);
  if (major < 1 || major > 3) return bad(absl::StrCat("format version ", major, " is unknown"));
  const int len_bytes = major == 1 ? 2 : 4;
  char len_raw[4] = {};
  in.read(len_raw, len_bytes);
  if (in.gcount() != len_bytes) return bad("truncated header");
  const int64_t header_len = major == 1 ? LoadLe<uint16_t, uint16_t>(len_raw)
                                        : LoadLe<uint32_t, uint32_t>(len_raw);
  std::string dict(static_cast<std::size_t>(header_len), '\0');
  in.read(dict.data(), header_len);
  if (in.gcount() != header_len) return bad("truncated header");
  NpyHeader out;
  out.data_offset = 8 + len_bytes + header_len;

  // The value after 'key': (up to the next top-level comma or brace).
  auto value_of = [&](const std::string& key) -> absl::StatusOr<std::string> {
    std::size_t at = dict.find("'" + key + "'");
    if (at == std::string::npos) at = dict.find("\"" + key + "\"");
    if (at == std::string::npos) return bad(absl::StrCat("no '", key, "' in the header"));
    std::size_t pos = dict.find(':', at + key.size() + 2);
    if (pos == std::string::npos) return bad(absl::StrCat("no value for '", key, "'"));
    ++pos;
    while (pos < dict.size() && dict[pos] == ' ') ++pos;
    std::size_t end = pos;
    if (pos < dict.size() && dict[pos] == '(') {
      end = dict.find(')', pos);
      if (end == std::string::npos) return bad("unclosed shape tuple");
      return dict.substr(pos + 1, end - pos - 1);
    }
    if (pos < dict.size() && (dict[pos] == '\'' || dict[pos] == '"')) {
      end = dict.find(dict[pos], pos + 1);
      if (end == std::string::npos) return bad(absl::StrCat("unclosed string for '", key, "'"));
      return dict.substr(pos + 1, end - pos - 1);
    }
    while (end < dict.size() && dict[end] != ',' && dict[end] != '}') ++end;
    std::string v = dict.substr(pos, end - pos);
    while (!v.empty() && v.back() == ' ') v.pop_back();
    return v;
  };
  auto descr = value_of("descr");
  if (!descr.ok()) return descr.status();
  out.descr = *descr;
  auto fortran = value_of("fortran_order");
  if (!fortran.ok()) return fortran.status();
  if (*fortran != "True" && *fortran != "False") {
    return bad(absl::StrCat("fortran_order is '", *fortran, "'"));
  }
  out.fortran_order = *fortran == "True";
  auto shape = value_of("shape");
  if (!shape.ok()) return shape.status();
  for (const auto& dim : absl::StrSplit(*shape, ',', absl::SkipWhitespace())) {
    std::string d(dim);
    d.erase(std::remove(d.begin(), d.end(), ' '), d.end());
    auto v = ParseInt("shape", d);
    if (!v.ok() || *v < 0) return bad(absl::StrCat("shape (", *shape, ")"));
    out.shape.push_back(*v);
  }
  return out;
}

int64_t FileSize(std::istream& in) {
  in.clear();
  in.seekg(0, std::ios::end);
  const auto size = static_cast<int64_t>(in.tellg());
  in.seekg(0);
  return size;
}

// A trace file opened for streaming: [rows, channels] of float32 or float64,
// read a chunk of rows at a time (never all at once).
class TraceFile {
 public:
  static absl::StatusOr<std::unique_ptr<TraceFile>> Open(const std::string& path,
                                                         int64_t channels_flag) {
    auto file = std::unique_ptr<TraceFile>(new TraceFile());
    file->in_.open(path, std::ios::binary);
    if (!file->in_) return absl::NotFoundError(absl::StrCat("--traces: cannot read ", path));
    const int64_t size = FileSize(file->in_);
    if (IsNpy(file->in_)) {
      auto header = ReadNpyHeader(file->in_, path);
      if (!header.ok()) return header.status();
      if (header->descr == "<f4") {
        file->item_bytes_ = 4;
      } else if (header->descr == "<f8") {
        file->item_bytes_ = 8;
      } else {
        return absl::InvalidArgumentError(absl::StrCat(
            path, ": dtype '", header->descr, "' is not supported; traces are little-endian "
            "float32 ('<f4') or float64 ('<f8'): save a.astype(np.float32)"));
      }
      if (header->fortran_order) {
        return absl::InvalidArgumentError(absl::StrCat(
            path, ": Fortran-ordered array; save np.ascontiguousarray(a) (C order, one row "
            "per token)"));
      }
      if (header->shape.size() != 2) {
        return absl::InvalidArgumentError(absl::StrCat(
            path, ": shape has ", header->shape.size(), " dimensions; traces are 2-D "
            "[rows, channels] (reshape to (-1, channels))"));
      }
      file->rows_ = header->shape[0];
      file->channels_ = header->shape[1];
      if (channels_flag > 0 && channels_flag != file->channels_) {
        return absl::InvalidArgumentError(absl::StrCat(
            path, ": shape (", file->rows_, ", ", file->channels_, ") but --channels ",
            channels_flag));
      }
      const int64_t want = header->data_offset + file->rows_ * file->channels_ * file->item_bytes_;
      if (size != want) {
        return absl::InvalidArgumentError(absl::StrCat(
            path, ": ", size, " bytes, but the header's shape and dtype need ", want));
      }
      file->in_.seekg(header->data_offset);
    } else {
      if (channels_flag <= 0) {
        return Usage(absl::StrCat("--traces ", path, " is not a .npy file: give --channels C "
                                  "to read it as raw little-endian float32 [rows, C]"));
      }
      file->channels_ = channels_flag;
      if (size % (4 * channels_flag) != 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            path, ": ", size, " bytes are not whole rows of ", channels_flag,
            " float32 channels (", 4 * channels_flag, " bytes each)"));
      }
      file->rows_ = size / (4 * channels_flag);
    }
    if (file->rows_ == 0 || file->channels_ == 0) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": no trace rows"));
    }
    return file;
  }

  int64_t rows() const { return rows_; }
  int64_t channels() const { return channels_; }
  const char* dtype() const { return item_bytes_ == 4 ? "float32" : "float64"; }

  // TraceRowSource: the next rows, at most max_rows.
  absl::StatusOr<int64_t> Next(int64_t max_rows, std::vector<float>& out) {
    const int64_t n = std::min(max_rows, rows_ - read_);
    if (n <= 0) return 0;
    buffer_.resize(static_cast<std::size_t>(n * channels_ * item_bytes_));
    in_.read(buffer_.data(), static_cast<std::streamsize>(buffer_.size()));
    if (in_.gcount() != static_cast<std::streamsize>(buffer_.size())) {
      return absl::DataLossError(absl::StrCat("--traces: short read at row ", read_));
    }
    const std::size_t values = static_cast<std::size_t>(n * channels_);
    out.resize(values);
    for (std::size_t i = 0; i < values; ++i) {
      const char* p = buffer_.data() + i * static_cast<std::size_t>(item_bytes_);
      out[i] = item_bytes_ == 4 ? LoadLe<float, uint32_t>(p)
                                : static_cast<float>(LoadLe<double, uint64_t>(p));
    }
    read_ += n;
    return n;
  }

 private:
  TraceFile() = default;
  std::ifstream in_;
  int64_t rows_ = 0, channels_ = 0, read_ = 0;
  int item_bytes_ = 4;
  std::vector<char> buffer_;
};

// Token ids from a file: text integers, or .npy int64/int32 (1-D or 2-D).
// `batch` is set from a 2-D .npy (0 otherwise).
struct TokenIds {
  std::vector<int64_t> ids;
  int64_t batch = 0;
};

absl::StatusOr<TokenIds> ReadTokenFile(const std::string& flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(flag, ": cannot read ", path));
  TokenIds out;
  if (IsNpy(in)) {
    auto header = ReadNpyHeader(in, path);
    if (!header.ok()) return header.status();
    int item = 0;
    if (header->descr == "<i8") item = 8;
    if (header->descr == "<i4") item = 4;
    if (item == 0 || header->fortran_order || header->shape.empty() || header->shape.size() > 2) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": token ids are a C-order 1-D or 2-D int64 ('<i8') or int32 ('<i4') array; "
          "got descr '", header->descr, "', ", header->shape.size(), " dimensions"));
    }
    int64_t count = 1;
    for (int64_t d : header->shape) count *= d;
    std::string raw(static_cast<std::size_t>(count * item), '\0');
    in.seekg(header->data_offset);
    in.read(raw.data(), static_cast<std::streamsize>(raw.size()));
    if (in.gcount() != static_cast<std::streamsize>(raw.size())) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": shorter than its shape"));
    }
    for (int64_t i = 0; i < count; ++i) {
      const char* p = raw.data() + i * item;
      out.ids.push_back(item == 8 ? LoadLe<int64_t, uint64_t>(p)
                                  : static_cast<int64_t>(LoadLe<int32_t, uint32_t>(p)));
    }
    if (header->shape.size() == 2) out.batch = header->shape[0];
    return out;
  }
  std::stringstream text;
  text << in.rdbuf();
  std::string all = text.str();
  std::replace(all.begin(), all.end(), ',', ' ');
  for (const auto& word : absl::StrSplit(all, absl::ByAnyChar(" \t\r\n"), absl::SkipEmpty())) {
    auto v = ParseInt(absl::StrCat(flag, " ", path), std::string(word));
    if (!v.ok()) return v.status();
    out.ids.push_back(*v);
  }
  return out;
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

absl::Status Health(const Line& line, Context& ctx) {
  if (line.positional.size() > 1) return Usage("health takes at most one SERVICE");
  auto serving = ctx.client->Health(line.positional.empty() ? "" : line.positional[0]);
  if (!serving.ok()) return serving.status();
  if (!*serving) return absl::UnavailableError("NOT_SERVING");
  std::cout << "SERVING\n";
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
                                "--tolerance", "--skip-verify"});
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
  if (const std::string t = Option(line, "--tolerance"); !t.empty()) {
    auto tolerance = ParseDouble("--tolerance", t);
    if (!tolerance.ok()) return tolerance.status();
    if (!(*tolerance > 0)) return Usage("--tolerance: expected a bound > 0");
    request.set_tolerance(*tolerance);
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
  PrintApplyReport(model, *report);
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

// ---------------------------------------------------------------- latency

absl::Status Latency(const Line& line, Context& ctx) {
  if (auto s = Expect(line, 1, {"--compare", "--mode", "--batch", "--seq-len", "--warmup",
                                "--iters", "--eager"});
      !s.ok()) {
    return s;
  }
  v1::LatencyRequest request;
  request.set_model(line.positional[0]);
  request.set_compare_model(Option(line, "--compare"));
  const std::string mode = Option(line, "--mode");
  request.set_mode(mode.empty() ? "prefill" : mode);
  // The same defaults as the Python client's measure_latency.
  auto count = [&line](const std::string& flag, int64_t fallback) -> absl::StatusOr<int64_t> {
    const std::string text = Option(line, flag);
    if (text.empty()) return fallback;
    return ParseInt(flag, text);
  };
  auto batch = count("--batch", 1);
  auto seq_len = count("--seq-len", 128);
  auto warmup = count("--warmup", 3);
  auto iters = count("--iters", 20);
  for (const auto* v : {&batch, &seq_len, &warmup, &iters}) {
    if (!v->ok()) return v->status();
  }
  request.set_batch(*batch);
  request.set_seq_len(*seq_len);
  request.set_warmup(*warmup);
  request.set_iters(*iters);
  request.set_eager(line.switches.count("--eager") > 0);
  auto report = ctx.client->MeasureLatency(request);
  if (!report.ok()) return report.status();
  if (ctx.json) return PrintJson(*report);

  if (request.mode() == "decode") {
    std::cout << "decode: one token for each of " << *batch << " sequences per sample, after a "
              << "prefill of " << *seq_len << " tokens";
  } else {
    std::cout << "prefill: one forward over " << *batch << " x " << *seq_len
              << " tokens per sample";
  }
  std::cout << "; " << *warmup << " warm-up samples, then " << report->samples()
            << " timed on " << report->device() << " (" << report->method() << ", "
            << report->execution() << ")\n";
  std::vector<std::vector<std::string>> rows = {
      {"MODEL", "VERSION", "MEDIAN MS", "95% CI", "P10", "P90", "SAMPLES"}};
  auto add_row = [&rows](const std::string& name, const v1::LatencyReport& r) {
    rows.push_back({name, std::to_string(r.version()), Fmt(r.median_ms()),
                    Fmt(r.ci95_low_ms()) + " - " + Fmt(r.ci95_high_ms()), Fmt(r.p10_ms()),
                    Fmt(r.p90_ms()), std::to_string(r.samples())});
  };
  add_row(request.model(), *report);
  if (report->has_compare()) add_row(request.compare_model(), report->compare());
  PrintTable(rows, {false, true, true, true, true, true, true});
  if (report->has_compare()) {
    std::cout << request.model() << " / " << request.compare_model() << ": "
              << Fmt(report->ratio()) << " (95% CI " << Fmt(report->ratio_ci95_low()) << " - "
              << Fmt(report->ratio_ci95_high()) << "), median over " << report->samples()
              << " interleaved rounds\n";
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------- capture, compute

absl::StatusOr<v1::ModelInfo> FindModel(Client& client, const std::string& model) {
  auto models = client.ListModels();
  if (!models.ok()) return models.status();
  for (const auto& m : *models) {
    if (m.name() == model) return m;
  }
  return absl::NotFoundError(absl::StrCat("model '", model, "' is not loaded"));
}

// `--model M`, or the one positional argument.
absl::StatusOr<std::string> ModelArgument(const Line& line) {
  const std::string flag = Option(line, "--model");
  if (!flag.empty() && line.positional.empty()) return flag;
  if (flag.empty() && line.positional.size() == 1) return line.positional[0];
  return Usage(absl::StrCat(line.command, ": name the model once, with --model M"));
}

// Applies `results`' permutations in one request, in order.
absl::StatusOr<v1::ApplyReport> ApplyResults(Context& ctx, const std::string& model,
                                             const std::vector<v1::PermutationResult>& results,
                                             uint64_t expected_version) {
  std::vector<v1::Permutation> perms;
  for (const auto& r : results) perms.push_back(r.permutation());
  return ctx.client->ApplyPermutation(model, perms, expected_version);
}

absl::Status Capture(const Line& line, Context& ctx) {
  const std::set<std::string> allowed = With(
      {"--model", "--tokens", "--random-tokens", "--batch", "--holdout-tokens",
       "--random-holdout", "--groups", "--token-seed"},
      SolverFlags());
  if (auto s = Expect(line, line.positional.size() == 1 ? 1 : 0, allowed); !s.ok()) return s;
  auto model = ModelArgument(line);
  if (!model.ok()) return model.status();
  v1::CaptureRequest request;
  request.set_model(*model);
  auto solver = ParseSolver(line);
  if (!solver.ok()) return solver.status();
  *request.mutable_solver() = *solver;
  for (const auto& g : SplitList(Option(line, "--groups"))) request.add_groups(g);

  int64_t batch = 0;
  if (const std::string b = Option(line, "--batch"); !b.empty()) {
    auto v = ParseInt("--batch", b);
    if (!v.ok()) return v.status();
    if (*v <= 0) return Usage("--batch: expected B > 0");
    batch = *v;
  }
  // The model's version before the capture: --apply refuses if it moved.
  auto info = FindModel(*ctx.client, *model);
  if (!info.ok()) return info.status();
  uint64_t token_seed = 0;
  if (const std::string v = Option(line, "--token-seed"); !v.empty()) {
    auto seed = ParseUint("--token-seed", v);
    if (!seed.ok()) return seed.status();
    token_seed = *seed;
  }
  SplitMix64 rng(token_seed);
  // Fills `ids` from FILE or draws B x N random ids; checks [B, seq].
  auto tokens = [&](const char* file_flag, const char* random_flag,
                    google::protobuf::RepeatedField<int64_t>* ids,
                    bool required) -> absl::Status {
    const std::string file = Option(line, file_flag);
    const std::string random = Option(line, random_flag);
    if (!file.empty() && !random.empty()) {
      return Usage(absl::StrCat("capture: give one of ", file_flag, " and ", random_flag));
    }
    if (!file.empty()) {
      auto read = ReadTokenFile(file_flag, file);
      if (!read.ok()) return read.status();
      if (read->batch > 0) {
        if (batch > 0 && batch != read->batch) {
          return Usage(absl::StrCat(file_flag, " ", file, " holds ", read->batch,
                                    " sequences but --batch is ", batch));
        }
        batch = read->batch;
      }
      const int64_t b = batch > 0 ? batch : 1;
      if (read->ids.empty() || static_cast<int64_t>(read->ids.size()) % b != 0) {
        return Usage(absl::StrCat(file_flag, " ", file, ": ", read->ids.size(),
                                  " ids are not ", b, " sequences of equal length"));
      }
      ids->Add(read->ids.begin(), read->ids.end());
      return absl::OkStatus();
    }
    if (!random.empty()) {
      auto n = ParseInt(random_flag, random);
      if (!n.ok()) return n.status();
      if (*n <= 0) return Usage(absl::StrCat(random_flag, ": expected N > 0 tokens per sequence"));
      const auto vocab = info->dims().find("vocab_size");
      if (vocab == info->dims().end() || vocab->second <= 0) {
        return absl::FailedPreconditionError(absl::StrCat(
            "model '", *model, "' reports no vocab_size; give token ids with ", file_flag));
      }
      const int64_t count = (batch > 0 ? batch : 1) * *n;
      for (int64_t i = 0; i < count; ++i) {
        ids->Add(static_cast<int64_t>(rng.Next() % static_cast<uint64_t>(vocab->second)));
      }
      return absl::OkStatus();
    }
    if (required) return Usage("capture: give --tokens FILE or --random-tokens N");
    return absl::OkStatus();
  };
  if (auto s = tokens("--tokens", "--random-tokens", request.mutable_input_ids(), true); !s.ok()) {
    return s;
  }
  if (auto s = tokens("--holdout-tokens", "--random-holdout", request.mutable_holdout_ids(), false);
      !s.ok()) {
    return s;
  }
  request.set_batch(batch > 0 ? batch : 1);

  auto set = ctx.client->CapturePermutation(request);
  if (!set.ok()) return set.status();
  const std::vector<v1::PermutationResult> results(set->results().begin(), set->results().end());
  const bool apply = line.switches.count("--apply") > 0;
  absl::StatusOr<v1::ApplyReport> report = absl::UnknownError("not applied");
  if (apply) report = ApplyResults(ctx, *model, results, info->version());
  if (ctx.json) {
    auto json = MessageJson(*set);
    if (!json.ok()) return json.status();
    if (apply && report.ok()) {
      auto applied = MessageJson(*report);
      if (!applied.ok()) return applied.status();
      (*json)["apply"] = *applied;
    }
    std::cout << json->dump() << "\n";
  } else {
    std::cout << *model << ": captured " << request.input_ids_size() << " tokens ("
              << request.batch() << " x " << request.input_ids_size() / request.batch()
              << "), " << results.size() << " group" << (results.size() == 1 ? "" : "s")
              << " solved\n";
    PrintPermutationResults(results);
    if (apply && report.ok()) PrintApplyReport(*model, *report);
  }
  return apply ? report.status() : absl::OkStatus();
}

absl::Status Compute(const Line& line, Context& ctx) {
  const std::set<std::string> allowed = With(
      {"--model", "--group", "--traces", "--channels", "--holdout-rows"}, SolverFlags());
  if (auto s = Expect(line, line.positional.size() == 1 ? 1 : 0, allowed); !s.ok()) return s;
  auto model = ModelArgument(line);
  if (!model.ok()) return model.status();
  const std::string group = Option(line, "--group");
  if (group.empty()) return Usage("compute: --group G is required (see `icdctl symmetries`)");
  const std::string path = Option(line, "--traces");
  if (path.empty()) return Usage("compute: --traces FILE is required");
  int64_t channels = 0;
  if (const std::string c = Option(line, "--channels"); !c.empty()) {
    auto v = ParseInt("--channels", c);
    if (!v.ok()) return v.status();
    if (*v <= 0) return Usage("--channels: expected C > 0");
    channels = *v;
  }
  v1::TraceHeader header;
  header.set_model(*model);
  header.set_group(group);
  if (const std::string r = Option(line, "--holdout-rows"); !r.empty()) {
    auto v = ParseInt("--holdout-rows", r);
    if (!v.ok()) return v.status();
    if (*v < 0) return Usage("--holdout-rows: expected R >= 0");
    header.set_holdout_rows(*v);
  }
  auto solver = ParseSolver(line);
  if (!solver.ok()) return solver.status();
  *header.mutable_solver() = *solver;
  auto file = TraceFile::Open(path, channels);
  if (!file.ok()) return file.status();
  header.set_channels((*file)->channels());

  TraceFile& source = **file;
  auto result = ctx.client->ComputePermutation(
      header, [&source](int64_t max_rows, std::vector<float>& rows) {
        return source.Next(max_rows, rows);
      });
  if (!result.ok()) return result.status();
  const bool apply = line.switches.count("--apply") > 0;
  absl::StatusOr<v1::ApplyReport> report = absl::UnknownError("not applied");
  if (apply) report = ApplyResults(ctx, *model, {*result}, 0);
  if (ctx.json) {
    auto json = MessageJson(*result);
    if (!json.ok()) return json.status();
    if (apply) {
      json = nlohmann::json{{"result", *json}};
      if (report.ok()) {
        auto applied = MessageJson(*report);
        if (!applied.ok()) return applied.status();
        (*json)["apply"] = *applied;
      }
    }
    std::cout << json->dump() << "\n";
  } else {
    std::cout << *model << ": " << source.rows() << " rows x " << source.channels() << " "
              << source.dtype() << " channels from " << path << "\n";
    PrintPermutationResults({*result});
    if (apply && report.ok()) PrintApplyReport(*model, *report);
  }
  return apply ? report.status() : absl::OkStatus();
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
      {"health", Health}, {"load", Load},     {"models", Models},     {"unload", Unload},
      {"symmetries", Symmetries}, {"apply", Apply}, {"verify", Verify},
      {"evaluate", Evaluate},     {"export", Export},       {"capture", Capture},
      {"compute", Compute},       {"latency", Latency}};
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
