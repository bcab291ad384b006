// icdctl's permutation sources: a JSON file of gather indices, or a seeded
// random valid permutation of each group.
//
// The random draw is specified bit for bit so that the Python client
// (icd_client.random_permutations) draws the same permutations from the same
// seed: one SplitMix64 stream seeded with SEED serves the groups in order; a
// shuffle of n items is Fisher-Yates from the back, swapping item i with item
// next() % (i + 1). For a group of size n, block b (0: n) and whole w (0: 1),
// each block of b indices is cut into b / w chunks of w; the chunks of a block
// are shuffled (chunk order), then each output chunk's w indices are shuffled.
// Every index stays in its block, and every chunk of w takes its indices from
// one source chunk of w: the constraints of design.md.
#ifndef ICD_CLIENT_ICDCTL_PERMUTATIONS_H_
#define ICD_CLIENT_ICDCTL_PERMUTATIONS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "icd/v1/permutation.pb.h"

namespace icd::ctl {

// SplitMix64 (Steele, Lea, Flood 2014): small, seedable, identical in Python.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t Next();

 private:
  uint64_t state_;
};

// A random valid permutation of one group (see the file comment).
absl::StatusOr<std::vector<int64_t>> RandomPermutation(const v1::Group& group,
                                                       SplitMix64& rng);

// Random permutations of `groups` (names, in this order; empty: every group
// of `symmetries`, in its order), one SplitMix64 stream seeded with `seed`.
absl::StatusOr<std::vector<v1::Permutation>> RandomPermutations(
    const v1::Symmetries& symmetries, const std::vector<std::string>& groups,
    uint64_t seed);

// Parses a permutation file: a JSON object {"group": [indices...], ...} whose
// entries are applied in file order, or a JSON array of
// {"group": "...", "index": [...]} objects. With `only` non-empty, keeps the
// named groups (in file order) and fails if one of them is missing.
absl::StatusOr<std::vector<v1::Permutation>> ParsePermutationJson(
    const std::string& text, const std::vector<std::string>& only);

}  // namespace icd::ctl

#endif  // ICD_CLIENT_ICDCTL_PERMUTATIONS_H_
