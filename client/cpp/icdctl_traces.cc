// icdctl capture and compute: traces to a permutation (icdctl --help).
#include <algorithm>
#include <cstdio>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "icd/status_macros.h"
#include "icdctl_commands.h"
#include "icdctl_output.h"
#include "icdctl_permutations.h"
#include "icdctl_readers.h"

namespace icd::ctl {
namespace {

absl::StatusOr<v1::ModelInfo> FindModel(Client& client, const std::string& model) {
  ICD_ASSIGN_OR_RETURN(auto models, client.ListModels());
  for (const auto& m : models) {
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

}  // namespace

absl::Status Capture(const Line& line, Context& ctx) {
  const std::set<std::string> allowed = With(
      {"--model", "--tokens", "--random-tokens", "--batch", "--holdout-tokens",
       "--random-holdout", "--groups", "--token-seed"},
      SolverFlags());
  ICD_RETURN_IF_ERROR(Expect(line, line.positional.size() == 1 ? 1 : 0, allowed));
  ICD_ASSIGN_OR_RETURN(auto model, ModelArgument(line));
  v1::CaptureRequest request;
  request.set_model(model);
  ICD_ASSIGN_OR_RETURN(auto solver, ParseSolver(line));
  *request.mutable_solver() = solver;
  for (const auto& g : SplitList(Option(line, "--groups"))) request.add_groups(g);

  int64_t batch = 0;
  if (const std::string b = Option(line, "--batch"); !b.empty()) {
    ICD_ASSIGN_OR_RETURN(auto v, ParseInt("--batch", b));
    if (v <= 0) return Usage("--batch: expected B > 0");
    batch = v;
  }
  // The model's version before the capture: --apply refuses if it moved.
  ICD_ASSIGN_OR_RETURN(auto info, FindModel(*ctx.client, model));
  uint64_t token_seed = 0;
  if (const std::string v = Option(line, "--token-seed"); !v.empty()) {
    ICD_ASSIGN_OR_RETURN(auto seed, ParseUint("--token-seed", v));
    token_seed = seed;
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
      ICD_ASSIGN_OR_RETURN(auto read, ReadTokenFile(file_flag, file));
      if (read.batch > 0) {
        if (batch > 0 && batch != read.batch) {
          return Usage(absl::StrCat(file_flag, " ", file, " holds ", read.batch,
                                    " sequences but --batch is ", batch));
        }
        batch = read.batch;
      }
      const int64_t b = batch > 0 ? batch : 1;
      if (read.ids.empty() || static_cast<int64_t>(read.ids.size()) % b != 0) {
        return Usage(absl::StrCat(file_flag, " ", file, ": ", read.ids.size(),
                                  " ids are not ", b, " sequences of equal length"));
      }
      ids->Add(read.ids.begin(), read.ids.end());
      return absl::OkStatus();
    }
    if (!random.empty()) {
      ICD_ASSIGN_OR_RETURN(auto n, ParseInt(random_flag, random));
      if (n <= 0) return Usage(absl::StrCat(random_flag, ": expected N > 0 tokens per sequence"));
      const auto vocab = info.dims().find("vocab_size");
      if (vocab == info.dims().end() || vocab->second <= 0) {
        return absl::FailedPreconditionError(absl::StrCat(
            "model '", model, "' reports no vocab_size; give token ids with ", file_flag));
      }
      const int64_t count = (batch > 0 ? batch : 1) * n;
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

  ICD_ASSIGN_OR_RETURN(auto set, ctx.client->CapturePermutation(request));
  const std::vector<v1::PermutationResult> results(set.results().begin(), set.results().end());
  const bool apply = line.switches.count("--apply") > 0;
  absl::StatusOr<v1::ApplyReport> report = absl::UnknownError("not applied");
  if (apply) report = ApplyResults(ctx, model, results, info.version());
  if (ctx.json) {
    ICD_ASSIGN_OR_RETURN(auto json, MessageJson(set));
    if (apply && report.ok()) {
      ICD_ASSIGN_OR_RETURN(auto applied, MessageJson(*report));
      (json)["apply"] = applied;
    }
    std::cout << json.dump() << "\n";
  } else {
    std::cout << model << ": captured " << request.input_ids_size() << " tokens ("
              << request.batch() << " x " << request.input_ids_size() / request.batch()
              << "), " << results.size() << " group" << (results.size() == 1 ? "" : "s")
              << " solved\n";
    PrintPermutationResults(results);
    if (apply && report.ok()) PrintApplyReport(model, *report);
  }
  return apply ? report.status() : absl::OkStatus();
}

absl::Status Compute(const Line& line, Context& ctx) {
  const std::set<std::string> allowed = With(
      {"--model", "--group", "--traces", "--channels", "--holdout-rows"}, SolverFlags());
  ICD_RETURN_IF_ERROR(Expect(line, line.positional.size() == 1 ? 1 : 0, allowed));
  ICD_ASSIGN_OR_RETURN(auto model, ModelArgument(line));
  const std::string group = Option(line, "--group");
  if (group.empty()) return Usage("compute: --group G is required (see `icdctl symmetries`)");
  const std::string path = Option(line, "--traces");
  if (path.empty()) return Usage("compute: --traces FILE is required");
  int64_t channels = 0;
  if (const std::string c = Option(line, "--channels"); !c.empty()) {
    ICD_ASSIGN_OR_RETURN(auto v, ParseInt("--channels", c));
    if (v <= 0) return Usage("--channels: expected C > 0");
    channels = v;
  }
  v1::TraceHeader header;
  header.set_model(model);
  header.set_group(group);
  if (const std::string r = Option(line, "--holdout-rows"); !r.empty()) {
    ICD_ASSIGN_OR_RETURN(auto v, ParseInt("--holdout-rows", r));
    if (v < 0) return Usage("--holdout-rows: expected R >= 0");
    header.set_holdout_rows(v);
  }
  ICD_ASSIGN_OR_RETURN(auto solver, ParseSolver(line));
  *header.mutable_solver() = solver;
  ICD_ASSIGN_OR_RETURN(auto file, TraceFile::Open(path, channels));
  header.set_channels((file)->channels());

  TraceFile& source = *file;
  auto result = ctx.client->ComputePermutation(
      header, [&source](int64_t max_rows, std::vector<float>& rows) {
        return source.Next(max_rows, rows);
      });
  if (!result.ok()) return result.status();
  const bool apply = line.switches.count("--apply") > 0;
  absl::StatusOr<v1::ApplyReport> report = absl::UnknownError("not applied");
  if (apply) report = ApplyResults(ctx, model, {*result}, 0);
  if (ctx.json) {
    ICD_ASSIGN_OR_RETURN(auto json, MessageJson(*result));
    if (apply) {
      json = nlohmann::json{{"result", json}};
      if (report.ok()) {
        ICD_ASSIGN_OR_RETURN(auto applied, MessageJson(*report));
        (json)["apply"] = applied;
      }
    }
    std::cout << json.dump() << "\n";
  } else {
    std::cout << model << ": " << source.rows() << " rows x " << source.channels() << " "
              << source.dtype() << " channels from " << path << "\n";
    PrintPermutationResults({*result});
    if (apply && report.ok()) PrintApplyReport(model, *report);
  }
  return apply ? report.status() : absl::OkStatus();
}

}  // namespace icd::ctl
