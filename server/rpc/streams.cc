#include "streams.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace icd::rpc {

using Clock = std::chrono::steady_clock;

StreamSlot::StreamSlot(StreamLimiter* limiter, grpc::ServerContext* context)
    : limiter_(limiter), context_(context), last_ns_(Now()) {}

StreamSlot::~StreamSlot() { limiter_->Close(this); }

int64_t StreamSlot::Now() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}

void StreamSlot::Touch() { last_ns_.store(Now()); }

absl::Status StreamSlot::IdleStatus(const char* rpc) const {
  return absl::DeadlineExceededError(absl::StrCat(
      rpc, ": no message for ", static_cast<double>(limiter_->idle_timeout().count()) / 1000.0,
      " s; the stream was cancelled (icd-server --stream-idle-timeout-s)"));
}

StreamLimiter::StreamLimiter(int max_streams, std::chrono::milliseconds idle_timeout)
    : max_streams_(max_streams), idle_timeout_(idle_timeout) {
  if (idle_timeout_.count() > 0) watchdog_ = std::thread([this] { Watch(); });
}

StreamLimiter::~StreamLimiter() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (watchdog_.joinable()) watchdog_.join();
}

absl::StatusOr<std::unique_ptr<StreamSlot>> StreamLimiter::Open(grpc::ServerContext* context,
                                                                 const char* rpc) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (max_streams_ > 0 && open_.size() >= static_cast<size_t>(max_streams_)) {
    return absl::ResourceExhaustedError(absl::StrCat(
        rpc, ": ", open_.size(), " streams are open, this server's limit (icd-server "
        "--max-streams); finish or cancel one first"));
  }
  std::unique_ptr<StreamSlot> slot(new StreamSlot(this, context));
  open_.insert(slot.get());
  return slot;
}

void StreamLimiter::Close(StreamSlot* slot) {
  std::lock_guard<std::mutex> lock(mutex_);
  open_.erase(slot);
}

void StreamLimiter::Watch() {
  const auto period = std::clamp<std::chrono::milliseconds>(
      idle_timeout_ / 4, std::chrono::milliseconds(10), std::chrono::milliseconds(1000));
  const int64_t limit_ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(idle_timeout_).count();
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stopping_) {
    wake_.wait_for(lock, period);
    const int64_t now = StreamSlot::Now();
    // Under the lock: a slot (and its call) lives until Close takes it.
    for (StreamSlot* slot : open_) {
      if (!slot->timed_out_.load() && now - slot->last_ns_.load() > limit_ns) {
        slot->timed_out_.store(true);
        slot->context_->TryCancel();
      }
    }
  }
}

}  // namespace icd::rpc
