// The engine's per-device memory budget (icd-server --memory-budget-mb):
// its text form, and what the engine reports it holds per device
// (Engine::Memory). std + absl only: the server's flag parser, the rpc
// layer's metrics and the tests include it.
//
// What is counted on a device, in bytes, checked before anything is
// allocated for it (design.md "Device memory"):
//   a loaded model   its weights in the loaded dtype and its probe reference
//                    (ids and logits): ModelInfo::device_bytes, exact;
//   a running call   an estimate of what it allocates for its duration
//                    (CapturePermutation, MeasureLatency, Evaluate,
//                    ComputePermutation's statistics; engine/memory_budget.h
//                    says how each is estimated), held until it returns.
// A load or call that would pass its device's budget is ResourceExhausted,
// naming the device, the bytes needed, those already in use and the budget.
#ifndef ICD_CORE_MEMORY_BUDGET_H_
#define ICD_CORE_MEMORY_BUDGET_H_

#include <cstdint>
#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "icd/core/export.h"

namespace icd {

// Bytes a device may hold, by device key: "cpu", "cuda:N", "cuda" (every
// CUDA device not named by its index) and "" (every device not named
// otherwise). A device no key covers has no limit.
struct MemoryBudget {
  std::map<std::string, int64_t> bytes;

  bool empty() const { return bytes.empty(); }
  // The budget of `device` ("cpu", "cuda:0"): its own entry, else "cuda"'s
  // for a CUDA device, else the default ""; 0: no limit.
  ICD_CORE_API int64_t For(absl::string_view device) const;
  // The largest budget when every device has one, else 0 (some device has no
  // limit): what one host-side buffer of weights may hold at most.
  ICD_CORE_API int64_t Bound() const;
};

// Adds the entries of one --memory-budget-mb value to `budget`:
//   SPEC  := ENTRY[,ENTRY...]
//   ENTRY := N | DEVICE=N        N: mebibytes (2^20 bytes), 1..2^30
//   DEVICE := cpu | cuda | cuda:I
// A bare N applies to every device that no other entry names; `cuda=N` to
// every CUDA device not named by its index. "70000" and
// "cuda:0=70000,cpu=4000" are both values. InvalidArgument (saying which
// entry and why) for anything else, and for a device, or a bare N, given
// twice (across values too).
ICD_CORE_API absl::Status AddMemoryBudget(absl::string_view spec, MemoryBudget& budget);

// "cpu 4000 MiB, cuda:0 70000 MiB, every other device 8000 MiB", for the
// server's start-up log; "no limit" when empty.
ICD_CORE_API std::string DescribeMemoryBudget(const MemoryBudget& budget);

// One device as the engine counts it (Engine::Memory).
struct DeviceMemory {
  std::string device;        // "cpu", "cuda:0"
  int64_t budget_bytes = 0;  // 0: no limit
  int64_t model_bytes = 0;   // loaded (and loading) models: weights and probe references
  int64_t call_bytes = 0;    // running calls' estimates
  int64_t models = 0;
  int64_t calls = 0;
  // LibTorch's CUDA caching allocator on a CUDA device, as it stands: bytes
  // in live tensors (allocated) and bytes it holds from the driver
  // (reserved, what nvidia-smi shows of icd beside the CUDA context); -1 on
  // the CPU and in builds without CUDA.
  int64_t allocator_allocated_bytes = -1;
  int64_t allocator_reserved_bytes = -1;
};

}  // namespace icd

#endif  // ICD_CORE_MEMORY_BUDGET_H_
