// PyTorch `.bin` state dicts (torch.save's zip layout) read with a restricted
// unpickler of our own and written so that torch.load(weights_only=True)
// accepts them.
#ifndef ICD_CORE_SRC_IO_TORCH_BIN_H_
#define ICD_CORE_SRC_IO_TORCH_BIN_H_

#include <filesystem>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "io/safetensors.h"

namespace icd::io {

// Accepts only what a state dict needs: an OrderedDict or dict of name ->
// tensor (torch._utils._rebuild_tensor_v2 over typed storages). Anything else
// (other globals, code) is refused, never executed. Tensors that share a
// storage in the file share it in the result (tied heads stay one tensor).
absl::StatusOr<TensorList> ReadTorchBin(const std::filesystem::path& file);

// Writes an OrderedDict in torch.save's zip layout. Tensors that share a
// storage (same data_ptr) are written as one storage, as torch.save does.
absl::Status WriteTorchBin(const std::filesystem::path& file,
                           const TensorList& tensors);

}  // namespace icd::io

#endif  // ICD_CORE_SRC_IO_TORCH_BIN_H_
