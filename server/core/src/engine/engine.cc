// The engine's API (icd/core/engine.h) over its registry of loaded models
// (engine_internal.h); CapturePermutation lives in engine_capture.cc.
#include "icd/core/engine.h"

#include "engine/engine_internal.h"

namespace icd {

using engine_internal::FindGroup;
using engine_internal::FromTorch;
using engine_internal::ProbeLogits;
using engine_internal::RequestBatch;
using engine_internal::TokenTensor;

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

std::vector<DeviceMemory> Engine::Memory() const { return impl_->Memory(); }

absl::StatusOr<ModelInfo> Engine::Info(const std::string& name) const {
  ICD_ASSIGN_OR_RETURN(auto model, impl_->Find(name));
  std::shared_lock<std::shared_mutex> lock(model->mutex);
  ICD_RETURN_IF_ERROR(engine_internal::StillLoaded(*model));
  return model->info;
}

absl::StatusOr<std::vector<GroupInfo>> Engine::Symmetries(const std::string& name,
                                                          uint64_t* version) const {
  ICD_ASSIGN_OR_RETURN(auto model, impl_->Find(name));
  std::shared_lock<std::shared_mutex> lock(model->mutex);
  ICD_RETURN_IF_ERROR(engine_internal::StillLoaded(*model));
  if (version != nullptr) *version = model->info.version;
  std::vector<GroupInfo> groups = model->spec;
  for (GroupInfo& group : groups) {
    for (GroupMember& member : group.members) {
      // The name the checkpoint's files gave it (what ReadTensors and an
      // export use), else the layout's.
      auto named = [&](const std::string& tensor) {
        auto stored = model->layout.stored_name.find(tensor);
        return stored != model->layout.stored_name.end()
                   ? stored->second
                   : LayoutTensorName(model->config.layout, tensor);
      };
      member.tensor = named(member.tensor);
      for (std::string& tensor : member.tensors) tensor = named(tensor);
    }
  }
  return groups;
}

absl::StatusOr<ApplyReport> Engine::Apply(const std::string& name,
                                          const std::vector<Permutation>& perms,
                                          const ApplyOptions& options, const CallContext& ctx) {
  ICD_ASSIGN_OR_RETURN(auto model, impl_->Find(name));
  std::unique_lock<std::shared_mutex> lock(model->mutex);
  ICD_RETURN_IF_ERROR(engine_internal::StillLoaded(*model));
  const engine_internal::OnModelStream on_stream(model->on_cuda, model->stream, impl_->device_gate);
  return Guarded("apply", [&] { return impl_->Apply(*model, perms, options, ctx); });
}

absl::StatusOr<CorrectnessReport> Engine::Verify(const std::string& name,
                                                 const CallContext& ctx) const {
  ICD_ASSIGN_OR_RETURN(auto model, impl_->Find(name));
  std::shared_lock<std::shared_mutex> lock(model->mutex);
  ICD_RETURN_IF_ERROR(engine_internal::StillLoaded(*model));
  const engine_internal::OnModelStream on_stream(model->on_cuda, model->stream, impl_->device_gate);
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
  ICD_RETURN_IF_ERROR(engine_internal::StillLoaded(*model));
  const engine_internal::OnModelStream on_stream(model->on_cuda, model->stream, impl_->device_gate);
  ICD_ASSIGN_OR_RETURN(const int64_t batch, RequestBatch(request.batch));
  ICD_ASSIGN_OR_RETURN(torch::Tensor ids,
                       TokenTensor(*model, request.input_ids, batch, "input_ids"));
  if (ids.size(1) < 2 && !request.return_logits) {
    return absl::InvalidArgumentError(absl::StrCat(
        "input_ids: rows of ", ids.size(1),
        " token leave nothing to score (the NLL is of each next token: send at least 2 per "
        "row, or ask for logits)"));
  }
  // The forward, the scored logits widened to float32 and their exponentials
  // (the NLL's logsumexp), and on the CPU the logits copied out when asked.
  const int64_t positions = batch * ids.size(1);
  const int64_t vocab = model->config.vocab_size;
  const int64_t forward_bytes =
      engine_internal::ForwardBytes(model->config, model->dtype, batch, ids.size(1));
  const int64_t nll_bytes = engine_internal::SaturatingProduct(
      {2, positions, vocab, model->dtype == torch::kFloat64 ? 8 : 4});
  const int64_t copy_bytes = request.return_logits && model->memory_device == "cpu"
                                 ? engine_internal::SaturatingProduct({positions, vocab, 4})
                                 : 0;
  ICD_ASSIGN_OR_RETURN(
      const engine_internal::MemoryHold hold,
      impl_->BookCall(*model,
                      engine_internal::SaturatingSum({forward_bytes, nll_bytes, copy_bytes}),
                      absl::StrCat("Evaluate of model '", name, "' over ", batch, " x ",
                                   ids.size(1), " tokens (an estimate: forward ", forward_bytes,
                                   ", the NLL's widened logits ", nll_bytes, ", logits copied out ",
                                   copy_bytes, " bytes)")));
  return Guarded("evaluate", [&]() -> absl::StatusOr<EvaluateResult> {
    torch::NoGradGuard no_grad;
    const int64_t seq = ids.size(1);
    ICD_ASSIGN_OR_RETURN(torch::Tensor logits, Forward(model->config, model->weights, ids, ctx));
    EvaluateResult result;
    result.shape = logits.sizes().vec();
    result.tokens = batch * (seq - 1);
    if (seq > 1) {
      // Each position's NLL as logsumexp(logits) - logits[next id], in float32
      // (float64 models in float64), their mean in float64: within 1e-9 of a
      // float64 log_softmax's mean, at a tenth of its cost (0.6 against 6-7 ms
      // for 2 x 1024 positions of 256 on a 2-core VM: docs/mamba2-scan.md).
      const torch::Tensor scored = logits.slice(1, 0, seq - 1);
      const torch::Tensor wide =
          scored.scalar_type() == torch::kFloat64 ? scored : scored.to(torch::kFloat32);
      const torch::Tensor targets = ids.slice(1, 1, seq).unsqueeze(-1).to(logits.device());
      const torch::Tensor nll = torch::logsumexp(wide, -1, /*keepdim=*/true) - wide.gather(-1, targets);
      result.mean_nll = nll.to(torch::kFloat64).mean().item<double>();
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
  ICD_RETURN_IF_ERROR(engine_internal::StillLoaded(*model));
  const engine_internal::OnModelStream on_stream(model->on_cuda, model->stream, impl_->device_gate);
  std::vector<std::string> wanted = names;
  if (wanted.empty()) {
    for (const WeightFile& file : model->layout.files) {
      for (const std::string& stored : file.names) wanted.push_back(stored);
    }
  }
  return Guarded("read tensors", [&]() -> absl::StatusOr<std::vector<HostTensor>> {
    std::vector<HostTensor> out;
    for (const std::string& stored : wanted) {
      const std::string canonical = WeightKey(stored, model->config);
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
  ICD_RETURN_IF_ERROR(engine_internal::StillLoaded(*model));
  const std::string canonical = WeightKey(tensor, model->config);
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
  ICD_RETURN_IF_ERROR(engine_internal::StillLoaded(*model));
  const engine_internal::OnModelStream on_stream(model->on_cuda, model->stream, impl_->device_gate);
  return Guarded("write tensors", [&] { return impl_->Write(*model, tensors, expected_version); });
}

absl::StatusOr<ExportResult> Engine::Export(const std::string& name, const std::string& path,
                                            const CallContext& ctx) {
  ICD_ASSIGN_OR_RETURN(auto model, impl_->Find(name));
  std::unique_lock<std::shared_mutex> lock(model->mutex);
  ICD_RETURN_IF_ERROR(engine_internal::StillLoaded(*model));
  const engine_internal::OnModelStream on_stream(model->on_cuda, model->stream, impl_->device_gate);
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
    ICD_RETURN_IF_ERROR(engine_internal::StillLoaded(*model));
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
  // The stream's statistics, its held-out tail (float32 rows, default 1024)
  // and the solve, on the model's device for the stream's life.
  const int64_t holdout_rows = header.holdout_rows > 0 ? header.holdout_rows : 1024;
  const int64_t stats_bytes = engine_internal::StatsBytes(header.channels, /*rows=*/1024);
  const int64_t tail_bytes =
      engine_internal::SaturatingProduct({holdout_rows, header.channels, 4});
  const int64_t solver_bytes = engine_internal::SolverBytes(header.channels);
  ICD_ASSIGN_OR_RETURN(
      engine_internal::MemoryHold booked,
      impl_->BookCall(*model,
                      engine_internal::SaturatingSum({stats_bytes, tail_bytes, solver_bytes}),
                      absl::StrCat("ComputePermutation of group '", header.group, "' of model '",
                                   header.model, "' (", header.channels,
                                   " channels; an estimate: statistics ", stats_bytes,
                                   ", held-out rows ", tail_bytes, ", solver ", solver_bytes,
                                   " bytes)"),
                      engine_internal::MemoryDevice(device)));
  // Kept by the solve below, so held as long as the session lives.
  auto hold = std::make_shared<engine_internal::MemoryHold>(std::move(booked));
  // Finish looks the model up again: it may have been unloaded meanwhile.
  Impl* impl = impl_.get();
  auto solve = [impl, header, options, hold](
                   const traces::TraceStats& stats, const torch::Tensor& holdout,
                   const CallContext& ctx) -> absl::StatusOr<PermutationResult> {
    ICD_ASSIGN_OR_RETURN(auto current, impl->Find(header.model));
    std::shared_lock<std::shared_mutex> lock(current->mutex);
    ICD_RETURN_IF_ERROR(engine_internal::StillLoaded(*current));
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
  ICD_RETURN_IF_ERROR(engine_internal::StillLoaded(*first));
  std::shared_lock<std::shared_mutex> second_lock;
  if (second != nullptr && second != first) {
    second_lock = std::shared_lock<std::shared_mutex>(second->mutex);
    ICD_RETURN_IF_ERROR(engine_internal::StillLoaded(*second));
  }
  // On the first model's stream; the compare model is only read, and the wait
  // on leaving covers it too. Counters count every kernel on the device:
  // the call has it to itself.
  const engine_internal::OnModelStream on_stream(model->on_cuda, model->stream, impl_->device_gate,
                                                 /*exclusive=*/options.counter_repeats > 0);
  auto timed = [](const LoadedModel& loaded) {
    return latency::TimedModel{loaded.info.name, &loaded.config, &loaded.weights,
                               loaded.info.device, loaded.info.version};
  };
  const latency::TimedModel timed_model = timed(*model);
  std::optional<latency::TimedModel> timed_compare;
  if (compare) timed_compare = timed(*compare);
  // Each model's forward over [batch, seq_len], one at a time; for decode,
  // every session's recurrent state for the whole call, and on a GPU the
  // memory its step's graph keeps (a one-token forward). A compare model on
  // another device is refused by Measure, not counted here.
  const bool decode = options.mode == "decode";
  int64_t forward_bytes = 0;
  int64_t state_bytes = 0;
  for (const LoadedModel* timed_one : {model.get(), compare.get()}) {
    if (timed_one == nullptr || timed_one->memory_device != model->memory_device) continue;
    forward_bytes = std::max(forward_bytes,
                             engine_internal::ForwardBytes(timed_one->config, timed_one->dtype,
                                                           options.batch, options.seq_len));
    if (decode) {
      const int64_t step = timed_one->memory_device == "cpu"
                               ? 0
                               : engine_internal::ForwardBytes(timed_one->config,
                                                               timed_one->dtype, options.batch, 1);
      state_bytes = engine_internal::SaturatingSum(
          {state_bytes, step,
           engine_internal::StateBytes(
               timed_one->config, timed_one->dtype, options.batch,
               engine_internal::SaturatingSum({options.seq_len, options.warmup, options.iters}))});
    }
  }
  ICD_ASSIGN_OR_RETURN(
      const engine_internal::MemoryHold hold,
      impl_->BookCall(*model, engine_internal::SaturatingSum({forward_bytes, state_bytes}),
                      absl::StrCat("MeasureLatency (", options.mode, ") of model '", options.model,
                                   "'",
                                   compare ? absl::StrCat(" and '", options.compare_model, "'")
                                           : "",
                                   " over ", options.batch, " x ", options.seq_len,
                                   " tokens (an estimate: forward ", forward_bytes,
                                   decode ? absl::StrCat(", decode state ", state_bytes) : "",
                                   " bytes)")));
  return Guarded("latency", [&] {
    return latency::Measure(options, timed_model,
                            timed_compare.has_value() ? &*timed_compare : nullptr, ctx);
  });
}

}  // namespace icd
