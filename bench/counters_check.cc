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
//                  | --ncu) [--settle-ms N] [--scrub] [--no-flush] [--max-launches 8192]
//   counters_check --mode read [--read-mb 256] [--read-slices 1] ...   (no
//                  model: one sum over that many MB of float32, a kernel that
//                  reads and writes almost nothing; sizes around the L2's
//                  tell a write-back of lines dirtied before the range from
//                  bytes that grow with the reads; slices, the same bytes in
//                  that many launches, tell writes that come with each range)
// --settle-ms N waits N ms with the device idle before each pass (ncu: before
// the sample); --scrub reads a buffer of twice the L2 first. Both are
// experiments on where a kernel's counted DRAM writes come from
// (deploy/results/h200-gpu-2026-12-03d/: more than it writes).
// --max-launches sizes CUPTI's ranges per pass (Collect's max_launches): does
// a pass's cost, seconds whatever the work, follow it?
// --replay user (the service's) matches ncu's --replay-mode application
// --cache-control none; --replay kernel matches ncu's default kernel replay
// in reads and L2 (DRAM writes differ: hardware_counters.h says why).
#include <chrono>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#ifdef ICD_HAVE_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <cuda_profiler_api.h>
#endif

#include "counters/hardware_counters.h"
#include "counters/l2_flush.h"
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
      {"--replay", "user"}, {"--max-launches", "8192"}, {"--read-mb", "256"},
      {"--read-slices", "1"}};
  bool cupti = false;
  bool ncu = false;
  bool scrub = false;
  bool flush = true;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--cupti") {
      cupti = true;
    } else if (arg == "--ncu") {
      ncu = true;
    } else if (arg == "--scrub") {
      scrub = true;
    } else if (arg == "--no-flush") {
      flush = false;
    } else if (i + 1 < argc) {
      args[arg] = argv[++i];
    }
  }
  const bool read_only = args.at("--mode") == "read";
  if ((!args.count("--model") && !read_only) || cupti == ncu) {
    std::cerr << "usage: counters_check (--model DIR [--dtype bfloat16] [--mode prefill|decode] "
                 "[--seq-len 2048] | --mode read [--read-mb 256] [--read-slices 1]) (--cupti [--repeats 3] [--replay user|kernel] "
                 "| --ncu) [--settle-ms N] [--scrub] [--no-flush] [--max-launches 8192]\n";
    return 2;
  }
  if (!torch::cuda::is_available()) {
    std::cerr << "counters_check: no CUDA device\n";
    return 1;
  }
  torch::NoGradGuard no_grad;
  const torch::Device cuda(torch::kCUDA, 0);
  // Before each pass (and before ncu's sample): the device idle for a while,
  // and (--scrub) every line of L2 replaced by a read of a buffer twice its size.
  const int settle_ms = args.count("--settle-ms") ? std::stoi(args.at("--settle-ms")) : 0;
  torch::Tensor scrub_buffer;
  if (scrub) {
#ifdef ICD_HAVE_CUDA
    const int64_t l2_bytes = at::cuda::getCurrentDeviceProperties()->l2CacheSize;
    scrub_buffer = torch::ones({l2_bytes / 2}, torch::dtype(torch::kFloat32).device(cuda));
#else
    std::cerr << "counters_check --scrub: built without CUDA's runtime headers\n";
    return 1;
#endif
  }
  auto settle = [&] {
    if (scrub_buffer.defined()) (void)scrub_buffer.sum();
    torch::cuda::synchronize();
    if (settle_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(settle_ms));
  };
  icd::Checkpoint checkpoint;
  std::unique_ptr<icd::decode::Session> session;
  torch::Tensor ids;
  torch::Tensor step_ids;
  torch::Tensor read_values;
  if (read_only) {
    const int64_t read_mb = std::stoll(args.at("--read-mb"));
    const int64_t read_slices = std::stoll(args.at("--read-slices"));
    if (read_mb < 1 || read_slices < 1 || (read_mb * 256 * 1024) % read_slices != 0) {
      std::cerr << "counters_check: --read-mb and --read-slices are at least 1, and the slices "
                   "divide the floats read, got "
                << read_mb << " and " << read_slices << "\n";
      return 2;
    }
    read_values = torch::ones({read_mb * 256 * 1024}, torch::dtype(torch::kFloat32).device(cuda));
  } else {
    const std::map<std::string, torch::ScalarType> dtypes = {
        {"bfloat16", torch::kBFloat16}, {"float16", torch::kFloat16}, {"float32", torch::kFloat32}};
    const torch::ScalarType dtype = dtypes.at(args.at("--dtype"));
    const int64_t seq_len = std::stoll(args.at("--seq-len"));
    checkpoint = CheckpointOnCuda(args.at("--model"), dtype);
    torch::manual_seed(7);
    ids = torch::randint(0, checkpoint.config.vocab_size, {1, seq_len},
                         torch::dtype(torch::kInt64))
              .to(cuda);
    step_ids = torch::randint(0, checkpoint.config.vocab_size, {1, 1}, torch::dtype(torch::kInt64))
                   .to(cuda);
    if (auto checked = icd::CheckForwardInputs(checkpoint.config, checkpoint.weights, ids);
        !checked.ok()) {
      std::cerr << checked << "\n";
      return 1;
    }
    if (args.at("--mode") == "decode") {
      session = OrDie(icd::decode::Session::Start(checkpoint.config, checkpoint.weights, ids,
                                                  icd::decode::Execution::kInPlace, {}),
                      "decode session");
    }
  }
  // One sample, as MeasureLatency's counters run it; the first is a warm-up
  // (cuBLAS handles, workspaces), outside both profilers.
  auto sample = [&]() -> absl::Status {
    if (read_only) {
      // --read-slices N: the same bytes in N launches, each a sum over its
      // own slice (N ranges for the range profiler where there was one).
      const int64_t slices = std::stoll(args.at("--read-slices"));
      const int64_t per_slice = read_values.numel() / slices;
      for (int64_t slice = 0; slice < slices; ++slice) {
        (void)read_values.narrow(0, slice * per_slice, per_slice).sum();
      }
      return absl::OkStatus();
    }
    if (session != nullptr) return session->Step(step_ids, {}).status();
    return icd::ForwardPrechecked(checkpoint.config, checkpoint.weights, ids).status();
  };
  if (auto warm = sample(); !warm.ok()) {
    std::cerr << warm << "\n";
    return 1;
  }
  torch::cuda::synchronize();
  const std::string label = args.at("--mode") + " " +
                            (read_only ? args.at("--read-mb") + " MB in " + args.at("--read-slices") + " launches"
                             : args.at("--model")) +
                            (cupti ? " (replay " + args.at("--replay") +
                                         (flush && args.at("--replay") == "user" ? ", L2 flushed" : "") +
                                         ")"
                                   : "");
  if (ncu) {
#ifdef ICD_HAVE_CUDA
    settle();
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
    absl::Status rewound = session != nullptr ? session->Rewind() : absl::OkStatus();
    if (rewound.ok()) settle();
    return rewound;
  };
  // As MeasureLatency: L2 flushed after each pass has started (--no-flush:
  // not, as before 2026-12-04).
  std::function<absl::Status()> flush_run;  // (kernel replay takes none)
  if (flush && replay == icd::counters::Replay::kUser) {
    flush_run = OrDie(icd::counters::MakeL2Flush(cuda), "L2 flush").run;
  }
  // Each repeat a collection of its own (MeasureLatency puts the repeats
  // after the first in one: the same sample, fewer of CUPTI's passes).
  for (int repeat = 0; repeat < std::stoi(args.at("--repeats")); ++repeat) {
    if (session != nullptr) OrDie(session->Mark(), "decode session");
    settle();
    const auto launches =
        OrDie(icd::counters::Collect(0, sample, replay, rewind,
                                     std::stoll(args.at("--max-launches")), flush_run),
              "hardware counters");
    for (const icd::KernelCounters& kernel : icd::counters::ByKernel(launches)) {
      PrintJson(kernel, label, repeat);
    }
    PrintJson(icd::counters::Total(launches), label, repeat);
    std::cout.flush();  // a run cut short keeps its finished repeats
  }
  return 0;
}
