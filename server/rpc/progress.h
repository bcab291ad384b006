// Progress of calls that carry the metadata header "x-icd-request-id": the
// service registers them here (Begin ... Finish), core reports their steps
// through CallContext::progress, and GetProgress reads them, while they run
// and for kKeepFinished after they end. Thread-safe; bounded (the oldest
// finished entries go first, and at most kMaxEntries are kept).
#ifndef ICD_RPC_PROGRESS_H_
#define ICD_RPC_PROGRESS_H_

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace icd::rpc {

inline constexpr char kRequestIdHeader[] = "x-icd-request-id";

struct ProgressSnapshot {
  std::string request_id, rpc, stage;
  int64_t done = 0, total = 0;
  double elapsed_s = 0;
  bool finished = false;
  absl::StatusCode code = absl::StatusCode::kOk;
};

class ProgressRegistry {
 public:
  static constexpr std::chrono::seconds kKeepFinished{60};
  static constexpr size_t kMaxEntries = 4096;

  class Entry;
  // A call with `request_id` begins: a new entry (replacing a finished one
  // of the same ID). AlreadyExists while another call with that ID runs;
  // InvalidArgument for an empty or over-long ID (256 bytes).
  absl::StatusOr<std::shared_ptr<Entry>> Begin(const std::string& request_id,
                                               absl::string_view rpc);
  void Finish(Entry& entry, absl::StatusCode code);
  std::optional<ProgressSnapshot> Get(const std::string& request_id) const;

  class Entry {
   public:
    void Report(absl::string_view stage, int64_t done, int64_t total);

   private:
    friend class ProgressRegistry;
    mutable std::mutex mutex_;
    ProgressSnapshot state_;
    std::chrono::steady_clock::time_point started_, ended_;
  };

 private:
  void Evict(std::chrono::steady_clock::time_point now);  // mutex_ held
  mutable std::mutex mutex_;
  std::map<std::string, std::shared_ptr<Entry>> entries_;
};

}  // namespace icd::rpc

#endif  // ICD_RPC_PROGRESS_H_
