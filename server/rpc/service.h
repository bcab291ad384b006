// The gRPC frontend of the engine: one handler per RPC of
// icd.v1.PermutationService. Each handler checks the token, converts the
// request, calls the Engine, maps the status (ToGrpcStatus), times the call
// and logs one line to stderr, client strings quoted (QuoteForLog):
//   rpc=ApplyPermutation status=OK ms=1.23 model="m"
//   rpc=ComputePermutation status=OK ms=88.1 model="m" group="layers.0.inner" rows=4096 bytes=2097152
// An INTERNAL status's detail (InternalFailure's payload) goes to the log on
// a second line, never to the client.
// It holds no model state: the Engine does. Health and reflection are
// registered by main.
#ifndef ICD_RPC_SERVICE_H_
#define ICD_RPC_SERVICE_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "icd/core/engine.h"
#include "icd/core/types.h"
#include "icd/v1/permutation.grpc.pb.h"
#include "metrics.h"
#include "paths.h"
#include "progress.h"
#include "streams.h"

namespace icd::rpc {

struct ServiceOptions {
  // Non-empty: every call must carry `authorization: Bearer <token>`.
  std::string token;
  // Largest `data` of one ReadTensors chunk; chunks are cut smaller so that
  // each fits max_message_bytes whole.
  std::size_t chunk_bytes = std::size_t{1} << 20;
  // The server's message cap (icd-server --max-message-mb).
  std::size_t max_message_bytes = std::size_t{64} << 20;
  // Most token ids one Evaluate or CapturePermutation (input and held-out
  // ids together) or one MeasureLatency forward (batch x seq_len) may take;
  // more is RESOURCE_EXHAUSTED before any work. 0: no limit.
  // icd-server: --max-tokens.
  int64_t max_tokens = 0;
  // Most streaming calls open at once (0: no limit), and how long one may
  // go without a message before it is cancelled (zero: forever).
  // icd-server: --max-streams, --stream-idle-timeout-s.
  int max_streams = 0;
  std::chrono::milliseconds stream_idle_timeout{0};
  // Largest WriteTensors stream (sum of tensor bytes); 0: no limit.
  std::size_t max_write_bytes = 0;
  // Largest ComputePermutation stream (sum of `f32_le` bytes); 0: no limit.
  // The engine keeps O(channels^2) per stream, so this bounds the time a
  // call can hold a thread rather than memory. icd-server: --max-trace-mb.
  std::size_t max_trace_bytes = std::size_t{4096} << 20;
  // One line per call on stderr.
  bool log_calls = true;
  // Where calls, applies, verifications and trace bytes are counted for
  // Prometheus (icd-server --metrics-listen); null: nowhere. Not owned.
  Metrics* metrics = nullptr;
};

// The deadline and cancellation of a call, as the engine polls them.
CallContext MakeCallContext(grpc::ServerContext* context);

class PermutationServiceImpl final : public v1::PermutationService::Service {
 public:
  // `engine` must outlive the service (main destroys it last).
  PermutationServiceImpl(Engine* engine, PathPolicy paths,
                         ServiceOptions options);

  grpc::Status LoadModel(grpc::ServerContext* context,
                         const v1::LoadModelRequest* request,
                         v1::ModelInfo* response) override;
  grpc::Status ListModels(grpc::ServerContext* context,
                          const v1::ListModelsRequest* request,
                          v1::ListModelsResponse* response) override;
  grpc::Status UnloadModel(grpc::ServerContext* context,
                           const v1::UnloadModelRequest* request,
                           v1::UnloadModelResponse* response) override;
  grpc::Status GetSymmetries(grpc::ServerContext* context,
                             const v1::GetSymmetriesRequest* request,
                             v1::Symmetries* response) override;
  grpc::Status ApplyPermutation(grpc::ServerContext* context,
                                const v1::ApplyRequest* request,
                                v1::ApplyReport* response) override;
  grpc::Status Verify(grpc::ServerContext* context,
                      const v1::VerifyRequest* request,
                      v1::CorrectnessReport* response) override;
  grpc::Status Evaluate(grpc::ServerContext* context,
                        const v1::EvaluateRequest* request,
                        v1::EvaluateResponse* response) override;
  grpc::Status ReadTensors(grpc::ServerContext* context,
                           const v1::ReadTensorsRequest* request,
                           grpc::ServerWriter<v1::TensorChunk>* writer) override;
  grpc::Status WriteTensors(grpc::ServerContext* context,
                            grpc::ServerReader<v1::TensorChunk>* reader,
                            v1::WriteReport* response) override;
  grpc::Status ExportModel(grpc::ServerContext* context,
                           const v1::ExportRequest* request,
                           v1::ExportReport* response) override;
  grpc::Status ComputePermutation(grpc::ServerContext* context,
                                  grpc::ServerReader<v1::TraceChunk>* reader,
                                  v1::PermutationResult* response) override;
  grpc::Status CapturePermutation(grpc::ServerContext* context,
                                  const v1::CaptureRequest* request,
                                  v1::PermutationSet* response) override;
  grpc::Status MeasureLatency(grpc::ServerContext* context,
                              const v1::LatencyRequest* request,
                              v1::LatencyReport* response) override;
  grpc::Status GetProgress(grpc::ServerContext* context, const v1::ProgressRequest* request,
                           v1::Progress* response) override;

 private:
  // What the log line says about a call beyond rpc, status and ms. `body`
  // may fill it in (streams learn the model late).
  struct CallLog {
    std::string model;
    std::string fields;  // " key=value" pairs, appended by Add and AddText
    void Add(const char* key, int64_t value);
    // A client's string, quoted and cut (QuoteForLog).
    void AddText(const char* key, const std::string& value);
  };

  // Token check, `body`, exception guard, status map, timing and the log
  // line.
  grpc::Status Handle(grpc::ServerContext* context, const char* rpc,
                      std::string model,
                      const std::function<absl::Status(CallLog&)>& body);
  absl::Status CheckToken(const grpc::ServerContext* context) const;
  // MakeCallContext, plus progress reports into the call's registry entry
  // when it carried x-icd-request-id (Handle registers it).
  CallContext ContextFor(grpc::ServerContext* context);
  // RESOURCE_EXHAUSTED over options_.max_tokens, naming the field.
  absl::Status CheckTokenCount(const char* field, int64_t tokens) const;

  Engine* engine_;
  PathPolicy paths_;
  ServiceOptions options_;
  StreamLimiter streams_;
  ProgressRegistry progress_;
  // The running calls' progress entries by their context (ContextFor).
  std::mutex progress_mutex_;
  std::map<const grpc::ServerContext*, std::shared_ptr<ProgressRegistry::Entry>> progress_by_call_;
};

}  // namespace icd::rpc

#endif  // ICD_RPC_SERVICE_H_
