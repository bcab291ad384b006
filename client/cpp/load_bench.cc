// A bounded load generator for icd-server: N client threads, each with its
// own channel, for T seconds, issuing a mix of Verify, Evaluate and
// ApplyPermutation (random valid permutations of every group, verified by the
// server) against one model, one call at a time per thread.
//
//   load_bench --server HOST:PORT --model NAME [--load PATH] [--clients 8]
//              [--seconds 10] [--token-file F] [--server-pid PID] [--seed 1]
//
// Prints one JSON line: calls and errors per kind (errors by gRPC code),
// throughput, p50/p99 latency per kind, and with --server-pid the server's
// resident memory (VmRSS) before and after. Exit status 1 when any call
// failed (every call here is expected to succeed), 2 on bad flags.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "icd/client/client.h"
#include "icdctl_permutations.h"

namespace {

struct Totals {
  std::mutex mutex;
  std::map<std::string, std::vector<double>> millis;            // per kind, successful calls
  std::map<std::string, std::map<std::string, int64_t>> errors;  // kind -> code -> count
};

long ResidentKb(const std::string& pid) {
  std::ifstream status("/proc/" + pid + "/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));
  }
  return -1;
}

double Percentile(std::vector<double> values, double q) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const double rank = q * static_cast<double>(values.size() - 1);
  const auto low = static_cast<size_t>(rank);
  const size_t high = std::min(low + 1, values.size() - 1);
  return values[low] + (rank - static_cast<double>(low)) * (values[high] - values[low]);
}

}  // namespace

int main(int argc, char** argv) {
  std::string server, model, load_path, token_file, server_pid;
  int clients = 8;
  double seconds = 10;
  uint64_t seed = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) {
      std::cerr << "load_bench: " << flag << " needs a value (see the file comment)\n";
      return 2;
    }
    const std::string value = argv[++i];
    if (flag == "--server") server = value;
    else if (flag == "--model") model = value;
    else if (flag == "--load") load_path = value;
    else if (flag == "--clients") clients = std::stoi(value);
    else if (flag == "--seconds") seconds = std::stod(value);
    else if (flag == "--token-file") token_file = value;
    else if (flag == "--server-pid") server_pid = value;
    else if (flag == "--seed") seed = std::stoull(value);
    else {
      std::cerr << "load_bench: unknown flag " << flag << "\n";
      return 2;
    }
  }
  if (server.empty() || model.empty() || clients < 1 || seconds <= 0) {
    std::cerr << "usage: load_bench --server HOST:PORT --model NAME [--load PATH] [--clients N]"
                 " [--seconds T] [--token-file F] [--server-pid PID] [--seed S]\n";
    return 2;
  }
  icd::ClientOptions options;
  options.deadline = std::chrono::seconds(60);
  if (!token_file.empty()) {
    std::ifstream in(token_file);
    std::getline(in, options.token);
  }
  auto setup = icd::Client::Connect(server, options);
  if (!setup.ok()) {
    std::cerr << "load_bench: " << setup.status() << "\n";
    return 1;
  }
  if (!load_path.empty()) {
    auto loaded = (*setup)->LoadModel(model, load_path);
    if (!loaded.ok()) {
      std::cerr << "load_bench: load: " << loaded.status() << "\n";
      return 1;
    }
  }
  auto symmetries = (*setup)->GetSymmetries(model);
  if (!symmetries.ok()) {
    std::cerr << "load_bench: " << symmetries.status() << "\n";
    return 1;
  }
  const long rss_before = server_pid.empty() ? -1 : ResidentKb(server_pid);

  Totals totals;
  std::atomic<int64_t> next_seed{static_cast<int64_t>(seed) * 1000003};
  const auto stop = std::chrono::steady_clock::now() +
                    std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                        std::chrono::duration<double>(seconds));
  auto worker = [&](int id) {
    auto client = icd::Client::Connect(server, options);
    std::mt19937_64 rng(seed + static_cast<uint64_t>(id));
    icd::v1::EvaluateRequest evaluate;
    evaluate.set_model(model);
    evaluate.set_batch(1);
    for (int t = 0; t < 16; ++t) evaluate.add_input_ids((t * 31 + id) % 64);
    std::map<std::string, std::vector<double>> millis;
    std::map<std::string, std::map<std::string, int64_t>> errors;
    while (std::chrono::steady_clock::now() < stop) {
      const int pick = static_cast<int>(rng() % 3);
      const std::string kind = pick == 0 ? "verify" : pick == 1 ? "evaluate" : "apply";
      absl::Status status;
      const auto start = std::chrono::steady_clock::now();
      if (!client.ok()) {
        status = client.status();
      } else if (pick == 0) {
        status = (*client)->Verify(model).status();
      } else if (pick == 1) {
        status = (*client)->Evaluate(evaluate).status();
      } else {
        auto perms = icd::ctl::RandomPermutations(*symmetries, {}, next_seed++);
        status = perms.ok() ? (*client)->ApplyPermutation(model, *perms).status() : perms.status();
      }
      const double ms = std::chrono::duration<double, std::milli>(
                            std::chrono::steady_clock::now() - start).count();
      if (status.ok()) {
        millis[kind].push_back(ms);
      } else {
        ++errors[kind][absl::StatusCodeToString(status.code())];
      }
    }
    std::lock_guard<std::mutex> lock(totals.mutex);
    for (auto& [kind, values] : millis) {
      auto& all = totals.millis[kind];
      all.insert(all.end(), values.begin(), values.end());
    }
    for (const auto& [kind, codes] : errors) {
      for (const auto& [code, count] : codes) totals.errors[kind][code] += count;
    }
  };
  std::vector<std::thread> threads;
  for (int id = 0; id < clients; ++id) threads.emplace_back(worker, id);
  for (std::thread& thread : threads) thread.join();
  const long rss_after = server_pid.empty() ? -1 : ResidentKb(server_pid);

  int64_t ok = 0, failed = 0;
  std::string kinds;
  for (const std::string kind : {"verify", "evaluate", "apply"}) {
    const std::vector<double>& values = totals.millis[kind];
    int64_t kind_errors = 0;
    std::string codes;
    for (const auto& [code, count] : totals.errors[kind]) {
      kind_errors += count;
      absl::StrAppend(&codes, codes.empty() ? "" : ", ", "\"", code, "\": ", count);
    }
    ok += static_cast<int64_t>(values.size());
    failed += kind_errors;
    char line[256];
    std::snprintf(line, sizeof(line),
                  "\"%s\": {\"ok\": %zu, \"p50_ms\": %.2f, \"p99_ms\": %.2f, \"errors\": {",
                  kind.c_str(), values.size(), Percentile(values, 0.5), Percentile(values, 0.99));
    absl::StrAppend(&kinds, kinds.empty() ? "" : ", ", line, codes, "}}");
  }
  std::printf(
      "{\"bench\": \"load\", \"clients\": %d, \"seconds\": %.1f, \"calls_ok\": %lld, "
      "\"calls_failed\": %lld, \"calls_per_s\": %.1f, %s, \"server_rss_kb_before\": %ld, "
      "\"server_rss_kb_after\": %ld}\n",
      clients, seconds, static_cast<long long>(ok), static_cast<long long>(failed),
      static_cast<double>(ok + failed) / seconds, kinds.c_str(), rss_before, rss_after);
  return failed == 0 ? 0 : 1;
}
