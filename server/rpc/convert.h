// Proto messages <-> engine value types. No logic beyond copying fields and
// checking what the wire format leaves open (dtype names, tensor chunking).
#ifndef ICD_RPC_CONVERT_H_
#define ICD_RPC_CONVERT_H_

#include <cstddef>
#include <string>
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

// Splits one tensor into chunks of at most `max_bytes` of data (at least one
// chunk; `last` on the final one). Every chunk carries name, shape and dtype.
std::vector<v1::TensorChunk> SplitTensor(const HostTensor& tensor,
                                         std::size_t max_bytes);

// Reassembles a WriteTensors stream: chunks of one tensor are contiguous and
// agree on shape and dtype; `last` closes the tensor. A chunk with no name
// and no data (the header chunk) is allowed between tensors.
class TensorAssembler {
 public:
  absl::Status Add(const v1::TensorChunk& chunk);
  // INVALID_ARGUMENT if a tensor is still open or its size does not match
  // its shape and dtype.
  absl::StatusOr<std::vector<HostTensor>> Finish();
  std::size_t bytes() const { return bytes_; }

 private:
  absl::Status Close();
  std::vector<HostTensor> tensors_;
  bool open_ = false;
  std::size_t bytes_ = 0;
};

}  // namespace icd::rpc

#endif  // ICD_RPC_CONVERT_H_
