// state_space_scan_bench: icd's Mamba-2 scan on CUDA on its own, both forms
// (server/core/src/scan/state_space_scan.cu, the recurrence;
// state_space_chunked.cu, the chunked form on tensor cores), on one layer
// of the mamba2-130m and mamba2-2.7b shapes (batch 1, 2048 steps, head dim
// 64, d_state 128, one group; bf16 x, B, C and time step read from one
// [L, conv_dim] buffer as the forward does). CUDA runtime only, so nvcc
// builds it in seconds on the GPU machine; the recurrence's tile is the
// launcher's (ICD_STATE_SPACE_TILE picks one): bench/state_space_scan_bench.sh.
//
// One JSON line per shape and form: the median of 30 launches (CUDA events,
// after 5), the two floors the recurrence is measured against (the bytes it
// must move at 4.0 TB/s; three FP32 operations per state and step at the
// GPU's FP32 issue rate, SMs x 128 lanes x clock), and for the chunked form
// its distance (rel L2) from the recurrence's y and S_L on the same inputs.
// With --check, first the chunked form against the recurrence over odd
// shapes (groups, head dims and state sizes off its tiles, lengths around
// its 64-step chunk, S_0, D per channel), and the step form (a decode step)
// against the recurrence on one step: one line each, exit 1 past 1e-5.
// Then one decode step of each shape, the step form and the recurrence: the
// mean of 200 launches back to back (a decode step's kernels run so).
// The recurrence itself is checked against float64 by cuda_test
// (StateSpaceKernelTest); both forms by cuda_test's chunked cases.
//
// Usage: state_space_scan_bench [--label NAME] [--check]
// Exit status: 0; 1 when a checked distance is past 1e-5; 2 on a CUDA error.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cuda_check.h"
#include "scan/state_space_scan_launch.h"

namespace {

using icd::scan::LaunchStateSpaceScan;
using icd::scan::StateSpaceForm;
using icd::scan::StateSpaceWorkspaceFloats;
using icd::scan::ScanElementType;
using icd::scan::StateSpaceScanLaunchArgs;

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

// One layer's inputs on the device: x, B, C in one [B, L, conv_dim] bf16
// buffer (x, then the groups' B, then their C, as the conv writes xBC).
struct Case {
  std::string name;
  int64_t batch, heads, groups, head_dim, state, seq_len;
  bool state_in;
  bool skip_per_channel;
};

struct Layer {
  Case shape;
  void* xbc = nullptr;
  void* time_step = nullptr;
  float* bias = nullptr;
  float* decay = nullptr;
  float* skip = nullptr;
  float* state_in = nullptr;

  explicit Layer(const Case& c) : shape(c) {
    std::mt19937 random(11);
    xbc = RandomBf16(c.batch * c.seq_len * ConvDim(), 1.0f, random);
    time_step = RandomBf16(c.batch * c.seq_len * c.heads, 2.0f, random);
    bias = RandomFloat(c.heads, -4.0f, -2.0f, random);
    decay = RandomFloat(c.heads, -16.0f, -1.0f, random);
    skip = RandomFloat(c.skip_per_channel ? c.heads * c.head_dim : c.heads, 0.5f, 1.5f, random);
    if (c.state_in) state_in = RandomFloat(StateFloats(), -1.0f, 1.0f, random);
  }
  ~Layer() {
    for (void* buffer : {xbc, time_step, static_cast<void*>(bias), static_cast<void*>(decay),
                         static_cast<void*>(skip), static_cast<void*>(state_in)}) {
      if (buffer != nullptr) CHECK_CUDA(cudaFree(buffer));
    }
  }
  Layer(const Layer&) = delete;
  Layer& operator=(const Layer&) = delete;

  int64_t Inner() const { return shape.heads * shape.head_dim; }
  int64_t ConvDim() const { return Inner() + 2 * shape.groups * shape.state; }
  int64_t StateFloats() const { return shape.batch * Inner() * shape.state; }
  int64_t OutputFloats() const { return shape.batch * shape.seq_len * Inner(); }

  StateSpaceScanLaunchArgs Args(StateSpaceForm form, float* state_out, float* output) const {
    StateSpaceScanLaunchArgs args;
    args.batch = shape.batch;
    args.seq_len = shape.seq_len;
    args.heads = shape.heads;
    args.head_dim = shape.head_dim;
    args.groups = shape.groups;
    args.state_size = shape.state;
    args.element_type = ScanElementType::kBFloat16;
    auto* values = static_cast<__nv_bfloat16*>(xbc);
    const int64_t batch_stride = shape.seq_len * ConvDim();
    args.hidden = {values, batch_stride, ConvDim()};
    args.b_proj = {values + Inner(), batch_stride, ConvDim()};
    args.c_proj = {values + Inner() + shape.groups * shape.state, batch_stride, ConvDim()};
    args.time_step = {time_step, shape.seq_len * shape.heads, shape.heads};
    args.time_step_bias = {bias, true};
    args.a_decay = decay;
    args.skip = {skip, true};
    args.skip_per_channel = shape.skip_per_channel;
    args.state_in = state_in;
    args.state_out = state_out;
    args.output = output;
    args.form = form;
    return args;
  }
};

// A form's y and S_L on the layer, and the median of `launches` timed ones.
struct Result {
  std::vector<float> output, state;
  std::vector<float> microseconds;
};

Result Run(const Layer& layer, StateSpaceForm form, int launches) {
  float* state = nullptr;
  float* output = nullptr;
  float* workspace = nullptr;
  CHECK_CUDA(cudaMalloc(&state, layer.StateFloats() * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&output, layer.OutputFloats() * sizeof(float)));
  StateSpaceScanLaunchArgs args = layer.Args(form, state, output);
  const int64_t workspace_floats = StateSpaceWorkspaceFloats(args);
  if (workspace_floats > 0) {
    CHECK_CUDA(cudaMalloc(&workspace, workspace_floats * sizeof(float)));
    args.workspace = workspace;
  }
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  Result result;
  for (int launch = 0; launch < launches + 1; ++launch) {
    CHECK_CUDA(cudaEventRecord(start));
    const int status = LaunchStateSpaceScan(args, nullptr);
    if (status != 0) {
      std::fprintf(stderr, "%s: launch: %s\n", layer.shape.name.c_str(),
                   cudaGetErrorString(static_cast<cudaError_t>(status)));
      std::exit(2);
    }
    CHECK_CUDA(cudaEventRecord(stop));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    if (launch >= 1) result.microseconds.push_back(ms * 1000.0f);
  }
  CHECK_CUDA(cudaGetLastError());
  result.output.resize(static_cast<size_t>(layer.OutputFloats()));
  result.state.resize(static_cast<size_t>(layer.StateFloats()));
  CHECK_CUDA(cudaMemcpy(result.output.data(), output, result.output.size() * sizeof(float),
                        cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(result.state.data(), state, result.state.size() * sizeof(float),
                        cudaMemcpyDeviceToHost));
  std::sort(result.microseconds.begin(), result.microseconds.end());
  for (void* buffer : {static_cast<void*>(state), static_cast<void*>(output),
                       static_cast<void*>(workspace)}) {
    if (buffer != nullptr) CHECK_CUDA(cudaFree(buffer));
  }
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  return result;
}

double RelL2(const std::vector<float>& values, const std::vector<float>& reference) {
  double difference = 0.0;
  double norm = 0.0;
  for (size_t i = 0; i < values.size(); ++i) {
    const double delta = static_cast<double>(values[i]) - reference[i];
    difference += delta * delta;
    norm += static_cast<double>(reference[i]) * reference[i];
  }
  return norm > 0.0 ? std::sqrt(difference / norm) : std::sqrt(difference);
}

// The chunked form against the recurrence on odd shapes; false past 1e-5.
bool Check(const std::string& label) {
  bool pass = true;
  std::vector<Case> cases;
  for (const int64_t length : {1, 7, 63, 64, 65, 130, 1000}) {
    cases.push_back({"P64 N128", 1, 4, 1, 64, 128, length, length % 2 == 1, false});
  }
  cases.push_back({"B2 G2 P32 N16", 2, 8, 2, 32, 16, 257, true, true});
  cases.push_back({"G4 P128 N64", 1, 8, 4, 128, 64, 300, true, false});
  cases.push_back({"G3 P24 N33", 3, 6, 3, 24, 33, 67, true, true});
  cases.push_back({"G1 P8 N5", 1, 8, 1, 8, 5, 200, false, false});
  cases.push_back({"G8 P64 N128", 1, 16, 8, 64, 128, 2048, true, false});
  const size_t chunked_cases = cases.size();
  for (const Case& c : std::vector<Case>{{"P64 N128", 1, 4, 1, 64, 128, 1, true, false},
                                         {"P64 N128", 2, 80, 1, 64, 128, 1, true, true},
                                         {"B2 G2 P32 N16", 2, 8, 2, 32, 16, 1, true, true},
                                         {"G4 P128 N64", 1, 8, 4, 128, 64, 1, false, false},
                                         {"G3 P24 N33", 3, 6, 3, 24, 33, 1, true, true},
                                         {"G1 P8 N5", 1, 8, 1, 8, 5, 1, true, false}}) {
    cases.push_back(c);
  }
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    const StateSpaceForm form = i < chunked_cases ? StateSpaceForm::kChunked : StateSpaceForm::kStep;
    const Layer layer(c);
    const Result recurrence = Run(layer, StateSpaceForm::kRecurrence, 1);
    const Result checked = Run(layer, form, 1);
    const double output = RelL2(checked.output, recurrence.output);
    const double state = RelL2(checked.state, recurrence.state);
    const bool within = output <= 1e-5 && state <= 1e-5;
    pass = pass && within;
    std::printf("{\"bench\": \"state_space_check\", \"label\": \"%s\", \"form\": \"%s\", "
                "\"case\": \"%s\", \"batch\": %ld, \"seq_len\": %ld, \"state_in\": %s, "
                "\"output_rel_l2\": %.3g, \"state_rel_l2\": %.3g, \"pass\": %s}\n",
                label.c_str(), form == StateSpaceForm::kStep ? "step" : "chunked", c.name.c_str(),
                static_cast<long>(c.batch), static_cast<long>(c.seq_len),
                c.state_in ? "true" : "false", output, state, within ? "true" : "false");
  }
  return pass;
}

void TimeShape(const char* name, int64_t heads, const std::string& label,
               const cudaDeviceProp& properties, int clock_khz) {
  const Case c{std::string("mamba2-") + name, 1, heads, 1, 64, 128, 2048, false, false};
  const Layer layer(c);
  const Result recurrence = Run(layer, StateSpaceForm::kRecurrence, 30);
  const Result chunked = Run(layer, StateSpaceForm::kChunked, 30);
  // Moved at least once: x, B, C, the time step (bf16), y and the state (float32).
  const double bytes = 2.0 * c.seq_len * (layer.Inner() + 2 * c.groups * c.state + heads) +
                       4.0 * c.seq_len * layer.Inner() + 4.0 * layer.StateFloats();
  const double state_steps = static_cast<double>(layer.Inner()) * c.state * c.seq_len;
  const double fp32_rate = static_cast<double>(properties.multiProcessorCount) * 128.0 *
                           clock_khz * 1e3;  // operations per second
  const char* tile = std::getenv("ICD_STATE_SPACE_TILE");
  for (const auto& [form, result] :
       {std::pair<const char*, const Result*>{"recurrence", &recurrence},
        std::pair<const char*, const Result*>{"chunked", &chunked}}) {
    const auto& us = result->microseconds;
    std::printf("{\"bench\": \"state_space_scan\", \"label\": \"%s\", \"form\": \"%s\", "
                "\"tile\": \"%s\", \"shape\": \"%s\", \"heads\": %ld, \"seq_len\": %ld, "
                "\"median_us\": %.1f, \"p10_us\": %.1f, \"p90_us\": %.1f, "
                "\"bytes_floor_us\": %.1f, \"fp32_floor_us\": %.1f, "
                "\"output_rel_l2_vs_recurrence\": %.3g, \"state_rel_l2_vs_recurrence\": %.3g, "
                "\"gpu\": \"%s\"}\n",
                label.c_str(), form, tile != nullptr ? tile : "default", c.name.c_str(),
                static_cast<long>(heads), static_cast<long>(c.seq_len),
                static_cast<double>(us[us.size() / 2]), static_cast<double>(us[us.size() / 10]),
                static_cast<double>(us[us.size() * 9 / 10]), bytes / 4.0e12 * 1e6,
                3.0 * state_steps / fp32_rate * 1e6, RelL2(result->output, recurrence.output),
                RelL2(result->state, recurrence.state), properties.name);
  }
}

// One decode step of a layer, each form: the mean of 200 launches back to
// back between two events (S_0 given, S written elsewhere).
void TimeStep(const char* name, int64_t heads, const std::string& label) {
  const Case c{std::string("mamba2-") + name, 1, heads, 1, 64, 128, 1, true, false};
  const Layer layer(c);
  float* state = nullptr;
  float* output = nullptr;
  CHECK_CUDA(cudaMalloc(&state, layer.StateFloats() * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&output, layer.OutputFloats() * sizeof(float)));
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  constexpr int kLaunches = 200;
  for (const auto& [form_name, form] :
       {std::pair<const char*, StateSpaceForm>{"recurrence", StateSpaceForm::kRecurrence},
        std::pair<const char*, StateSpaceForm>{"step", StateSpaceForm::kStep}}) {
    const StateSpaceScanLaunchArgs args = layer.Args(form, state, output);
    for (int round = 0; round < 2; ++round) {  // the first warms up
      CHECK_CUDA(cudaEventRecord(start));
      for (int launch = 0; launch < kLaunches; ++launch) {
        if (LaunchStateSpaceScan(args, nullptr) != 0) {
          std::fprintf(stderr, "%s: step launch failed\n", c.name.c_str());
          std::exit(2);
        }
      }
      CHECK_CUDA(cudaEventRecord(stop));
      CHECK_CUDA(cudaEventSynchronize(stop));
      float ms = 0;
      CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
      if (round == 0) continue;
      // Moved at least once: S in and out (float32), x, B, C (bf16), y (float32).
      const double bytes = 8.0 * layer.StateFloats() + 6.0 * layer.Inner() + 4.0 * c.state;
      std::printf("{\"bench\": \"state_space_step\", \"label\": \"%s\", \"form\": \"%s\", "
                  "\"shape\": \"%s\", \"heads\": %ld, \"mean_us\": %.2f, "
                  "\"bytes_floor_us\": %.2f}\n",
                  label.c_str(), form_name, c.name.c_str(), static_cast<long>(heads),
                  ms * 1000.0 / kLaunches, bytes / 4.0e12 * 1e6);
    }
  }
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaFree(state));
  CHECK_CUDA(cudaFree(output));
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
}

}  // namespace

int main(int argc, char** argv) {
  std::string label = "default";
  bool check = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--label") == 0 && i + 1 < argc) label = argv[++i];
    if (std::strcmp(argv[i], "--check") == 0) check = true;
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
  const bool pass = !check || Check(label);
  TimeShape("130m", 24, label, properties, clock_khz);
  TimeShape("2.7b", 80, label, properties, clock_khz);
  TimeStep("130m", 24, label);
  TimeStep("2.7b", 80, label);
  return pass ? 0 : 1;
}
