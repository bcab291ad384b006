// config.json: any text is refused with a status or becomes a config whose
// implied tensor shapes are computed without overflow or a crash.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "io/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto config = icd::ParseConfig(text, "fuzz/config.json");
  if (!config.ok()) return 0;
  for (const auto& [name, shape] : icd::ExpectedShapes(*config)) {
    for (int64_t dim : shape) {
      if (dim <= 0) std::abort();  // an accepted config implies real tensors
    }
  }
  icd::ConfigDims(*config);
  return 0;
}
