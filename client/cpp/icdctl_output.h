// icdctl's output: the response as JSON (--json), or tables for people.
#ifndef ICD_CLIENT_CPP_ICDCTL_OUTPUT_H_
#define ICD_CLIENT_CPP_ICDCTL_OUTPUT_H_

#include <string>
#include <vector>

#include <google/protobuf/message.h>
#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "icd/v1/permutation.pb.h"

namespace icd::ctl {

// Proto field names, defaults included (see kHelp on --json).
absl::StatusOr<std::string> JsonText(const google::protobuf::Message& message);

absl::Status PrintJson(const google::protobuf::Message& message);

// A message as a JSON value, to combine several into one printed object.
absl::StatusOr<nlohmann::json> MessageJson(const google::protobuf::Message& message);

std::string Fmt(double v, int precision = 4);

// Columns padded to their widest cell; `right` marks right-aligned columns.
void PrintTable(const std::vector<std::vector<std::string>>& rows,
                const std::vector<bool>& right);

void PrintModel(const v1::ModelInfo& m);

void PrintCorrectness(const v1::CorrectnessReport& c);

void PrintApplyReport(const std::string& model, const v1::ApplyReport& report);

// One row per group: the columns kHelp explains under "Output of capture and
// compute". Block sizes are the union over the results, in first-seen order.
void PrintPermutationResults(const std::vector<v1::PermutationResult>& results);

}  // namespace icd::ctl

#endif  // ICD_CLIENT_CPP_ICDCTL_OUTPUT_H_
