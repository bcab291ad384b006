// The pickle side of torch.save's zip layout (archive/data.pkl): a
// restricted reader that understands only state dicts, and a writer that emits
// what torch.load(weights_only=True) accepts. Both speak protocol 2.
#ifndef ICD_CORE_SRC_IO_PICKLE_H_
#define ICD_CORE_SRC_IO_PICKLE_H_

#include "torch_api.h"

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "io/safetensors.h"

namespace icd::io {

// Returns the storage behind persistent id key `key`: a 1-D CPU tensor of
// `numel` elements of `dtype`. Called once per use; the caller caches, so
// that every use of one key views one storage.
using StorageLoader = std::function<absl::StatusOr<torch::Tensor>(
    const std::string& key, torch::ScalarType dtype, int64_t numel)>;

// Unpickles a state dict: a dict or collections.OrderedDict of str -> tensor,
// tensors rebuilt by torch._utils._rebuild_tensor_v2 (or _rebuild_tensor,
// _rebuild_parameter) over typed storages. Any other global is refused
// before anything is built. Tensors are as_strided views of their storage
// (so ties survive); a non-contiguous one is copied to contiguous memory.
// Errors are InvalidArgument, prefixed by `where` and the byte position.
absl::StatusOr<TensorList> UnpickleStateDict(const std::string& where, const std::string& pickle,
                                             const StorageLoader& load_storage);

// One tensor of a state dict to pickle, as a view of storage `storage_key`.
struct PickledTensor {
  std::string name;
  std::string storage_key;
  torch::ScalarType dtype = torch::kFloat;
  int64_t storage_numel = 0;  // elements of `dtype` in the storage
  int64_t storage_offset = 0;  // elements
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;  // elements
};

// Pickles an OrderedDict of name -> tensor in the shape torch.save gives it.
// InvalidArgument for a dtype without a typed storage class.
absl::StatusOr<std::string> PickleStateDict(const std::vector<PickledTensor>& tensors);

// "FloatStorage" for kFloat etc.; nullopt for dtypes torch has no class for.
std::optional<std::string> StorageClassName(torch::ScalarType dtype);

// The element type of a storage class global ("torch.FloatStorage" etc.;
// untyped storages hold bytes); nullopt for anything else.
std::optional<torch::ScalarType> StorageClassDtype(const std::string& qualified_name);

}  // namespace icd::io

#endif  // ICD_CORE_SRC_IO_PICKLE_H_
