// Memory traffic of a piece of GPU work as the hardware counts it (issue 21):
// DRAM bytes read and written, L2 sectors and their hit rate, and each
// kernel's duration, per kernel, through CUPTI's range profiler (the
// counters Nsight Compute reads): auto ranges (one range per kernel launch),
// replayed as `Replay` says when the metrics need several passes. libcupti is
// opened at the first call, so a server on a node without it starts and
// answers FAILED_PRECONDITION here.
// No LibTorch: the work is a callback. Internal to core.
#ifndef ICD_CORE_SRC_COUNTERS_HARDWARE_COUNTERS_H_
#define ICD_CORE_SRC_COUNTERS_HARDWARE_COUNTERS_H_

#include <cstdint>
#include <functional>
#include <optional>
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

// How the counts of several passes are gathered.
enum class Replay {
  // The work runs once per pass (as many passes as the metrics need, often
  // one), each time from the same state (Collect's `rewind`) and launching
  // the same kernels; each kernel sees the caches as the kernels before it
  // left them, as in a real run. Reads and L2 sectors agree with Nsight
  // Compute's application replay within 1%. DRAM writes agree only with a
  // `flush`: starting a pass leaves about 21 MB of dirty lines in L2 (28-29
  // MB with room for 1,024 ranges or more), which the work's first misses
  // write back and which were counted as its own (a sum over 256 MB: 21 MB
  // written against Nsight Compute's 2.6 MB, and no more over 1,024 MB:
  // deploy/results/h200-gpu-2026-12-04a/).
  kUser,
  // The work runs once and CUPTI reruns each kernel, device memory saved
  // before and restored between its passes. The restore leaves dirty lines
  // in L2 that the kernel's own misses then write back, so DRAM writes
  // include the profiler's (deploy/results/h200-gpu-2026-12-03c/ measured
  // it against Nsight Compute).
  kKernel,
};

// The method a report names for `replay`.
std::string Describe(Replay replay);

// Runs `work` on CUDA device `device_index` (the calling thread's
// current context: the work's kernels must be launched from this thread, and
// nothing else should run on the device meanwhile, since every kernel in the
// context is counted) once per pass, and returns each launch's counts in
// launch order. `rewind` (optional) runs before every pass after the first,
// outside the counts, and puts back what the work changed that would change
// its next pass (a decode session's state: a step from another state may
// take other kernels or bytes). FAILED_PRECONDITION, with the reason, when
// the counters cannot be read: no libcupti, a build without CUPTI, an
// unsupported chip, counters restricted to administrators, more launches
// than `max_launches`, or (user replay) passes that launched different
// kernels, or several passes whose kernels cannot be compared (another
// CUPTI client holds the callbacks). Errors of `work` and `rewind` are
// returned as they are. One collection at a time per process. A pass costs
// CUPTI time in proportion to `max_launches` (CountLaunches sizes it).
// `flush` (optional, user replay) runs in every pass after counting has
// started and before the work, its ranges counted and left out of what is
// returned: a read that writes L2's dirty lines back and leaves it holding
// clean ones (MakeL2Flush), so that the work's DRAM writes are its own. Its
// launches need CUPTI's launch callbacks to be told apart from the work's
// (FAILED_PRECONDITION without them).
inline constexpr int64_t kDefaultMaxLaunches = 8192;
absl::StatusOr<std::vector<KernelCounters>> Collect(
    int device_index, const std::function<absl::Status()>& work, Replay replay = Replay::kUser,
    const std::function<absl::Status()>& rewind = nullptr,
    int64_t max_launches = kDefaultMaxLaunches,
    const std::function<absl::Status()>& flush = nullptr);

// Collect with the work in pieces run one after the other in every pass, each
// piece's launches returned apart, told apart by the launches each piece
// made (so pieces may launch different numbers of kernels, as a step with
// experts chosen by value does). FAILED_PRECONDITION as Collect, and when
// there are several pieces and CUPTI's launch callbacks are held by another
// client. `max_launches` counts every piece's. Not for repeats of a decode
// step: two steps of a session as pieces came back with L2 sectors of
// +17% and -19% against the same step collected alone, their sum within 1%
// (deploy/results/h200-gpu-2026-12-03f/; cause not found), so MeasureLatency
// collects each repeat alone.
absl::StatusOr<std::vector<std::vector<KernelCounters>>> CollectEach(
    int device_index, const std::vector<std::function<absl::Status()>>& pieces,
    Replay replay = Replay::kUser, const std::function<absl::Status()>& rewind = nullptr,
    int64_t max_launches = kDefaultMaxLaunches,
    const std::function<absl::Status()>& flush = nullptr);

// Runs `work` once, uncounted, and returns how many kernels it launched from
// the calling thread (CUPTI's launch callbacks, no counters): room for a
// collection sized to its work, since a pass costs CUPTI time in proportion
// to the launches a collection has room for (about 0.1 s for 16, 0.5 s for
// 1,024, 4 s for 8,192 on the H200: deploy/results/h200-gpu-2026-12-03f/).
// nullopt where another client (a profiler) holds the callbacks; the work
// runs either way. FAILED_PRECONDITION as Collect where there is no CUPTI;
// the work's errors as they are.
absl::StatusOr<std::optional<int64_t>> CountLaunches(const std::function<absl::Status()>& work);

// Launches with the same kernel name summed, in order of first launch.
std::vector<KernelCounters> ByKernel(const std::vector<KernelCounters>& launches);
KernelCounters Total(const std::vector<KernelCounters>& launches);

}  // namespace icd::counters

#endif  // ICD_CORE_SRC_COUNTERS_HARDWARE_COUNTERS_H_
