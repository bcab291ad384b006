#include "icdctl_progress.h"

#include <chrono>
#include <cstdio>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace icd::ctl {

std::string NewRequestId() {
  std::random_device device;
  std::string id;
  for (int i = 0; i < 4; ++i) absl::StrAppend(&id, absl::Hex(device(), absl::kZeroPad8));
  return id;
}

ProgressLine::ProgressLine(std::unique_ptr<Client> client, std::string request_id)
    : client_(std::move(client)), request_id_(std::move(request_id)) {
  thread_ = std::thread([this] { Run(); });
}

ProgressLine::~ProgressLine() {
  stop_ = true;
  thread_.join();
  if (drawn_) std::fprintf(stderr, "\r\033[K");  // the line goes; the result follows
  std::fflush(stderr);
}

void ProgressLine::Run() {
  constexpr int kWidth = 24;
  while (!stop_) {
    for (int i = 0; i < 5 && !stop_; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (stop_) break;
    absl::StatusOr<v1::Progress> progress = client_->GetProgress(request_id_);
    if (!progress.ok() || progress->finished() || progress->stage().empty()) continue;
    std::string line = absl::StrCat(progress->rpc(), " ", progress->stage(), " ");
    if (progress->total() > 0) {
      const double share =
          std::min(1.0, static_cast<double>(progress->done()) / static_cast<double>(progress->total()));
      const int filled = static_cast<int>(share * kWidth);
      absl::StrAppend(&line, "[", std::string(filled, '#'), std::string(kWidth - filled, '.'),
                      "] ", progress->done(), "/", progress->total());
    } else {
      absl::StrAppend(&line, progress->done());
    }
    absl::StrAppend(&line, absl::StrFormat("  %.1f s", progress->elapsed_s()));
    std::fprintf(stderr, "\r\033[K%s", line.c_str());
    std::fflush(stderr);
    drawn_ = true;
  }
}

}  // namespace icd::ctl
