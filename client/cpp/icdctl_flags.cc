#include "icdctl_flags.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <limits>

#include "absl/strings/str_cat.h"
#include "icd/command_line.h"
#include "icd/status_macros.h"
#include "absl/strings/str_split.h"

namespace icd::ctl {

const char kHelp[] = R"(icdctl: command-line client of the icd permutation service.

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

On a terminal, load, capture, compute and latency draw a progress line on
stderr while the server works (GetProgress); none under --json or into a pipe.

Commands:
  health [SERVICE]
      grpc.health.v1 check (needs no token): prints SERVING and exits 0, or
      prints the status and exits 1. For container health checks and probes.
        icdctl --server 127.0.0.1:50051 --timeout 3 health

  load NAME PATH [--device D | --placement P] [--dtype T]
      Load a checkpoint directory (under the server's --model-root; relative
      paths are taken from the first root) as NAME. D: cpu | cuda | cuda:N,
      T: float32 | bfloat16 | float16 | float64 (default: the checkpoint's).
      P spreads the layers over several devices: auto (balanced by bytes
      over every GPU) or ranges naming every layer once, in order.
        icdctl --server 127.0.0.1:50051 load m mamba1-small/hf --dtype float32
        icdctl --server 127.0.0.1:50051 load big mamba-2.8b --placement cuda:0=0-31,cuda:1=32-63

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
          [--warmup W] [--iters N] [--eager] [--counters R]
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
      --counters R (CUDA): one more sample of each model (a decode step
      launched eagerly) run R times under the GPU's hardware counters (CUPTI):
      DRAM bytes read and written, L2 sectors and hit rate, per kernel and in
      all, with each repeat's totals (how repeatable they are).
        icdctl --server 127.0.0.1:50051 latency m --mode decode --batch 8 --seq-len 512
        icdctl --server 127.0.0.1:50051 latency m-permuted --compare m --iters 50
        icdctl --server 127.0.0.1:50051 latency m-permuted --compare m --counters 3

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

namespace {

const std::set<std::string>& ValuedOptions() {
  static const auto* options = new std::set<std::string>{
      "--device", "--dtype", "--placement", "--perm", "--random", "--groups",
      "--expected-version", "--tolerance", "--ids", "--batch",
      // latency
      "--compare", "--mode", "--seq-len", "--warmup", "--iters", "--counters",
      // capture / compute
      "--model", "--tokens", "--random-tokens", "--holdout-tokens",
      "--random-holdout", "--token-seed", "--group", "--traces", "--channels",
      "--holdout-rows",
      // solver
      "--objective", "--statistic", "--quantile", "--resolution", "--seed",
      "--seeds", "--nm", "--preserve-block", "--blocks"};
  return *options;
}

}  // namespace

absl::StatusOr<Line> ParseLine(int argc, char** argv) {
  Line line;
  if (const char* env = std::getenv("ICD_SERVER")) line.server = env;
  CommandLine args(argc, argv);
  while (args.Next()) {
    const std::string arg = args.name();
    auto next = [&]() -> absl::StatusOr<std::string> {
      auto value = args.Value();
      if (!value.ok()) return Usage(std::string(value.status().message()));
      return value;
    };
    if (arg == "--help" || arg == "-h" || (line.command.empty() && arg == "help")) {
      line.help = true;
    } else if (arg == "--json") {
      line.json = true;
    } else if (arg == "--server" || arg == "--timeout" || arg == "--token-file" ||
               ValuedOptions().count(arg) > 0) {
      ICD_ASSIGN_OR_RETURN(auto v, next());
      if (arg == "--server") {
        line.server = v;
      } else if (arg == "--token-file") {
        line.token_file = v;
      } else if (arg == "--timeout") {
        char* end = nullptr;
        line.timeout_s = std::strtod(v.c_str(), &end);
        if (v.empty() || *end != '\0' || !(line.timeout_s > 0)) {
          return Usage(absl::StrCat("--timeout: expected seconds > 0, got '", v, "'"));
        }
      } else {
        line.options[arg] = v;
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
  ICD_ASSIGN_OR_RETURN(auto v, ParseInt(what, text));
  if (v < 0 || v > std::numeric_limits<int32_t>::max()) {
    return Usage(absl::StrCat(what, ": expected 0..", std::numeric_limits<int32_t>::max(),
                              ", got ", v));
  }
  return static_cast<int32_t>(v);
}

absl::StatusOr<v1::SolverOptions> ParseSolver(const Line& line) {
  v1::SolverOptions out;
  out.set_objective(Option(line, "--objective"));
  out.set_statistic(Option(line, "--statistic"));
  if (const std::string v = Option(line, "--quantile"); !v.empty()) {
    ICD_ASSIGN_OR_RETURN(auto q, ParseDouble("--quantile", v));
    out.set_activation_quantile(q);
  }
  if (const std::string v = Option(line, "--resolution"); !v.empty()) {
    ICD_ASSIGN_OR_RETURN(auto r, ParseDouble("--resolution", v));
    out.set_resolution(r);
  }
  if (const std::string v = Option(line, "--seed"); !v.empty()) {
    ICD_ASSIGN_OR_RETURN(auto seed, ParseUint("--seed", v));
    out.set_seed(seed);
  }
  if (const std::string v = Option(line, "--seeds"); !v.empty()) {
    ICD_ASSIGN_OR_RETURN(auto k, ParseInt32("--seeds", v));
    out.set_seeds(k);
  }
  if (const std::string v = Option(line, "--nm"); !v.empty()) {
    const std::vector<std::string> parts = absl::StrSplit(v, ':');
    if (parts.size() != 2) return Usage(absl::StrCat("--nm: expected N:M, e.g. 2:4, got '", v, "'"));
    ICD_ASSIGN_OR_RETURN(auto n, ParseInt32("--nm N", parts[0]));
    ICD_ASSIGN_OR_RETURN(auto m, ParseInt32("--nm M", parts[1]));
    out.set_nm_n(n);
    out.set_nm_m(m);
  }
  if (const std::string v = Option(line, "--preserve-block"); !v.empty()) {
    ICD_ASSIGN_OR_RETURN(auto k, ParseInt32("--preserve-block", v));
    out.set_preserve_block(k);
  }
  for (const auto& b : SplitList(Option(line, "--blocks"))) {
    ICD_ASSIGN_OR_RETURN(auto size, ParseInt32("--blocks", b));
    out.add_block_sizes(size);
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

}  // namespace icd::ctl
