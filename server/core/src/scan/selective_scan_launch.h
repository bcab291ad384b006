// Plain-C++ interface of icd's Mamba-1 scan kernel (selective_scan.cu): raw
// device pointers, sizes and strides in elements, the stream as void*. No
// LibTorch and no CUDA header here, so that nvcc never compiles LibTorch and
// bench/scan_bench.cu needs only the CUDA runtime. The LibTorch side is
// selective_scan_cuda.cc.
#ifndef ICD_CORE_SRC_SCAN_SELECTIVE_SCAN_LAUNCH_H_
#define ICD_CORE_SRC_SCAN_SELECTIVE_SCAN_LAUNCH_H_

#include <cstdint>

namespace icd::scan {

// Element type of the operands that come in the compute dtype (hidden, gate,
// b_proj, c_proj, a raw time step, a rounded y); a float32 Δ, a_decay and
// the state are always float32, A_log, D and the bias either.
enum class ScanElementType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Largest state size N the kernel takes: each thread keeps its states in
// registers and a block keeps N B/C columns of a time chunk in shared memory.
inline constexpr int64_t kMaxCudaStateSize = 64;

// A parameter of a scan (per channel, per head, or Mamba-1's A_log [I, N])
// as the model holds it:
// float32, or the element type; widened in the kernel, so that a prefill
// launches nothing to widen A_log, D or the time step's bias.
struct ParameterOperand {
  const void* data = nullptr;
  bool wide = true;  // float32; false: element_type
};

// A [B, L, width] operand whose last axis is contiguous; strides in elements.
struct ScanOperand {
  const void* data = nullptr;
  int64_t batch_stride = 0;
  int64_t time_stride = 0;
};

// One layer's scan, with batch B, time L, inner channels I, state size N.
struct ScanLaunchArgs {
  int64_t batch = 0;
  int64_t seq_len = 0;
  int64_t inner = 0;
  int64_t state_size = 0;
  ScanElementType element_type = ScanElementType::kFloat32;
  ScanOperand hidden;                // x  [B, L, I], element_type
  // Δ [B, L, I]: either `delta` (Δ itself, float32) or `delta_raw` (the
  // time step before its bias and softplus, element_type; then Δ =
  // softplus(delta_raw + delta_bias), each step rounded to element_type as
  // the LibTorch reference rounds in the compute dtype). Exactly one is set.
  ScanOperand delta;
  ScanOperand delta_raw;
  // Or, for one step of time only (L = 1), the time step before its bias as
  // dt_proj's product, computed by the kernel: delta_raw[b, i] =
  // round(Σ_r delta_proj_weight[i, r] · delta_proj_input[b, r]), float32
  // accumulation, rounded to element_type as the linear's output.
  ScanOperand delta_proj_input;              // δ [B, L, R], element_type
  const void* delta_proj_weight = nullptr;   // [I, R], element_type, contiguous
  int64_t delta_rank = 0;                    // R
  ParameterOperand delta_bias;       // [I]; null: no bias (raw or dt_proj only)
  ScanOperand gate;                  // z  [B, L, I], element_type
  ScanOperand b_proj;                // B  [B, L, N], element_type
  ScanOperand c_proj;                // C  [B, L, N], element_type
  const float* a_decay = nullptr;    // A  [I, N], contiguous; or null, with
  ParameterOperand a_log;            // A = -exp(A_log) [I, N] (float32, as HF)
  ParameterOperand d_skip;           // D  [I]
  const float* state_in = nullptr;   // h_0 [B, I, N], contiguous; null: zeros
  float* state_out = nullptr;        // h_L [B, I, N], contiguous; null: not kept;
                                     // may be state_in (one thread reads and
                                     // writes each element)
  // y [B, L, I], contiguous: float32 in `output`, or rounded once to
  // element_type in `output_rounded`. Exactly one is set.
  float* output = nullptr;
  void* output_rounded = nullptr;
  // The step kernel reads A, D, dt_proj's bias and weight and state_in
  // before waiting for the kernel ahead (ScanInputs::operands_settled).
  bool operands_early = false;
};

// How the kernel maps work onto threads. A channel's N states are spread
// over `lanes` = N / states_per_thread threads (rounded up to a power of two,
// at least 4; padded states are inert); a block holds channels_per_block
// channels. unroll_groups unrolls a time chunk's butterfly groups (more
// overlap, more registers); prefetch_l2 prefetches x, Δ, z into L2 two
// chunks ahead. The engine uses neither (docs/results.md).
struct ScanKernelShape {
  int states_per_thread = 1;
  int channels_per_block = 16;
  bool unroll_groups = false;
  bool prefetch_l2 = false;
};

// The shape the engine uses (bench/scan_bench.cu times the others): as many
// states per thread as still leave about 8 warps per multiprocessor.
ScanKernelShape DefaultScanKernelShape(int64_t batch, int64_t inner, int64_t state_size,
                                       int multiprocessors);

// Whether `shape` is compiled for this state size and element type (the
// bench's alternatives only for 8 < N <= 16, float32 and bfloat16).
bool ScanKernelShapeAvailable(const ScanKernelShape& shape, int64_t state_size,
                              ScanElementType element_type);

// Enqueues the scan on `stream` (a cudaStream_t) of the current device, in
// the default shape for it; one step of time (L = 1, a decode step) runs
// LaunchSelectiveStateStep instead. Returns 0 (cudaSuccess) or a cudaError_t value:
// cudaErrorInvalidValue for arguments out of range (also a raw Δ with
// prefetch_l2, which prefetches float32 Δ only).
int LaunchSelectiveScan(const ScanLaunchArgs& args, void* stream);
int LaunchSelectiveScan(const ScanLaunchArgs& args, const ScanKernelShape& shape, void* stream);

// One step of time (L = 1) without the chunked kernel's staging: a
// channel's states over a few lanes, Δ from any of its three sources.
int LaunchSelectiveStateStep(const ScanLaunchArgs& args, void* stream);

// How many LaunchSelectiveStateStep launches in this process had
// operands_early.
int64_t SelectiveStateStepEarlyLaunchCount();

// cudaGetErrorString, for callers that do not include CUDA headers.
const char* ScanLaunchErrorString(int status);

// The cudaError_t value of "no kernel image for this device" (the build's
// CUDA architectures do not cover the GPU), so that callers can fall back.
int ScanLaunchNoKernelImageStatus();

}  // namespace icd::scan

#endif  // ICD_CORE_SRC_SCAN_SELECTIVE_SCAN_LAUNCH_H_
