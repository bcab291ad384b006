// icdctl's readers of local files: trace matrices (.npy or raw float32)
// streamed a chunk of rows at a time, token ids (text or .npy), whole files.
#ifndef ICD_CLIENT_CPP_ICDCTL_READERS_H_
#define ICD_CLIENT_CPP_ICDCTL_READERS_H_

#include <cstdint>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace icd::ctl {

// The whole file at `path`; NOT_FOUND naming `what` when it cannot be read.
absl::StatusOr<std::string> ReadFile(const std::string& path, const std::string& what);

// A trace file opened for streaming: [rows, channels] of float32 or float64,
// read a chunk of rows at a time (never all at once).
class TraceFile {
 public:
  static absl::StatusOr<std::unique_ptr<TraceFile>> Open(const std::string& path,
                                                         int64_t channels_flag);

  int64_t rows() const { return rows_; }
  int64_t channels() const { return channels_; }
  const char* dtype() const { return item_bytes_ == 4 ? "float32" : "float64"; }

  // TraceRowSource: the next rows, at most max_rows.
  absl::StatusOr<int64_t> Next(int64_t max_rows, std::vector<float>& out);

 private:
  TraceFile() = default;
  std::ifstream in_;
  int64_t rows_ = 0, channels_ = 0, read_ = 0;
  int item_bytes_ = 4;
  std::vector<char> buffer_;
};

// Token ids from a file: text integers, or .npy int64/int32 (1-D or 2-D).
// `batch` is set from a 2-D .npy (0 otherwise).
struct TokenIds {
  std::vector<int64_t> ids;
  int64_t batch = 0;
};

// NOT_FOUND or INVALID_ARGUMENT naming `flag` and the file.
absl::StatusOr<TokenIds> ReadTokenFile(const std::string& flag, const std::string& path);

}  // namespace icd::ctl

#endif  // ICD_CLIENT_CPP_ICDCTL_READERS_H_
