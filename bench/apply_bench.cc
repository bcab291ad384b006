// Applying a permutation to every group of a loaded model, against one
// device copy of all its weights (issue 5's "apply at memory speed" figure).
//
//   apply_bench --model DIR [--device cuda] [--dtype bfloat16] [--repeats 5] [--seed 1]
//               [--gather-columns staged|direct|both]
//
// The model is loaded through the engine; every repeat applies a fresh random
// valid permutation to every group (skip_verify, so only validation and the
// gathers are timed: the engine synchronises the device before it reads the
// clock), then one more apply is verified. The baseline clones every weight
// tensor once on the same device (the same tensors, read and written once),
// synchronised the same way. The gathers alone (icd::ApplyGathers on a
// second copy of the weights, no validation, no engine) are timed too: when
// the host call returns and when the device is done, so the report splits
// the host's fixed work from the device's. On CUDA, the kernel's two ways of gathering
// moving columns (gather/permute_gather_launch.h) are timed in turn, one
// JSON line each; the check runs with the default (staged). Host memory is
// kept for reuse, as icd-server keeps it.
#include "torch_api.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "io/checkpoint.h"
#include "apply/symmetry.h"
#include "apply/gather/permute_gather.h"
#include "icd/core/engine.h"
#include "icd/core/host_memory.h"
#include "test_util.h"

namespace {

double Median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

void Synchronize(const torch::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize(device.index());
}

torch::ScalarType ParseDtype(const std::string& name) {
  if (name == "float32") return torch::kFloat32;
  if (name == "bfloat16") return torch::kBFloat16;
  if (name == "float16") return torch::kFloat16;
  if (name == "float64") return torch::kFloat64;
  throw std::runtime_error("--dtype must be float32, bfloat16, float16 or float64");
}

// Milliseconds to clone every tensor once, median over `repeats`.
double CopyMillis(const std::vector<torch::Tensor>& tensors, const torch::Device& device,
                  int repeats) {
  std::vector<double> times;
  for (int r = 0; r <= repeats; ++r) {  // r == 0 warms the allocator up
    Synchronize(device);
    const auto start = std::chrono::steady_clock::now();
    std::vector<torch::Tensor> copies;
    copies.reserve(tensors.size());
    for (const torch::Tensor& tensor : tensors) copies.push_back(tensor.clone());
    Synchronize(device);
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    if (r > 0) times.push_back(ms);
  }
  return Median(times);
}

}  // namespace

int main(int argc, char** argv) {
  icd::KeepFreedHostMemory();
  std::string model_dir, device_name = "cuda", dtype_name = "bfloat16", columns_name = "both";
  int repeats = 5;
  uint64_t seed = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(flag + " needs a value");
      return argv[++i];
    };
    if (flag == "--model") model_dir = value();
    else if (flag == "--device") device_name = value();
    else if (flag == "--dtype") dtype_name = value();
    else if (flag == "--repeats") repeats = std::stoi(value());
    else if (flag == "--seed") seed = std::stoull(value());
    else if (flag == "--gather-columns") columns_name = value();
    else {
      std::cerr << "usage: apply_bench --model DIR [--device cuda] [--dtype bfloat16]"
                   " [--repeats 5] [--seed 1] [--gather-columns staged|direct|both]\n";
      return 2;
    }
  }
  if (model_dir.empty()) {
    std::cerr << "apply_bench: --model DIR is required\n";
    return 2;
  }
  const torch::Device device(device_name);
  const torch::ScalarType dtype = ParseDtype(dtype_name);

  icd::Engine engine;
  icd::LoadOptions load;
  load.device = device_name;
  load.dtype = dtype_name;
  auto info = engine.Load("model", model_dir, load);
  if (!info.ok()) {
    std::cerr << "load: " << info.status() << "\n";
    return 1;
  }
  auto groups = engine.Symmetries("model");
  if (!groups.ok()) {
    std::cerr << "symmetries: " << groups.status() << "\n";
    return 1;
  }

  // The same tensors, on the same device and dtype, for the copy baseline.
  auto checkpoint = icd::ReadCheckpoint(model_dir);
  if (!checkpoint.ok()) {
    std::cerr << "read: " << checkpoint.status() << "\n";
    return 1;
  }
  icd::Weights direct;
  std::vector<torch::Tensor> tensors;
  int64_t bytes = 0;
  for (const auto& [name, tensor] : checkpoint->weights) {
    direct[name] = tensor.to(device, dtype).contiguous();
    tensors.push_back(direct[name]);
    bytes += tensors.back().numel() * tensors.back().element_size();
  }
  checkpoint->weights.clear();
  const double copy_ms = CopyMillis(tensors, device, repeats);
  tensors.clear();
  const icd::FamilySpec spec = icd::BuildSpec(checkpoint->config);

  using icd::gather::GatherColumns;
  std::vector<std::pair<std::string, GatherColumns>> modes;
  if (columns_name == "staged" || columns_name == "both") modes.emplace_back("staged", GatherColumns::kStaged);
  if (columns_name == "direct" || columns_name == "both") modes.emplace_back("direct", GatherColumns::kDirect);
  if (modes.empty()) {
    std::cerr << "apply_bench: --gather-columns must be staged, direct or both\n";
    return 2;
  }
  std::mt19937_64 rng(seed);
  icd::ApplyOptions unverified;
  unverified.skip_verify = true;
  struct Timed {
    std::string mode;
    std::vector<double> apply, gathers_host, gathers;
  };
  std::vector<Timed> timed;
  for (const auto& [mode_name, mode] : modes) {
    icd::gather::SetCudaGatherColumns(mode);
    Timed& times = timed.emplace_back(Timed{mode_name, {}, {}, {}});
    std::vector<double>& apply_times = times.apply;
    for (int r = 0; r <= repeats; ++r) {  // r == 0 is a warm-up
      auto report =
          engine.Apply("model", icd::testing::RandomPermutations(*groups, rng), unverified);
      if (!report.ok()) {
        std::cerr << "apply: " << report.status() << "\n";
        return 1;
      }
      if (r > 0) apply_times.push_back(report->apply_ms);
    }
    for (int r = 0; r <= repeats; ++r) {
      std::vector<std::vector<int64_t>> indices;
      for (const icd::GroupInfo& group : spec) indices.push_back(icd::testing::RandomPermutation(group, rng));
      std::vector<icd::GroupPermutation> perms;
      for (size_t g = 0; g < spec.size(); ++g) perms.push_back({&spec[g], &indices[g]});
      Synchronize(device);
      const auto start = std::chrono::steady_clock::now();
      icd::ApplyGathers(perms, direct);
      const auto host_done = std::chrono::steady_clock::now();
      Synchronize(device);
      const auto done = std::chrono::steady_clock::now();
      if (r == 0) continue;
      times.gathers_host.push_back(std::chrono::duration<double, std::milli>(host_done - start).count());
      times.gathers.push_back(std::chrono::duration<double, std::milli>(done - start).count());
    }
  }
  icd::gather::SetCudaGatherColumns(GatherColumns::kStaged);
  // A refused check (ABORTED: the weights are restored) is reported, not
  // fatal: the timing stands, and the message carries the measured error.
  auto verified = engine.Apply("model", icd::testing::RandomPermutations(*groups, rng));
  std::string check = "\"verified\": false, \"verify_error\": \"" +
                      std::string(verified.ok() ? "" : verified.status().message()) + "\"";
  if (verified.ok()) {
    char text[256];
    std::snprintf(text, sizeof(text),
                  "\"verified\": %s, \"verify_rel_l2\": %.3g, \"verify_top1\": %.4f, "
                  "\"verify_tolerance\": %.3g, \"verify_ms\": %.1f",
                  verified->verified ? "true" : "false", verified->correctness.rel_l2,
                  verified->correctness.top1_agreement, verified->correctness.tolerance,
                  verified->verify_ms);
    check = text;
  }
  for (const Timed& times : timed) {
    const std::vector<double>& apply_times = times.apply;
    const char* mode_name = times.mode.c_str();
    const double apply_ms = Median(apply_times);
    std::printf(
        "{\"bench\": \"apply\", \"model\": \"%s\", \"device\": \"%s\", \"dtype\": \"%s\", "
        "\"gather_columns\": \"%s\", \"gathers_host_ms_median\": %.3f, "
        "\"gathers_ms_median\": %.3f, "
        "\"parameters\": %lld, \"weight_bytes\": %lld, \"groups\": %zu, \"repeats\": %d, "
        "\"apply_ms_median\": %.3f, \"apply_ms_min\": %.3f, \"copy_ms_median\": %.3f, "
        "\"apply_over_copy\": %.3f, \"copy_gb_s\": %.1f, %s}\n",
        model_dir.c_str(), info->device.c_str(), dtype_name.c_str(), mode_name,
        Median(times.gathers_host), Median(times.gathers),
        static_cast<long long>(info->parameters), static_cast<long long>(bytes), groups->size(),
        repeats, apply_ms, *std::min_element(apply_times.begin(), apply_times.end()), copy_ms,
        apply_ms / copy_ms, 2.0 * static_cast<double>(bytes) / (copy_ms * 1e6), check.c_str());
  }
  return verified.ok() ? 0 : 3;
}
