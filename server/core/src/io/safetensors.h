// Strict safetensors reader and writer.
#ifndef ICD_CORE_SRC_IO_SAFETENSORS_H_
#define ICD_CORE_SRC_IO_SAFETENSORS_H_

#include "torch_api.h"

#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace icd::io {

struct NamedTensor {
  std::string name;
  torch::Tensor tensor;  // CPU, contiguous
};
// Ordered as in the file (safetensors: sorted by offset; .bin: dict order).
using TensorList = std::vector<NamedTensor>;

// Refuses (InvalidArgument, naming the file and the reason): a short file, a
// header length past the end or over 100 MB, bad JSON, unknown dtype, shape
// and byte count that disagree, offsets outside the data area, overlapping
// tensors. A missing file is NotFound.
absl::StatusOr<TensorList> ReadSafetensors(const std::filesystem::path& file);

// Writes tensors in list order; `metadata` goes to "__metadata__".
absl::Status WriteSafetensors(const std::filesystem::path& file,
                              const TensorList& tensors,
                              const std::map<std::string, std::string>& metadata = {});

}  // namespace icd::io

#endif  // ICD_CORE_SRC_IO_SAFETENSORS_H_
