// linear_bench: icd's few-rows linear kernel (server/core/src/fused/
// few_rows_linear.cu), a decode step's projections, on its own: CUDA runtime
// and cuBLAS only (no LibTorch), so nvcc builds it in seconds on the GPU
// machine and kernel variants can be compared in one call.
//
// 1. Correctness against a float64 CPU reference (every element type, rows
//    1..8, in_features down to one 16-byte load, out_features below a block's
//    warps, a bias, a strided input). Inputs are rounded to the element type
//    first; each output must be within its rounding (half an ulp of the
//    element type) plus 1e-5 of the sum of |w·x| terms (float32 accumulation).
// 2. Timing on the Mamba decode shapes (mamba-130m and mamba-2.8b: in_proj,
//    x_proj, dt_proj, out_proj, the head; Mamba-2's in_proj; bf16, 1 row):
//    launches are captured in a CUDA graph, each on its own copy of the weights (copies enough to
//    pass 512 MB, so no launch finds its weights in the 50 MB L2), as a decode
//    step replays them; the median of 15 replays, per launch. Beside it, on
//    the same copies: cuBLAS (cublasGemmEx, float32 compute, what LibTorch's
//    F.linear calls), and a read-only kernel that streams the same weight
//    bytes and does nothing else (the kernel's floor). One JSON line per case.
//
// Usage: linear_bench [--variant NAME]   (a label for this build's tuning)
// Exit status: 0 all checks passed, 1 a check failed, 2 a CUDA error.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda_check.h"
#include "fused/fused_launch.h"

namespace {

using icd::fused::ElementType;
using icd::fused::FewRowsLinearLaunchArgs;
using icd::fused::LaunchFewRowsLinear;

#define CHECK_CUBLAS(call)                                                  \
  do {                                                                      \
    const cublasStatus_t status_ = (call);                                  \
    if (status_ != CUBLAS_STATUS_SUCCESS) {                                 \
      std::fprintf(stderr, "%s:%d: cuBLAS status %d\n", __FILE__, __LINE__, \
                   static_cast<int>(status_));                              \
      std::exit(2);                                                         \
    }                                                                       \
  } while (0)

int ElementBytes(ElementType type) { return type == ElementType::kFloat32 ? 4 : 2; }

const char* ElementName(ElementType type) {
  switch (type) {
    case ElementType::kFloat32: return "float32";
    case ElementType::kBFloat16: return "bfloat16";
    case ElementType::kFloat16: return "float16";
  }
  return "?";
}

// Host-side storage of one value, and its value back as a double.
uint32_t Store(ElementType type, float value) {
  switch (type) {
    case ElementType::kFloat32: {
      uint32_t bits;
      std::memcpy(&bits, &value, 4);
      return bits;
    }
    case ElementType::kBFloat16:
      return __bfloat16_as_ushort(__float2bfloat16_rn(value));
    case ElementType::kFloat16:
      return __half_as_ushort(__float2half_rn(value));
  }
  return 0;
}

double Load(ElementType type, uint32_t bits) {
  switch (type) {
    case ElementType::kFloat32: {
      float value;
      std::memcpy(&value, &bits, 4);
      return value;
    }
    case ElementType::kBFloat16:
      return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(bits)));
    case ElementType::kFloat16:
      return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  }
  return 0;
}

// n values of `type`, packed as the device holds them.
std::vector<unsigned char> Pack(ElementType type, const std::vector<uint32_t>& bits) {
  const int size = ElementBytes(type);
  std::vector<unsigned char> bytes(bits.size() * size);
  for (size_t i = 0; i < bits.size(); ++i) std::memcpy(&bytes[i * size], &bits[i], size);
  return bytes;
}

std::vector<uint32_t> Unpack(ElementType type, const std::vector<unsigned char>& bytes) {
  const int size = ElementBytes(type);
  std::vector<uint32_t> bits(bytes.size() / size, 0);
  for (size_t i = 0; i < bits.size(); ++i) std::memcpy(&bits[i], &bytes[i * size], size);
  return bits;
}

struct Device {
  void* pointer = nullptr;
  explicit Device(size_t bytes) { CHECK_CUDA(cudaMalloc(&pointer, std::max<size_t>(bytes, 16))); }
  ~Device() { cudaFree(pointer); }
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;
};

// One correctness case; false (and a line on stderr) when an output is off.
bool CheckCase(ElementType type, int64_t rows, int64_t in_features, int64_t out_features,
               bool bias, int64_t row_padding, std::mt19937& random) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t stride = in_features + row_padding;
  std::vector<uint32_t> input(rows * stride), weight(out_features * in_features),
      bias_values(out_features);
  for (auto& v : input) v = Store(type, normal(random));
  for (auto& v : weight) v = Store(type, normal(random) / std::sqrt(float(in_features)));
  for (auto& v : bias_values) v = Store(type, normal(random));
  const int size = ElementBytes(type);
  Device d_input(input.size() * size), d_weight(weight.size() * size),
      d_bias(bias_values.size() * size), d_output(rows * out_features * size);
  CHECK_CUDA(cudaMemcpy(d_input.pointer, Pack(type, input).data(), input.size() * size,
                        cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_weight.pointer, Pack(type, weight).data(), weight.size() * size,
                        cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_bias.pointer, Pack(type, bias_values).data(),
                        bias_values.size() * size, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemset(d_output.pointer, 0xff, rows * out_features * size));  // NaN
  FewRowsLinearLaunchArgs args;
  args.rows = rows;
  args.in_features = in_features;
  args.out_features = out_features;
  args.element_type = type;
  args.input = d_input.pointer;
  args.input_row_stride = stride;
  args.weight = d_weight.pointer;
  args.bias = bias ? d_bias.pointer : nullptr;
  args.output = d_output.pointer;
  CHECK_CUDA(static_cast<cudaError_t>(LaunchFewRowsLinear(args, nullptr)));
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<unsigned char> out_bytes(rows * out_features * size);
  CHECK_CUDA(cudaMemcpy(out_bytes.data(), d_output.pointer, out_bytes.size(),
                        cudaMemcpyDeviceToHost));
  const std::vector<uint32_t> output = Unpack(type, out_bytes);
  const double half_ulp = type == ElementType::kFloat32   ? std::ldexp(1.0, -24)
                          : type == ElementType::kBFloat16 ? std::ldexp(1.0, -8)
                                                           : std::ldexp(1.0, -11);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t o = 0; o < out_features; ++o) {
      double sum = bias ? Load(type, bias_values[o]) : 0.0, magnitude = std::fabs(sum);
      for (int64_t k = 0; k < in_features; ++k) {
        const double term = Load(type, weight[o * in_features + k]) * Load(type, input[r * stride + k]);
        sum += term;
        magnitude += std::fabs(term);
      }
      const double got = Load(type, output[r * out_features + o]);
      const double bound = half_ulp * std::fabs(sum) + 1e-5 * magnitude + 1e-30;
      if (!(std::fabs(got - sum) <= bound)) {
        std::fprintf(stderr,
                     "FAIL %s rows=%lld in=%lld out=%lld bias=%d padding=%lld: y[%lld][%lld] = %g, "
                     "reference %g (bound %g)\n",
                     ElementName(type), (long long)rows, (long long)in_features,
                     (long long)out_features, int(bias), (long long)row_padding, (long long)r,
                     (long long)o, got, sum, bound);
        return false;
      }
    }
  }
  return true;
}

// Streams `bytes` of weights in 16-byte loads and keeps one word per block:
// the read rate a kernel that only reads the weights reaches.
__global__ void ReadOnlyKernel(const uint4* data, int64_t chunks, unsigned int* sink) {
  unsigned int folded = 0;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < chunks;
       i += int64_t{gridDim.x} * blockDim.x) {
    const uint4 v = __ldcs(data + i);
    folded ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (folded == 0x9e3779b9u) sink[blockIdx.x] = folded;  // never in practice; keeps the loads
}

struct Shape {
  const char* model;
  const char* name;
  int64_t in_features, out_features;
};

// Median milliseconds per launch of `launch(copy)` over `copies` weight
// copies, captured once as a graph and replayed.
template <class Launch>
double TimeGraph(int copies, cudaStream_t stream, Launch&& launch) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int c = 0; c < copies; ++c) launch(c);
  CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
  CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  for (int i = 0; i < 3; ++i) CHECK_CUDA(cudaGraphLaunch(exec, stream));
  std::vector<double> times;
  for (int i = 0; i < 15; ++i) {
    CHECK_CUDA(cudaEventRecord(start, stream));
    CHECK_CUDA(cudaGraphLaunch(exec, stream));
    CHECK_CUDA(cudaEventRecord(stop, stream));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms / copies);
  }
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  CHECK_CUDA(cudaGraphExecDestroy(exec));
  CHECK_CUDA(cudaGraphDestroy(graph));
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

void TimeShape(const Shape& shape, const std::string& variant, const char* gpu) {
  const ElementType type = ElementType::kBFloat16;
  const int64_t weight_bytes = shape.in_features * shape.out_features * 2;
  const int copies = static_cast<int>(
      std::clamp<int64_t>((int64_t{512} << 20) / weight_bytes + 1, 2, 2000));
  Device weights(static_cast<size_t>(weight_bytes) * copies);
  Device input(shape.in_features * 2), output(shape.out_features * 4 * copies);
  Device sink(4 * 4096);
  CHECK_CUDA(cudaMemset(weights.pointer, 0x3c, static_cast<size_t>(weight_bytes) * copies));
  CHECK_CUDA(cudaMemset(input.pointer, 0x3c, shape.in_features * 2));
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  auto* base = static_cast<unsigned char*>(weights.pointer);

  const double icd_ms = TimeGraph(copies, stream, [&](int c) {
    FewRowsLinearLaunchArgs args;
    args.rows = 1;
    args.in_features = shape.in_features;
    args.out_features = shape.out_features;
    args.element_type = type;
    args.input = input.pointer;
    args.input_row_stride = shape.in_features;
    args.weight = base + static_cast<size_t>(weight_bytes) * c;
    args.output = static_cast<unsigned char*>(output.pointer) + shape.out_features * 2 * c;
    CHECK_CUDA(static_cast<cudaError_t>(LaunchFewRowsLinear(args, stream)));
  });

  cublasHandle_t handle;
  CHECK_CUBLAS(cublasCreate(&handle));
  CHECK_CUBLAS(cublasSetStream(handle, stream));
  const float one = 1.0f, zero = 0.0f;
  // Warm-up outside the capture: cuBLAS sets up its workspace on first use.
  auto cublas_launch = [&](int c) {
    // Column-major: y[out] = Wᵀ[out, in] x, W stored [out, in] row-major.
    CHECK_CUBLAS(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, int(shape.out_features), 1,
                              int(shape.in_features), &one,
                              base + static_cast<size_t>(weight_bytes) * c, CUDA_R_16BF,
                              int(shape.in_features), input.pointer, CUDA_R_16BF,
                              int(shape.in_features), &zero,
                              static_cast<unsigned char*>(output.pointer) +
                                  shape.out_features * 2 * c,
                              CUDA_R_16BF, int(shape.out_features), CUBLAS_COMPUTE_32F,
                              CUBLAS_GEMM_DEFAULT));
  };
  cublas_launch(0);
  CHECK_CUDA(cudaStreamSynchronize(stream));
  const double cublas_ms = TimeGraph(copies, stream, cublas_launch);
  CHECK_CUBLAS(cublasDestroy(handle));

  int device = 0, multiprocessors = 0;
  CHECK_CUDA(cudaGetDevice(&device));
  CHECK_CUDA(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
  const double read_ms = TimeGraph(copies, stream, [&](int c) {
    const int64_t chunks = weight_bytes / 16;
    const int blocks = static_cast<int>(
        std::min<int64_t>((chunks + 255) / 256, int64_t{multiprocessors} * 8));
    ReadOnlyKernel<<<blocks, 256, 0, stream>>>(
        reinterpret_cast<const uint4*>(base + static_cast<size_t>(weight_bytes) * c), chunks,
        static_cast<unsigned int*>(sink.pointer));
    CHECK_CUDA(cudaGetLastError());
  });
  CHECK_CUDA(cudaStreamDestroy(stream));
  auto rate = [&](double ms) { return weight_bytes / (ms * 1e-3) / 1e12; };
  std::printf(
      "{\"bench\": \"linear_bench\", \"variant\": \"%s\", \"gpu\": \"%s\", \"model\": \"%s\", "
      "\"projection\": \"%s\", \"in_features\": %lld, \"out_features\": %lld, \"rows\": 1, "
      "\"dtype\": \"bfloat16\", \"weight_mb\": %.3f, \"copies\": %d, \"icd_us\": %.2f, "
      "\"icd_tb_s\": %.3f, \"cublas_us\": %.2f, \"cublas_tb_s\": %.3f, \"read_only_us\": %.2f, "
      "\"read_only_tb_s\": %.3f, \"icd_over_read_only\": %.3f}\n",
      variant.c_str(), gpu, shape.model, shape.name, (long long)shape.in_features,
      (long long)shape.out_features, weight_bytes / 1e6, copies, icd_ms * 1e3, rate(icd_ms),
      cublas_ms * 1e3, rate(cublas_ms), read_ms * 1e3, rate(read_ms), icd_ms / read_ms);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  std::string variant = "default";
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--variant") == 0) variant = argv[i + 1];
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::fprintf(stderr, "linear_bench: no CUDA device\n");
    return 2;
  }
  cudaDeviceProp properties;
  CHECK_CUDA(cudaGetDeviceProperties(&properties, 0));

  std::mt19937 random(7);
  bool ok = true;
  for (const ElementType type :
       {ElementType::kFloat32, ElementType::kBFloat16, ElementType::kFloat16}) {
    const int64_t per_load = 16 / ElementBytes(type);
    for (int64_t rows = 1; rows <= 8; ++rows) {
      for (const int64_t in_features : {per_load, 48 - 48 % per_load, int64_t{160}, int64_t{1000}}) {
        for (const int64_t out_features : {int64_t{1}, int64_t{5}, int64_t{80}, int64_t{333}}) {
          const bool bias = (rows + out_features) % 2 == 0;
          const int64_t padding = rows % 3 == 0 ? per_load : 0;
          ok = CheckCase(type, rows, in_features, out_features, bias, padding, random) && ok;
        }
      }
    }
  }
  std::fprintf(stderr, "linear_bench: correctness %s\n", ok ? "passed" : "FAILED");

  const Shape shapes[] = {
      {"130m", "in_proj", 768, 3072},    {"130m", "x_proj", 1536, 80},
      {"130m", "dt_proj", 48, 1536},     {"130m", "out_proj", 1536, 768},
      {"130m", "head", 768, 50280},      {"2.8b", "in_proj", 2560, 10240},
      {"2.8b", "x_proj", 5120, 192},     {"2.8b", "dt_proj", 160, 5120},
      {"2.8b", "out_proj", 5120, 2560},  {"2.8b", "head", 2560, 50280},
      // Mamba-2's in_proj (z, x, B, C, dt; one group, d_state 128, heads of
      // 64); its out_proj and head are Mamba-1's shapes above.
      {"mamba2-130m", "in_proj", 768, 3352}, {"mamba2-2.7b", "in_proj", 2560, 10576},
  };
  for (const Shape& shape : shapes) TimeShape(shape, variant, properties.name);
  return ok ? 0 : 1;
}
