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

grpc::Status PermutationServiceImpl::Handle(
    grpc::ServerContext* context, const char* rpc, std::string model,
    const std::function<absl::Status(std::string&)>& body) {
  const auto start = Clock::now();
  absl::Status status = CheckToken(context);
  if (status.ok()) {
    try {
      status = body(model);
    } catch (const std::exception& e) {
      status = absl::InternalError(absl::StrCat(rpc, ": ", e.what()));
    }
  }
  if (options_.log_calls) {
    const double ms =
        std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    const std::string code = absl::StatusCodeToString(status.code());
    std::fprintf(stderr, "rpc=%s status=%s ms=%.2f model=%s\n", rpc,
                 code.c_str(), ms, model.empty() ? "-" : model.c_str());
  }
  return ToGrpcStatus(status);
}

grpc::Status PermutationServiceImpl::LoadModel(
    grpc::ServerContext* context, const v1::LoadModelRequest* request,
    v1::ModelInfo* response) {
  return Handle(context, "LoadModel", request->name(), [&](std::string&) {
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
  return Handle(context, "ListModels", "", [&](std::string&) {
    for (const auto& info : engine_->List()) {
      ToProto(info, response->add_models());
    }
    return absl::OkStatus();
  });
}

grpc::Status PermutationServiceImpl::UnloadModel(
    grpc::ServerContext* context, const v1::UnloadModelRequest* request,
    v1::UnloadModelResponse*) {
  return Handle(context, "UnloadModel", request->name(), [&](std::string&) {
    return engine_->Unload(request->name());
  });
}

grpc::Status PermutationServiceImpl::GetSymmetries(
    grpc::ServerContext* context, const v1::GetSymmetriesRequest* request,
    v1::Symmetries* response) {
  return Handle(context, "GetSymmetries", request->model(), [&](std::string&) {
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
                [&](std::string&) {
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
  return Handle(context, "Verify", request->model(), [&](std::string&) {
    auto report = engine_->Verify(request->model(), MakeCallContext(context));
    if (!report.ok()) return report.status();
    ToProto(*report, response);
    return absl::OkStatus();
  });
}

grpc::Status PermutationServiceImpl::Evaluate(
    grpc::ServerContext* context, const v1::EvaluateRequest* request,
    v1::EvaluateResponse* response) {
  return Handle(context, "Evaluate", request->model(), [&](std::string&) {
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
  return Handle(context, "ReadTensors", request->model(), [&](std::string&) {
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
  return Handle(context, "WriteTensors", "", [&](std::string& model) {
    v1::TensorChunk chunk;
    if (!reader->Read(&chunk)) {
      return absl::InvalidArgumentError("WriteTensors: empty stream");
    }
    model = chunk.model();
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
  return Handle(context, "ExportModel", request->model(), [&](std::string&) {
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
    grpc::ServerContext* context, grpc::ServerReader<v1::TraceChunk>*,
    v1::PermutationResult*) {
  return Handle(context, "ComputePermutation", "", [](std::string&) {
    return absl::UnimplementedError(
        "ComputePermutation is not served by this server version yet");
  });
}

grpc::Status PermutationServiceImpl::CapturePermutation(
    grpc::ServerContext* context, const v1::CaptureRequest* request,
    v1::PermutationSet*) {
  return Handle(context, "CapturePermutation", request->model(),
                [](std::string&) {
                  return absl::UnimplementedError(
                      "CapturePermutation is not served by this server "
                      "version yet");
                });
}

grpc::Status PermutationServiceImpl::MeasureLatency(
    grpc::ServerContext* context, const v1::LatencyRequest* request,
    v1::LatencyReport*) {
  return Handle(context, "MeasureLatency", request->model(), [](std::string&) {
    return absl::UnimplementedError(
        "MeasureLatency is not served by this server version yet");
  });
}

}  // namespace icd::rpc
