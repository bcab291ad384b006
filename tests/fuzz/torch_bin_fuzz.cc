// pytorch_model.bin: a zip archive holding a pickle and raw storages. Any
// input is refused with a status or parsed within bounds; never a crash.
#include <cstdint>
#include <cstdlib>

#include "fuzz_file.h"
#include "io/torch_bin.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto path = icd::fuzz::WriteInput(".bin", data, size);
  auto tensors = icd::io::ReadTorchBin(path);
  if (!tensors.ok()) return 0;
  for (const auto& named : *tensors) {
    if (!named.tensor.defined()) std::abort();
  }
  return 0;
}
