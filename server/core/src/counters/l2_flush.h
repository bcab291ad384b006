// The `flush` of a hardware-counters collection (hardware_counters.h): a
// read of a buffer several times L2's size, which writes L2's dirty lines back
// to DRAM and leaves it holding clean ones, so that the DRAM writes counted
// for the work that follows are the work's own. LibTorch's side of the
// counters; internal to core.
#ifndef ICD_CORE_SRC_COUNTERS_L2_FLUSH_H_
#define ICD_CORE_SRC_COUNTERS_L2_FLUSH_H_

#include <cstdint>
#include <functional>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "torch_api.h"

namespace icd::counters {

struct L2Flush {
  std::function<absl::Status()> run;  // one read of the whole buffer, on the current stream
  int64_t bytes = 0;                  // the buffer's size
};

// Four times `device`'s L2 (a read of twice its size left a few per cent
// of the dirty lines on the H200). INVALID_ARGUMENT off CUDA,
// FAILED_PRECONDITION in a build without CUDA, RESOURCE_EXHAUSTED when the
// buffer does not fit.
absl::StatusOr<L2Flush> MakeL2Flush(const torch::Device& device);

}  // namespace icd::counters

#endif  // ICD_CORE_SRC_COUNTERS_L2_FLUSH_H_
