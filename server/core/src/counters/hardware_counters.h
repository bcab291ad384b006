// Memory traffic of a piece of GPU work as the hardware counts it (issue 21):
// DRAM bytes read and written, L2 sectors and their hit rate, and each
// kernel's duration, per kernel, through CUPTI's range profiler (the
// counters Nsight Compute reads): auto ranges (one range per kernel launch)
// with kernel replay (CUPTI reruns a kernel, its memory restored, as often as
// the metrics need passes). libcupti is opened at the first call, so a server
// on a node without it starts and answers FAILED_PRECONDITION here.
// No LibTorch: the work is a callback. Internal to core.
#ifndef ICD_CORE_SRC_COUNTERS_HARDWARE_COUNTERS_H_
#define ICD_CORE_SRC_COUNTERS_HARDWARE_COUNTERS_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "icd/core/types.h"

namespace icd::counters {

// `launch` added to `sum` (launches and bytes summed, the hit rate weighted
// by L2 sectors).
void Add(KernelCounters& sum, const KernelCounters& launch);

// The metric names, in the order of KernelCounters's fields (for reports and
// for checking against Nsight Compute with the same names).
const std::vector<std::string>& MetricNames();

// Runs `work` once on CUDA device `device_index` (the calling thread's
// current context: the work's kernels must be launched from this thread, and
// nothing else should run on the device meanwhile, since every kernel in the
// context is counted) and returns each launch's counts in launch order.
// FAILED_PRECONDITION, with the reason, when the counters cannot be read: no
// libcupti, a build without CUPTI, an unsupported chip, counters restricted
// to administrators, or more launches than `max_launches`. Errors of `work`
// are returned as they are. One collection at a time per process.
absl::StatusOr<std::vector<KernelCounters>> Collect(int device_index,
                                                  const std::function<absl::Status()>& work,
                                                  int64_t max_launches = 8192);

// Launches with the same kernel name summed, in order of first launch.
std::vector<KernelCounters> ByKernel(const std::vector<KernelCounters>& launches);
KernelCounters Total(const std::vector<KernelCounters>& launches);

}  // namespace icd::counters

#endif  // ICD_CORE_SRC_COUNTERS_HARDWARE_COUNTERS_H_
