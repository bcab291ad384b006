// The parsers read files: each fuzz input is written to one scratch file per
// process, reused for every input.
#ifndef ICD_TESTS_FUZZ_FUZZ_FILE_H_
#define ICD_TESTS_FUZZ_FUZZ_FILE_H_

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

namespace icd::fuzz {

inline std::filesystem::path WriteInput(const char* suffix, const uint8_t* data, size_t size) {
  static const std::filesystem::path path = std::filesystem::temp_directory_path() /
      ("icd-fuzz-" + std::to_string(::getpid()) + suffix);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  return path;
}

}  // namespace icd::fuzz

#endif  // ICD_TESTS_FUZZ_FUZZ_FILE_H_
