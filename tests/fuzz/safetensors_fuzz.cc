// Any byte string given to ReadSafetensors is either refused with a status or
// yields tensors whose bytes lie inside the file: never a crash, an overread
// (ASan) or undefined behaviour (UBSan).
#include <cstdint>
#include <cstdlib>

#include "fuzz_file.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto path = icd::fuzz::WriteInput(".safetensors", data, size);
  auto tensors = icd::io::ReadSafetensors(path);
  if (!tensors.ok()) return 0;
  size_t bytes = 0;
  for (const auto& named : *tensors) {
    if (!named.tensor.is_contiguous()) std::abort();  // the reader's contract
    bytes += static_cast<size_t>(named.tensor.numel()) * named.tensor.element_size();
  }
  if (bytes > size) std::abort();  // tensors never hold more than the file
  return 0;
}
