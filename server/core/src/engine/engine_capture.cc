// Engine::Capture (CapturePermutation): forwards that collect the wanted
// groups' activations into trace statistics, then the solver per group.
#include "engine/engine_internal.h"

#include "traces/solve.h"

namespace icd {

using engine_internal::FindGroup;
using engine_internal::RequestBatch;
using engine_internal::TokenTensor;

namespace {

// Collects each wanted group's rows during a forward: training rows into the
// statistics, the last `holdout_positions` positions of every sequence (or a
// whole held-out pass) into the held-out rows.
class CaptureCollector : public CaptureSink {
 public:
  struct Slot {
    explicit Slot(traces::StatsOptions options)
        : device(options.device), stats(std::move(options)) {}
    torch::Device device;  // the statistics' (activations of a placed model's layers move there)
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
    const torch::Tensor values = rows.to(slot.device, torch::kFloat32);
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

// The capture's forwards: groups [first, next) of each, in order, as many
// as their statistics fit kCaptureStatsBytes (at least one).
std::vector<std::pair<size_t, size_t>> CaptureBatches(const std::vector<const GroupInfo*>& groups) {
  std::vector<std::pair<size_t, size_t>> batches;
  size_t next = 0;
  while (next < groups.size()) {
    const size_t first = next;
    int64_t bytes = 0;
    while (next < groups.size()) {
      const int64_t size = groups[next]->size;
      const int64_t need = 2 * size * size * 8;
      if (next > first && bytes + need > kCaptureStatsBytes) break;
      bytes += need;
      ++next;
    }
    batches.emplace_back(first, next);
  }
  return batches;
}

// What a capture holds on the model's device at its peak, estimated per
// batch of groups: the statistics and held-out rows of the batch's groups,
// with either a forward (and one float32 copy of the widest group's rows)
// or one group's solve (and its held-out rows gathered into one tensor).
// Held-out rows per group: forward.h's capture points hand `residual`
// n_layer + 1 row sets per forward and every other group at most 2.
struct CaptureEstimate {
  int64_t forward = 0, statistics = 0, holdout = 0, solver = 0, total = 0;
};

CaptureEstimate EstimateCapture(const LoadedModel& model,
                                const std::vector<const GroupInfo*>& groups,
                                const std::vector<std::pair<size_t, size_t>>& batches,
                                int64_t batch, int64_t seq, int64_t holdout_seq,
                                int64_t holdout_positions) {
  using engine_internal::SaturatingProduct;
  using engine_internal::SaturatingSum;
  const int64_t longest = std::max(seq, holdout_seq);
  const int64_t forward =
      engine_internal::ForwardBytes(model.config, model.dtype, batch, longest);
  // Rows held out per row set: every position of the held-out ids, or the
  // last holdout_positions of each sequence.
  const int64_t held_rows = holdout_seq > 0 ? batch * holdout_seq : batch * holdout_positions;
  CaptureEstimate peak;
  for (const auto& [first, next] : batches) {
    CaptureEstimate part;
    int64_t widest = 0, row_copy = 0;
    for (size_t i = first; i < next; ++i) {
      const int64_t channels = groups[i]->size;
      const int64_t sets = groups[i]->name == "residual" ? model.config.n_layer + 1 : 2;
      const int64_t held = SaturatingProduct({sets, held_rows, channels, 4});
      const int64_t rows = SaturatingProduct({sets, batch, seq});
      part.statistics =
          SaturatingSum({part.statistics, engine_internal::StatsBytes(channels, rows)});
      part.holdout = SaturatingSum({part.holdout, held});
      part.solver = std::max(part.solver,
                             SaturatingSum({engine_internal::SolverBytes(channels), held}));
      widest = std::max(widest, channels);
    }
    row_copy = SaturatingProduct({batch, longest, widest, 4});
    part.forward = SaturatingSum({forward, row_copy});
    part.total = SaturatingSum(
        {part.statistics, part.holdout, std::max(part.forward, part.solver)});
    if (part.total > peak.total) peak = part;
  }
  return peak;
}

}  // namespace

absl::StatusOr<std::vector<PermutationResult>> Engine::Capture(const CaptureRequest& request,
                                                               const CallContext& ctx) {
  ICD_ASSIGN_OR_RETURN(auto model, impl_->Find(request.model));
  ICD_ASSIGN_OR_RETURN(traces::ResolvedOptions options,
                       traces::ResolveSolverOptions(request.solver));
  ICD_ASSIGN_OR_RETURN(const int64_t batch, RequestBatch(request.batch));
  std::shared_lock<std::shared_mutex> lock(model->mutex);
  ICD_RETURN_IF_ERROR(engine_internal::StillLoaded(*model));
  const engine_internal::OnModelStream on_stream(model->on_cuda, model->stream, impl_->device_gate);
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
  const std::vector<std::pair<size_t, size_t>> batches = CaptureBatches(groups);
  const CaptureEstimate estimate =
      EstimateCapture(*model, groups, batches, batch, seq,
                      holdout_ids.defined() ? holdout_ids.size(1) : 0, holdout_positions);
  ICD_ASSIGN_OR_RETURN(
      const engine_internal::MemoryHold hold,
      impl_->BookCall(*model, estimate.total,
                      absl::StrCat("CapturePermutation of model '", request.model, "' over ",
                                   batch, " x ", seq, " tokens and ", groups.size(),
                                   " group(s) (an estimate at its peak: forward ",
                                   estimate.forward, ", statistics ", estimate.statistics,
                                   ", held-out rows ", estimate.holdout, ", solver ",
                                   estimate.solver, " bytes)"),
                      engine_internal::MemoryDevice(device)));

  return Guarded("capture", [&]() -> absl::StatusOr<std::vector<PermutationResult>> {
    torch::NoGradGuard no_grad;
    std::vector<PermutationResult> results;
    for (const auto& [first, next] : batches) {
      // One forward (two with held-out tokens) per batch of groups whose
      // statistics fit kCaptureStatsBytes.
      std::vector<std::unique_ptr<CaptureCollector::Slot>> slots;
      std::map<std::string, CaptureCollector::Slot*> by_name;
      for (size_t i = first; i < next; ++i) {
        slots.push_back(std::make_unique<CaptureCollector::Slot>(
            traces::StatsOptionsFor(options, groups[i]->size, device)));
        by_name[groups[i]->name] = slots.back().get();
      }
      // Progress in groups: those solved before this batch's forward.
      ReportProgress(ctx, "forward", static_cast<int64_t>(first),
                     static_cast<int64_t>(groups.size()));
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
        ReportProgress(ctx, "solve", static_cast<int64_t>(i + 1),
                       static_cast<int64_t>(groups.size()));
      }
    }
    return results;
  });
}

}  // namespace icd
