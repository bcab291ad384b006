#include "forward/latency.h"

#include "torch_api.h"

#include <algorithm>
#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <utility>
#include <vector>

#ifdef ICD_HAVE_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "absl/strings/str_cat.h"
#include "counters/hardware_counters.h"
#include "counters/l2_flush.h"
#include "devices.h"
#include "forward/decode.h"
#include "forward/forward.h"
#include "icd/core/status_macros.h"
#include "forward/latency_stats.h"

namespace icd::latency {
namespace {

enum class Mode { kPrefill, kDecode };

absl::StatusOr<Mode> ParseMode(const std::string& mode) {
  if (mode == "prefill") return Mode::kPrefill;
  if (mode == "decode") return Mode::kDecode;
  return absl::InvalidArgumentError(
      absl::StrCat("mode: expected \"prefill\" or \"decode\", got \"", mode, "\""));
}

const torch::Tensor& Embedding(const TimedModel& model) {
  return model.weights->at(kEmbeddingTensor);
}

// Times one sample: Start, the sample's work, StopMillis.
class SampleTimer {
 public:
  virtual ~SampleTimer() = default;
  virtual void Start() = 0;
  // Waits for the sample's work to finish; its duration in milliseconds.
  virtual double StopMillis() = 0;
  virtual const char* Method() const = 0;
};

// Host wall time; on a GPU the streams the forward runs on are waited for on
// both sides, since its work is asynchronous. Every device of a model placed
// over several: one device's events would not see the others' work.
class SteadyClockTimer final : public SampleTimer {
 public:
  explicit SteadyClockTimer(std::vector<torch::Device> devices) : devices_(std::move(devices)) {}
  void Start() override {
    Synchronize();
    start_ = std::chrono::steady_clock::now();
  }
  double StopMillis() override {
    Synchronize();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start_)
        .count();
  }
  const char* Method() const override { return "steady_clock"; }

 private:
  void Synchronize() const {
    for (const torch::Device& device : devices_) SynchronizeCurrentStream(device);
  }
  std::vector<torch::Device> devices_;
  std::chrono::steady_clock::time_point start_;
};

#ifdef ICD_HAVE_CUDA
// GPU time between two events on the stream the forward runs on (PyTorch's
// current stream of the model's device): no host sync inside the sample, and
// gaps while the host launches kernels count, as they do for a caller.
class CudaEventTimer final : public SampleTimer {
 public:
  explicit CudaEventTimer(c10::DeviceIndex device_index)
      : device_index_(device_index), start_(cudaEventDefault), stop_(cudaEventDefault) {}
  void Start() override { start_.record(c10::cuda::getCurrentCUDAStream(device_index_)); }
  double StopMillis() override {
    stop_.record(c10::cuda::getCurrentCUDAStream(device_index_));
    stop_.synchronize();
    return start_.elapsed_time(stop_);
  }
  const char* Method() const override { return "cuda_events"; }

 private:
  c10::DeviceIndex device_index_;
  at::cuda::CUDAEvent start_;  // cudaEventDefault: timing enabled
  at::cuda::CUDAEvent stop_;
};
#endif  // ICD_HAVE_CUDA

std::unique_ptr<SampleTimer> MakeTimer(const std::vector<torch::Device>& devices) {
#ifdef ICD_HAVE_CUDA
  if (devices.size() == 1 && devices[0].is_cuda()) {
    return std::make_unique<CudaEventTimer>(devices[0].index());
  }
#endif
  return std::make_unique<SteadyClockTimer>(devices);
}

// A model placed over several devices moves its residual stream (float32,
// or float64 for a float64 model) and the last mixer's output (the model's
// dtype) at each change of device, the head's input to a tied head's
// device: those copies of one sample's [batch, tokens, d_model], timed alone
// (steady clock, the streams waited for), the median of `iters` per
// boundary, summed. 0 on one device.
double TransferMillis(const TimedModel& model, int64_t batch, int64_t tokens, int64_t iters) {
  const Weights& weights = *model.weights;
  std::vector<torch::Device> path{Embedding(model).device()};
  for (int64_t layer = 0; layer < model.config->n_layer; ++layer) {
    path.push_back(weights.at(LayerTensorName(layer, "norm.weight")).device());
  }
  path.push_back(weights.at("backbone.norm_f.weight").device());
  path.push_back(model.config->tied ? Embedding(model).device()
                                    : weights.at(kHeadTensor).device());
  const torch::ScalarType dtype = Embedding(model).scalar_type();
  const torch::ScalarType wide = dtype == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  double total_ms = 0;
  for (size_t i = 1; i < path.size(); ++i) {
    if (path[i] == path[i - 1]) continue;
    const torch::Tensor residual =
        torch::zeros({batch, tokens, model.config->d_model}, torch::dtype(wide).device(path[i - 1]));
    const torch::Tensor mixed = residual.to(dtype);
    std::vector<double> copies_ms;
    SteadyClockTimer timer({path[i - 1], path[i]});
    for (int64_t k = 0; k < iters; ++k) {
      timer.Start();
      (void)residual.to(path[i]);
      (void)mixed.to(path[i]);
      copies_ms.push_back(timer.StopMillis());
    }
    total_ms += Summarize(copies_ms).median;
  }
  return total_ms;
}

// Pseudo-random token ids in [0, vocab), the same sequence on every call (a
// fixed seed), so that runs and the two models of a comparison see the same
// tokens. Drawn on the host, then moved to the device outside any timing.
class TokenSource {
 public:
  static constexpr uint64_t kSeed = 0x1cd1a7e9c7;

  TokenSource(int64_t vocab, torch::Device device)
      : vocab_(static_cast<uint64_t>(vocab)), device_(device), random_(kSeed) {}

  torch::Tensor Next(int64_t batch, int64_t seq_len) {
    torch::Tensor ids = torch::empty({batch, seq_len}, torch::dtype(torch::kInt64));  // [B, L]
    int64_t* data = ids.data_ptr<int64_t>();
    for (int64_t i = 0; i < ids.numel(); ++i) data[i] = static_cast<int64_t>(random_() % vocab_);
    return ids.to(device_);
  }

 private:
  uint64_t vocab_;
  torch::Device device_;
  std::mt19937_64 random_;
};

// One model's samples: a forward over the same [batch, seq_len] ids
// (prefill), or one single-token step of a decode session (decode.h) that
// advances the model's state.
class ModelSampler {
 public:
  explicit ModelSampler(const TimedModel& model) : model_(&model) {}

  // Untimed: Forward's checks once (the samples skip them: the range check
  // is a device sync), and for decode the prefill into a session stepping as
  // `execution` says (decode.h; on a GPU kCudaGraph captures the step).
  absl::Status Prepare(Mode mode, decode::Execution execution, const torch::Tensor& prefill_ids,
                       const CallContext& ctx) {
    ICD_RETURN_IF_ERROR(CheckForwardInputs(*model_->config, *model_->weights, prefill_ids));
    if (mode == Mode::kDecode) {
      ICD_ASSIGN_OR_RETURN(session_, decode::Session::Start(*model_->config, *model_->weights,
                                                            prefill_ids, execution, ctx));
    }
    return absl::OkStatus();
  }

  // ids: the prefill ids, or this step's [batch, 1] (drawn in [0, vocab)).
  absl::Status Sample(const torch::Tensor& ids, const CallContext& ctx) {
    if (session_ != nullptr) return session_->Step(ids, ctx).status();
    return ForwardPrechecked(*model_->config, *model_->weights, ids, ctx).status();
  }

  // A decode session's Mark and Rewind (decode.h); nothing to do for a
  // prefill, which starts from no state.
  absl::Status Mark() { return session_ != nullptr ? session_->Mark() : absl::OkStatus(); }
  absl::Status Rewind() { return session_ != nullptr ? session_->Rewind() : absl::OkStatus(); }

  const char* Execution() const {
    return decode::ExecutionName(session_ != nullptr ? session_->execution()
                                                     : decode::Execution::kEager);
  }

 private:
  const TimedModel* model_;
  std::unique_ptr<decode::Session> session_;  // decode only
};

absl::Status PollContext(const CallContext& ctx, int64_t round, int64_t rounds) {
  absl::Status status = CheckCall(ctx, "latency measurement");
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat(status.message(), " (after ", round, " of ",
                                                  rounds, " rounds)"));
}

LatencyTiming Timing(const std::vector<double>& samples_ms, const TimedModel& model,
                     const char* method, const char* execution) {
  const SampleSummary summary = Summarize(samples_ms);
  LatencyTiming timing;
  timing.median_ms = summary.median;
  timing.p10_ms = summary.p10;
  timing.p90_ms = summary.p90;
  timing.ci95_low_ms = summary.ci95_low;
  timing.ci95_high_ms = summary.ci95_high;
  timing.samples = summary.samples;
  timing.device = model.device;
  timing.method = method;
  timing.execution = execution;
  timing.version = model.version;
  return timing;
}

// The two models of a comparison must run on the same tokens, on one device.
absl::Status CheckComparable(const TimedModel& model, const TimedModel& compare) {
  const torch::Device device = Embedding(model).device();
  const torch::Device other = Embedding(compare).device();
  if (device != other) {
    return absl::FailedPreconditionError(absl::StrCat(
        "compare_model '", compare.name, "' is on ", other.str(), ", model '", model.name,
        "' on ", device.str(), ": a comparison times both on one device; load them on the same"));
  }
  if (model.config->vocab_size != compare.config->vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "compare_model '", compare.name, "' has vocab_size ", compare.config->vocab_size,
        ", model '", model.name, "' ", model.config->vocab_size,
        ": a comparison runs both on the same token ids"));
  }
  return absl::OkStatus();
}

// One more sample of `model` under the hardware counters, `repeats` times:
// a prefill forward over `ids`, or a decode step (the kernels a graph
// replays, one launch each: decode::Execution::kInPlace) in a session of its
// own, prefilled with `prefill_ids`, then stepping through `step_ids`
// (one uncounted step for a first step's one-time launches, then one per
// repeat; both models of a comparison get the same). Under user replay a
// collection runs the sample once per pass: a decode session rewinds to the
// same state before each pass.
absl::StatusOr<CounterReport> CountSample(Mode mode, const TimedModel& model,
                                          const torch::Tensor& prefill_ids,
                                          const std::vector<torch::Tensor>& step_ids,
                                          int64_t repeats, const CallContext& ctx) {
  ModelSampler sampler(model);
  // The graph's kernels one launch each (CUPTI counts launches, and a graph
  // replay is one), or the eager step where there is no graph.
  ICD_RETURN_IF_ERROR(sampler.Prepare(mode, decode::Execution::kInPlace, prefill_ids, ctx));
  const torch::Device device = Embedding(model).device();
  CounterReport report;
  report.method = counters::Describe(counters::Replay::kUser);
  report.execution =
      mode == Mode::kDecode ? absl::StrCat("decode step (", sampler.Execution(), ")") : "prefill";
  // One uncounted sample (a decode session's first step makes one-time
  // launches) that sizes the collections: a pass costs CUPTI time in
  // proportion to the launches a collection has room for (hardware_counters.h).
  ICD_ASSIGN_OR_RETURN(const std::optional<int64_t> sample_launches,
                       counters::CountLaunches([&] {
                         return sampler.Sample(mode == Mode::kDecode ? step_ids[0] : prefill_ids,
                                               ctx);
                       }));
  // Room for the sample's launches with a margin (steps that launch more
  // than the first did: experts chosen by value, an attention cache that
  // grows), or the default where the launches could not be counted. Each
  // repeat is a collection of its own: repeats back to back in one
  // collection (CollectEach) split a decode step's counts between them
  // unevenly on the H200 (h200-gpu-2026-12-03f), and with sized collections
  // a repeat costs a fraction of a second.
  const int64_t room = sample_launches.has_value()
                           ? std::min(counters::kDefaultMaxLaunches,
                                      *sample_launches + *sample_launches / 4 + 16)
                           : counters::kDefaultMaxLaunches;
  // Every pass starts from an L2 of clean lines: else the lines CUPTI's
  // start of a pass leaves dirty are written back by the sample's misses and
  // counted as its writes (hardware_counters.h). Without it where its
  // buffer does not fit, or where the launches cannot be named (the flush's
  // ranges could not be told from the sample's); the method says which.
  counters::L2Flush flush;
  if (!sample_launches.has_value()) {
    absl::StrAppend(&report.method,
                    "; L2 not flushed (CUPTI's launch callbacks are held by another client): "
                    "DRAM writes include lines dirtied before the sample");
  } else if (absl::StatusOr<counters::L2Flush> made = counters::MakeL2Flush(device); !made.ok()) {
    absl::StrAppend(&report.method, "; L2 not flushed (", made.status().message(),
                    "): DRAM writes include lines dirtied before the sample");
  } else {
    flush = *std::move(made);
    absl::StrAppend(&report.method, "; before the sample in every pass, L2 flushed by a read of ",
                    flush.bytes >> 20, " MB (its counts left out)");
  }
  for (int64_t repeat = 0; repeat < repeats; ++repeat) {
    ICD_RETURN_IF_ERROR(CheckCall(ctx, "hardware counters"));
    ICD_RETURN_IF_ERROR(sampler.Mark());
    const torch::Tensor ids =
        mode == Mode::kDecode ? step_ids[static_cast<size_t>(repeat) + 1] : prefill_ids;
    ICD_ASSIGN_OR_RETURN(std::vector<KernelCounters> launches,
                         counters::Collect(device.index(),
                                           [&] { return sampler.Sample(ids, ctx); },
                                           counters::Replay::kUser,
                                           [&] { return sampler.Rewind(); }, room,
                                           flush.run));
    report.repeat_totals.push_back(counters::Total(launches));
    if (repeat == 0) {
      report.total = report.repeat_totals.front();
      report.kernels = counters::ByKernel(launches);
    }
  }
  return report;
}

}  // namespace

absl::Status ValidateOptions(const LatencyOptions& options) {
  ICD_RETURN_IF_ERROR(ParseMode(options.mode).status());
  auto at_least = [](const char* field, int64_t value, int64_t lowest) {
    if (value >= lowest) return absl::OkStatus();
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": must be at least ", lowest, ", got ", value));
  };
  ICD_RETURN_IF_ERROR(at_least("batch", options.batch, 1));
  ICD_RETURN_IF_ERROR(at_least("seq_len", options.seq_len, 1));
  ICD_RETURN_IF_ERROR(at_least("iters", options.iters, 1));
  ICD_RETURN_IF_ERROR(at_least("warmup", options.warmup, 0));
  auto samples_at_most = [](const char* field, int64_t value) {
    if (value <= kMaxIters) return absl::OkStatus();
    return absl::ResourceExhaustedError(
        absl::StrCat(field, ": ", value, " samples exceed the limit of ", kMaxIters));
  };
  ICD_RETURN_IF_ERROR(samples_at_most("iters", options.iters));
  ICD_RETURN_IF_ERROR(samples_at_most("warmup", options.warmup));
  ICD_RETURN_IF_ERROR(at_least("counter_repeats", options.counter_repeats, 0));
  if (options.counter_repeats > kMaxCounterRepeats) {
    return absl::ResourceExhaustedError(absl::StrCat("counter_repeats: ", options.counter_repeats,
                                                     " exceeds the limit of ", kMaxCounterRepeats));
  }
  if (options.batch > kMaxTokens / options.seq_len) {
    return absl::ResourceExhaustedError(
        absl::StrCat("batch·seq_len: ", options.batch, "·", options.seq_len,
                     " tokens per forward exceed the limit of ", kMaxTokens));
  }
  return absl::OkStatus();
}

absl::StatusOr<LatencyReport> Measure(const LatencyOptions& options, const TimedModel& model,
                                      const TimedModel* compare, const CallContext& ctx) {
  ICD_ASSIGN_OR_RETURN(const Mode mode, ParseMode(options.mode));
  if (compare != nullptr) ICD_RETURN_IF_ERROR(CheckComparable(model, *compare));
  const int64_t vocab = model.config->vocab_size;
  const int64_t tokens = options.batch * options.seq_len;  // <= kMaxTokens (ValidateOptions)
  if (vocab > kMaxLogits / tokens) {
    return absl::ResourceExhaustedError(
        absl::StrCat("batch·seq_len·vocab_size: ", tokens, "·", vocab,
                     " logits per forward exceed the limit of ", kMaxLogits, " (",
                     (kMaxLogits * 4) >> 30, " GiB of float32)"));
  }
  torch::NoGradGuard no_grad;
  const torch::Device device = Embedding(model).device();
  const std::vector<torch::Device> devices = DevicesOf(*model.weights);
  if (options.counter_repeats > 0 && (devices.size() > 1 || (compare != nullptr &&
                                                             DevicesOf(*compare->weights).size() > 1))) {
    return absl::FailedPreconditionError(
        "counter_repeats: the hardware counters are read on one device; a model placed over "
        "several is timed without them");
  }
  if (options.counter_repeats > 0 && !device.is_cuda()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "counter_repeats: hardware counters are read on a CUDA device; model '", model.name,
        "' is on ", device.str()));
  }
  TokenSource token_source(vocab, device);
  const torch::Tensor prefill_ids = token_source.Next(options.batch, options.seq_len);

  std::vector<ModelSampler> samplers;
  samplers.emplace_back(model);
  if (compare != nullptr) samplers.emplace_back(*compare);
  for (ModelSampler& sampler : samplers) {
    ICD_RETURN_IF_ERROR(sampler.Prepare(
        mode, options.eager ? decode::Execution::kEager : decode::Execution::kCudaGraph,
        prefill_ids, ctx));
  }

  std::vector<torch::Device> timed_devices = devices;
  if (compare != nullptr) {
    for (const torch::Device& other : DevicesOf(*compare->weights)) {
      if (std::find(timed_devices.begin(), timed_devices.end(), other) == timed_devices.end()) {
        timed_devices.push_back(other);
      }
    }
  }
  std::unique_ptr<SampleTimer> timer = MakeTimer(timed_devices);
  const int64_t rounds = options.warmup + options.iters;
  std::vector<std::vector<double>> times_ms(samplers.size());
  std::vector<double> ratios;  // t(model) / t(compare) per timed round
  for (int64_t round = 0; round < rounds; ++round) {
    ICD_RETURN_IF_ERROR(PollContext(ctx, round, rounds));
    if (round < options.warmup) {
      ReportProgress(ctx, "warmup", round, options.warmup);
    } else {
      ReportProgress(ctx, "samples", round - options.warmup, options.iters);
    }
    // Decode: every round advances both states by the same token.
    const torch::Tensor ids =
        mode == Mode::kDecode ? token_source.Next(options.batch, 1) : prefill_ids;
    std::vector<double> round_ms(samplers.size(), 0.0);
    for (size_t turn = 0; turn < samplers.size(); ++turn) {
      // Odd rounds run the models in reverse order.
      const size_t which = round % 2 == 1 ? samplers.size() - 1 - turn : turn;
      timer->Start();
      ICD_RETURN_IF_ERROR(samplers[which].Sample(ids, ctx));
      round_ms[which] = timer->StopMillis();
    }
    if (round < options.warmup) continue;  // warm-up: run, not kept
    for (size_t i = 0; i < samplers.size(); ++i) times_ms[i].push_back(round_ms[i]);
    if (compare != nullptr) ratios.push_back(round_ms[0] / round_ms[1]);
  }

  ReportProgress(ctx, "samples", options.iters, options.iters);
  LatencyReport report;
  const int64_t sample_tokens = mode == Mode::kDecode ? 1 : options.seq_len;
  report.timing = Timing(times_ms[0], model, timer->Method(), samplers[0].Execution());
  report.timing.transfer_ms = TransferMillis(model, options.batch, sample_tokens, options.iters);
  if (compare != nullptr) {
    report.compare = Timing(times_ms[1], *compare, timer->Method(), samplers[1].Execution());
    report.compare->transfer_ms = TransferMillis(*compare, options.batch, sample_tokens, options.iters);
    const SampleSummary ratio = Summarize(ratios);
    report.ratio = ratio.median;
    report.ratio_ci95_low = ratio.ci95_low;
    report.ratio_ci95_high = ratio.ci95_high;
  }
  if (options.counter_repeats > 0) {
    ReportProgress(ctx, "counters", 0, compare != nullptr ? 2 : 1);
    std::vector<torch::Tensor> step_ids;
    if (mode == Mode::kDecode) {
      for (int64_t i = 0; i <= options.counter_repeats; ++i) {
        step_ids.push_back(token_source.Next(options.batch, 1));
      }
    }
    ICD_ASSIGN_OR_RETURN(report.timing.counters,
                         CountSample(mode, model, prefill_ids, step_ids,
                                     options.counter_repeats, ctx));
    if (compare != nullptr) {
      ReportProgress(ctx, "counters", 1, 2);
      ICD_ASSIGN_OR_RETURN(report.compare->counters,
                           CountSample(mode, *compare, prefill_ids, step_ids,
                                       options.counter_repeats, ctx));
    }
  }
  return report;
}

}  // namespace icd::latency
