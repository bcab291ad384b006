#include "counters/l2_flush.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

#ifdef ICD_HAVE_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace icd::counters {

absl::StatusOr<L2Flush> MakeL2Flush(const torch::Device& device) {
  if (!device.is_cuda()) {
    return absl::InvalidArgumentError(
        absl::StrCat("L2 flush: ", device.str(), " is not a CUDA device"));
  }
#ifndef ICD_HAVE_CUDA
  return absl::FailedPreconditionError("L2 flush: this build has no CUDA");
#else
  const int64_t l2_bytes = at::cuda::getDeviceProperties(device.index())->l2CacheSize;
  constexpr int64_t kTimesL2 = 4;
  L2Flush flush;
  flush.bytes = kTimesL2 * std::max<int64_t>(l2_bytes, 1 << 20);
  torch::Tensor buffer;
  try {
    // Never written: its lines enter L2 clean. (The values do not matter.)
    buffer = torch::empty({flush.bytes / 4}, torch::dtype(torch::kFloat32).device(device));
  } catch (const c10::Error& error) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "L2 flush: ", flush.bytes, " bytes on ", device.str(), ": ", error.what_without_backtrace()));
  }
  // Inside a collection's pass: an error comes back as a status, so that the
  // pass still ends (CollectEach stops the session after its work).
  flush.run = [buffer]() -> absl::Status {
    try {
      (void)buffer.sum();
    } catch (const c10::Error& error) {
      return absl::InternalError(absl::StrCat("L2 flush: ", error.what_without_backtrace()));
    }
    return absl::OkStatus();
  };
  return flush;
#endif
}

}  // namespace icd::counters
