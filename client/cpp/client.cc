#include "icd/client/client.h"

#include <algorithm>
#include <cstring>
#include <future>
#include <utility>

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "icd/v1/permutation.grpc.pb.h"

namespace icd {
namespace {

// grpc.health.v1 is not shipped as headers; its two tiny messages are
// encoded by hand: HealthCheckRequest{string service = 1},
// HealthCheckResponse{ServingStatus status = 1} (SERVING = 1).
std::string EncodeHealthRequest(const std::string& service) {
  std::string out;
  if (service.empty()) return out;
  out.push_back(0x0A);
  uint64_t n = service.size();
  while (n >= 0x80) {
    out.push_back(static_cast<char>((n & 0x7F) | 0x80));
    n >>= 7;
  }
  out.push_back(static_cast<char>(n));
  out += service;
  return out;
}

absl::StatusOr<int> DecodeHealthStatus(const std::string& bytes) {
  // Only field 1 (varint) is expected; absent means UNKNOWN (0).
  size_t i = 0;
  int status = 0;
  while (i < bytes.size()) {
    const auto key = static_cast<unsigned char>(bytes[i++]);
    if (key != 0x08) return absl::InternalError("unexpected health response");
    uint64_t v = 0;
    int shift = 0;
    while (i < bytes.size()) {
      const auto b = static_cast<unsigned char>(bytes[i++]);
      v |= static_cast<uint64_t>(b & 0x7F) << shift;
      shift += 7;
      if ((b & 0x80) == 0) break;
    }
    status = static_cast<int>(v);
  }
  return status;
}

// Appends `n` floats as little-endian float32, whatever the host's order.
void AppendF32Le(const float* values, std::size_t n, std::string* out) {
  const std::size_t start = out->size();
  out->resize(start + n * 4);
  char* dst = out->data() + start;
  for (std::size_t i = 0; i < n; ++i) {
    uint32_t bits = 0;
    std::memcpy(&bits, &values[i], 4);
    for (int b = 0; b < 4; ++b) *dst++ = static_cast<char>((bits >> (8 * b)) & 0xFF);
  }
}

}  // namespace

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  // grpc::StatusCode and absl::StatusCode share their numeric values (both
  // are the canonical google.rpc.Code); the server asserts the pairs.
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      status.error_message());
}

class Client::Impl {
 public:
  Impl(std::shared_ptr<grpc::Channel> channel, ClientOptions options)
      : channel_(std::move(channel)),
        stub_(v1::PermutationService::NewStub(channel_)),
        generic_(channel_),
        options_(std::move(options)) {}

  void Prepare(grpc::ClientContext* ctx, bool with_token = true) const {
    if (options_.deadline.count() > 0) {
      ctx->set_deadline(std::chrono::system_clock::now() + options_.deadline);
    }
    if (with_token && !options_.token.empty()) {
      ctx->AddMetadata("authorization", "Bearer " + options_.token);
    }
    if (!options_.request_id.empty()) ctx->AddMetadata("x-icd-request-id", options_.request_id);
  }

  // One ComputePermutation stream: the header chunk, then whatever `next`
  // fills in until it returns false. An error from `next` cancels the call.
  absl::StatusOr<v1::PermutationResult> StreamTraces(
      const v1::TraceHeader& header,
      const std::function<absl::StatusOr<bool>(v1::TraceChunk&)>& next) {
    grpc::ClientContext ctx;
    Prepare(&ctx);
    v1::PermutationResult result;
    auto writer = stub_->ComputePermutation(&ctx, &result);
    v1::TraceChunk chunk;
    *chunk.mutable_header() = header;
    // A failed Write means the server has ended the call: its status says why.
    bool open = writer->Write(chunk);
    while (open) {
      chunk.Clear();
      absl::StatusOr<bool> more = next(chunk);
      if (!more.ok()) {
        ctx.TryCancel();
        writer->Finish().ok();  // CANCELLED; the source's error is the news
        return more.status();
      }
      if (!*more) break;
      open = writer->Write(chunk);
    }
    writer->WritesDone();
    grpc::Status s = writer->Finish();
    if (!s.ok()) return FromGrpcStatus(s);
    return result;
  }

  // Rows per chunk for `channels` channels: what fits in chunk_bytes.
  int64_t ChunkRows(int64_t channels) const {
    return std::max<int64_t>(1, options_.chunk_bytes / (4 * channels));
  }

  // One unary call: fresh context, map the status.
  template <typename Req, typename Resp, typename Method>
  absl::StatusOr<Resp> Unary(Method method, const Req& request) {
    grpc::ClientContext ctx;
    Prepare(&ctx);
    Resp response;
    grpc::Status s = (stub_.get()->*method)(&ctx, request, &response);
    if (!s.ok()) return FromGrpcStatus(s);
    return response;
  }

  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::PermutationService::Stub> stub_;
  grpc::TemplatedGenericStub<grpc::ByteBuffer, grpc::ByteBuffer> generic_;
  ClientOptions options_;
};

using Stub = v1::PermutationService::Stub;

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(
    const std::string& address, ClientOptions options) {
  if (address.empty()) return absl::InvalidArgumentError("empty address");
  grpc::ChannelArguments args;
  const int max_bytes = std::max(1, options.max_message_mb) * 1024 * 1024;
  args.SetMaxReceiveMessageSize(max_bytes);
  args.SetMaxSendMessageSize(max_bytes);
  auto creds = options.credentials ? options.credentials
                                   : grpc::InsecureChannelCredentials();
  auto channel = grpc::CreateCustomChannel(address, creds, args);
  if (options.connect_timeout.count() > 0) {
    const auto deadline =
        std::chrono::system_clock::now() + options.connect_timeout;
    if (!channel->WaitForConnected(deadline)) {
      return absl::UnavailableError(
          absl::StrCat("could not connect to ", address, " within ",
                       options.connect_timeout.count(), " ms"));
    }
  }
  return std::unique_ptr<Client>(new Client(
      std::make_unique<Impl>(std::move(channel), std::move(options))));
}

Client::Client(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Client::~Client() = default;

absl::StatusOr<bool> Client::Health(const std::string& service) {
  grpc::ClientContext ctx;
  impl_->Prepare(&ctx, /*with_token=*/false);
  const std::string encoded = EncodeHealthRequest(service);
  grpc::Slice slice(encoded);
  grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  std::promise<grpc::Status> done;
  impl_->generic_.UnaryCall(&ctx, "/grpc.health.v1.Health/Check",
                            grpc::StubOptions(), &request, &response,
                            [&done](grpc::Status s) { done.set_value(s); });
  grpc::Status s = done.get_future().get();
  if (!s.ok()) return FromGrpcStatus(s);
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) {
    return absl::InternalError("unreadable health response");
  }
  std::string bytes;
  for (const auto& sl : slices) {
    bytes.append(reinterpret_cast<const char*>(sl.begin()), sl.size());
  }
  auto status = DecodeHealthStatus(bytes);
  if (!status.ok()) return status.status();
  return *status == 1;
}

absl::StatusOr<v1::ModelInfo> Client::LoadModel(
    const v1::LoadModelRequest& request) {
  return impl_->Unary<v1::LoadModelRequest, v1::ModelInfo>(&Stub::LoadModel,
                                                           request);
}

absl::StatusOr<v1::ModelInfo> Client::LoadModel(const std::string& name,
                                                const std::string& path,
                                                const std::string& device,
                                                const std::string& dtype) {
  v1::LoadModelRequest request;
  request.set_name(name);
  request.set_path(path);
  request.set_device(device);
  request.set_dtype(dtype);
  return LoadModel(request);
}

absl::StatusOr<std::vector<v1::ModelInfo>> Client::ListModels() {
  auto r = impl_->Unary<v1::ListModelsRequest, v1::ListModelsResponse>(
      &Stub::ListModels, v1::ListModelsRequest());
  if (!r.ok()) return r.status();
  return std::vector<v1::ModelInfo>(r->models().begin(), r->models().end());
}

absl::Status Client::UnloadModel(const std::string& name) {
  v1::UnloadModelRequest request;
  request.set_name(name);
  return impl_
      ->Unary<v1::UnloadModelRequest, v1::UnloadModelResponse>(
          &Stub::UnloadModel, request)
      .status();
}

absl::StatusOr<v1::Symmetries> Client::GetSymmetries(const std::string& model) {
  v1::GetSymmetriesRequest request;
  request.set_model(model);
  return impl_->Unary<v1::GetSymmetriesRequest, v1::Symmetries>(
      &Stub::GetSymmetries, request);
}

absl::StatusOr<v1::ApplyReport> Client::ApplyPermutation(
    const v1::ApplyRequest& request) {
  return impl_->Unary<v1::ApplyRequest, v1::ApplyReport>(
      &Stub::ApplyPermutation, request);
}

absl::StatusOr<v1::ApplyReport> Client::ApplyPermutation(
    const std::string& model, const std::vector<v1::Permutation>& perms,
    uint64_t expected_version, bool skip_verify) {
  v1::ApplyRequest request;
  request.set_model(model);
  for (const auto& p : perms) *request.add_permutations() = p;
  request.set_expected_version(expected_version);
  request.set_skip_verify(skip_verify);
  return ApplyPermutation(request);
}

absl::StatusOr<v1::CorrectnessReport> Client::Verify(const std::string& model) {
  v1::VerifyRequest request;
  request.set_model(model);
  return impl_->Unary<v1::VerifyRequest, v1::CorrectnessReport>(&Stub::Verify,
                                                                request);
}

absl::StatusOr<v1::EvaluateResponse> Client::Evaluate(
    const v1::EvaluateRequest& request) {
  return impl_->Unary<v1::EvaluateRequest, v1::EvaluateResponse>(
      &Stub::Evaluate, request);
}

absl::StatusOr<std::vector<Tensor>> Client::ReadTensors(
    const std::string& model, const std::vector<std::string>& names) {
  v1::ReadTensorsRequest request;
  request.set_model(model);
  for (const auto& n : names) request.add_names(n);
  grpc::ClientContext ctx;
  impl_->Prepare(&ctx);
  auto reader = impl_->stub_->ReadTensors(&ctx, request);
  std::vector<Tensor> out;
  bool open = false;  // the last tensor still expects chunks
  v1::TensorChunk chunk;
  while (reader->Read(&chunk)) {
    if (!open) {
      Tensor t;
      t.name = chunk.name();
      t.shape.assign(chunk.shape().begin(), chunk.shape().end());
      t.dtype = chunk.dtype();
      out.push_back(std::move(t));
      open = true;
    } else if (chunk.name() != out.back().name) {
      ctx.TryCancel();
      reader->Finish().ok();
      return absl::InternalError(absl::StrCat("chunk of ", chunk.name(),
                                              " inside tensor ",
                                              out.back().name));
    }
    out.back().data += chunk.data();
    if (chunk.last()) open = false;
  }
  grpc::Status s = reader->Finish();
  if (!s.ok()) return FromGrpcStatus(s);
  if (open) {
    return absl::InternalError(
        absl::StrCat("stream ended inside tensor ", out.back().name));
  }
  return out;
}

absl::StatusOr<uint64_t> Client::WriteTensors(
    const std::string& model, const std::vector<Tensor>& tensors,
    uint64_t expected_version) {
  grpc::ClientContext ctx;
  impl_->Prepare(&ctx);
  v1::WriteReport report;
  auto writer = impl_->stub_->WriteTensors(&ctx, &report);
  const auto chunk_bytes =
      static_cast<size_t>(std::max<int64_t>(1, impl_->options_.chunk_bytes));
  bool first = true;
  bool broken = false;
  auto send = [&](v1::TensorChunk& c) {
    if (first) {
      c.set_model(model);
      c.set_expected_version(expected_version);
      first = false;
    }
    if (!writer->Write(c)) broken = true;
  };
  for (const auto& t : tensors) {
    size_t pos = 0;
    do {
      v1::TensorChunk c;
      c.set_name(t.name);
      for (int64_t d : t.shape) c.add_shape(d);
      c.set_dtype(t.dtype);
      const size_t n = std::min(chunk_bytes, t.data.size() - pos);
      c.set_data(t.data.substr(pos, n));
      pos += n;
      c.set_last(pos >= t.data.size());
      send(c);
    } while (!broken && pos < t.data.size());
    if (broken) break;
  }
  if (first && !broken) {  // no tensors: still name the model
    v1::TensorChunk c;
    send(c);
  }
  writer->WritesDone();
  grpc::Status s = writer->Finish();
  if (!s.ok()) return FromGrpcStatus(s);
  return report.version();
}

absl::StatusOr<v1::ExportReport> Client::ExportModel(const std::string& model,
                                                     const std::string& path) {
  v1::ExportRequest request;
  request.set_model(model);
  request.set_path(path);
  return impl_->Unary<v1::ExportRequest, v1::ExportReport>(&Stub::ExportModel,
                                                           request);
}

namespace {

absl::Status CheckChannels(const v1::TraceHeader& header) {
  if (header.channels() <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ComputePermutation: header.channels is ", header.channels(),
        "; it must be the size of group '", header.group(), "'"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<v1::PermutationResult> Client::ComputePermutation(
    const v1::TraceHeader& header, const TraceRowSource& source) {
  if (auto s = CheckChannels(header); !s.ok()) return s;
  const int64_t channels = header.channels();
  const int64_t max_rows = impl_->ChunkRows(channels);
  std::vector<float> rows;
  return impl_->StreamTraces(header, [&](v1::TraceChunk& chunk) -> absl::StatusOr<bool> {
    rows.clear();
    absl::StatusOr<int64_t> n = source(max_rows, rows);
    if (!n.ok()) return n.status();
    if (*n == 0 && rows.empty()) return false;
    if (*n < 0 || *n > max_rows ||
        rows.size() != static_cast<std::size_t>(*n * channels)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "ComputePermutation: the row source returned ", *n, " rows (at most ",
          max_rows, " asked) and ", rows.size(), " values; ", channels,
          " channels per row"));
    }
    chunk.set_rows(*n);
    AppendF32Le(rows.data(), rows.size(), chunk.mutable_f32_le());
    return true;
  });
}

absl::StatusOr<v1::PermutationResult> Client::ComputePermutation(
    const v1::TraceHeader& header, absl::Span<const float> rows,
    int64_t chunk_rows) {
  if (auto s = CheckChannels(header); !s.ok()) return s;
  const auto channels = static_cast<std::size_t>(header.channels());
  if (rows.size() % channels != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ComputePermutation: ", rows.size(), " values are not whole rows of ",
        channels, " channels"));
  }
  const auto per_chunk = static_cast<std::size_t>(
      chunk_rows > 0 ? chunk_rows : impl_->ChunkRows(header.channels()));
  std::size_t pos = 0;  // in rows
  const std::size_t total = rows.size() / channels;
  return impl_->StreamTraces(header, [&](v1::TraceChunk& chunk) -> absl::StatusOr<bool> {
    if (pos >= total) return false;
    const std::size_t n = std::min(per_chunk, total - pos);
    chunk.set_rows(static_cast<int64_t>(n));
    AppendF32Le(rows.data() + pos * channels, n * channels, chunk.mutable_f32_le());
    pos += n;
    return true;
  });
}

absl::StatusOr<v1::PermutationResult> Client::ComputePermutation(
    const std::vector<v1::TraceChunk>& chunks) {
  grpc::ClientContext ctx;
  impl_->Prepare(&ctx);
  v1::PermutationResult result;
  auto writer = impl_->stub_->ComputePermutation(&ctx, &result);
  for (const auto& c : chunks) {
    if (!writer->Write(c)) break;
  }
  writer->WritesDone();
  grpc::Status s = writer->Finish();
  if (!s.ok()) return FromGrpcStatus(s);
  return result;
}

absl::StatusOr<v1::PermutationSet> Client::CapturePermutation(
    const v1::CaptureRequest& request) {
  return impl_->Unary<v1::CaptureRequest, v1::PermutationSet>(
      &Stub::CapturePermutation, request);
}

absl::StatusOr<v1::Progress> Client::GetProgress(const std::string& request_id) {
  v1::ProgressRequest request;
  request.set_request_id(request_id);
  return impl_->Unary<v1::ProgressRequest, v1::Progress>(&Stub::GetProgress, request);
}

absl::StatusOr<v1::LatencyReport> Client::MeasureLatency(
    const v1::LatencyRequest& request) {
  return impl_->Unary<v1::LatencyRequest, v1::LatencyReport>(
      &Stub::MeasureLatency, request);
}

}  // namespace icd
