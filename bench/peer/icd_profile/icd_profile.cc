// Where icd's Mamba forward spends its time: LibTorch's own profiler (Kineto,
// CPU ops + CUDA kernels through CUPTI) around icd::Forward, the function
// MeasureLatency times, on a checkpoint read by icd's reader.
//
//   icd_profile --model DIR [--dtype bfloat16] [--seq-len 2048] [--prefill-iters 5]
//               [--decode-steps 30] [--warmup 3] [--out PREFIX]
//               [--ab VAR --values "A B ..." [--rounds 3]]
//
// With --ab, no profiler and no traces: the CUDA-graph decode step's median
// (over --decode-steps) under each setting of the environment variable VAR
// ("-" leaves it unset), a fresh session (a graph captured under that
// setting) each time, the settings interleaved over --rounds; one process,
// one load of the model. VAR must be one the kernels re-read after
// fused::ReloadLaunchSettings (the README's table says which).
//
// Writes PREFIX-prefill.json, PREFIX-decode.json (a decode session's eager
// steps) and PREFIX-decode-graph.json (its CUDA graph replayed): chrome
// traces whose regions "icd_prefill", "icd_decode_step" and
// "icd_decode_graph_step" each end with a device sync, so
// every kernel a region launched ran inside it: bench/peer/trace_table.py
// reads them) and prints, without the profiler, the median wall time of a
// prefill and of a decode step (host clock around the call and a sync), to
// show what the profiler itself adds.
//
// Built against icd's static core (icd_core_testing) by
// bench/peer/icd_profile/CMakeLists.txt; icd's own sources are not changed.
#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/torch.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "io/checkpoint.h"
#include "forward/decode.h"
#include "forward/forward.h"
#include "fused/fused.h"
#include "../../driver_util.h"

namespace {

std::map<std::string, std::string> ParseArgs(int argc, char** argv) {
  std::map<std::string, std::string> args = {
      {"--dtype", "bfloat16"}, {"--seq-len", "2048"}, {"--prefill-iters", "5"},
      {"--decode-steps", "30"}, {"--warmup", "3"}, {"--out", "icd-profile"},
      {"--rounds", "3"}};
  for (int i = 1; i + 1 < argc; i += 2) args[argv[i]] = argv[i + 1];
  if (!args.count("--model")) {
    std::cerr << "usage: icd_profile --model DIR [--dtype bfloat16] [--seq-len 2048] "
                 "[--prefill-iters 5] [--decode-steps 30] [--warmup 3] [--out PREFIX]\n";
    std::exit(2);
  }
  return args;
}

torch::ScalarType DType(const std::string& name) {
  if (name == "bfloat16") return torch::kBFloat16;
  if (name == "float16") return torch::kFloat16;
  if (name == "float32") return torch::kFloat32;
  std::cerr << "unknown dtype " << name << "\n";
  std::exit(2);
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double Ms(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// Median wall milliseconds of `run` (host clock around the call and a device
// sync) over `iters` calls, after `warmup` untimed ones.
template <typename Fn>
double MedianWallMs(Fn&& run, int warmup, int iters) {
  for (int i = 0; i < warmup; ++i) run();
  torch::cuda::synchronize();
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    run();
    torch::cuda::synchronize();
    ms.push_back(Ms(t0, std::chrono::steady_clock::now()));
  }
  return Median(ms);
}

void StartProfiler();
void StopProfiler(const std::string& path);

// `iters` calls of `run` under the profiler, each a region `region` that
// ends with a device sync; the trace goes to `path`.
template <typename Fn>
void Profile(Fn&& run, const char* region, int iters, const std::string& path) {
  StartProfiler();
  for (int i = 0; i < iters; ++i) {
    RECORD_USER_SCOPE(region);
    run();
    torch::cuda::synchronize();
  }
  StopProfiler(path);
}

using torch::profiler::impl::ActivityType;
using torch::profiler::impl::ProfilerConfig;
using torch::profiler::impl::ProfilerState;

void StartProfiler() {
  const ProfilerConfig config(ProfilerState::KINETO);
  const std::set<ActivityType> activities{ActivityType::CPU, ActivityType::CUDA};
  torch::autograd::profiler::prepareProfiler(config, activities);
  torch::autograd::profiler::enableProfiler(config, activities);
}

void StopProfiler(const std::string& path) {
  auto result = torch::autograd::profiler::disableProfiler();
  result->save(path);
  std::cout << "trace: " << path << " (" << result->events().size() << " events)\n";
}

}  // namespace

int main(int argc, char** argv) {
  const auto args = ParseArgs(argc, argv);
  const torch::ScalarType dtype = DType(args.at("--dtype"));
  const int64_t seq_len = std::stoll(args.at("--seq-len"));
  const int prefill_iters = std::stoi(args.at("--prefill-iters"));
  const int decode_steps = std::stoi(args.at("--decode-steps"));
  const int warmup = std::stoi(args.at("--warmup"));
  const std::string out = args.at("--out");
  torch::NoGradGuard no_grad;
  const torch::Device cuda(torch::kCUDA, 0);

  icd::Checkpoint checkpoint = CheckpointOnCuda(args.at("--model"), dtype);
  const icd::ModelConfig& config = checkpoint.config;
  const icd::Weights& weights = checkpoint.weights;
  std::cout << "model " << args.at("--model") << ": d_model " << config.d_model << ", n_layer "
            << config.n_layer << ", d_inner " << config.d_inner << ", vocab " << config.vocab_size
            << ", dtype " << args.at("--dtype") << "\n";

  torch::manual_seed(7);
  const torch::Tensor ids =
      torch::randint(0, config.vocab_size, {1, seq_len}, torch::dtype(torch::kInt64)).to(cuda);
  const torch::Tensor steps =
      torch::randint(0, config.vocab_size, {warmup + 2 * decode_steps + 1, 1},
                     torch::dtype(torch::kInt64)).to(cuda);
  if (auto s = icd::CheckForwardInputs(config, weights, ids); !s.ok()) {
    std::cerr << s << "\n";
    return 1;
  }
  auto prefill = [&] { return OrDie(icd::ForwardPrechecked(config, weights, ids), "Forward"); };

  if (args.count("--ab")) {
    const std::string variable = args.at("--ab");
    std::vector<std::string> values;
    std::istringstream listed(args.count("--values") ? args.at("--values") : "-");
    for (std::string value; listed >> value;) values.push_back(value);
    int64_t next = 0;
    for (int round = 1; round <= std::stoi(args.at("--rounds")); ++round) {
      for (const std::string& value : values) {
        if (value == "-") {
          unsetenv(variable.c_str());
        } else {
          setenv(variable.c_str(), value.c_str(), 1);
        }
        icd::fused::ReloadLaunchSettings();
        auto session = OrDie(icd::decode::Session::Start(config, weights, ids,
                                                         icd::decode::Execution::kCudaGraph, {}),
                             "decode session");
        auto step = [&] {
          return OrDie(session->Step(steps.narrow(0, next++ % steps.size(0), 1), {}),
                       "decode step");
        };
        std::cout << variable << "=" << value << " round " << round << ": decode step ("
                  << icd::decode::ExecutionName(session->execution()) << "), no profiler: median "
                  << MedianWallMs(step, warmup, decode_steps) << " ms over " << decode_steps
                  << std::endl;
      }
    }
    return 0;
  }

  // Prefill: warm-up, plain timing, then the profiled calls.
  std::cout << "prefill " << seq_len << " tokens, no profiler: median "
            << MedianWallMs(prefill, warmup, std::max(prefill_iters, 5)) << " ms\n";
  Profile(prefill, "icd_prefill", prefill_iters, out + "-prefill.json");

  // Decode: a decode session (what MeasureLatency's decode mode times),
  // first eager, every kernel launched on its own (the same kernels the graph
  // replays, each with its own duration), then as its CUDA graph.
  int64_t next = 0;
  for (const icd::decode::Execution execution :
       {icd::decode::Execution::kEager, icd::decode::Execution::kCudaGraph}) {
    const char* name = icd::decode::ExecutionName(execution);
    auto session = OrDie(icd::decode::Session::Start(config, weights, ids, execution, {}),
                         "decode session");
    auto step = [&] {
      return OrDie(session->Step(steps.narrow(0, next++ % steps.size(0), 1), {}), "decode step");
    };
    std::cout << "decode step (" << name << "), no profiler: median "
              << MedianWallMs(step, warmup, decode_steps) << " ms over " << decode_steps << "\n";
    const bool eager = execution == icd::decode::Execution::kEager;
    Profile(step, eager ? "icd_decode_step" : "icd_decode_graph_step", decode_steps,
            out + (eager ? "-decode.json" : "-decode-graph.json"));
  }
  return 0;
}
