// Plain-C++ interface of icd's Mamba-2 scan kernel (state_space_scan.cu), as
// selective_scan_launch.h is Mamba-1's: raw device pointers, sizes and
// strides in elements, the stream as void*. The LibTorch side is
// state_space_scan_cuda.cc.
#ifndef ICD_CORE_SRC_SCAN_STATE_SPACE_SCAN_LAUNCH_H_
#define ICD_CORE_SRC_SCAN_STATE_SPACE_SCAN_LAUNCH_H_

#include <cstdint>

#include "scan/selective_scan_launch.h"

namespace icd::scan {

// Largest state size N the kernel takes: a block stages B and C of a time
// chunk, N of each, in shared memory.
inline constexpr int64_t kMaxCudaStateSpaceStateSize = 128;

// The forms of the scan on CUDA: the recurrence (state_space_scan.cu), the
// chunked form of the state-space duality on tensor cores
// (state_space_chunked.cu; bfloat16 x, B and C only), and one step of time
// (state_space_step.cu; L = 1, a decode step).
enum class StateSpaceForm { kAuto, kRecurrence, kChunked, kStep };

// One layer of S_t = exp(Δ_t A_h) S_{t-1} + Δ_t x_t B_tᵀ, y_t = S_t C_t + D x_t
// (state_space_scan.h), batch B, time L, heads H in G groups, head dim P,
// state size N. Accumulates in float32.
struct StateSpaceScanLaunchArgs {
  int64_t batch = 0;
  int64_t seq_len = 0;
  int64_t heads = 0;
  int64_t head_dim = 0;
  int64_t groups = 0;
  int64_t state_size = 0;
  ScanElementType element_type = ScanElementType::kFloat32;
  ScanOperand hidden;  // x [B, L, H·P], element_type
  // Δ [B, L, H]: `delta` (Δ itself, float32), or `time_step` (element_type)
  // with Δ = softplus(time_step + time_step_bias), each step rounded to
  // element_type as the LibTorch reference computes it in the compute dtype,
  // then clamped to [delta_min, delta_max] (rounded again) when
  // delta_limited. Exactly one of the two is set.
  ScanOperand delta;
  ScanOperand time_step;
  ParameterOperand time_step_bias;  // [H]; null: no bias
  bool delta_limited = false;
  float delta_min = 0.0f;
  float delta_max = 0.0f;
  ScanOperand b_proj;                // B [B, L, G·N], element_type
  ScanOperand c_proj;                // C [B, L, G·N], element_type
  const float* a_decay = nullptr;    // A [H]; or null, with A = -exp(A_log) from:
  ParameterOperand a_log;            // A_log [H] (HF computes A so, in float32)
  ParameterOperand skip;             // D [H], or [H·P] with skip_per_channel; null: none
  bool skip_per_channel = false;
  const float* state_in = nullptr;   // S_0 [B, H, P, N], contiguous; null: zeros
  float* state_out = nullptr;        // S_L [B, H, P, N], contiguous; null: not kept;
                                     // may be state_in (one thread reads and writes
                                     // each element)
  float* output = nullptr;           // y [B, L, H·P], contiguous
  // kAuto: the step form for one step; the chunked form where it runs and
  // the sequence is longer than one of its chunks (ICD_STATE_SPACE_FORM=
  // recurrence or =chunked overrides both, for measuring the forms in one
  // build); else the form named, where it runs.
  StateSpaceForm form = StateSpaceForm::kAuto;
  float* workspace = nullptr;  // the chunked form's: StateSpaceWorkspaceFloats
  // The step form reads state_in, A and D before waiting for the kernel
  // ahead (StateSpaceInputs::operands_settled).
  bool operands_early = false;
};

// How many step-form launches in this process had operands_early.
int64_t StateSpaceStepEarlyLaunchCount();

// The form a launch with these arguments runs; kRecurrence where the form
// asked for cannot (the chunked form on other element types, the step form
// on more than one step).
StateSpaceForm StateSpaceFormFor(const StateSpaceScanLaunchArgs& args);

// Floats of device memory `workspace` must hold for the form
// StateSpaceFormFor picks: the chunks' states and decays; 0 for the
// recurrence.
int64_t StateSpaceWorkspaceFloats(const StateSpaceScanLaunchArgs& args);

// Enqueues the scan on `stream` (a cudaStream_t) of the current device.
// Returns 0 (cudaSuccess) or a cudaError_t value: cudaErrorInvalidValue for
// arguments out of range.
int LaunchStateSpaceScan(const StateSpaceScanLaunchArgs& args, void* stream);

// The chunked form alone (LaunchStateSpaceScan's, when StateSpaceFormFor
// picks it): cudaErrorInvalidValue where it does not run or `workspace` is
// null.
int LaunchStateSpaceChunked(const StateSpaceScanLaunchArgs& args, void* stream);

// The step form alone: cudaErrorInvalidValue unless seq_len is 1.
int LaunchStateSpaceStep(const StateSpaceScanLaunchArgs& args, void* stream);

}  // namespace icd::scan

#endif  // ICD_CORE_SRC_SCAN_STATE_SPACE_SCAN_LAUNCH_H_
