#include "icd/core/engine.h"

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
#include "checkpoint.h"
#include "config.h"
#include "exporter.h"
#include "forward.h"
#include "icd/core/status_macros.h"
#include "latency.h"
#include "model.h"
#include "probe.h"
#include "symmetry.h"
#include "traces/solve.h"

namespace icd {
namespace {

using Clock = std::chrono::steady_clock;

double MillisSince(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

// LibTorch reports errors by exception; none may cross the engine API.
template <typename Fn>
auto Guarded(const char* what, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const std::exception& e) {
    return InternalFailure(what, e.what());
  }
}

absl::StatusOr<torch::ScalarType> ToTorch(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return torch::kFloat32;
    case DType::kBFloat16: return torch::kBFloat16;
    case DType::kFloat16: return torch::kFloat16;
    case DType::kFloat64: return torch::kFloat64;
  }
  return absl::InvalidArgumentError("unknown dtype");
}

absl::StatusOr<DType> FromTorch(torch::ScalarType type) {
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

absl::StatusOr<torch::Device> ParseDevice(const std::string& name) {
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

  double Tolerance(double requested) const {
    return requested > 0 ? requested : DefaultTolerance(dtype);
  }
};

std::string GroupList(const FamilySpec& spec) {
  std::set<std::string> kinds;
  for (const GroupInfo& group : spec) {
    const auto dot = group.name.rfind('.');
    kinds.insert(dot == std::string::npos ? group.name
                                          : absl::StrCat("layers.{i}", group.name.substr(dot)));
  }
  return absl::StrJoin(kinds, ", ");
}

absl::Status CheckVersion(const LoadedModel& model, uint64_t expected) {
  if (expected != 0 && expected != model.info.version) {
    return absl::FailedPreconditionError(
        absl::StrCat("model '", model.info.name, "' is at version ", model.info.version,
                     ", the request expected version ", expected));
  }
  return absl::OkStatus();
}

absl::StatusOr<const GroupInfo*> FindGroup(const LoadedModel& model, const std::string& name) {
  auto it = model.groups.find(name);
  if (it == model.groups.end()) {
    return absl::InvalidArgumentError(absl::StrCat("unknown group '", name, "'; model '",
                                                   model.info.name, "' has ",
                                                   GroupList(model.spec)));
  }
  return it->second;
}

// Token ids as an int64 [batch, seq] tensor on the model's device, checked.
absl::StatusOr<torch::Tensor> TokenTensor(const LoadedModel& model, const std::vector<int64_t>& ids,
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

absl::StatusOr<torch::Tensor> ProbeLogits(const LoadedModel& model, const CallContext& ctx) {
  return Forward(model.config, model.weights, model.probe.input_ids, ctx);
}

}  // namespace

class Engine::Impl {
 public:
  explicit Impl(EngineOptions options) : options_(std::move(options)) {}

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

  // Counts `bytes` against the memory budget for `name` (loading), or
  // refuses: checked and booked under one lock, so concurrent loads cannot
  // both pass.
  absl::Status ReserveBytes(const std::string& name, int64_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t held = 0;
    for (const auto& [holder, size] : bytes_) held += size;
    if (options_.memory_budget_bytes > 0 && held + bytes > options_.memory_budget_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "memory budget: model '", name, "' needs ", bytes, " bytes of weights, ", held,
          " are held, the budget is ", options_.memory_budget_bytes,
          " (icd-server --memory-budget-mb); unload a model first"));
    }
    bytes_[name] = bytes;
    return absl::OkStatus();
  }

  void Finish(const std::string& name, std::shared_ptr<LoadedModel> model) {
    std::lock_guard<std::mutex> lock(mutex_);
    loading_.erase(name);
    if (model) {
      models_[name] = std::move(model);
    } else {
      bytes_.erase(name);
    }
  }

  absl::StatusOr<std::shared_ptr<LoadedModel>> LoadModel(const std::string& name,
                                                         const std::string& path,
                                                         const LoadOptions& options,
                                                         const CallContext& ctx) {
    if (name.empty()) return absl::InvalidArgumentError("name: must not be empty");
    const std::string device_name = options.device.empty() ? options_.default_device
                                                           : options.device;
    ICD_ASSIGN_OR_RETURN(torch::Device device, ParseDevice(device_name));
    ICD_ASSIGN_OR_RETURN(Checkpoint checkpoint, ReadCheckpoint(path, ctx, options.allowed_roots));

    auto model = std::make_shared<LoadedModel>();
    model->dtype = checkpoint.weights.at("backbone.embeddings.weight").scalar_type();
    if (!options.dtype.empty()) {
      ICD_ASSIGN_OR_RETURN(DType dtype, ParseDType(options.dtype));
      ICD_ASSIGN_OR_RETURN(model->dtype, ToTorch(dtype));
    }
    if (model->dtype == torch::kFloat16 && device.is_cpu()) {
      return absl::InvalidArgumentError(
          "dtype float16 on the CPU: LibTorch has no CPU half kernels here; load with dtype "
          "float32 (or on a CUDA device)");
    }
    int64_t bytes = 0;
    for (const auto& [tensor_name, tensor] : checkpoint.weights) {
      bytes += tensor.numel() * static_cast<int64_t>(c10::elementSize(model->dtype));
    }
    ICD_RETURN_IF_ERROR(ReserveBytes(name, bytes));
    torch::NoGradGuard no_grad;
    for (auto& [tensor_name, tensor] : checkpoint.weights) {
      tensor = tensor.to(device, model->dtype).contiguous();
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
    info.family = model->config.family;
    info.layout = model->config.layout;
    info.device = device.str();
    ICD_ASSIGN_OR_RETURN(info.dtype, FromTorch(model->dtype));
    for (const auto& [tensor_name, tensor] : model->weights) info.parameters += tensor.numel();
    info.version = FirstVersion(name);
    info.fingerprint = checkpoint.fingerprint;
    info.dims = ConfigDims(model->config);
    info.path = path;
    model->allowed_roots = options.allowed_roots;
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
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = models_.find(name);
    if (it == models_.end() || it->second != model) {
      return absl::NotFoundError(absl::StrCat("model '", name, "' is not loaded"));
    }
    models_.erase(it);
    bytes_.erase(name);
    uint64_t& last = retired_versions_[std::hash<std::string>{}(name)];
    last = std::max(last, model->info.version);
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
    const auto start = Clock::now();
    ICD_RETURN_IF_ERROR(CheckVersion(model, options.expected_version));
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
            "unknown group '", perm.group, "' (this model has: ", GroupList(model.spec), ")"));
      }
      ICD_RETURN_IF_ERROR(ValidatePermutation(*it->second, perm.index));
      groups.push_back(it->second);
    }
    std::vector<GroupPermutation> gathers;
    for (size_t i = 0; i < perms.size(); ++i) gathers.push_back({groups[i], &perms[i].index});
    ApplyGathers(gathers, model.weights);
    // Gathers on a GPU are asynchronous: apply_ms counts them finished.
    const torch::Device device = model.weights.begin()->second.device();
    if (device.is_cuda()) torch::cuda::synchronize(device.index());
    auto restore = [&] {
      std::vector<std::vector<int64_t>> inverses;
      for (const Permutation& perm : perms) inverses.push_back(InversePermutation(perm.index));
      std::vector<GroupPermutation> undo;
      for (size_t i = perms.size(); i-- > 0;) undo.push_back({groups[i], &inverses[i]});
      ApplyGathers(undo, model.weights);
    };
    ApplyReport report;
    report.apply_ms = MillisSince(start);
    for (const Permutation& perm : perms) report.groups.push_back(perm.group);
    if (!options.skip_verify) {
      const auto verify_start = Clock::now();
      absl::StatusOr<torch::Tensor> logits = ProbeLogits(model, ctx);
      if (!logits.ok()) {
        restore();
        return logits.status();
      }
      report.correctness =
          CompareLogits(*logits, model.probe.logits, model.Tolerance(options.tolerance));
      report.verify_ms = MillisSince(verify_start);
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
    ICD_RETURN_IF_ERROR(CheckVersion(model, expected_version));
    if (tensors.empty()) return absl::InvalidArgumentError("tensors: none given");
    // Convert and check everything before touching any weight.
    std::vector<std::pair<torch::Tensor*, torch::Tensor>> updates;
    std::set<std::string> seen;
    for (const HostTensor& host : tensors) {
      std::string canonical = CanonicalTensorName(host.name);
      if (canonical == "lm_head.weight" && model.config.tied) {
        canonical = "backbone.embeddings.weight";
      }
      auto it = model.weights.find(canonical);
      if (it == model.weights.end()) {
        return absl::NotFoundError(absl::StrCat("tensor '", host.name, "' is not in model '",
                                                model.info.name, "'"));
      }
      if (!seen.insert(canonical).second) {
        return absl::InvalidArgumentError(absl::StrCat("tensor '", host.name, "' given twice"));
      }
      torch::Tensor& current = it->second;
      ICD_ASSIGN_OR_RETURN(torch::ScalarType type, ToTorch(host.dtype));
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
    absl::StatusOr<torch::Tensor> logits = ProbeLogits(model, {});
    if (!logits.ok()) {
      for (size_t i = 0; i < updates.size(); ++i) updates[i].first->copy_(previous[i]);
      return logits.status();
    }
    model.probe.logits = *logits;  // an intended change of function: new reference
    return ++model.info.version;
  }

  EngineOptions options_;
  mutable std::mutex mutex_;  // guards models_, loading_ and bytes_ only
  std::map<std::string, std::shared_ptr<LoadedModel>> models_;
  std::set<std::string> loading_;
  std::map<std::string, int64_t> bytes_;  // weight bytes per loaded or loading model
  std::unordered_map<size_t, uint64_t> retired_versions_;  // name hash -> last version
};

Engine::Engine(EngineOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {}
Engine::~Engine() = default;

absl::StatusOr<ModelInfo> Engine::Load(const std::string& name, const std::string& path,
                                       const LoadOptions& options, const CallContext& ctx) {
  ICD_RETURN_IF_ERROR(impl_->Reserve(name));
  absl::StatusOr<std::shared_ptr<LoadedModel>> model =
      Guarded("load", [&] { return impl_->LoadModel(name, path, options, ctx); });
  if (!model.ok()) {
    impl_->Finish(name, nullptr);
    return model.status();
  }
  ModelInfo info = (*model)->info;
  impl_->Finish(name, *std::move(model));
  return info;
}

absl::Status Engine::Unload(const std::string& name) { return impl_->Erase(name); }

std::vector<ModelInfo> Engine::List() const { return impl_->List(); }

absl::StatusOr<ModelInfo> Engine::Info(const std::string& name) const {
  ICD_ASSIGN_OR_RETURN(auto model, impl_->Find(name));
  std::shared_lock<std::shared_mutex> lock(model->mutex);
  return model->info;
}

absl::StatusOr<std::vector<GroupInfo>> Engine::Symmetries(const std::string& name) const {
  ICD_ASSIGN_OR_RETURN(auto model, impl_->Find(name));
  std::shared_lock<std::shared_mutex> lock(model->mutex);
  std::vector<GroupInfo> groups = model->spec;
  for (GroupInfo& group : groups) {
    for (GroupMember& member : group.members) {
      member.tensor = LayoutTensorName(model->config.layout, member.tensor);
    }
  }
  return groups;
}

absl::StatusOr<ApplyReport> Engine::Apply(const std::string& name,
                                          const std::vector<Permutation>& perms,
                                          const ApplyOptions& options, const CallContext& ctx) {
  ICD_ASSIGN_OR_RETURN(auto model, impl_->Find(name));
  std::unique_lock<std::shared_mutex> lock(model->mutex);
  return Guarded("apply", [&] { return impl_->Apply(*model, perms, options, ctx); });
}

absl::StatusOr<CorrectnessReport> Engine::Verify(const std::string& name,
                                                 const CallContext& ctx) const {
  ICD_ASSIGN_OR_RETURN(auto model, impl_->Find(name));
  std::shared_lock<std::shared_mutex> lock(model->mutex);
  return Guarded("verify", [&]() -> absl::StatusOr<CorrectnessReport> {
    ICD_ASSIGN_OR_RETURN(torch::Tensor logits, ProbeLogits(*model, ctx));
    return CompareLogits(logits, model->probe.logits, model->Tolerance(0));
  });
}

absl::StatusOr<EvaluateResult> Engine::Evaluate(const std::string& name,
                                                const EvaluateRequest& request,
                                                const CallContext& ctx) const {
  ICD_ASSIGN_OR_RETURN(auto model, impl_->Find(name));
  std::shared_lock<std::shared_mutex> lock(model->mutex);
  ICD_ASSIGN_OR_RETURN(torch::Tensor ids,
                       TokenTensor(*model, request.input_ids, request.batch, "input_ids"));
  if (ids.size(1) < 2 && !request.return_logits) {
    return absl::InvalidArgumentError(absl::StrCat(
        "input_ids: rows of ", ids.size(1),
        " token leave nothing to score (the NLL is of each next token: send at least 2 per "
        "row, or ask for logits)"));
  }
  return Guarded("evaluate", [&]() -> absl::StatusOr<EvaluateResult> {
    torch::NoGradGuard no_grad;
    const int64_t seq = ids.size(1);
    ICD_ASSIGN_OR_RETURN(torch::Tensor logits, Forward(model->config, model->weights, ids, ctx));
    EvaluateResult result;
    result.shape = logits.sizes().vec();
    result.tokens = request.batch * (seq - 1);
    if (seq > 1) {
      torch::Tensor log_probs =
          torch::log_softmax(logits.slice(1, 0, seq - 1).to(torch::kFloat64), -1);
      torch::Tensor targets = ids.slice(1, 1, seq).unsqueeze(-1);
      result.mean_nll = -log_probs.gather(-1, targets).mean().item<double>();
    }
    if (request.return_logits) {
      torch::Tensor host = logits.to(torch::kCPU).contiguous();
      result.logits.assign(host.data_ptr<float>(), host.data_ptr<float>() + host.numel());
    }
    return result;
  });
}

absl::StatusOr<std::vector<HostTensor>> Engine::ReadTensors(
    const std::string& name, const std::vector<std::string>& names) const {
  ICD_ASSIGN_OR_RETURN(auto model, impl_->Find(name));
  std::shared_lock<std::shared_mutex> lock(model->mutex);
  std::vector<std::string> wanted = names;
  if (wanted.empty()) {
    for (const WeightFile& file : model->layout.files) {
      for (const std::string& stored : file.names) wanted.push_back(stored);
    }
  }
  return Guarded("read tensors", [&]() -> absl::StatusOr<std::vector<HostTensor>> {
    std::vector<HostTensor> out;
    for (const std::string& stored : wanted) {
      std::string canonical = CanonicalTensorName(stored);
      if (canonical == "lm_head.weight" && model->config.tied) {
        canonical = "backbone.embeddings.weight";
      }
      auto it = model->weights.find(canonical);
      if (it == model->weights.end()) {
        return absl::NotFoundError(
            absl::StrCat("tensor '", stored, "' is not in model '", name, "'"));
      }
      torch::Tensor host = it->second.to(torch::kCPU).contiguous();
      HostTensor tensor;
      tensor.name = stored;
      tensor.shape = host.sizes().vec();
      ICD_ASSIGN_OR_RETURN(tensor.dtype, FromTorch(host.scalar_type()));
      tensor.data.assign(static_cast<const char*>(host.data_ptr()), host.nbytes());
      out.push_back(std::move(tensor));
    }
    return out;
  });
}

absl::StatusOr<int64_t> Engine::TensorBytes(const std::string& name,
                                            const std::string& tensor) const {
  ICD_ASSIGN_OR_RETURN(auto model, impl_->Find(name));
  std::shared_lock<std::shared_mutex> lock(model->mutex);
  std::string canonical = CanonicalTensorName(tensor);
  if (canonical == "lm_head.weight" && model->config.tied) canonical = "backbone.embeddings.weight";
  auto it = model->weights.find(canonical);
  if (it == model->weights.end()) {
    return absl::NotFoundError(absl::StrCat("tensor '", tensor, "' is not in model '", name, "'"));
  }
  return static_cast<int64_t>(it->second.numel()) * static_cast<int64_t>(it->second.element_size());
}

absl::StatusOr<uint64_t> Engine::WriteTensors(const std::string& name,
                                              const std::vector<HostTensor>& tensors,
                                              uint64_t expected_version) {
  ICD_ASSIGN_OR_RETURN(auto model, impl_->Find(name));
  std::unique_lock<std::shared_mutex> lock(model->mutex);
  return Guarded("write tensors", [&] { return impl_->Write(*model, tensors, expected_version); });
}

absl::StatusOr<ExportResult> Engine::Export(const std::string& name, const std::string& path,
                                            const CallContext& ctx) {
  ICD_ASSIGN_OR_RETURN(auto model, impl_->Find(name));
  std::unique_lock<std::shared_mutex> lock(model->mutex);
  return Guarded("export", [&]() -> absl::StatusOr<ExportResult> {
    // The files beside the weights are copied: they must still lie where the
    // load was allowed to read.
    ICD_RETURN_IF_ERROR(CheckFilesUnderRoots(model->info.path, model->allowed_roots));
    ICD_ASSIGN_OR_RETURN(ExportResult result,
                         ExportCheckpoint(model->info.path, model->layout, model->config,
                                          model->weights, path, ctx));
    result.version = model->info.version;
    return result;
  });
}

absl::StatusOr<std::unique_ptr<TraceSession>> Engine::BeginTraces(const TraceHeader& header) {
  ICD_ASSIGN_OR_RETURN(auto model, impl_->Find(header.model));
  ICD_ASSIGN_OR_RETURN(traces::ResolvedOptions options,
                       traces::ResolveSolverOptions(header.solver));
  torch::Device device = torch::kCPU;
  {
    std::shared_lock<std::shared_mutex> lock(model->mutex);
    ICD_ASSIGN_OR_RETURN(const GroupInfo* group, FindGroup(*model, header.group));
    if (header.channels != group->size) {
      return absl::InvalidArgumentError(
          absl::StrCat("group '", header.group, "' has ", group->size, " channels; the header says ",
                       header.channels));
    }
    if (header.holdout_rows < 0 ||
        header.holdout_rows > traces::kMaxHoldoutValues / std::max<int64_t>(header.channels, 1)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "holdout_rows ", header.holdout_rows, " outside [0, ",
          traces::kMaxHoldoutValues / std::max<int64_t>(header.channels, 1), "] for group '",
          header.group, "'"));
    }
    device = model->probe.input_ids.device();
  }
  // Finish looks the model up again: it may have been unloaded meanwhile.
  Impl* impl = impl_.get();
  auto solve = [impl, header, options](const traces::TraceStats& stats,
                                       const torch::Tensor& holdout,
                                       const CallContext& ctx) -> absl::StatusOr<PermutationResult> {
    ICD_ASSIGN_OR_RETURN(auto current, impl->Find(header.model));
    std::shared_lock<std::shared_mutex> lock(current->mutex);
    ICD_ASSIGN_OR_RETURN(const GroupInfo* group, FindGroup(*current, header.group));
    if (group->size != header.channels) {
      return absl::FailedPreconditionError(absl::StrCat(
          "model '", header.model, "' was replaced during the stream; group '", header.group,
          "' now has ", group->size, " channels"));
    }
    return Guarded("solve", [&] {
      return traces::SolveGroup(*group, stats, holdout, options, current->weights, ctx);
    });
  };
  return Guarded("traces", [&]() -> absl::StatusOr<std::unique_ptr<TraceSession>> {
    return std::make_unique<TraceSession>(
        std::make_unique<TraceSession::Impl>(header, options, device, std::move(solve)));
  });
}

namespace {

// Collects each wanted group's rows during a forward: training rows into the
// statistics, the last `holdout_positions` positions of every sequence (or a
// whole held-out pass) into the held-out rows.
class CaptureCollector : public CaptureSink {
 public:
  struct Slot {
    explicit Slot(traces::StatsOptions options) : stats(std::move(options)) {}
    traces::TraceStats stats;
    std::vector<torch::Tensor> holdout;
  };

  CaptureCollector(std::map<std::string, Slot*> slots, int64_t batch, int64_t seq,
                   int64_t holdout_positions, bool holdout_pass, const CallContext& ctx)
      : slots_(std::move(slots)),
        batch_(batch),
        seq_(seq),
        holdout_positions_(holdout_positions),
        holdout_pass_(holdout_pass),
        ctx_(ctx) {}

  bool Wants(const std::string& group) const override { return slots_.count(group) > 0; }

  // OK, or why the statistics stopped (CheckCall): they are then incomplete.
  const absl::Status& stopped() const { return stopped_; }

  void SetWindow(int64_t start, int64_t length) override {
    window_start_ = start;
    window_length_ = length;
  }

  void Add(const std::string& group, const torch::Tensor& rows) override {
    if (!stopped_.ok()) return;  // the forward stops at its next check
    Slot& slot = *slots_.at(group);
    const torch::Tensor values = rows.to(torch::kFloat32);
    if (holdout_pass_) {
      slot.holdout.push_back(values.contiguous());
    } else if (holdout_positions_ > 0 && values.size(0) == batch_ * window_length_) {
      // Positions from seq - holdout_positions on, in every sequence, are
      // held out; the window may hold some of each.
      const int64_t channels = values.size(1);
      const torch::Tensor sequences = values.reshape({batch_, window_length_, channels});
      const int64_t trained = std::clamp<int64_t>(seq_ - holdout_positions_ - window_start_, 0,
                                                  window_length_);
      if (trained > 0) {
        stopped_ =
            slot.stats.Add(sequences.narrow(1, 0, trained).reshape({-1, channels}), ctx_);
      }
      if (trained < window_length_) {
        slot.holdout.push_back(sequences.narrow(1, trained, window_length_ - trained)
                                   .reshape({-1, channels})
                                   .contiguous());
      }
    } else {
      stopped_ = slot.stats.Add(values, ctx_);
    }
  }

 private:
  std::map<std::string, Slot*> slots_;
  int64_t batch_, seq_, holdout_positions_;
  bool holdout_pass_;
  const CallContext& ctx_;
  absl::Status stopped_;
  int64_t window_start_ = 0;
  int64_t window_length_ = 0;  // SetWindow
};

// Statistics memory one capture forward may hold; more groups take more
// forwards.
constexpr int64_t kCaptureStatsBytes = int64_t{2} << 30;

}  // namespace

absl::StatusOr<std::vector<PermutationResult>> Engine::Capture(const CaptureRequest& request,
                                                               const CallContext& ctx) {
  ICD_ASSIGN_OR_RETURN(auto model, impl_->Find(request.model));
  ICD_ASSIGN_OR_RETURN(traces::ResolvedOptions options,
                       traces::ResolveSolverOptions(request.solver));
  const int64_t batch = request.batch > 0 ? request.batch : 1;
  std::shared_lock<std::shared_mutex> lock(model->mutex);
  ICD_ASSIGN_OR_RETURN(torch::Tensor ids, TokenTensor(*model, request.input_ids, batch, "input_ids"));
  torch::Tensor holdout_ids;
  if (!request.holdout_ids.empty()) {
    ICD_ASSIGN_OR_RETURN(holdout_ids,
                         TokenTensor(*model, request.holdout_ids, batch, "holdout_ids"));
  }
  std::vector<const GroupInfo*> groups;
  std::set<std::string> seen;
  if (request.groups.empty()) {
    for (const GroupInfo& group : model->spec) groups.push_back(&group);
  } else {
    for (const std::string& name : request.groups) {
      ICD_ASSIGN_OR_RETURN(const GroupInfo* group, FindGroup(*model, name));
      if (!seen.insert(name).second) {
        return absl::InvalidArgumentError(absl::StrCat("groups: '", name, "' is listed twice"));
      }
      groups.push_back(group);
    }
  }
  const int64_t seq = ids.size(1);
  // Without held-out tokens: the last fifth of every sequence is held out.
  const int64_t holdout_positions = holdout_ids.defined() ? 0 : (seq >= 2 ? std::max<int64_t>(1, seq / 5) : 0);
  const torch::Device device = ids.device();

  return Guarded("capture", [&]() -> absl::StatusOr<std::vector<PermutationResult>> {
    torch::NoGradGuard no_grad;
    std::vector<PermutationResult> results;
    size_t next = 0;
    while (next < groups.size()) {
      // One forward (two with held-out tokens) per batch of groups whose
      // statistics fit the budget.
      std::vector<std::unique_ptr<CaptureCollector::Slot>> slots;
      std::map<std::string, CaptureCollector::Slot*> by_name;
      int64_t bytes = 0;
      const size_t first = next;
      while (next < groups.size()) {
        const int64_t size = groups[next]->size;
        const int64_t need = 2 * size * size * 8;
        if (next > first && bytes + need > kCaptureStatsBytes) break;
        bytes += need;
        slots.push_back(std::make_unique<CaptureCollector::Slot>(
            traces::StatsOptionsFor(options, size, device)));
        by_name[groups[next]->name] = slots.back().get();
        ++next;
      }
      CaptureCollector training(by_name, batch, seq, holdout_positions, /*holdout_pass=*/false,
                                ctx);
      ICD_RETURN_IF_ERROR(Forward(model->config, model->weights, ids, ctx, &training).status());
      ICD_RETURN_IF_ERROR(training.stopped());
      if (holdout_ids.defined()) {
        CaptureCollector held(by_name, batch, holdout_ids.size(1), 0, /*holdout_pass=*/true, ctx);
        ICD_RETURN_IF_ERROR(Forward(model->config, model->weights, holdout_ids, ctx, &held).status());
        ICD_RETURN_IF_ERROR(held.stopped());
      }
      for (size_t i = first; i < next; ++i) {
        CaptureCollector::Slot& slot = *slots[i - first];
        slot.stats.Finish();
        const torch::Tensor holdout =
            slot.holdout.empty() ? torch::empty({0, groups[i]->size}, torch::kFloat32)
                                 : torch::cat(slot.holdout, 0);
        ICD_ASSIGN_OR_RETURN(PermutationResult result,
                             traces::SolveGroup(*groups[i], slot.stats, holdout, options,
                                                model->weights, ctx));
        results.push_back(std::move(result));
      }
    }
    return results;
  });
}

absl::StatusOr<LatencyReport> Engine::MeasureLatency(const LatencyOptions& options,
                                                     const CallContext& ctx) {
  ICD_RETURN_IF_ERROR(latency::ValidateOptions(options));
  ICD_ASSIGN_OR_RETURN(auto model, impl_->Find(options.model));
  std::shared_ptr<LoadedModel> compare;
  if (!options.compare_model.empty()) {
    ICD_ASSIGN_OR_RETURN(compare, impl_->Find(options.compare_model));
  }
  // Shared locks taken in one order (by address): two comparisons of the
  // same pair in opposite roles could otherwise deadlock behind a writer
  // waiting on each model. A model compared with itself is locked once.
  LoadedModel* first = model.get();
  LoadedModel* second = compare.get();
  if (second != nullptr && std::less<LoadedModel*>()(second, first)) std::swap(first, second);
  std::shared_lock<std::shared_mutex> first_lock(first->mutex);
  std::shared_lock<std::shared_mutex> second_lock;
  if (second != nullptr && second != first) {
    second_lock = std::shared_lock<std::shared_mutex>(second->mutex);
  }
  auto timed = [](const LoadedModel& loaded) {
    return latency::TimedModel{loaded.info.name, &loaded.config, &loaded.weights,
                               loaded.info.device, loaded.info.version};
  };
  const latency::TimedModel timed_model = timed(*model);
  std::optional<latency::TimedModel> timed_compare;
  if (compare) timed_compare = timed(*compare);
  return Guarded("latency", [&] {
    return latency::Measure(options, timed_model,
                            timed_compare.has_value() ? &*timed_compare : nullptr, ctx);
  });
}

}  // namespace icd
