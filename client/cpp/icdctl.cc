// icdctl: the command-line client of icd.v1.PermutationService, one command
// per RPC, on top of icd::Client. Human-readable output by default, the
// response message as JSON with --json. The exit code is the gRPC status code
// (0: OK); errors go to stderr as "icdctl: CODE: message".
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "icd/client/client.h"
#include "icd/status_macros.h"
#include "icdctl_commands.h"
#include "icdctl_flags.h"
#include "icdctl_output.h"
#include "icdctl_permutations.h"
#include "icdctl_progress.h"
#include "icdctl_readers.h"

namespace icd::ctl {
namespace {

// ---------------------------------------------------------------- commands


absl::Status Load(const Line& line, Context& ctx) {
  ICD_RETURN_IF_ERROR(Expect(line, 2, {"--device", "--dtype", "--placement"}));
  v1::LoadModelRequest request;
  request.set_name(line.positional[0]);
  request.set_path(line.positional[1]);
  request.set_device(Option(line, "--device"));
  request.set_dtype(Option(line, "--dtype"));
  request.set_placement(Option(line, "--placement"));
  ICD_ASSIGN_OR_RETURN(auto info, ctx.client->LoadModel(request));
  if (ctx.json) return PrintJson(info);
  std::cout << "loaded ";
  PrintModel(info);
  return absl::OkStatus();
}

absl::Status Models(const Line& line, Context& ctx) {
  ICD_RETURN_IF_ERROR(Expect(line, 0, {}));
  ICD_ASSIGN_OR_RETURN(auto models, ctx.client->ListModels());
  if (ctx.json) {
    v1::ListModelsResponse response;
    for (const auto& m : models) *response.add_models() = m;
    return PrintJson(response);
  }
  if (models.empty()) {
    std::cout << "no models loaded\n";
    return absl::OkStatus();
  }
  std::vector<std::vector<std::string>> rows = {
      {"NAME", "ARCHITECTURE", "FAMILY", "LAYOUT", "DEVICE", "DTYPE", "PARAMETERS", "VERSION",
       "PATH"}};
  for (const auto& m : models) {
    // A model placed over several devices: each of them, in layer order.
    std::string devices = m.device();
    if (m.placement_size() > 1) {
      devices.clear();
      std::string previous;
      for (const auto& range : m.placement()) {
        if (range.device() == previous) continue;
        devices += (devices.empty() ? "" : "+") + range.device();
        previous = range.device();
      }
    }
    rows.push_back({m.name(), m.architecture(), m.family(), m.layout(), devices, m.dtype(),
                    std::to_string(m.parameters()), std::to_string(m.version()), m.path()});
  }
  PrintTable(rows, {false, false, false, false, false, false, true, true, false});
  return absl::OkStatus();
}

absl::Status Health(const Line& line, Context& ctx) {
  if (line.positional.size() > 1) return Usage("health takes at most one SERVICE");
  ICD_ASSIGN_OR_RETURN(auto serving, ctx.client->Health(line.positional.empty() ? "" : line.positional[0]));
  if (!serving) return absl::UnavailableError("NOT_SERVING");
  std::cout << "SERVING\n";
  return absl::OkStatus();
}

absl::Status Unload(const Line& line, Context& ctx) {
  ICD_RETURN_IF_ERROR(Expect(line, 1, {}));
  ICD_RETURN_IF_ERROR(ctx.client->UnloadModel(line.positional[0]));
  if (ctx.json) return PrintJson(v1::UnloadModelResponse());
  std::cout << "unloaded " << line.positional[0] << "\n";
  return absl::OkStatus();
}

absl::Status Symmetries(const Line& line, Context& ctx) {
  ICD_RETURN_IF_ERROR(Expect(line, 1, {}));
  ICD_ASSIGN_OR_RETURN(auto syms, ctx.client->GetSymmetries(line.positional[0]));
  if (ctx.json) return PrintJson(syms);
  std::cout << syms.model() << " (version " << syms.version() << "): "
            << syms.groups_size() << " symmetry groups\n";
  std::vector<std::vector<std::string>> rows = {{"GROUP", "SIZE", "BLOCK", "WHOLE", "MEMBERS"}};
  for (const auto& g : syms.groups()) {
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
    ICD_ASSIGN_OR_RETURN(auto version, ParseUint("--expected-version", v));
    request.set_expected_version(version);
  }
  if (const std::string t = Option(line, "--tolerance"); !t.empty()) {
    ICD_ASSIGN_OR_RETURN(auto tolerance, ParseDouble("--tolerance", t));
    if (!(tolerance > 0)) return Usage("--tolerance: expected a bound > 0");
    request.set_tolerance(tolerance);
  }
  absl::StatusOr<std::vector<v1::Permutation>> perms;
  if (!perm_file.empty()) {
    ICD_ASSIGN_OR_RETURN(auto text, ReadFile(perm_file, "--perm"));
    perms = ParsePermutationJson(text, groups);
  } else {
    ICD_ASSIGN_OR_RETURN(auto seed, ParseUint("--random", seed_text));
    ICD_ASSIGN_OR_RETURN(auto syms, ctx.client->GetSymmetries(model));
    perms = RandomPermutations(syms, groups, seed);
  }
  if (!perms.ok()) return perms.status();
  for (auto& p : *perms) *request.add_permutations() = std::move(p);
  ICD_ASSIGN_OR_RETURN(auto report, ctx.client->ApplyPermutation(request));
  if (ctx.json) return PrintJson(report);
  PrintApplyReport(model, report);
  return absl::OkStatus();
}

absl::Status Verify(const Line& line, Context& ctx) {
  ICD_RETURN_IF_ERROR(Expect(line, 1, {}));
  ICD_ASSIGN_OR_RETURN(auto report, ctx.client->Verify(line.positional[0]));
  if (ctx.json) return PrintJson(report);
  PrintCorrectness(report);
  return absl::OkStatus();
}

absl::Status Evaluate(const Line& line, Context& ctx) {
  ICD_RETURN_IF_ERROR(Expect(line, 1, {"--ids", "--batch", "--logits"}));
  v1::EvaluateRequest request;
  request.set_model(line.positional[0]);
  const std::string ids = Option(line, "--ids");
  if (ids.empty()) return Usage("evaluate: --ids 1,2,3 is required");
  for (const auto& id : SplitList(ids)) {
    ICD_ASSIGN_OR_RETURN(auto v, ParseInt("--ids", id));
    request.add_input_ids(v);
  }
  if (const std::string b = Option(line, "--batch"); !b.empty()) {
    ICD_ASSIGN_OR_RETURN(auto batch, ParseInt("--batch", b));
    request.set_batch(batch);
  }
  request.set_return_logits(line.switches.count("--logits") > 0);
  ICD_ASSIGN_OR_RETURN(auto response, ctx.client->Evaluate(request));
  if (ctx.json) return PrintJson(response);
  std::cout << request.model() << ": mean NLL " << Fmt(response.mean_nll(), 6)
            << " nats (perplexity " << Fmt(std::exp(response.mean_nll()), 6) << ") over "
            << response.tokens() << " predicted tokens\n";
  if (request.return_logits() && response.shape_size() == 3) {
    const int64_t vocab = response.shape(2);
    std::cout << "logits [" << response.shape(0) << ", " << response.shape(1) << ", "
              << vocab << "], one row per (batch, position):\n";
    for (int64_t row = 0; vocab > 0 && row * vocab < response.logits_size(); ++row) {
      std::cout << row / response.shape(1) << " " << row % response.shape(1) << ":";
      for (int64_t v = 0; v < vocab; ++v) {
        std::cout << " " << Fmt(response.logits(static_cast<int>(row * vocab + v)), 6);
      }
      std::cout << "\n";
    }
  }
  return absl::OkStatus();
}

absl::Status Export(const Line& line, Context& ctx) {
  ICD_RETURN_IF_ERROR(Expect(line, 2, {}));
  ICD_ASSIGN_OR_RETURN(auto report, ctx.client->ExportModel(line.positional[0], line.positional[1]));
  if (ctx.json) return PrintJson(report);
  std::cout << "exported " << line.positional[0] << " (version " << report.version()
            << ") to " << report.path() << ":\n";
  for (const auto& f : report.files()) std::cout << "  " << f << "\n";
  return absl::OkStatus();
}

// ---------------------------------------------------------------- latency

// One model's hardware counters: a row per kernel, the total, and the spread
// of the totals over the repeats.
void PrintCounters(const std::string& model, const v1::CounterReport& counters) {
  constexpr double kMB = 1e6;
  std::cout << "\nhardware counters of " << model << ": " << counters.execution() << ", "
            << counters.repeat_totals_size() << " repeat(s) (" << counters.method() << ")\n";
  std::vector<std::vector<std::string>> rows = {{"KERNEL", "LAUNCHES", "DRAM READ MB",
                                                 "DRAM WRITE MB", "L2 SECTORS", "L2 HIT %",
                                                 "US (REPLAYED)"}};
  auto add = [&rows](const v1::KernelCounters& k) {
    std::string name = k.kernel();
    if (name.size() > 64) name = name.substr(0, 61) + "...";
    rows.push_back({name, std::to_string(k.launches()), Fmt(k.dram_read_bytes() / kMB),
                    Fmt(k.dram_write_bytes() / kMB), Fmt(k.l2_sectors()),
                    Fmt(100 * k.l2_hit_rate()), Fmt(k.duration_ns() / 1e3)});
  };
  for (const auto& kernel : counters.kernels()) add(kernel);
  add(counters.total());
  PrintTable(rows, {false, true, true, true, true, true, true});
  double low_read = 0, high_read = 0, low_hit = 0, high_hit = 0;
  for (int i = 0; i < counters.repeat_totals_size(); ++i) {
    const auto& total = counters.repeat_totals(i);
    const double read = total.dram_read_bytes() + total.dram_write_bytes();
    low_read = i == 0 ? read : std::min(low_read, read);
    high_read = i == 0 ? read : std::max(high_read, read);
    low_hit = i == 0 ? total.l2_hit_rate() : std::min(low_hit, total.l2_hit_rate());
    high_hit = i == 0 ? total.l2_hit_rate() : std::max(high_hit, total.l2_hit_rate());
  }
  std::cout << "over the repeats: DRAM bytes " << Fmt(low_read / kMB) << " - "
            << Fmt(high_read / kMB) << " MB, L2 hit " << Fmt(100 * low_hit) << " - "
            << Fmt(100 * high_hit) << " %\n";
}

absl::Status Latency(const Line& line, Context& ctx) {
  if (auto s = Expect(line, 1, {"--compare", "--mode", "--batch", "--seq-len", "--warmup",
                                "--iters", "--eager", "--counters"});
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
  auto counters = count("--counters", 0);
  for (const auto* v : {&batch, &seq_len, &warmup, &iters, &counters}) {
    if (!v->ok()) return v->status();
  }
  request.set_batch(*batch);
  request.set_seq_len(*seq_len);
  request.set_warmup(*warmup);
  request.set_iters(*iters);
  request.set_eager(line.switches.count("--eager") > 0);
  request.set_counter_repeats(*counters);
  ICD_ASSIGN_OR_RETURN(auto report, ctx.client->MeasureLatency(request));
  if (ctx.json) return PrintJson(report);

  if (request.mode() == "decode") {
    std::cout << "decode: one token for each of " << *batch << " sequences per sample, after a "
              << "prefill of " << *seq_len << " tokens";
  } else {
    std::cout << "prefill: one forward over " << *batch << " x " << *seq_len
              << " tokens per sample";
  }
  std::cout << "; " << *warmup << " warm-up samples, then " << report.samples()
            << " timed on " << report.device() << " (" << report.method() << ", "
            << report.execution() << ")\n";
  std::vector<std::vector<std::string>> rows = {
      {"MODEL", "VERSION", "MEDIAN MS", "95% CI", "P10", "P90", "SAMPLES"}};
  auto add_row = [&rows](const std::string& name, const v1::LatencyReport& r) {
    rows.push_back({name, std::to_string(r.version()), Fmt(r.median_ms()),
                    Fmt(r.ci95_low_ms()) + " - " + Fmt(r.ci95_high_ms()), Fmt(r.p10_ms()),
                    Fmt(r.p90_ms()), std::to_string(r.samples())});
  };
  add_row(request.model(), report);
  if (report.has_compare()) add_row(request.compare_model(), report.compare());
  PrintTable(rows, {false, true, true, true, true, true, true});
  auto print_transfer = [](const std::string& name, const v1::LatencyReport& r) {
    if (r.transfer_ms() == 0) return;
    std::cout << name << " is placed over several devices: moving its residual stream between "
              << "them takes " << Fmt(r.transfer_ms()) << " ms of each sample (timed alone)\n";
  };
  print_transfer(request.model(), report);
  if (report.has_compare()) print_transfer(request.compare_model(), report.compare());
  if (report.has_compare()) {
    std::cout << request.model() << " / " << request.compare_model() << ": "
              << Fmt(report.ratio()) << " (95% CI " << Fmt(report.ratio_ci95_low()) << " - "
              << Fmt(report.ratio_ci95_high()) << "), median over " << report.samples()
              << " interleaved rounds\n";
  }
  if (report.has_counters()) PrintCounters(request.model(), report.counters());
  if (report.compare().has_counters()) {
    PrintCounters(request.compare_model(), report.compare().counters());
  }
  return absl::OkStatus();
}

absl::Status Run(int argc, char** argv) {
  ICD_ASSIGN_OR_RETURN(auto line, ParseLine(argc, argv));
  if (line.help || argc == 1) {
    std::cout << kHelp;
    return absl::OkStatus();
  }
  using Command = absl::Status (*)(const Line&, Context&);
  static const std::map<std::string, Command> kCommands = {
      {"health", Health}, {"load", Load},     {"models", Models},     {"unload", Unload},
      {"symmetries", Symmetries}, {"apply", Apply}, {"verify", Verify},
      {"evaluate", Evaluate},     {"export", Export},       {"capture", Capture},
      {"compute", Compute},       {"latency", Latency}};
  if (line.command.empty()) return Usage("no command");
  auto it = kCommands.find(line.command);
  if (it == kCommands.end()) return Usage(absl::StrCat("unknown command '", line.command, "'"));
  if (line.server.empty()) return Usage("--server HOST:PORT is required");

  ClientOptions options;
  if (line.timeout_s > 0) {
    options.deadline = std::chrono::milliseconds(static_cast<int64_t>(line.timeout_s * 1000));
    options.connect_timeout = options.deadline;
  }
  if (!line.token_file.empty()) {
    ICD_ASSIGN_OR_RETURN(auto token, ReadFile(line.token_file, "--token-file"));
    while (!token.empty() && (token.back() == '\n' || token.back() == '\r')) {
      token.pop_back();
    }
    options.token = std::move(token);
  }
  // The long commands show how far they are on a terminal (not under --json
  // or into a pipe): their calls carry a request ID that a second
  // connection follows with GetProgress.
  const bool long_command = line.command == "load" || line.command == "capture" ||
                            line.command == "compute" || line.command == "latency";
  const bool show_progress = long_command && !line.json && isatty(STDERR_FILENO) == 1;
  if (show_progress) options.request_id = NewRequestId();
  ICD_ASSIGN_OR_RETURN(auto client, Client::Connect(line.server, options));
  std::unique_ptr<ProgressLine> progress;
  if (show_progress) {
    ClientOptions watcher_options = options;
    watcher_options.request_id.clear();
    watcher_options.deadline = std::chrono::milliseconds(5000);  // each poll
    auto watcher = Client::Connect(line.server, watcher_options);
    if (watcher.ok()) progress = std::make_unique<ProgressLine>(*std::move(watcher), options.request_id);
  }
  Context ctx{client.get(), line.json};
  if (progress == nullptr) return it->second(line, ctx);
  // The command's output waits until the progress line is cleared, so that
  // the two never interleave on one terminal (commands write std::cout only).
  std::ostringstream output;
  std::streambuf* terminal = std::cout.rdbuf(output.rdbuf());
  absl::Status status = it->second(line, ctx);
  std::cout.rdbuf(terminal);
  progress.reset();
  std::cout << output.str();
  return status;
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
