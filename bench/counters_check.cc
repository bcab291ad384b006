// icd's hardware counters against Nsight Compute's on the same kernels
// (issue 21): one sample of a checkpoint's forward, the one MeasureLatency's
// counters count (a prefill over [1, L] random ids, or an eager decode step
// after such a prefill), run either under icd's CUPTI collection
// (counters/hardware_counters.h), printing a JSON line per kernel and the
// total, or between cudaProfilerStart and cudaProfilerStop for
//   ncu --profile-from-start off --metrics <the same> counters_check ... --ncu
// (bench/counters_ncu.py sums ncu's CSV the same way).
//
//   counters_check --model DIR [--dtype bfloat16] [--mode prefill|decode]
//                  [--seq-len 2048] (--cupti [--repeats 3] [--replay user|kernel]
//                  | --ncu)
// --replay user (the service's) matches ncu's --replay-mode application
// --cache-control none; --replay kernel matches ncu's default kernel replay
// in reads and L2 (DRAM writes differ: hardware_counters.h says why).
#include <cstdlib>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#ifdef ICD_HAVE_CUDA
#include <cuda_profiler_api.h>
#endif

#include "counters/hardware_counters.h"
#include "forward/decode.h"
#include "forward/forward.h"
#include "driver_util.h"
#include "io/checkpoint.h"

namespace {

void PrintJson(const icd::KernelCounters& k, const std::string& label, int repeat) {
  std::string name;
  for (char c : k.kernel) {
    if (c == '"' || c == '\\') name += '\\';
    name += c;
  }
  std::cout << "{\"bench\": \"counters\", \"label\": \"" << label << "\", \"repeat\": " << repeat
            << ", \"kernel\": \"" << name << "\", \"launches\": " << k.launches
            << ", \"dram_read_bytes\": " << k.dram_read_bytes
            << ", \"dram_write_bytes\": " << k.dram_write_bytes
            << ", \"l2_sectors\": " << k.l2_sectors << ", \"l2_hit_rate\": " << k.l2_hit_rate
            << ", \"duration_ns\": " << k.duration_ns << "}\n";
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> args = {
      {"--dtype", "bfloat16"}, {"--mode", "prefill"}, {"--seq-len", "2048"}, {"--repeats", "3"},
      {"--replay", "user"}};
  bool cupti = false;
  bool ncu = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--cupti") {
      cupti = true;
    } else if (arg == "--ncu") {
      ncu = true;
    } else if (i + 1 < argc) {
      args[arg] = argv[++i];
    }
  }
  if (!args.count("--model") || cupti == ncu) {
    std::cerr << "usage: counters_check --model DIR [--dtype bfloat16] [--mode prefill|decode] "
                 "[--seq-len 2048] (--cupti [--repeats 3] [--replay user|kernel] | --ncu)\n";
    return 2;
  }
  if (!torch::cuda::is_available()) {
    std::cerr << "counters_check: no CUDA device\n";
    return 1;
  }
  const std::map<std::string, torch::ScalarType> dtypes = {
      {"bfloat16", torch::kBFloat16}, {"float16", torch::kFloat16}, {"float32", torch::kFloat32}};
  const torch::ScalarType dtype = dtypes.at(args.at("--dtype"));
  const bool decode = args.at("--mode") == "decode";
  const int64_t seq_len = std::stoll(args.at("--seq-len"));
  torch::NoGradGuard no_grad;
  const torch::Device cuda(torch::kCUDA, 0);
  icd::Checkpoint checkpoint = CheckpointOnCuda(args.at("--model"), dtype);
  const icd::ModelConfig& config = checkpoint.config;
  const icd::Weights& weights = checkpoint.weights;
  torch::manual_seed(7);
  const torch::Tensor ids =
      torch::randint(0, config.vocab_size, {1, seq_len}, torch::dtype(torch::kInt64)).to(cuda);
  const torch::Tensor step_ids =
      torch::randint(0, config.vocab_size, {1, 1}, torch::dtype(torch::kInt64)).to(cuda);
  if (auto checked = icd::CheckForwardInputs(config, weights, ids); !checked.ok()) {
    std::cerr << checked << "\n";
    return 1;
  }
  std::unique_ptr<icd::decode::Session> session;
  if (decode) {
    session = OrDie(icd::decode::Session::Start(config, weights, ids,
                                                icd::decode::Execution::kInPlace, {}),
                    "decode session");
  }
  // One sample, as MeasureLatency's counters run it; the first is a warm-up
  // (cuBLAS handles, workspaces), outside both profilers.
  auto sample = [&]() -> absl::Status {
    if (session != nullptr) return session->Step(step_ids, {}).status();
    return icd::ForwardPrechecked(config, weights, ids).status();
  };
  if (auto warm = sample(); !warm.ok()) {
    std::cerr << warm << "\n";
    return 1;
  }
  torch::cuda::synchronize();
  const std::string label = args.at("--mode") + " " + args.at("--model") +
                            (cupti ? " (replay " + args.at("--replay") + ")" : "");
  if (ncu) {
#ifdef ICD_HAVE_CUDA
    cudaProfilerStart();
    const absl::Status ran = sample();
    torch::cuda::synchronize();
    cudaProfilerStop();
    if (!ran.ok()) {
      std::cerr << ran << "\n";
      return 1;
    }
    return 0;
#else
    std::cerr << "counters_check --ncu: built without CUDA's runtime headers\n";
    return 1;
#endif
  }
  if (args.at("--replay") != "user" && args.at("--replay") != "kernel") {
    std::cerr << "counters_check: --replay is user or kernel, got " << args.at("--replay") << "\n";
    return 2;
  }
  const auto replay =
      args.at("--replay") == "user" ? icd::counters::Replay::kUser : icd::counters::Replay::kKernel;
  // A decode step rewinds to the same state before each pass (user replay),
  // as MeasureLatency's counters do.
  auto rewind = [&]() -> absl::Status {
    return session != nullptr ? session->Rewind() : absl::OkStatus();
  };
  for (int repeat = 0; repeat < std::stoi(args.at("--repeats")); ++repeat) {
    if (session != nullptr) OrDie(session->Mark(), "decode session");
    const auto launches =
        OrDie(icd::counters::Collect(0, sample, replay, rewind), "hardware counters");
    for (const icd::KernelCounters& kernel : icd::counters::ByKernel(launches)) {
      PrintJson(kernel, label, repeat);
    }
    PrintJson(icd::counters::Total(launches), label, repeat);
    std::cout.flush();  // a run cut short keeps its finished repeats
  }
  return 0;
}
