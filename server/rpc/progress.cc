#include "progress.h"

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"

namespace icd::rpc {

absl::StatusOr<std::shared_ptr<ProgressRegistry::Entry>> ProgressRegistry::Begin(
    const std::string& request_id, absl::string_view rpc) {
  if (request_id.empty() || request_id.size() > 256) {
    return absl::InvalidArgumentError(absl::StrCat(
        kRequestIdHeader, ": a request ID of 1 to 256 bytes, got ", request_id.size()));
  }
  const auto now = std::chrono::steady_clock::now();
  const std::lock_guard<std::mutex> lock(mutex_);
  Evict(now);
  auto found = entries_.find(request_id);
  if (found != entries_.end()) {
    const std::lock_guard<std::mutex> entry_lock(found->second->mutex_);
    if (!found->second->state_.finished) {
      return absl::AlreadyExistsError(absl::StrCat(
          kRequestIdHeader, ": another call with this ID is running; use one ID per call"));
    }
  }
  auto entry = std::make_shared<Entry>();
  entry->state_.request_id = request_id;
  entry->state_.rpc = std::string(rpc);
  entry->started_ = now;
  entries_[request_id] = entry;
  return entry;
}

void ProgressRegistry::Entry::Report(absl::string_view stage, int64_t done, int64_t total) {
  const std::lock_guard<std::mutex> lock(mutex_);
  state_.stage = std::string(stage);
  state_.done = done;
  state_.total = total;
}

void ProgressRegistry::Finish(Entry& entry, absl::StatusCode code) {
  const std::lock_guard<std::mutex> lock(entry.mutex_);
  entry.state_.finished = true;
  entry.state_.code = code;
  entry.ended_ = std::chrono::steady_clock::now();
}

std::optional<ProgressSnapshot> ProgressRegistry::Get(const std::string& request_id) const {
  std::shared_ptr<Entry> entry;
  {
    const std::lock_guard<std::mutex> lock(mutex_);
    auto found = entries_.find(request_id);
    if (found == entries_.end()) return std::nullopt;
    entry = found->second;
  }
  const std::lock_guard<std::mutex> lock(entry->mutex_);
  const auto now = std::chrono::steady_clock::now();
  if (entry->state_.finished && now - entry->ended_ > kKeepFinished) return std::nullopt;
  ProgressSnapshot snapshot = entry->state_;
  snapshot.elapsed_s = std::chrono::duration<double>(
                           (entry->state_.finished ? entry->ended_ : now) - entry->started_)
                           .count();
  return snapshot;
}

void ProgressRegistry::Evict(std::chrono::steady_clock::time_point now) {
  // Finished entries past their time; then, over the cap, the oldest
  // finished ones. Running calls are never dropped (at most the server's
  // threads run at once).
  std::vector<std::pair<std::chrono::steady_clock::time_point, std::string>> finished;
  for (auto it = entries_.begin(); it != entries_.end();) {
    std::unique_lock<std::mutex> entry_lock(it->second->mutex_);
    if (it->second->state_.finished && now - it->second->ended_ > kKeepFinished) {
      entry_lock.unlock();
      it = entries_.erase(it);
      continue;
    }
    if (it->second->state_.finished) finished.emplace_back(it->second->ended_, it->first);
    ++it;
  }
  if (entries_.size() < kMaxEntries) return;
  std::sort(finished.begin(), finished.end());
  for (const auto& [ended, id] : finished) {
    if (entries_.size() < kMaxEntries) break;
    entries_.erase(id);
  }
}

}  // namespace icd::rpc
