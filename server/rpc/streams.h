// Bounds on streaming calls. A sync gRPC server spends one thread per call
// for as long as its handler runs, and a stream's handler runs while it waits
// for the client's next message: idle streams alone could hold every thread.
// So streams are capped below the thread count (unary calls and health keep
// theirs), and a stream that neither sends nor takes a message for the idle
// timeout is cancelled.
#ifndef ICD_RPC_STREAMS_H_
#define ICD_RPC_STREAMS_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <set>
#include <thread>

#include <grpcpp/server_context.h>

#include "absl/status/statusor.h"

namespace icd::rpc {

class StreamLimiter;

// One open stream's place. Destroyed before its handler returns.
class StreamSlot {
 public:
  ~StreamSlot();
  StreamSlot(const StreamSlot&) = delete;
  StreamSlot& operator=(const StreamSlot&) = delete;

  // A message came in or went out: the idle clock starts again.
  void Touch();
  // Whether the limiter cancelled the call for idleness; then the handler's
  // status, DeadlineExceeded, says so (the client sees CANCELLED).
  bool timed_out() const { return timed_out_.load(); }
  absl::Status IdleStatus(const char* rpc) const;

 private:
  friend class StreamLimiter;
  StreamSlot(StreamLimiter* limiter, grpc::ServerContext* context);
  static int64_t Now();

  StreamLimiter* limiter_;
  grpc::ServerContext* context_;
  std::atomic<int64_t> last_ns_;
  std::atomic<bool> timed_out_{false};
};

class StreamLimiter {
 public:
  // max_streams 0: no cap; idle_timeout zero: streams may idle forever.
  StreamLimiter(int max_streams, std::chrono::milliseconds idle_timeout);
  ~StreamLimiter();  // no slot may outlive it
  StreamLimiter(const StreamLimiter&) = delete;
  StreamLimiter& operator=(const StreamLimiter&) = delete;

  // A slot for a stream of `rpc`, or ResourceExhausted (naming the flag)
  // when max_streams are open.
  absl::StatusOr<std::unique_ptr<StreamSlot>> Open(grpc::ServerContext* context, const char* rpc);

  std::chrono::milliseconds idle_timeout() const { return idle_timeout_; }

 private:
  friend class StreamSlot;
  void Close(StreamSlot* slot);
  void Watch();  // the watchdog thread

  const int max_streams_;
  const std::chrono::milliseconds idle_timeout_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::set<StreamSlot*> open_;  // guarded by mutex_
  bool stopping_ = false;       // guarded by mutex_
  std::thread watchdog_;
};

}  // namespace icd::rpc

#endif  // ICD_RPC_STREAMS_H_
