#include "service.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/cord.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_cat.h"
#include "auth.h"
#include "convert.h"
#include "icd/core/checked.h"
#include "icd/core/status_macros.h"
#include "log_text.h"
#include "status.h"

namespace icd::rpc {
namespace {

using Clock = std::chrono::steady_clock;

// How often a call's context asks gRPC whether the caller cancelled
// (MakeCallContext).
constexpr std::chrono::milliseconds kCancelPoll{5};

// "4096 MiB" when whole mebibytes (as the flag sets it), else bytes.
std::string DescribeBytes(std::size_t bytes) {
  constexpr std::size_t kMiB = std::size_t{1} << 20;
  if (bytes % kMiB == 0) return absl::StrCat(bytes / kMiB, " MiB");
  return absl::StrCat(bytes, " bytes");
}

}  // namespace

CallContext MakeCallContext(grpc::ServerContext* context) {
  CallContext out;
  const auto deadline = context->deadline();
  if (deadline != std::chrono::system_clock::time_point::max()) {
    const auto left = deadline - std::chrono::system_clock::now();
    // Beyond a year is as good as none (and would overflow steady_clock).
    if (left < std::chrono::hours(24 * 365)) {
      out.deadline =
          Clock::now() + std::chrono::duration_cast<Clock::duration>(left);
    }
  }
  // IsCancelled is a round trip through gRPC's completion queue (25-50 µs
  // on the 2-core VM) and a forward checks its call hundreds of times: ask
  // at most every kCancelPoll, and remember a yes.
  struct Poll {
    std::atomic<bool> cancelled{false};
    std::atomic<Clock::rep> next{0};
  };
  auto poll = std::make_shared<Poll>();
  out.cancelled = [context, poll] {
    if (poll->cancelled.load(std::memory_order_relaxed)) return true;
    const Clock::rep now = Clock::now().time_since_epoch().count();
    if (now < poll->next.load(std::memory_order_relaxed)) return false;
    poll->next.store(now + std::chrono::duration_cast<Clock::duration>(kCancelPoll).count(),
                     std::memory_order_relaxed);
    const bool cancelled = context->IsCancelled();
    if (cancelled) poll->cancelled.store(true, std::memory_order_relaxed);
    return cancelled;
  };
  return out;
}

PermutationServiceImpl::PermutationServiceImpl(Engine* engine, PathPolicy paths,
                                               ServiceOptions options)
    : engine_(engine),
      paths_(std::move(paths)),
      options_(std::move(options)),
      streams_(options_.max_streams, options_.stream_idle_timeout) {}

absl::Status PermutationServiceImpl::CheckToken(
    const grpc::ServerContext* context) const {
  return CheckBearerToken(context->client_metadata(), options_.token);
}

absl::Status PermutationServiceImpl::CheckTokenCount(const char* field, int64_t tokens) const {
  if (options_.max_tokens <= 0 || tokens <= options_.max_tokens) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat(
      field, ": ", tokens, " tokens, more than this server's limit of ", options_.max_tokens,
      " per call (icd-server --max-tokens); split the work into smaller calls"));
}

void PermutationServiceImpl::CallLog::Add(const char* key, int64_t value) {
  absl::StrAppend(&fields, " ", key, "=", value);
}

void PermutationServiceImpl::CallLog::AddText(const char* key, const std::string& value) {
  absl::StrAppend(&fields, " ", key, "=", QuoteForLog(value));
}

CallContext PermutationServiceImpl::ContextFor(grpc::ServerContext* context) {
  CallContext call = MakeCallContext(context);
  std::shared_ptr<ProgressRegistry::Entry> entry;
  {
    const std::lock_guard<std::mutex> lock(progress_mutex_);
    auto found = progress_by_call_.find(context);
    if (found != progress_by_call_.end()) entry = found->second;
  }
  if (entry != nullptr) {
    call.progress = [entry](absl::string_view stage, int64_t done, int64_t total) {
      entry->Report(stage, done, total);
    };
  }
  return call;
}

grpc::Status PermutationServiceImpl::Handle(
    grpc::ServerContext* context, const char* rpc, std::string model,
    const std::function<absl::Status(CallLog&)>& body) {
  const auto start = Clock::now();
  CallLog log{std::move(model), ""};
  absl::Status status = CheckToken(context);
  // A call that names itself (x-icd-request-id) can be followed by GetProgress.
  std::shared_ptr<ProgressRegistry::Entry> progress;
  const auto& metadata = context->client_metadata();
  const auto request_id = metadata.find(kRequestIdHeader);
  if (status.ok() && request_id != metadata.end() && std::strcmp(rpc, "GetProgress") != 0) {
    auto begun = progress_.Begin(std::string(request_id->second.data(), request_id->second.size()),
                                 rpc);
    if (begun.ok()) {
      progress = *std::move(begun);
      const std::lock_guard<std::mutex> lock(progress_mutex_);
      progress_by_call_[context] = progress;
    } else {
      status = begun.status();
    }
  }
  if (status.ok()) {
    try {
      status = body(log);
    } catch (const std::exception& e) {
      status = InternalFailure(rpc, e.what());
    }
  }
  if (progress != nullptr) {
    {
      const std::lock_guard<std::mutex> lock(progress_mutex_);
      progress_by_call_.erase(context);
    }
    progress_.Finish(*progress, status.code());
  }
  const auto detail = status.GetPayload(kInternalDetailPayload);  // optional<Cord>
  const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  if (options_.metrics != nullptr) options_.metrics->RecordCall(rpc, status.code(), ms / 1e3);
  // GetProgress is polled (several times a second): counted, never logged.
  if ((options_.log_calls && std::strcmp(rpc, "GetProgress") != 0) || detail.has_value()) {
    const std::string code = absl::StatusCodeToString(status.code());
    const std::string model_text = log.model.empty() ? "-" : QuoteForLog(log.model);
    std::string line = absl::StrFormat("rpc=%s status=%s ms=%.2f model=%s%s\n", rpc, code, ms,
                                       model_text, log.fields);
    // What failed inside, for the operator: quoted, on its own line.
    if (detail.has_value()) {
      absl::StrAppend(&line, "rpc=", rpc, " internal_detail=",
                      QuoteForLog(std::string(*detail), 16384), "\n");
    }
    std::fwrite(line.data(), 1, line.size(), stderr);
  }
  return ToGrpcStatus(status);
}

grpc::Status PermutationServiceImpl::LoadModel(
    grpc::ServerContext* context, const v1::LoadModelRequest* request,
    v1::ModelInfo* response) {
  return Handle(context, "LoadModel", request->name(), [&](CallLog&) {
    auto path = paths_.ResolveModelPath(request->path());
    if (!path.ok()) return path.status();
    LoadOptions options = FromProto(*request);
    for (const auto& root : paths_.model_roots()) options.allowed_roots.push_back(root.string());
    auto info = engine_->Load(request->name(), *path, options, ContextFor(context));
    if (!info.ok()) return info.status();
    ToProto(*info, response);
    return absl::OkStatus();
  });
}

grpc::Status PermutationServiceImpl::ListModels(
    grpc::ServerContext* context, const v1::ListModelsRequest*,
    v1::ListModelsResponse* response) {
  return Handle(context, "ListModels", "", [&](CallLog&) {
    for (const auto& info : engine_->List()) {
      ToProto(info, response->add_models());
    }
    return absl::OkStatus();
  });
}

grpc::Status PermutationServiceImpl::UnloadModel(
    grpc::ServerContext* context, const v1::UnloadModelRequest* request,
    v1::UnloadModelResponse*) {
  return Handle(context, "UnloadModel", request->name(), [&](CallLog&) {
    absl::Status status = engine_->Unload(request->name());
    if (status.ok() && options_.metrics != nullptr) options_.metrics->ForgetModel(request->name());
    return status;
  });
}

grpc::Status PermutationServiceImpl::GetSymmetries(
    grpc::ServerContext* context, const v1::GetSymmetriesRequest* request,
    v1::Symmetries* response) {
  return Handle(context, "GetSymmetries", request->model(), [&](CallLog&) {
    uint64_t version = 0;
    auto groups = engine_->Symmetries(request->model(), &version);
    if (!groups.ok()) return groups.status();
    response->set_model(request->model());
    response->set_version(version);
    for (const auto& g : *groups) ToProto(g, response->add_groups());
    return absl::OkStatus();
  });
}

grpc::Status PermutationServiceImpl::ApplyPermutation(
    grpc::ServerContext* context, const v1::ApplyRequest* request,
    v1::ApplyReport* response) {
  return Handle(context, "ApplyPermutation", request->model(),
                [&](CallLog&) {
                  auto report = engine_->Apply(
                      request->model(), FromProto(request->permutations()),
                      ApplyOptionsFromProto(*request),
                      ContextFor(context));
                  if (options_.metrics != nullptr) {
                    options_.metrics->RecordApply(
                        request->model(), report.ok(),
                        report.ok() && report->verified
                            ? std::optional<double>(report->correctness.rel_l2)
                            : std::nullopt);
                  }
                  if (!report.ok()) return report.status();
                  ToProto(*report, response);
                  return absl::OkStatus();
                });
}

grpc::Status PermutationServiceImpl::Verify(grpc::ServerContext* context,
                                            const v1::VerifyRequest* request,
                                            v1::CorrectnessReport* response) {
  return Handle(context, "Verify", request->model(), [&](CallLog&) {
    auto report = engine_->Verify(request->model(), ContextFor(context));
    if (!report.ok()) return report.status();
    if (options_.metrics != nullptr) {
      options_.metrics->RecordVerify(request->model(), report->rel_l2);
    }
    ToProto(*report, response);
    return absl::OkStatus();
  });
}

grpc::Status PermutationServiceImpl::Evaluate(
    grpc::ServerContext* context, const v1::EvaluateRequest* request,
    v1::EvaluateResponse* response) {
  return Handle(context, "Evaluate", request->model(), [&](CallLog& log) {
    log.Add("tokens", request->input_ids_size());
    if (absl::Status s = CheckTokenCount("input_ids", request->input_ids_size()); !s.ok()) return s;
    auto result = engine_->Evaluate(request->model(), FromProto(*request),
                                    ContextFor(context));
    if (!result.ok()) return result.status();
    ToProto(*result, response);
    return absl::OkStatus();
  });
}

grpc::Status PermutationServiceImpl::ReadTensors(
    grpc::ServerContext* context, const v1::ReadTensorsRequest* request,
    grpc::ServerWriter<v1::TensorChunk>* writer) {
  return Handle(context, "ReadTensors", request->model(), [&](CallLog&) {
    const std::vector<std::string> names(request->names().begin(),
                                         request->names().end());
    auto slot = streams_.Open(context, "ReadTensors");
    if (!slot.ok()) return slot.status();
    auto tensors = engine_->ReadTensors(request->model(), names);
    if (!tensors.ok()) return tensors.status();
    for (const auto& t : *tensors) {
      for (const auto& chunk :
           SplitTensor(t, options_.chunk_bytes, options_.max_message_bytes)) {
        if (!writer->Write(chunk)) {
          if ((*slot)->timed_out()) return (*slot)->IdleStatus("ReadTensors");
          return absl::CancelledError("ReadTensors: the client stopped reading");
        }
        (*slot)->Touch();
      }
    }
    return absl::OkStatus();
  });
}

grpc::Status PermutationServiceImpl::WriteTensors(
    grpc::ServerContext* context, grpc::ServerReader<v1::TensorChunk>* reader,
    v1::WriteReport* response) {
  return Handle(context, "WriteTensors", "", [&](CallLog& log) {
    auto slot = streams_.Open(context, "WriteTensors");
    if (!slot.ok()) return slot.status();
    v1::TensorChunk chunk;
    if (!reader->Read(&chunk)) {
      if ((*slot)->timed_out()) return (*slot)->IdleStatus("WriteTensors");
      return absl::InvalidArgumentError("WriteTensors: empty stream");
    }
    (*slot)->Touch();
    log.model = chunk.model();
    const std::string& model = log.model;
    if (model.empty()) {
      return absl::InvalidArgumentError(
          "WriteTensors: the first chunk must carry `model`");
    }
    const uint64_t expected_version = chunk.expected_version();
    // Each tensor is held to what the model's own tensor holds as its chunks
    // arrive, so the stream buffers at most the model's size.
    TensorAssembler assembler([this, &model](const std::string& tensor) {
      return engine_->TensorBytes(model, tensor);
    });
    do {
      if (!chunk.model().empty() && chunk.model() != model) {
        return absl::InvalidArgumentError(
            absl::StrCat("WriteTensors: a chunk names another model than the stream's first, ",
                         QuoteForLog(model)));
      }
      absl::Status s = assembler.Add(chunk);
      if (!s.ok()) return s;
      if (options_.max_write_bytes > 0 &&
          assembler.bytes() > options_.max_write_bytes) {
        return absl::ResourceExhaustedError(
            absl::StrCat("WriteTensors: more than ", DescribeBytes(options_.max_write_bytes),
                         " (icd-server --memory-budget-mb)"));
      }
      (*slot)->Touch();
    } while (reader->Read(&chunk));
    if ((*slot)->timed_out()) return (*slot)->IdleStatus("WriteTensors");
    if (context->IsCancelled()) {
      return absl::CancelledError("WriteTensors: cancelled by the client");
    }
    slot->reset();  // the stream is read: what follows is work, not idling
    auto tensors = assembler.Finish();
    if (!tensors.ok()) return tensors.status();
    auto version = engine_->WriteTensors(model, *tensors, expected_version);
    if (!version.ok()) return version.status();
    response->set_version(*version);
    return absl::OkStatus();
  });
}

grpc::Status PermutationServiceImpl::ExportModel(
    grpc::ServerContext* context, const v1::ExportRequest* request,
    v1::ExportReport* response) {
  return Handle(context, "ExportModel", request->model(), [&](CallLog&) {
    auto path = paths_.ResolveExportPath(request->path());
    if (!path.ok()) {
      // An unknown model first: NOT_FOUND says more than a path complaint.
      auto info = engine_->Info(request->model());
      return info.ok() ? path.status() : info.status();
    }
    auto result =
        engine_->Export(request->model(), *path, ContextFor(context));
    if (!result.ok()) return result.status();
    ToProto(*result, response);
    return absl::OkStatus();
  });
}

grpc::Status PermutationServiceImpl::ComputePermutation(
    grpc::ServerContext* context, grpc::ServerReader<v1::TraceChunk>* reader,
    v1::PermutationResult* response) {
  return Handle(context, "ComputePermutation", "", [&](CallLog& log) {
    auto slot = streams_.Open(context, "ComputePermutation");
    if (!slot.ok()) return slot.status();
    v1::TraceChunk chunk;
    if (!reader->Read(&chunk) || !chunk.has_header()) {
      if ((*slot)->timed_out()) return (*slot)->IdleStatus("ComputePermutation");
      return absl::InvalidArgumentError(
          "ComputePermutation: the first TraceChunk must carry header");
    }
    (*slot)->Touch();
    const CallContext call = ContextFor(context);
    const TraceHeader header = FromProto(chunk.header());
    log.model = header.model;
    log.AddText("group", header.group);
    // Unknown model or group, wrong channel count, bad solver options: refused
    // here, before any rows travel.
    auto session = engine_->BeginTraces(header);
    if (!session.ok()) return session.status();
    int64_t rows = 0;
    std::size_t bytes = 0;
    absl::Status status = absl::OkStatus();
    for (int64_t index = 0;; ++index) {
      if (index > 0 && chunk.has_header()) {
        status = absl::InvalidArgumentError(absl::StrCat(
            "ComputePermutation: chunk ", index,
            " carries a header; only the first TraceChunk may"));
        break;
      }
      if (status = CheckCall(call, "ComputePermutation"); !status.ok()) break;
      bytes += chunk.f32_le().size();
      if (options_.max_trace_bytes > 0 && bytes > options_.max_trace_bytes) {
        status = absl::ResourceExhaustedError(absl::StrCat(
            "ComputePermutation: the traces exceed this server's limit of ",
            DescribeBytes(options_.max_trace_bytes),
            " per call (icd-server --max-trace-mb); send fewer rows, e.g. a "
            "sample of the tokens"));
        break;
      }
      // A chunk with neither rows nor bytes (the header alone) adds nothing;
      // any other goes to the engine, which checks its size and values.
      if (chunk.rows() != 0 || !chunk.f32_le().empty()) {
        status = (*session)->AddRows(chunk.f32_le(), chunk.rows(), call);
        if (!status.ok()) {
          status = absl::Status(
              status.code(), absl::StrCat("ComputePermutation: chunk ", index,
                                          ": ", std::string(status.message())));
          break;
        }
        rows += chunk.rows();
      }
      if (!reader->Read(&chunk)) break;
      (*slot)->Touch();
    }
    log.Add("rows", rows);
    log.Add("bytes", static_cast<int64_t>(bytes));
    if (options_.metrics != nullptr) options_.metrics->AddTraceBytes(static_cast<int64_t>(bytes));
    if ((*slot)->timed_out()) return (*slot)->IdleStatus("ComputePermutation");
    if (!status.ok()) return status;
    // A cancelled client also ends the reads: never solve a partial stream.
    if (context->IsCancelled()) {
      return absl::CancelledError("ComputePermutation: cancelled by the client");
    }
    slot->reset();  // the stream is read: the solve is work, not idling
    auto result = (*session)->Finish(call);
    if (!result.ok()) return result.status();
    ToProto(*result, response);
    return absl::OkStatus();
  });
}

grpc::Status PermutationServiceImpl::CapturePermutation(
    grpc::ServerContext* context, const v1::CaptureRequest* request,
    v1::PermutationSet* response) {
  return Handle(context, "CapturePermutation", request->model(),
                [&](CallLog& log) {
                  log.Add("groups", request->groups_size());
                  log.Add("tokens", request->input_ids_size());
                  if (absl::Status s = CheckTokenCount(
                          "input_ids and holdout_ids",
                          int64_t{request->input_ids_size()} + request->holdout_ids_size());
                      !s.ok()) {
                    return s;
                  }
                  auto results = engine_->Capture(FromProto(*request),
                                                  ContextFor(context));
                  if (!results.ok()) return results.status();
                  for (const auto& r : *results) {
                    ToProto(r, response->add_results());
                  }
                  return absl::OkStatus();
                });
}

grpc::Status PermutationServiceImpl::MeasureLatency(
    grpc::ServerContext* context, const v1::LatencyRequest* request,
    v1::LatencyReport* response) {
  return Handle(context, "MeasureLatency", request->model(), [&](CallLog& log) {
    const LatencyOptions options = FromProto(*request);
    log.AddText("mode", options.mode);
    if (!options.compare_model.empty()) log.AddText("compare", options.compare_model);
    log.Add("batch", options.batch);
    log.Add("seq_len", options.seq_len);
    log.Add("iters", options.iters);
    if (options.batch > 0 && options.seq_len > 0) {
      absl::StatusOr<int64_t> tokens =
          CheckedProduct({options.batch, options.seq_len}, "batch x seq_len");
      if (!tokens.ok()) return tokens.status();
      if (absl::Status s = CheckTokenCount("batch x seq_len", *tokens); !s.ok()) return s;
    }
    auto report = engine_->MeasureLatency(options, ContextFor(context));
    if (!report.ok()) return report.status();
    ToProto(*report, response);
    return absl::OkStatus();
  });
}

}  // namespace icd::rpc

namespace icd::rpc {

grpc::Status PermutationServiceImpl::GetProgress(grpc::ServerContext* context,
                                                 const v1::ProgressRequest* request,
                                                 v1::Progress* response) {
  return Handle(context, "GetProgress", "", [&](CallLog&) {
    const std::optional<ProgressSnapshot> snapshot = progress_.Get(request->request_id());
    if (!snapshot.has_value()) {
      return absl::NotFoundError(absl::StrCat(
          "request_id: no call with this ID is running or ended in the last ",
          ProgressRegistry::kKeepFinished.count(), " s (a call is followed when it carries the "
          "metadata header ", kRequestIdHeader, ")"));
    }
    response->set_request_id(snapshot->request_id);
    response->set_rpc(snapshot->rpc);
    response->set_stage(snapshot->stage);
    response->set_done(snapshot->done);
    response->set_total(snapshot->total);
    response->set_elapsed_s(snapshot->elapsed_s);
    response->set_finished(snapshot->finished);
    if (snapshot->finished) response->set_code(absl::StatusCodeToString(snapshot->code));
    return absl::OkStatus();
  });
}

}  // namespace icd::rpc
