// state_space_scan_bench: icd's Mamba-2 scan kernel (server/core/src/scan/
// state_space_scan.cu) on its own, on one layer of the mamba2-130m and
// mamba2-2.7b shapes (batch 1, 2048 steps, head dim 64, d_state 128, one
// group; bf16 x, B, C and time step read from one [L, conv_dim] buffer as
// the forward does). CUDA runtime only, so nvcc builds it in seconds on the
// GPU machine; the tile is the launcher's (ICD_STATE_SPACE_TILE picks one),
// so one build times every tile: bench/state_space_scan_bench.sh.
//
// One JSON line per shape: the median of 30 launches (CUDA events, after 5),
// and beside it the two floors the kernel is measured against: the bytes it
// must move at 4.0 TB/s, and three FP32 operations per state and step at the
// GPU's FP32 issue rate (SMs x 128 lanes x clock).
// Correctness is cuda_test's (StateSpaceKernelTest, run under each tile).
//
// Usage: state_space_scan_bench [--label NAME]
// Exit status: 0, or 2 on a CUDA error.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda_check.h"
#include "scan/state_space_scan_launch.h"

namespace {

using icd::scan::LaunchStateSpaceScan;
using icd::scan::ScanElementType;
using icd::scan::StateSpaceScanLaunchArgs;

struct Shape {
  const char* name;
  int64_t heads;
};

// A device buffer of `count` random values in [-scale, scale] (bf16) or
// [low, high] (float32).
void* RandomBf16(int64_t count, float scale, std::mt19937& random) {
  std::uniform_real_distribution<float> uniform(-scale, scale);
  std::vector<__nv_bfloat16> host(static_cast<size_t>(count));
  for (auto& value : host) value = __float2bfloat16(uniform(random));
  void* device = nullptr;
  CHECK_CUDA(cudaMalloc(&device, host.size() * sizeof(__nv_bfloat16)));
  CHECK_CUDA(cudaMemcpy(device, host.data(), host.size() * sizeof(__nv_bfloat16),
                        cudaMemcpyHostToDevice));
  return device;
}

float* RandomFloat(int64_t count, float low, float high, std::mt19937& random) {
  std::uniform_real_distribution<float> uniform(low, high);
  std::vector<float> host(static_cast<size_t>(count));
  for (auto& value : host) value = uniform(random);
  float* device = nullptr;
  CHECK_CUDA(cudaMalloc(&device, host.size() * sizeof(float)));
  CHECK_CUDA(cudaMemcpy(device, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice));
  return device;
}

void TimeShape(const Shape& shape, const std::string& label, const cudaDeviceProp& properties,
               int clock_khz) {
  constexpr int64_t kSteps = 2048, kHeadDim = 64, kState = 128, kGroups = 1;
  const int64_t inner = shape.heads * kHeadDim;
  const int64_t conv_dim = inner + 2 * kGroups * kState;  // xBC, as the conv writes it
  std::mt19937 random(11);
  void* xbc = RandomBf16(kSteps * conv_dim, 1.0f, random);
  void* time_step = RandomBf16(kSteps * shape.heads, 2.0f, random);
  float* bias = RandomFloat(shape.heads, -4.0f, -2.0f, random);
  float* decay = RandomFloat(shape.heads, -16.0f, -1.0f, random);
  float* skip = RandomFloat(shape.heads, 0.5f, 1.5f, random);
  float* state = nullptr;
  float* output = nullptr;
  CHECK_CUDA(cudaMalloc(&state, shape.heads * kHeadDim * kState * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&output, kSteps * inner * sizeof(float)));

  StateSpaceScanLaunchArgs args;
  args.batch = 1;
  args.seq_len = kSteps;
  args.heads = shape.heads;
  args.head_dim = kHeadDim;
  args.groups = kGroups;
  args.state_size = kState;
  args.element_type = ScanElementType::kBFloat16;
  auto* xbc_values = static_cast<__nv_bfloat16*>(xbc);
  args.hidden = {xbc_values, kSteps * conv_dim, conv_dim};
  args.b_proj = {xbc_values + inner, kSteps * conv_dim, conv_dim};
  args.c_proj = {xbc_values + inner + kGroups * kState, kSteps * conv_dim, conv_dim};
  args.time_step = {time_step, kSteps * shape.heads, shape.heads};
  args.time_step_bias = bias;
  args.a_decay = decay;
  args.skip = skip;
  args.state_out = state;
  args.output = output;

  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  std::vector<float> microseconds;
  for (int launch = 0; launch < 35; ++launch) {
    CHECK_CUDA(cudaEventRecord(start));
    const int status = LaunchStateSpaceScan(args, nullptr);
    if (status != 0) {
      std::fprintf(stderr, "launch: %s\n", cudaGetErrorString(static_cast<cudaError_t>(status)));
      std::exit(2);
    }
    CHECK_CUDA(cudaEventRecord(stop));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    if (launch >= 5) microseconds.push_back(ms * 1000.0f);
  }
  std::sort(microseconds.begin(), microseconds.end());
  const double median = microseconds[microseconds.size() / 2];
  // Moved at least once: x, B, C, the time step (bf16), y and the state (float32).
  const double bytes = 2.0 * kSteps * (inner + 2 * kGroups * kState + shape.heads) +
                       4.0 * kSteps * inner + 4.0 * shape.heads * kHeadDim * kState;
  const double state_steps = static_cast<double>(inner) * kState * kSteps;
  const double fp32_rate = static_cast<double>(properties.multiProcessorCount) * 128.0 *
                           clock_khz * 1e3;  // operations per second
  std::printf("{\"bench\": \"state_space_scan\", \"label\": \"%s\", \"tile\": \"%s\", "
              "\"shape\": \"mamba2-%s\", \"heads\": %ld, \"seq_len\": %ld, \"median_us\": %.1f, "
              "\"p10_us\": %.1f, \"p90_us\": %.1f, \"bytes_floor_us\": %.1f, "
              "\"fp32_floor_us\": %.1f, \"gpu\": \"%s\"}\n",
              label.c_str(), std::getenv("ICD_STATE_SPACE_TILE") != nullptr
                                 ? std::getenv("ICD_STATE_SPACE_TILE")
                                 : "default",
              shape.name, static_cast<long>(shape.heads), static_cast<long>(kSteps), median,
              static_cast<double>(microseconds[microseconds.size() / 10]),
              static_cast<double>(microseconds[microseconds.size() * 9 / 10]),
              bytes / 4.0e12 * 1e6, 3.0 * state_steps / fp32_rate * 1e6, properties.name);
  for (void* buffer : {xbc, time_step, static_cast<void*>(bias), static_cast<void*>(decay),
                       static_cast<void*>(skip), static_cast<void*>(state),
                       static_cast<void*>(output)}) {
    CHECK_CUDA(cudaFree(buffer));
  }
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
}

}  // namespace

int main(int argc, char** argv) {
  std::string label = "default";
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--label") == 0) label = argv[i + 1];
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::fprintf(stderr, "state_space_scan_bench: no CUDA device\n");
    return 2;
  }
  cudaDeviceProp properties;
  CHECK_CUDA(cudaGetDeviceProperties(&properties, 0));
  int clock_khz = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0));
  for (const Shape& shape : {Shape{"130m", 24}, Shape{"2.7b", 80}}) {
    TimeShape(shape, label, properties, clock_khz);
  }
  return 0;
}
