// Plain value types of the engine API. std + absl only: no LibTorch, no
// protobuf, so that the gRPC layer and the clients can include this header.
#ifndef ICD_CORE_TYPES_H_
#define ICD_CORE_TYPES_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "icd/core/export.h"

namespace icd {

enum class Family { kMamba1, kFalconMamba, kMamba2 };
enum class Layout { kHf, kMambaSsm };
enum class DType { kFloat32, kBFloat16, kFloat16, kFloat64 };

// Wire names: "mamba1" | "falcon_mamba" | "mamba2", "hf" | "mamba_ssm",
// "float32" | "bfloat16" | "float16" | "float64".
ICD_CORE_API std::string_view FamilyName(Family family);
ICD_CORE_API std::string_view LayoutName(Layout layout);
ICD_CORE_API std::string_view DTypeName(DType dtype);
ICD_CORE_API absl::StatusOr<DType> ParseDType(std::string_view name);
ICD_CORE_API int64_t DTypeSize(DType dtype);

// One device's share of a model (ModelInfo::placement): layers [first,
// last] and the bytes it holds there. The embedding is with the first layer,
// the final norm and an untied head with the last.
struct LayerRange {
  std::string device;  // "cpu", "cuda:1"
  int64_t first = 0;
  int64_t last = 0;  // inclusive
  int64_t bytes = 0;
};

struct ModelInfo {
  std::string name;
  // config.json's architecture ("mamba2", "nemotron_h", "jamba", ...); family
  // is its Mamba layers' kind.
  std::string architecture;
  Family family = Family::kMamba1;
  Layout layout = Layout::kHf;
  std::string device;  // "cpu", "cuda:0"
  DType dtype = DType::kFloat32;
  int64_t parameters = 0;  // distinct parameters (a tied head counts once)
  // 1 at the first load of a name; a later load under the same name starts
  // above every version the earlier instances reached, so an
  // expected_version taken from one never matches another.
  uint64_t version = 0;
  std::string fingerprint;  // hex digest of config and weights at load
  std::map<std::string, int64_t> dims;  // d_model, n_layer, vocab_size, ...
  std::string path;  // checkpoint directory it was loaded from
  // Bytes it holds on `device`, as the memory budget counts them: its
  // weights in `dtype` and its probe reference (ids and logits); over every
  // device where it is placed over several.
  int64_t device_bytes = 0;
  // Where its layers are: one range over every layer on `device`, or one
  // per device of a placement (LoadOptions::placement; `device` is then the
  // first range's).
  std::vector<LayerRange> placement;
};

// One slice of one tensor that a symmetry group permutes.
struct GroupMember {
  std::string tensor;  // name in the model's own layout
  int axis = 0;
  int64_t offset = 0;
  int64_t length = 0;
  // How the group's index maps onto the slice:
  //   "identity"     slice position j takes old position p[j];
  //   "per_head:P"   the group indexes heads of P channels each: channel
  //                  j*P+q takes old channel p[j]*P+q;
  //   "per_group:N"  the group indexes heads in whole groups of `whole`
  //                  heads; the slice holds one block of N rows per group:
  //                  row g*N+n takes old row (p[g*whole]/whole)*N+n.
  //   "segments:C:S:O" the group permutes within blocks of `block` channels;
  //                  the slice is segments of S positions, C in a row for
  //                  each block (the C query heads that read one KV head);
  //                  in every segment positions O..O+block-1 are that
  //                  block's channels, moved as the group moves them, and
  //                  the rest stay: position s*S+O+q takes old position
  //                  s*S+O+(p[b*block+q]-b*block), b = s/C.
  //   "tensors"      the group moves whole tensors between the names in
  //                  `tensors` (a checkpoint that stores one tensor per
  //                  expert): tensors[j] takes what tensors[p[j]] held;
  //                  `tensor` is tensors[0], axis, offset and length unused.
  std::string expand = "identity";
  std::vector<std::string> tensors;
  // >= 0: the member moves only the sub-tensor at this index of axis 0 (one
  // expert of experts stacked [E, ...]); axis counts the whole tensor's axes
  // (>= 1). -1: the whole tensor.
  int64_t slice = -1;
};

struct GroupInfo {
  std::string name;  // "residual", "layers.3.inner", ...
  int64_t size = 0;
  int64_t block = 0;  // >0: p[j] / block == j / block
  int64_t whole = 0;  // >0: p[k*whole .. k*whole+whole-1] lie in one block of `whole`
  std::vector<GroupMember> members;
};

// A gather: new index j holds what old index index[j] held.
struct Permutation {
  std::string group;
  std::vector<int64_t> index;
};

struct CorrectnessReport {
  bool ok = false;
  double rel_l2 = 0;  // ||now - ref|| / ||ref|| over all probe logits
  double max_abs = 0;  // max |now - ref|
  double max_rel = 0;  // max |now - ref| / max |ref|
  double top1_agreement = 0;  // share of positions whose argmax agrees
  double tolerance = 0;  // ok <=> rel_l2 <= tolerance
  int64_t tokens = 0;  // probe positions compared
};

// Cooperative cancellation: what a call's caller wants of its end. Core
// polls it (CheckCall) between layers, chunks of tokens, statistics blocks
// and solver steps, so that a call stops within about 100 ms of its caller
// going away or its deadline passing, with nothing changed. The transport
// fills it (the gRPC deadline and IsCancelled); core never sees the
// transport.
struct CallContext {
  std::optional<std::chrono::steady_clock::time_point> deadline;
  std::function<bool()> cancelled;  // may be empty
  // May be empty: where a long call says how far it is (ReportProgress).
  std::function<void(absl::string_view stage, int64_t done, int64_t total)> progress;
};

// A long call's progress, for a caller that asked (CallContext::progress):
// `done` of `total` steps of `stage` ("forward", "solve", "samples", ...;
// total 0: not known in advance). Core calls it where the steps are
// natural units (groups solved, samples taken, trace rows received).
ICD_CORE_API void ReportProgress(const CallContext& ctx, absl::string_view stage, int64_t done,
                                 int64_t total);

// The one check of a CallContext: OK while the call may go on; Cancelled or
// DeadlineExceeded, the message naming `where`, once it may not.
ICD_CORE_API absl::Status CheckCall(const CallContext& ctx, absl::string_view where);

struct LoadOptions {
  std::string device;  // empty: the engine's default device
  // Empty: every layer on `device`. "auto": the layers in contiguous ranges
  // over every visible CUDA device, balanced by bytes (the embedding with
  // the first layer, the final norm and head with the last). Or explicit
  // ranges, "cuda:0=0-31,cuda:1=32-63": every layer once, in order.
  std::string placement;
  std::string dtype;  // empty: the checkpoint's dtype
  // Non-empty: every file of the checkpoint directory, links followed, must
  // lie under one of these directories (PermissionDenied naming the file);
  // checked again before an export copies the files. The transport's path
  // policy fills it with its model roots.
  std::vector<std::string> allowed_roots;
};

struct ApplyOptions {
  bool skip_verify = false;
  uint64_t expected_version = 0;  // 0: no check
  double tolerance = 0;  // 0: the dtype's default (design.md "Tolerances")
};

struct ApplyReport {
  uint64_t version = 0;
  bool verified = false;  // false when skip_verify
  CorrectnessReport correctness;
  double apply_ms = 0;  // validation + gathers, without the check
  double verify_ms = 0;
  std::vector<std::string> groups;  // applied, in request order
};

struct EvaluateRequest {
  std::vector<int64_t> input_ids;  // row-major [batch, seq]
  int64_t batch = 1;
  bool return_logits = false;
};

struct EvaluateResult {
  std::vector<int64_t> shape;  // [batch, seq, vocab]
  std::vector<float> logits;  // only when asked
  double mean_nll = 0;  // next-token mean negative log-likelihood (nats)
  int64_t tokens = 0;  // predicted positions: batch * (seq - 1)
};

// A tensor on the host: raw little-endian bytes, row-major.
struct HostTensor {
  std::string name;
  std::vector<int64_t> shape;
  DType dtype = DType::kFloat32;
  std::string data;
};

// MeasureLatency (design.md): what to time. Defaults as the clients'.
struct LatencyOptions {
  std::string model;
  std::string compare_model;  // empty: `model` alone
  // "prefill": a sample is one forward over [batch, seq_len] token ids;
  // "decode": after an untimed prefill of seq_len tokens, a sample is one
  // single-token step of the whole batch (the state advances every sample).
  std::string mode = "prefill";
  int64_t batch = 1;
  int64_t seq_len = 128;
  int64_t warmup = 3;  // samples run first and discarded
  int64_t iters = 20;  // timed samples
  // Decode on a GPU replays each step as one CUDA graph; `eager` launches
  // its kernels one by one instead (what the graph saves, measured).
  bool eager = false;
  // Above 0 (CUDA only): after the timed samples, one more sample of each
  // model (a prefill forward, or a decode step launched eagerly) runs this
  // many times under the GPU's hardware counters (LatencyTiming::counters).
  // While they are read the call has the device to itself.
  int64_t counter_repeats = 0;
};

// What the GPU's counters saw of one kernel's launches (or of all of them).
struct KernelCounters {
  std::string kernel;  // the kernel's function name; "total" for a sum
  int64_t launches = 0;
  double dram_read_bytes = 0;   // dram__bytes_read.sum
  double dram_write_bytes = 0;  // dram__bytes_write.sum
  double l2_sectors = 0;        // lts__t_sectors.sum: 32-byte L2 sectors accessed
  double l2_hit_rate = 0;       // lts__t_sector_hit_rate, 0..1; a sum's weighted by l2_sectors
  double duration_ns = 0;       // gpu__time_duration.sum, each kernel alone (replayed)
};

// One sample's memory traffic from the hardware counters (counter_repeats).
struct CounterReport {
  std::string method;     // how they were read
  std::string execution;  // what was counted: "prefill", "decode step (in_place)" (a
                          // graph's kernels one launch each), "decode step (eager)"
  std::vector<KernelCounters> kernels;  // first repeat, summed by kernel, in launch order
  KernelCounters total;                 // first repeat, every launch
  std::vector<KernelCounters> repeat_totals;  // each repeat's total: how repeatable they are
};

// One model's timed samples, in milliseconds.
struct LatencyTiming {
  double median_ms = 0;
  double p10_ms = 0;  // percentiles by linear interpolation between ranks
  double p90_ms = 0;
  double ci95_low_ms = 0;  // distribution-free 95% interval of the median
  double ci95_high_ms = 0;  // (order statistics; [min, max] below 6 samples)
  int64_t samples = 0;
  std::string device;  // as ModelInfo reports it
  std::string method;  // how it was timed: "cuda_events" | "steady_clock"
  // How a sample ran: "cuda_graph" (a decode step replayed as one graph) or
  // "eager" (kernels launched one by one: prefill, CPU, or asked).
  std::string execution;
  uint64_t version = 0;  // the model's version that was timed (ModelInfo)
  std::optional<CounterReport> counters;  // with LatencyOptions::counter_repeats
  // A model placed over several devices (ModelInfo::placement): what moving
  // its residual stream between them costs a sample, timed alone (the
  // median of `iters` copies per change of device, summed); 0 on one.
  double transfer_ms = 0;
};

struct LatencyReport {
  LatencyTiming timing;  // `model`
  std::optional<LatencyTiming> compare;  // `compare_model`, when asked
  // With compare_model: the median over the interleaved rounds of
  // t(model) / t(compare_model), and its 95% interval (same method); else 0.
  double ratio = 0;
  double ratio_ci95_low = 0;
  double ratio_ci95_high = 0;
};

struct ExportResult {
  std::string path;
  std::vector<std::string> files;  // relative to path, sorted
  uint64_t version = 0;
};

}  // namespace icd

#endif  // ICD_CORE_TYPES_H_
