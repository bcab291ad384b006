// The engine's internals shared by its translation units (engine.cc, the
// façade; engine_capture.cc, CapturePermutation): a loaded model, the
// registry that holds them (Engine::Impl), and the small conversions and
// checks the API methods share. Internal to core.
#ifndef ICD_CORE_SRC_ENGINE_INTERNAL_H_
#define ICD_CORE_SRC_ENGINE_INTERNAL_H_

#include "torch_api.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <shared_mutex>
#include <unordered_map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "devices.h"
#include "engine/memory_budget.h"
#include "engine/placement.h"
#include "engine/model_stream.h"
#include "blocks/shapes.h"
#include "io/checkpoint.h"
#include "io/config.h"
#include "io/exporter.h"
#include "forward/forward.h"
#include "icd/core/engine.h"
#include "icd/core/status_macros.h"
#include "forward/latency.h"
#include "model.h"
#include "forward/probe.h"
#include "apply/symmetry.h"
#include "traces/solve.h"

namespace icd {
namespace engine_internal {


using Clock = std::chrono::steady_clock;

inline double MillisSince(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

inline absl::StatusOr<torch::ScalarType> ToTorch(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return torch::kFloat32;
    case DType::kBFloat16: return torch::kBFloat16;
    case DType::kFloat16: return torch::kFloat16;
    case DType::kFloat64: return torch::kFloat64;
  }
  return absl::InvalidArgumentError("unknown dtype");
}

inline absl::StatusOr<DType> FromTorch(torch::ScalarType type) {
  switch (type) {
    case torch::kFloat32: return DType::kFloat32;
    case torch::kBFloat16: return DType::kBFloat16;
    case torch::kFloat16: return DType::kFloat16;
    case torch::kFloat64: return DType::kFloat64;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("unsupported tensor dtype ", std::string(c10::toString(type))));
  }
}

inline absl::StatusOr<torch::Device> ParseDevice(const std::string& name) {
  if (name == "cpu") return torch::Device(torch::kCPU);
  if (name == "cuda" || name.rfind("cuda:", 0) == 0) {
    if (!torch::cuda::is_available()) {
      return absl::InvalidArgumentError(
          absl::StrCat("device '", name, "': no CUDA device is available to this server"));
    }
    try {
      torch::Device device(name);
      if (device.has_index() &&
          device.index() >= static_cast<int64_t>(torch::cuda::device_count())) {
        return absl::InvalidArgumentError(absl::StrCat(
            "device '", name, "': only ", torch::cuda::device_count(), " CUDA devices"));
      }
      return device;
    } catch (const std::exception&) {
    }
  }
  return absl::InvalidArgumentError(
      absl::StrCat("device '", name, "': expected cpu, cuda or cuda:N"));
}

// The devices a LoadOptions::placement names, in order: every visible CUDA
// device for "auto", else each range's (placement.h checks the ranges once
// the config says how many layers there are).
inline absl::StatusOr<std::vector<torch::Device>> PlacementDevices(const std::string& placement) {
  std::vector<torch::Device> devices;
  if (placement == "auto") {
    if (!torch::cuda::is_available()) {
      return absl::InvalidArgumentError(
          "placement 'auto': no CUDA device is available to this server");
    }
    const auto count = static_cast<int64_t>(torch::cuda::device_count());
    for (int64_t index = 0; index < count; ++index) {
      devices.emplace_back(torch::kCUDA, static_cast<c10::DeviceIndex>(index));
    }
    return devices;
  }
  for (absl::string_view part : absl::StrSplit(placement, ',')) {
    const std::string name(part.substr(0, part.find('=')));
    absl::StatusOr<torch::Device> device = ParseDevice(name);
    if (!device.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("placement '", placement, "': ", device.status().message()));
    }
    devices.push_back(*device);
  }
  return devices;
}

struct LoadedModel {
  mutable std::shared_mutex mutex;  // shared: reads; exclusive: changes
  ModelInfo info;
  ModelConfig config;
  Weights weights;
  FamilySpec spec;
  std::map<std::string, const GroupInfo*> groups;
  CheckpointLayout layout;
  ProbeReference probe;
  torch::ScalarType dtype = torch::kFloat32;
  std::vector<std::string> allowed_roots;  // LoadOptions::allowed_roots
  std::string memory_device;  // where the memory budget counts it: "cpu", "cuda:N"
  bool on_cuda = false;
  std::optional<c10::Stream> stream;  // a CUDA model's calls run on it (model_stream.h)
  // Its layers by device (ModelInfo::placement); more than one range where
  // LoadOptions::placement put it over several.
  std::vector<LayerRange> placement;
  // Set by Unload under the exclusive lock: a call that found the model
  // before and takes its lock after is refused, not run on a model the
  // ledger no longer counts.
  bool unloaded = false;

  double Tolerance(double requested) const {
    return requested > 0 ? requested : DefaultTolerance(dtype);
  }
};

inline std::string GroupList(const FamilySpec& spec) {
  std::set<std::string> kinds;
  for (const GroupInfo& group : spec) {
    const auto dot = group.name.rfind('.');
    kinds.insert(dot == std::string::npos ? group.name
                                          : absl::StrCat("layers.{i}", group.name.substr(dot)));
  }
  return absl::StrJoin(kinds, ", ");
}

// NotFound where the model was unloaded while the call waited for its lock.
inline absl::Status StillLoaded(const LoadedModel& model) {
  if (!model.unloaded) return absl::OkStatus();
  return absl::NotFoundError(
      absl::StrCat("model '", model.info.name, "' was unloaded while this call waited for it"));
}

inline absl::Status CheckVersion(const LoadedModel& model, uint64_t expected) {
  if (expected != 0 && expected != model.info.version) {
    return absl::FailedPreconditionError(
        absl::StrCat("model '", model.info.name, "' is at version ", model.info.version,
                     ", the request expected version ", expected));
  }
  return absl::OkStatus();
}

inline absl::StatusOr<const GroupInfo*> FindGroup(const LoadedModel& model, const std::string& name) {
  auto it = model.groups.find(name);
  if (it == model.groups.end()) {
    return absl::InvalidArgumentError(absl::StrCat("unknown group '", name, "'; model '",
                                                   model.info.name, "' has ",
                                                   GroupList(model.spec)));
  }
  return it->second;
}

// Token ids as an int64 [batch, seq] tensor on the model's device, checked.
// A request's batch: 0 means one row (the proto's default); below 0 is
// refused.
inline absl::StatusOr<int64_t> RequestBatch(int64_t batch) {
  if (batch < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch: ", batch, " < 0 (0 means one row)"));
  }
  return batch > 0 ? batch : 1;
}

inline absl::StatusOr<torch::Tensor> TokenTensor(const LoadedModel& model, const std::vector<int64_t>& ids,
                                          int64_t batch, const char* field) {
  const auto count = static_cast<int64_t>(ids.size());
  if (batch < 1 || count == 0 || count % batch != 0) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": ", count,
                                                   " ids do not split into batch ", batch,
                                                   " equal non-empty rows"));
  }
  const int64_t vocab = model.config.vocab_size;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat(field, ": id ", ids[i], " at position ", i,
                                                     " outside [0, ", vocab, ")"));
    }
  }
  return torch::tensor(ids, torch::dtype(torch::kInt64))
      .reshape({batch, count / batch})
      .to(model.probe.input_ids.device());
}

inline absl::StatusOr<torch::Tensor> ProbeLogits(const LoadedModel& model, const CallContext& ctx) {
  return Forward(model.config, model.weights, model.probe.input_ids, ctx);
}

}  // namespace engine_internal

using engine_internal::LoadedModel;

class Engine::Impl {
 public:
  explicit Impl(EngineOptions options) : options_(std::move(options)) {}

  std::vector<DeviceMemory> Memory() const { return ledger_.Snapshot(); }

  absl::StatusOr<std::shared_ptr<LoadedModel>> Find(const std::string& name) const {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = models_.find(name);
    if (it == models_.end()) {
      return absl::NotFoundError(absl::StrCat("model '", name, "' is not loaded"));
    }
    return it->second;
  }

  absl::Status Reserve(const std::string& name) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (models_.count(name) > 0 || loading_.count(name) > 0) {
      return absl::AlreadyExistsError(absl::StrCat("model '", name, "' is already loaded"));
    }
    const size_t held = models_.size() + loading_.size();
    if (options_.max_models > 0 && held >= static_cast<size_t>(options_.max_models)) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "model limit reached: ", held, " models loaded or loading, at most ",
          options_.max_models, " (icd-server --max-models); unload one first"));
    }
    loading_.insert(name);
    return absl::OkStatus();
  }

  // Books a running call's estimated bytes on `model`'s device until the
  // hold is destroyed, or refuses (ResourceExhausted) before it allocates.
  // `device`: where the call's memory lives when it is not the model's
  // calls' device (a placed model's statistics live beside its embedding).
  absl::StatusOr<engine_internal::MemoryHold> BookCall(const LoadedModel& model, int64_t bytes,
                                                       absl::string_view what,
                                                       const std::string& device = "") {
    return ledger_.BookCall(device.empty() ? model.memory_device : device, bytes, what,
                            "use fewer tokens or a smaller batch, wait for running calls, or "
                            "unload a model");
  }

  void Finish(const std::string& name, std::shared_ptr<LoadedModel> model) {
    std::lock_guard<std::mutex> lock(mutex_);
    loading_.erase(name);
    if (model) {
      models_[name] = std::move(model);
    } else {
      ledger_.ReleaseModel(name);
    }
  }

  // The layers' devices, and the bytes each holds (weights in `dtype`, the
  // probe reference), from the config alone: one range on `devices[0]`
  // without a placement, else its ranges. For "auto", each GPU's room is
  // what its budget has left, or else what the driver and the allocator
  // have free.
  absl::StatusOr<std::vector<LayerRange>> PlanPlacement(const std::string& placement,
                                                        const std::vector<torch::Device>& devices,
                                                        const ModelConfig& config,
                                                        torch::ScalarType dtype) const {
    const engine_internal::PlacementSizes sizes =
        engine_internal::SizesOf(config, static_cast<int64_t>(c10::elementSize(dtype)));
    std::vector<LayerRange> ranges;
    if (placement.empty()) {
      ranges.push_back({engine_internal::MemoryDevice(devices.front()), 0, config.n_layer - 1, 0});
    } else if (placement == "auto") {
      std::vector<std::string> names;
      std::vector<int64_t> room;
      for (const torch::Device& device : devices) {
        names.push_back(engine_internal::MemoryDevice(device));
        const int64_t unbooked = ledger_.Unbooked(names.back());
        room.push_back(unbooked >= 0 ? std::max<int64_t>(unbooked, 1)
                                     : engine_internal::FreeDeviceBytes(device));
      }
      ICD_ASSIGN_OR_RETURN(ranges, engine_internal::BalancePlacement(sizes, names, room));
    } else {
      ICD_ASSIGN_OR_RETURN(ranges, engine_internal::ParsePlacement(placement, config.n_layer));
      for (size_t i = 0; i < ranges.size(); ++i) {
        ranges[i].device = engine_internal::MemoryDevice(devices[i]);
      }
    }
    if (ranges.size() > 1 && blocks::HasSharedBlocks(config)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "placement '", placement, "': ", config.architecture,
          "'s shared blocks are read at layers all over the model; load it on one device"));
    }
    engine_internal::CountRangeBytes(sizes, &ranges);
    // The probe reference: its ids beside the embedding, its logits beside
    // the head.
    const int64_t ids_bytes = kProbeBatch * kProbeSeq * int64_t{8};
    ranges.front().bytes += ids_bytes;
    (config.tied ? ranges.front() : ranges.back()).bytes +=
        engine_internal::ProbeBytes(config) - ids_bytes;
    return ranges;
  }

  absl::StatusOr<std::shared_ptr<LoadedModel>> LoadModel(const std::string& name,
                                                         const std::string& path,
                                                         const LoadOptions& options,
                                                         const CallContext& ctx) {
    if (name.empty()) return absl::InvalidArgumentError("name: must not be empty");
    if (!options.placement.empty() && !options.device.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "device '", options.device, "' and placement '", options.placement,
          "': give one (a placement names its devices)"));
    }
    // Where the model goes: one device, or a placement's, in order.
    std::vector<torch::Device> devices;
    if (options.placement.empty()) {
      ICD_ASSIGN_OR_RETURN(torch::Device device,
                           engine_internal::ParseDevice(options.device.empty()
                                                            ? options_.default_device
                                                            : options.device));
      devices.push_back(device);
    } else {
      ICD_ASSIGN_OR_RETURN(devices, engine_internal::PlacementDevices(options.placement));
    }
    const torch::Device device = devices.front();
    const bool on_cpu = std::any_of(devices.begin(), devices.end(),
                                    [](const torch::Device& d) { return d.is_cpu(); });
    std::optional<torch::ScalarType> requested;
    if (!options.dtype.empty()) {
      ICD_ASSIGN_OR_RETURN(DType dtype, ParseDType(options.dtype));
      ICD_ASSIGN_OR_RETURN(requested, engine_internal::ToTorch(dtype));
    }
    if (requested == torch::kFloat16 && on_cpu) {
      return absl::InvalidArgumentError(kNoCpuHalf);
    }
    auto model = std::make_shared<LoadedModel>();
    model->memory_device = engine_internal::MemoryDevice(device);
    model->on_cuda = std::any_of(devices.begin(), devices.end(),
                                 [](const torch::Device& d) { return d.is_cuda(); });
    if (options_.model_streams && devices.size() == 1) {
      model->stream = engine_internal::ModelStream(device);
    }
    const engine_internal::OnModelStream on_stream(model->on_cuda, model->stream, device_gate);
    // The layers' devices, and the bytes each holds, from the config alone.
    auto plan = [&](const ModelConfig& config, torch::ScalarType dtype) {
      return PlanPlacement(options.placement, devices, config, dtype);
    };
    // The memory budget, before any weight is read: with a dtype asked for
    // the model's bytes are known from config.json alone and are booked
    // now; otherwise they are at least those of a 2-byte dtype (checked
    // here), and booked exactly once the files say their dtype (below),
    // still before anything reaches the model's devices.
    auto before_weights = [&](const ModelConfig& config) -> absl::Status {
      const torch::ScalarType counted = requested.value_or(torch::kBFloat16);
      const std::string what = absl::StrCat(
          "loading model '", name, "' (", engine_internal::WeightElements(config),
          " weight elements in ",
          requested ? std::string(c10::toString(*requested))
                    : std::string("the checkpoint's dtype, at least 2 bytes each"),
          ", and a probe reference of ", engine_internal::ProbeBytes(config), " bytes)");
      ICD_ASSIGN_OR_RETURN(model->placement, plan(config, counted));
      if (requested) {
        return ledger_.BookModel(name, engine_internal::BytesByDevice(model->placement), what,
                                 kUnloadFirst);
      }
      for (const auto& [part_device, bytes] : engine_internal::BytesByDevice(model->placement)) {
        ICD_RETURN_IF_ERROR(ledger_.CheckFits(part_device, bytes, what, kUnloadFirst));
      }
      return absl::OkStatus();
    };
    ICD_ASSIGN_OR_RETURN(Checkpoint checkpoint,
                         ReadCheckpoint(path, ctx, options.allowed_roots, before_weights));

    model->dtype =
        requested.value_or(checkpoint.weights.at("backbone.embeddings.weight").scalar_type());
    if (model->dtype == torch::kFloat16 && on_cpu) {
      return absl::InvalidArgumentError(kNoCpuHalf);
    }
    // Planned again only where the early plan counted 2 bytes a weight; with
    // a dtype asked for it was planned (and booked) in that dtype, and a new
    // plan would see its own booking as used room.
    if (!requested) {
      ICD_ASSIGN_OR_RETURN(model->placement, plan(checkpoint.config, model->dtype));
    }
    ICD_RETURN_IF_ERROR(ledger_.BookModel(
        name, engine_internal::BytesByDevice(model->placement),
        absl::StrCat("loading model '", name, "' (weights in ",
                     std::string(c10::toString(model->dtype)), " and its probe reference)"),
        kUnloadFirst));
    if (model->placement.size() > 1) {
      // A placed model's calls book their memory beside its head (the
      // logits, a call's largest tensor).
      model->memory_device =
          (checkpoint.config.tied ? model->placement.front() : model->placement.back()).device;
    }
    torch::NoGradGuard no_grad;
    for (auto& [tensor_name, tensor] : checkpoint.weights) {
      const std::string& target =
          engine_internal::RangeOfTensor(tensor_name, model->placement).device;
      tensor = tensor.to(torch::Device(target), model->dtype).contiguous();
    }
    model->config = checkpoint.config;
    model->weights = std::move(checkpoint.weights);
    model->layout = std::move(checkpoint.layout);
    model->spec = BuildSpec(model->config);
    ICD_RETURN_IF_ERROR(CheckSpec(model->spec, model->weights));
    for (const GroupInfo& group : model->spec) model->groups[group.name] = &group;
    ICD_ASSIGN_OR_RETURN(model->probe,
                         TakeProbe(model->config, model->weights, checkpoint.fingerprint, ctx));

    ModelInfo& info = model->info;
    info.name = name;
    info.architecture = model->config.architecture;
    info.family = model->config.family;
    info.layout = model->config.layout;
    info.device = model->placement.size() > 1 ? model->placement.front().device : device.str();
    ICD_ASSIGN_OR_RETURN(info.dtype, engine_internal::FromTorch(model->dtype));
    for (const auto& [tensor_name, tensor] : model->weights) info.parameters += tensor.numel();
    info.version = FirstVersion(name);
    info.fingerprint = checkpoint.fingerprint;
    info.dims = ConfigDims(model->config);
    info.path = path;
    model->allowed_roots = options.allowed_roots;
    // What the model holds, counted from its tensors: the booking above, or
    // a bug in the estimate, corrected here.
    std::vector<LayerRange> held = model->placement;
    for (LayerRange& range : held) range.bytes = 0;
    held.front().bytes += static_cast<int64_t>(model->probe.input_ids.nbytes());
    (model->config.tied ? held.front() : held.back()).bytes +=
        static_cast<int64_t>(model->probe.logits.nbytes());
    for (const auto& [tensor_name, tensor] : model->weights) {
      const LayerRange& range = engine_internal::RangeOfTensor(tensor_name, model->placement);
      held[static_cast<size_t>(&range - model->placement.data())].bytes +=
          static_cast<int64_t>(tensor.nbytes());
    }
    info.device_bytes = 0;
    for (const LayerRange& range : held) info.device_bytes += range.bytes;
    if (engine_internal::BytesByDevice(held) != engine_internal::BytesByDevice(model->placement)) {
      ICD_RETURN_IF_ERROR(ledger_.BookModel(
          name, engine_internal::BytesByDevice(held),
          absl::StrCat("loading model '", name, "' (as loaded)"), kUnloadFirst));
    }
    model->placement = held;
    info.placement = held;
    return model;
  }

  std::vector<ModelInfo> List() const {
    std::vector<std::shared_ptr<LoadedModel>> models;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (const auto& [name, model] : models_) models.push_back(model);
    }
    std::vector<ModelInfo> infos;
    for (const auto& model : models) {
      std::shared_lock<std::shared_mutex> lock(model->mutex);
      infos.push_back(model->info);
    }
    return infos;
  }

  absl::Status Erase(const std::string& name) {
    ICD_ASSIGN_OR_RETURN(auto model, Find(name));
    std::unique_lock<std::shared_mutex> model_lock(model->mutex);  // waits for in-flight calls
    std::unique_lock<std::mutex> lock(mutex_);
    auto it = models_.find(name);
    if (it == models_.end() || it->second != model) {
      return absl::NotFoundError(absl::StrCat("model '", name, "' is not loaded"));
    }
    models_.erase(it);
    model->unloaded = true;
    ledger_.ReleaseModel(name);
    uint64_t& last = retired_versions_[std::hash<std::string>{}(name)];
    last = std::max(last, model->info.version);
    // Nothing loaded or loading and no call booked (a trace stream books
    // its memory for its life): cuBLAS's workspaces go back. Under the
    // device gate held exclusively, so that a call still running on a model
    // it found before an unload (it holds the gate shared) is not mid-matmul.
    if (models_.empty() && loading_.empty() && ledger_.NoCalls()) {
      lock.unlock();
      const std::unique_lock<std::shared_mutex> gate(device_gate);
      engine_internal::ReleaseCublasWorkspaces();
    }
    return absl::OkStatus();
  }

  // The version a new load of `name` starts at: 1, or above every version an
  // earlier instance of that name reached (ModelInfo::version). Keyed by a
  // hash of the name, so a name costs 16 bytes however long it is; a
  // collision only starts a model higher.
  uint64_t FirstVersion(const std::string& name) const {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = retired_versions_.find(std::hash<std::string>{}(name));
    return it == retired_versions_.end() ? 1 : it->second + 1;
  }

  absl::StatusOr<ApplyReport> Apply(LoadedModel& model, const std::vector<Permutation>& perms,
                                    const ApplyOptions& options, const CallContext& ctx) {
    const auto start = engine_internal::Clock::now();
    ICD_RETURN_IF_ERROR(engine_internal::CheckVersion(model, options.expected_version));
    if (perms.empty()) return absl::InvalidArgumentError("permutations: none given");
    if (!(options.tolerance >= 0) || std::isinf(options.tolerance)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tolerance: must be a finite number >= 0 (0: the dtype's default), got ",
          options.tolerance));
    }
    std::vector<const GroupInfo*> groups;
    for (const Permutation& perm : perms) {
      auto it = model.groups.find(perm.group);
      if (it == model.groups.end()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "unknown group '", perm.group, "' (this model has: ", engine_internal::GroupList(model.spec), ")"));
      }
      ICD_RETURN_IF_ERROR(ValidatePermutation(*it->second, perm.index));
      groups.push_back(it->second);
    }
    std::vector<GroupPermutation> gathers;
    for (size_t i = 0; i < perms.size(); ++i) gathers.push_back({groups[i], &perms[i].index});
    // At most once: a restore that throws part way is not run again (a
    // second inverse would permute what the first put back).
    bool restored = false;
    auto restore = [&] {
      if (restored) return;
      restored = true;
      std::vector<std::vector<int64_t>> inverses;
      for (const Permutation& perm : perms) inverses.push_back(InversePermutation(perm.index));
      std::vector<GroupPermutation> undo;
      for (size_t i = perms.size(); i-- > 0;) undo.push_back({groups[i], &inverses[i]});
      ApplyGathers(undo, model.weights);
    };
    // A throw inside the gathers leaves every device as it was
    // (ApplyGathers undoes the devices it had finished).
    ApplyGathers(gathers, model.weights);
    // From here a throw (a CUDA error, an out-of-memory in the check) must
    // not leave the weights permuted under the old version.
    try {
      return CheckApplied(model, perms, options, ctx, start, restore);
    } catch (...) {
      restore();
      throw;
    }
  }

  // Apply's second half: the gathers done, time them, run the post-apply
  // check, and either take the new version or undo them (`restore`).
  template <typename Restore>
  absl::StatusOr<ApplyReport> CheckApplied(LoadedModel& model,
                                           const std::vector<Permutation>& perms,
                                           const ApplyOptions& options, const CallContext& ctx,
                                           engine_internal::Clock::time_point start,
                                           const Restore& restore) {
    // Gathers on a GPU are asynchronous: apply_ms counts them finished. The
    // stream they ran on, not the device: a device-wide synchronize is
    // refused while another call captures a CUDA graph (a decode session),
    // and breaks that capture.
    for (const torch::Device& device : DevicesOf(model.weights)) SynchronizeCurrentStream(device);
    ApplyReport report;
    report.apply_ms = engine_internal::MillisSince(start);
    for (const Permutation& perm : perms) report.groups.push_back(perm.group);
    if (!options.skip_verify) {
      ReportProgress(ctx, "check", 0, 1);
      const auto verify_start = engine_internal::Clock::now();
      absl::StatusOr<torch::Tensor> logits = engine_internal::ProbeLogits(model, ctx);
      if (!logits.ok()) {
        restore();
        return logits.status();
      }
      report.correctness =
          CompareLogits(*logits, model.probe.logits, model.Tolerance(options.tolerance));
      report.verify_ms = engine_internal::MillisSince(verify_start);
      report.verified = true;
      if (!report.correctness.ok) {
        restore();
        return absl::AbortedError(absl::StrFormat(
            "post-apply check failed: relative L2 %.3g > tolerance %.3g (max abs %.3g, top-1 "
            "agreement %.4f); weights restored, version stays %d",
            report.correctness.rel_l2, report.correctness.tolerance, report.correctness.max_abs,
            report.correctness.top1_agreement, model.info.version));
      }
    }
    report.version = ++model.info.version;
    return report;
  }

  absl::StatusOr<uint64_t> Write(LoadedModel& model, const std::vector<HostTensor>& tensors,
                                 uint64_t expected_version) {
    ICD_RETURN_IF_ERROR(engine_internal::CheckVersion(model, expected_version));
    if (tensors.empty()) return absl::InvalidArgumentError("tensors: none given");
    // Convert and check everything before touching any weight.
    std::vector<std::pair<torch::Tensor*, torch::Tensor>> updates;
    std::set<std::string> seen;
    for (const HostTensor& host : tensors) {
      const std::string canonical = WeightKey(host.name, model.config);
      auto it = model.weights.find(canonical);
      if (it == model.weights.end()) {
        return absl::NotFoundError(absl::StrCat("tensor '", host.name, "' is not in model '",
                                                model.info.name, "'"));
      }
      if (!seen.insert(canonical).second) {
        return absl::InvalidArgumentError(absl::StrCat("tensor '", host.name, "' given twice"));
      }
      torch::Tensor& current = it->second;
      ICD_ASSIGN_OR_RETURN(torch::ScalarType type, engine_internal::ToTorch(host.dtype));
      if (type != current.scalar_type() || host.shape != current.sizes().vec()) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "tensor '%s': got %s [%s], the model holds %s [%s]", host.name,
            std::string(DTypeName(host.dtype)), absl::StrJoin(host.shape, ", "),
            std::string(c10::toString(current.scalar_type())),
            absl::StrJoin(current.sizes().vec(), ", ")));
      }
      const auto expected_bytes = static_cast<size_t>(current.numel()) * current.element_size();
      if (host.data.size() != expected_bytes) {
        return absl::InvalidArgumentError(absl::StrCat("tensor '", host.name, "': ",
                                                       host.data.size(), " bytes, expected ",
                                                       expected_bytes));
      }
      torch::Tensor incoming = torch::empty(current.sizes(), torch::dtype(type));
      std::memcpy(incoming.data_ptr(), host.data.data(), host.data.size());
      // A NaN or infinity would become the probe reference, and every later
      // check would compare NaN with NaN.
      const torch::Tensor finite = torch::isfinite(incoming).reshape({-1});
      if (!finite.all().item<bool>()) {
        const int64_t at = finite.logical_not().nonzero()[0][0].item<int64_t>();
        return absl::InvalidArgumentError(absl::StrCat(
            "tensor '", host.name, "': element ", at,
            " is NaN or infinite; weights must be finite"));
      }
      updates.emplace_back(&current, incoming.to(current.device()));
    }
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> previous;
    for (auto& [target, incoming] : updates) {
      previous.push_back(target->clone());
      target->copy_(incoming);
    }
    absl::StatusOr<torch::Tensor> logits = engine_internal::ProbeLogits(model, {});
    if (!logits.ok()) {
      for (size_t i = 0; i < updates.size(); ++i) updates[i].first->copy_(previous[i]);
      return logits.status();
    }
    model.probe.logits = *logits;  // an intended change of function: new reference
    return ++model.info.version;
  }

  static constexpr char kUnloadFirst[] = "unload a model first";
  static constexpr char kNoCpuHalf[] =
      "dtype float16 on the CPU: LibTorch has no CPU half kernels here; load with dtype "
      "float32 (or on a CUDA device)";

  EngineOptions options_;
  mutable std::mutex mutex_;  // guards models_ and loading_ only

 public:
  // Held by every call on a CUDA model (model_stream.h): shared, or
  // exclusively by a call that counts the device's kernels.
  std::shared_mutex device_gate;

 private:
  std::map<std::string, std::shared_ptr<LoadedModel>> models_;
  std::set<std::string> loading_;
  // What each device holds against the budget: loaded (and loading) models
  // by name, running calls by hold. Its own lock.
  engine_internal::MemoryLedger ledger_{options_.memory_budget};
  std::unordered_map<size_t, uint64_t> retired_versions_;  // name hash -> last version
};

}  // namespace icd

#endif  // ICD_CORE_SRC_ENGINE_INTERNAL_H_
