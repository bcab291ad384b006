// icdctl's commands share the client and the output mode; capture and
// compute (traces to a permutation) live in icdctl_traces.cc, the others in
// icdctl.cc.
#ifndef ICD_CLIENT_CPP_ICDCTL_COMMANDS_H_
#define ICD_CLIENT_CPP_ICDCTL_COMMANDS_H_

#include "absl/status/status.h"
#include "icd/client/client.h"
#include "icdctl_flags.h"

namespace icd::ctl {

struct Context {
  Client* client;
  bool json;
};

// capture: CapturePermutation on the server's own forward (icdctl --help).
absl::Status Capture(const Line& line, Context& ctx);
// compute: ComputePermutation from local trace files (icdctl --help).
absl::Status Compute(const Line& line, Context& ctx);

}  // namespace icd::ctl

#endif  // ICD_CLIENT_CPP_ICDCTL_COMMANDS_H_
