// Efficacy and time of the N:M channel permutation search (traces/nm_sparsity).
//
//   nm_sparsity_bench [--device cpu|cuda] [--seeds K] [--skip-large]
//
// Cases (2:4, automatic rounds):
//   random [64 rows, 128 channels], |N(0,1)|            K seeds
//   random [128 rows, 64 channels], U[0,1)              K seeds (Apex's
//       permutation_test.py setup, where its default search reports 35.5%)
//   5120 channels x 2752 rows (2560 + 192: out_proj + x_proj of mamba-2.8b),
//       |N(0,1)| weights, and the same scaled by a log-normal per-channel
//       activation norm (|W|·‖x‖-like saliency)              2 seeds each
//   the same 5120 x 2752 with block = 64 (a Mamba-2 head)     1 seed
#include "torch_api.h"
#include <torch/version.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "traces/nm_sparsity.h"

namespace {

using icd::traces::NmOptions;
using icd::traces::NmSolution;

struct Case {
  std::string name;
  int64_t rows = 0, channels = 0;
  std::string kind;  // "abs_normal", "uniform", "scaled"
  int64_t block = 0;
};

torch::Tensor MakeSaliency(const Case& c, uint64_t seed, torch::Device device) {
  torch::manual_seed(seed);
  torch::Tensor saliency;
  if (c.kind == "uniform") {
    saliency = torch::rand({c.rows, c.channels}, torch::kFloat32);
  } else {
    saliency = torch::randn({c.rows, c.channels}, torch::kFloat32).abs();
    if (c.kind == "scaled") {
      saliency = saliency * torch::randn({1, c.channels}, torch::kFloat32).mul(0.5).exp();
    }
  }
  return saliency.to(device);
}

bool RunCase(const Case& c, uint64_t seed, torch::Device device) {
  const torch::Tensor saliency = MakeSaliency(c, seed, device);
  NmOptions options;
  options.block = c.block;
  options.seed = seed;
  if (device.is_cuda()) torch::cuda::synchronize();
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<NmSolution> solution = icd::traces::SolveNmPermutation(saliency, options);
  if (device.is_cuda()) torch::cuda::synchronize();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!solution.ok()) {
    std::printf("%-34s seed %2llu  FAILED: %s\n", c.name.c_str(),
                static_cast<unsigned long long>(seed),
                std::string(solution.status().message()).c_str());
    return false;
  }
  std::printf("%-34s seed %2llu  identity %13.3f  solved %13.3f  bound %13.3f  "
              "efficacy %6.2f%%  rounds %3lld  %7.3f s\n",
              c.name.c_str(), static_cast<unsigned long long>(seed), solution->kept_identity,
              solution->kept_solved, solution->upper_bound, 100.0 * solution->efficacy,
              static_cast<long long>(solution->rounds), seconds);
  std::fflush(stdout);
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  std::string device_name = "cpu";
  int64_t seeds = 5;
  bool skip_large = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--device" && i + 1 < argc) {
      device_name = argv[++i];
    } else if (arg == "--seeds" && i + 1 < argc) {
      seeds = std::atoll(argv[++i]);
    } else if (arg == "--skip-large") {
      skip_large = true;
    } else {
      std::fprintf(stderr, "usage: %s [--device cpu|cuda] [--seeds K] [--skip-large]\n", argv[0]);
      return 2;
    }
  }
  if (device_name == "cuda" && !torch::cuda::is_available()) {
    std::fprintf(stderr, "CUDA requested but not available\n");
    return 2;
  }
  const torch::Device device(device_name == "cuda" ? torch::kCUDA : torch::kCPU);
  std::string device_label = device_name;
  if (device.is_cuda()) {
    device_label += " (" + std::to_string(torch::cuda::device_count()) + " visible)";
  }
  std::printf("device: %s; LibTorch %s, %d intra-op threads\n", device_label.c_str(),
              TORCH_VERSION, torch::get_num_threads());

  bool ok = true;
  const std::vector<Case> small = {
      {"64 rows x 128 ch |N(0,1)|", 64, 128, "abs_normal", 0},
      {"128 rows x 64 ch U[0,1) (Apex)", 128, 64, "uniform", 0},
  };
  for (const Case& c : small) {
    for (int64_t seed = 1; seed <= seeds; ++seed) ok = RunCase(c, static_cast<uint64_t>(seed), device) && ok;
  }
  if (!skip_large) {
    const std::vector<Case> large = {
        {"2752 rows x 5120 ch |N(0,1)|", 2752, 5120, "abs_normal", 0},
        {"2752 rows x 5120 ch scaled", 2752, 5120, "scaled", 0},
    };
    for (const Case& c : large) {
      for (uint64_t seed = 1; seed <= 2; ++seed) ok = RunCase(c, seed, device) && ok;
    }
    ok = RunCase({"2752 rows x 5120 ch |N(0,1)| blk64", 2752, 5120, "abs_normal", 64}, 1,
                 device) && ok;
  }
  return ok ? 0 : 1;
}
