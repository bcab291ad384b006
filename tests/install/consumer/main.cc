// consumer ADDRESS MODEL_PATH: loads MODEL_PATH on the server at ADDRESS,
// lists its symmetry groups, applies the first group's reversal and verifies
// it; prints one line and exits 0 when every call succeeded and the check
// passed.
#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

#include "icd/client/client.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: consumer ADDRESS MODEL_PATH\n");
    return 2;
  }
  auto client = icd::Client::Connect(argv[1]);
  if (!client.ok()) {
    std::fprintf(stderr, "connect: %s\n", client.status().ToString().c_str());
    return 1;
  }
  auto info = (*client)->LoadModel("consumer", argv[2]);
  auto symmetries = info.ok() ? (*client)->GetSymmetries("consumer") : info.status();
  if (!symmetries.ok() || symmetries->groups_size() == 0) {
    std::fprintf(stderr, "load / symmetries: %s\n", symmetries.status().ToString().c_str());
    return 1;
  }
  // The residual group reversed: a permutation every group accepts.
  const icd::v1::Group& group = symmetries->groups(0);
  icd::v1::Permutation permutation;
  permutation.set_group(group.name());
  for (int64_t j = group.size() - 1; j >= 0; --j) permutation.add_index(j);
  auto report = (*client)->ApplyPermutation("consumer", {permutation});
  if (!report.ok() || !report->correctness().ok()) {
    std::fprintf(stderr, "apply: %s\n", report.status().ToString().c_str());
    return 1;
  }
  std::printf("consumer: %d groups; applied %s reversed, verified rel_l2 %.3g\n",
              symmetries->groups_size(), group.name().c_str(), report->correctness().rel_l2());
  return 0;
}
