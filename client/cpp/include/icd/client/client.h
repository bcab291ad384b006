// icd::Client: a thin, thread-safe C++ client of icd.v1.PermutationService.
//
// Every method is one RPC. Requests and responses are the generated proto
// messages of proto/icd/v1/permutation.proto (icd::v1::...), so the fields and
// their documentation are the service's own; the streaming RPCs (ReadTensors,
// WriteTensors, ComputePermutation) take and return whole values and do the
// chunking. Errors come back as absl::Status with the server's code and
// message (FromGrpcStatus): INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS,
// PERMISSION_DENIED, FAILED_PRECONDITION, ABORTED, UNAUTHENTICATED, ...
//
//   auto client = icd::Client::Connect("127.0.0.1:50051", {});
//   if (!client.ok()) return client.status();
//   auto info = (*client)->LoadModel("m", "mamba1-small/hf");
//   auto syms = (*client)->GetSymmetries("m");
//
// The client never links LibTorch or the engine.
#ifndef ICD_CLIENT_CLIENT_H_
#define ICD_CLIENT_CLIENT_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "icd/v1/permutation.pb.h"

namespace grpc {
class Status;
class ChannelCredentials;
}  // namespace grpc

namespace icd {

struct ClientOptions {
  // Deadline of each call, relative to its start; zero: none.
  std::chrono::milliseconds deadline{0};
  // Sent as `authorization: Bearer <token>` on every call when not empty.
  std::string token;
  // Connect waits up to this long for the channel to be ready (UNAVAILABLE
  // after it); zero: connect lazily on the first call.
  std::chrono::milliseconds connect_timeout{10000};
  // Largest message sent or received.
  int max_message_mb = 256;
  // Null: an insecure channel.
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  // Non-empty: sent as the metadata header x-icd-request-id on every call,
  // so that GetProgress (from another thread or process) can follow the
  // calls; the server refuses a second call with the ID while one runs.
  std::string request_id;
  // ReadTensors/WriteTensors/ComputePermutation chunk size on the client's
  // side: 1 MiB less 64 KiB, so that a chunk with its name, shape and model
  // fits the smallest server message cap (icd-server --max-message-mb 1).
  int64_t chunk_bytes = (int64_t{1} << 20) - (int64_t{64} << 10);
};

// Where ComputePermutation's rows come from, one chunk at a time: appends at
// most `max_rows` rows (row-major float32 [rows, channels]) to `rows`, which
// arrives empty, and returns how many it appended; 0 ends the stream. An
// error cancels the call (the server keeps nothing) and is returned as is.
using TraceRowSource =
    std::function<absl::StatusOr<int64_t>(int64_t max_rows, std::vector<float>& rows)>;

// One whole tensor: raw little-endian bytes, row-major.
struct Tensor {
  std::string name;
  std::vector<int64_t> shape;
  std::string dtype;  // "float32" | "bfloat16" | "float16" | "float64"
  std::string data;
};

class Client {
 public:
  static absl::StatusOr<std::unique_ptr<Client>> Connect(
      const std::string& address, ClientOptions options = {});
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // grpc.health.v1.Health/Check for `service` ("" : the whole server):
  // true when SERVING. Needs no token.
  absl::StatusOr<bool> Health(const std::string& service = "");

  absl::StatusOr<v1::ModelInfo> LoadModel(const v1::LoadModelRequest& request);
  absl::StatusOr<v1::ModelInfo> LoadModel(const std::string& name,
                                          const std::string& path,
                                          const std::string& device = "",
                                          const std::string& dtype = "");
  absl::StatusOr<std::vector<v1::ModelInfo>> ListModels();
  absl::Status UnloadModel(const std::string& name);
  absl::StatusOr<v1::Symmetries> GetSymmetries(const std::string& model);

  absl::StatusOr<v1::ApplyReport> ApplyPermutation(
      const v1::ApplyRequest& request);
  // Convenience: one request of (group, index) pairs.
  absl::StatusOr<v1::ApplyReport> ApplyPermutation(
      const std::string& model, const std::vector<v1::Permutation>& perms,
      uint64_t expected_version = 0, bool skip_verify = false);

  absl::StatusOr<v1::CorrectnessReport> Verify(const std::string& model);
  absl::StatusOr<v1::EvaluateResponse> Evaluate(
      const v1::EvaluateRequest& request);

  // Empty `names`: every tensor. Chunks are reassembled.
  absl::StatusOr<std::vector<Tensor>> ReadTensors(
      const std::string& model, const std::vector<std::string>& names = {});
  // Streams the tensors in chunks; returns the new version.
  absl::StatusOr<uint64_t> WriteTensors(const std::string& model,
                                        const std::vector<Tensor>& tensors,
                                        uint64_t expected_version = 0);

  absl::StatusOr<v1::ExportReport> ExportModel(const std::string& model,
                                               const std::string& path);

  // A permutation of one group from activation traces. `header` names the
  // model, the group, its channel count (the group's size), the held-out rows
  // and the solver options; the rows follow in chunks of at most
  // ClientOptions::chunk_bytes (at least one row each), so a trace of any
  // length streams in bounded memory on both sides. The result's
  // `permutation` applies as is with ApplyPermutation.
  absl::StatusOr<v1::PermutationResult> ComputePermutation(
      const v1::TraceHeader& header, const TraceRowSource& source);
  // Rows already in memory: row-major [rows.size() / channels, channels].
  // `chunk_rows` > 0 fixes the rows per chunk instead.
  absl::StatusOr<v1::PermutationResult> ComputePermutation(
      const v1::TraceHeader& header, absl::Span<const float> rows,
      int64_t chunk_rows = 0);
  // The stream exactly as given, chunk by chunk, unchecked (tools, tests).
  absl::StatusOr<v1::PermutationResult> ComputePermutation(
      const std::vector<v1::TraceChunk>& chunks);

  // Runs the model on the request's tokens, captures each group's
  // activations and solves each; results in the order of request.groups (or
  // GetSymmetries' order when empty).
  absl::StatusOr<v1::PermutationSet> CapturePermutation(
      const v1::CaptureRequest& request);

  // Times the model's forward on the server (prefill or decode samples),
  // with request.compare_model in interleaved rounds and their ratio.
  // How far the call that carried `request_id` is (ClientOptions::request_id).
  absl::StatusOr<v1::Progress> GetProgress(const std::string& request_id);
  absl::StatusOr<v1::LatencyReport> MeasureLatency(
      const v1::LatencyRequest& request);

 private:
  class Impl;
  explicit Client(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The one mapping of a gRPC status to absl (same code, same message).
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace icd

#endif  // ICD_CLIENT_CLIENT_H_
