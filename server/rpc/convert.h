// Proto messages <-> engine value types. No logic beyond copying fields and
// checking what the wire format leaves open (dtype names, tensor chunking).
#ifndef ICD_RPC_CONVERT_H_
#define ICD_RPC_CONVERT_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "icd/core/traces.h"
#include "icd/core/types.h"
#include "icd/v1/permutation.pb.h"

namespace icd::rpc {

void ToProto(const ModelInfo& in, v1::ModelInfo* out);
void ToProto(const GroupInfo& in, v1::Group* out);
void ToProto(const CorrectnessReport& in, v1::CorrectnessReport* out);
void ToProto(const ApplyReport& in, v1::ApplyReport* out);
void ToProto(const EvaluateResult& in, v1::EvaluateResponse* out);
void ToProto(const ExportResult& in, v1::ExportReport* out);

LoadOptions FromProto(const v1::LoadModelRequest& in);
std::vector<Permutation> FromProto(
    const google::protobuf::RepeatedPtrField<v1::Permutation>& in);
ApplyOptions ApplyOptionsFromProto(const v1::ApplyRequest& in);
EvaluateRequest FromProto(const v1::EvaluateRequest& in);

// Zero batch, seq_len, iters and an empty mode take LatencyOptions' defaults
// (zero is never valid there); warmup is taken as sent (0: none).
LatencyOptions FromProto(const v1::LatencyRequest& in);
void ToProto(const LatencyReport& in, v1::LatencyReport* out);

// Traces. Both ways for the messages a client may also build or read back
// (solver options, results); zero fields stay zero: defaults are the engine's.
void ToProto(const SolverOptions& in, v1::SolverOptions* out);
void ToProto(const BlocksTouched& in, v1::BlocksTouched* out);
void ToProto(const PermutationResult& in, v1::PermutationResult* out);
SolverOptions FromProto(const v1::SolverOptions& in);
BlocksTouched FromProto(const v1::BlocksTouched& in);
PermutationResult FromProto(const v1::PermutationResult& in);
TraceHeader FromProto(const v1::TraceHeader& in);
CaptureRequest FromProto(const v1::CaptureRequest& in);

// Splits one tensor into chunks (at least one; `last` on the final one), each
// a message of at most `max_message_bytes`: data of at most `max_data_bytes`,
// less what name, shape and dtype take. Every chunk carries name, shape and
// dtype.
std::vector<v1::TensorChunk> SplitTensor(const HostTensor& tensor, std::size_t max_data_bytes,
                                         std::size_t max_message_bytes = SIZE_MAX);

// Reassembles a WriteTensors stream: chunks of one tensor are contiguous and
// agree on shape and dtype; `last` closes the tensor. A chunk with no name
// and no data (the header chunk) is allowed between tensors. Sizes are
// checked as chunks arrive: a shape whose byte count overflows, data beyond
// what the shape and dtype need or beyond what the model's tensor holds
// (`target_bytes`, when given: NotFound for a tensor the model lacks) is
// refused at once, so a stream never buffers more than the model's tensors.
class TensorAssembler {
 public:
  using TargetBytes = std::function<absl::StatusOr<int64_t>(const std::string& tensor)>;
  explicit TensorAssembler(TargetBytes target_bytes = nullptr)
      : target_bytes_(std::move(target_bytes)) {}
  absl::Status Add(const v1::TensorChunk& chunk);
  // INVALID_ARGUMENT if a tensor is still open or its size does not match
  // its shape and dtype.
  absl::StatusOr<std::vector<HostTensor>> Finish();
  std::size_t bytes() const { return bytes_; }

 private:
  absl::Status Close();
  TargetBytes target_bytes_;
  std::vector<HostTensor> tensors_;
  bool open_ = false;
  int64_t declared_bytes_ = 0;  // the open tensor's shape x dtype size
  int64_t limit_bytes_ = 0;     // at most declared_bytes_ and the target's
  std::size_t bytes_ = 0;
};

}  // namespace icd::rpc

#endif  // ICD_RPC_CONVERT_H_
