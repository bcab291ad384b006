#include "service.h"

#include <chrono>
#include <cstdio>
#include <exception>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "convert.h"
#include "status.h"

namespace icd::rpc {
namespace {

using Clock = std::chrono::steady_clock;

// Compares without an early exit, so the time does not leak the prefix.
bool SameSecret(const std::string& a, const std::string& b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff = static_cast<unsigned char>(
        diff | (a[i] ^ (i < b.size() ? b[i] : 0)));
  }
  return diff == 0;
}

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
  out.cancelled = [context] { return context->IsCancelled(); };
  return out;
}

PermutationServiceImpl::PermutationServiceImpl(Engine* engine, PathPolicy paths,
                                               ServiceOptions options)
    : engine_(engine), paths_(std::move(paths)), options_(std::move(options)) {}

absl::Status PermutationServiceImpl::CheckToken(
    const grpc::ServerContext* context) const {
  if (options_.token.empty()) return absl::OkStatus();
  const auto& md = context->client_metadata();
  const auto it = md.find("authorization");
  if (it == md.end()) {
    return absl::UnauthenticatedError(
        "missing `authorization: Bearer <token>` metadata");
  }
  const std::string value(it->second.data(), it->second.size());
  if (!SameSecret(value, "Bearer " + options_.token)) {
    return absl::UnauthenticatedError("wrong bearer token");
  }
  return absl::OkStatus();
}

void PermutationServiceImpl::CallLog::Add(const char* key,
                                          const std::string& value) {
  absl::StrAppend(&fields, " ", std::string(key), "=", value);
}

grpc::Status PermutationServiceImpl::Handle(
    grpc::ServerContext* context, const char* rpc, std::string model,
    const std::function<absl::Status(CallLog&)>& body) {
  const auto start = Clock::now();
  CallLog log{std::move(model), ""};
  absl::Status status = CheckToken(context);
  if (status.ok()) {
    try {
      status = body(log);
    } catch (const std::exception& e) {
      status = absl::InternalError(absl::StrCat(rpc, ": ", e.what()));
    }
  }
  if (options_.log_calls) {
    const double ms =
        std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    const std::string code = absl::StatusCodeToString(status.code());
    std::fprintf(stderr, "rpc=%s status=%s ms=%.2f model=%s%s\n", rpc,
                 code.c_str(), ms, log.model.empty() ? "-" : log.model.c_str(),
                 log.fields.c_str());
  }
  return ToGrpcStatus(status);
}

grpc::Status PermutationServiceImpl::LoadModel(
    grpc::ServerContext* context, const v1::LoadModelRequest* request,
    v1::ModelInfo* response) {
  return Handle(context, "LoadModel", request->name(), [&](CallLog&) {
    if (request->name().empty()) {
      return absl::InvalidArgumentError("LoadModel: empty model name");
    }
    auto path = paths_.ResolveModelPath(request->path());
    if (!path.ok()) return path.status();
    auto info = engine_->Load(request->name(), *path, FromProto(*request),
                              MakeCallContext(context));
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
    return engine_->Unload(request->name());
  });
}

grpc::Status PermutationServiceImpl::GetSymmetries(
    grpc::ServerContext* context, const v1::GetSymmetriesRequest* request,
    v1::Symmetries* response) {
  return Handle(context, "GetSymmetries", request->model(), [&](CallLog&) {
    auto groups = engine_->Symmetries(request->model());
    if (!groups.ok()) return groups.status();
    response->set_model(request->model());
    for (const auto& g : *groups) ToProto(g, response->add_groups());
    auto info = engine_->Info(request->model());
    if (info.ok()) response->set_version(info->version);
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
                      MakeCallContext(context));
                  if (!report.ok()) return report.status();
                  ToProto(*report, response);
                  return absl::OkStatus();
                });
}

grpc::Status PermutationServiceImpl::Verify(grpc::ServerContext* context,
                                            const v1::VerifyRequest* request,
                                            v1::CorrectnessReport* response) {
  return Handle(context, "Verify", request->model(), [&](CallLog&) {
    auto report = engine_->Verify(request->model(), MakeCallContext(context));
    if (!report.ok()) return report.status();
    ToProto(*report, response);
    return absl::OkStatus();
  });
}

grpc::Status PermutationServiceImpl::Evaluate(
    grpc::ServerContext* context, const v1::EvaluateRequest* request,
    v1::EvaluateResponse* response) {
  return Handle(context, "Evaluate", request->model(), [&](CallLog&) {
    if (request->batch() < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("Evaluate: batch ", request->batch(), " < 0"));
    }
    auto result = engine_->Evaluate(request->model(), FromProto(*request),
                                    MakeCallContext(context));
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
    auto tensors = engine_->ReadTensors(request->model(), names);
    if (!tensors.ok()) return tensors.status();
    for (const auto& t : *tensors) {
      for (const auto& chunk : SplitTensor(t, options_.chunk_bytes)) {
        if (!writer->Write(chunk)) {
          return absl::CancelledError("ReadTensors: the client stopped reading");
        }
      }
    }
    return absl::OkStatus();
  });
}

grpc::Status PermutationServiceImpl::WriteTensors(
    grpc::ServerContext* context, grpc::ServerReader<v1::TensorChunk>* reader,
    v1::WriteReport* response) {
  return Handle(context, "WriteTensors", "", [&](CallLog& log) {
    v1::TensorChunk chunk;
    if (!reader->Read(&chunk)) {
      return absl::InvalidArgumentError("WriteTensors: empty stream");
    }
    log.model = chunk.model();
    const std::string& model = log.model;
    if (model.empty()) {
      return absl::InvalidArgumentError(
          "WriteTensors: the first chunk must carry `model`");
    }
    const uint64_t expected_version = chunk.expected_version();
    TensorAssembler assembler;
    do {
      if (!chunk.model().empty() && chunk.model() != model) {
        return absl::InvalidArgumentError(
            absl::StrCat("WriteTensors: chunk for model ", chunk.model(),
                         " in a stream for ", model));
      }
      absl::Status s = assembler.Add(chunk);
      if (!s.ok()) return s;
      if (options_.max_write_bytes > 0 &&
          assembler.bytes() > options_.max_write_bytes) {
        return absl::ResourceExhaustedError(
            absl::StrCat("WriteTensors: more than ", options_.max_write_bytes,
                         " bytes"));
      }
    } while (reader->Read(&chunk));
    if (context->IsCancelled()) {
      return absl::CancelledError("WriteTensors: cancelled by the client");
    }
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
    // Unknown model first: NOT_FOUND says more than a path complaint.
    auto info = engine_->Info(request->model());
    if (!info.ok()) return info.status();
    auto path = paths_.ResolveExportPath(request->path());
    if (!path.ok()) return path.status();
    auto result =
        engine_->Export(request->model(), *path, MakeCallContext(context));
    if (!result.ok()) return result.status();
    ToProto(*result, response);
    return absl::OkStatus();
  });
}

grpc::Status PermutationServiceImpl::ComputePermutation(
    grpc::ServerContext* context, grpc::ServerReader<v1::TraceChunk>* reader,
    v1::PermutationResult* response) {
  return Handle(context, "ComputePermutation", "", [&](CallLog& log) {
    v1::TraceChunk chunk;
    if (!reader->Read(&chunk) || !chunk.has_header()) {
      return absl::InvalidArgumentError(
          "ComputePermutation: the first TraceChunk must carry header");
    }
    const TraceHeader header = FromProto(chunk.header());
    log.model = header.model;
    log.Add("group", header.group.empty() ? "-" : header.group);
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
      if (context->IsCancelled()) break;
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
        status = (*session)->AddRows(chunk.f32_le(), chunk.rows());
        if (!status.ok()) {
          status = absl::Status(
              status.code(), absl::StrCat("ComputePermutation: chunk ", index,
                                          ": ", std::string(status.message())));
          break;
        }
        rows += chunk.rows();
      }
      if (!reader->Read(&chunk)) break;
    }
    log.Add("rows", std::to_string(rows));
    log.Add("bytes", std::to_string(bytes));
    if (!status.ok()) return status;
    // A cancelled client also ends the reads: never solve a partial stream.
    if (context->IsCancelled()) {
      return absl::CancelledError("ComputePermutation: cancelled by the client");
    }
    auto result = (*session)->Finish(MakeCallContext(context));
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
                  log.Add("groups", request->groups().empty()
                                        ? std::string("all")
                                        : std::to_string(request->groups_size()));
                  log.Add("tokens", std::to_string(request->input_ids_size()));
                  if (request->batch() < 0) {
                    return absl::InvalidArgumentError(absl::StrCat(
                        "CapturePermutation: batch ", request->batch(), " < 0"));
                  }
                  auto results = engine_->Capture(FromProto(*request),
                                                  MakeCallContext(context));
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
    log.Add("mode", options.mode);
    if (!options.compare_model.empty()) log.Add("compare", options.compare_model);
    log.Add("batch", std::to_string(options.batch));
    log.Add("seq_len", std::to_string(options.seq_len));
    log.Add("iters", std::to_string(options.iters));
    auto report = engine_->MeasureLatency(options, MakeCallContext(context));
    if (!report.ok()) return report.status();
    ToProto(*report, response);
    return absl::OkStatus();
  });
}

}  // namespace icd::rpc
