// icdctl's progress line: while a long command (load, capture, compute,
// latency) runs on a terminal, a thread asks the server how far the call is
// (GetProgress, the call carrying ClientOptions::request_id) and redraws one
// line on stderr; nothing under --json or when stderr is not a terminal.
#ifndef ICD_CLIENT_CPP_ICDCTL_PROGRESS_H_
#define ICD_CLIENT_CPP_ICDCTL_PROGRESS_H_

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "icd/client/client.h"

namespace icd::ctl {

// A fresh request ID: 32 hex digits from the system's random source.
std::string NewRequestId();

class ProgressLine {
 public:
  // Polls `client` (a connection of its own: the command's call blocks the
  // other) for `request_id` every 250 ms until destroyed, then clears the
  // line.
  ProgressLine(std::unique_ptr<Client> client, std::string request_id);
  ~ProgressLine();
  ProgressLine(const ProgressLine&) = delete;
  ProgressLine& operator=(const ProgressLine&) = delete;

 private:
  void Run();
  std::unique_ptr<Client> client_;
  std::string request_id_;
  std::atomic<bool> stop_{false};
  bool drawn_ = false;
  std::thread thread_;
};

}  // namespace icd::ctl

#endif  // ICD_CLIENT_CPP_ICDCTL_PROGRESS_H_
