// SplitMix64 (Steele, Lea, Flood 2014): a small seeded stream that gives the
// same numbers on every platform and standard library (std::shuffle and the
// std distributions do not), so every seeded result of the engine repeats.
#ifndef ICD_CORE_SRC_SPLITMIX64_H_
#define ICD_CORE_SRC_SPLITMIX64_H_

#include <cstdint>
#include <utility>
#include <vector>

namespace icd {

class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}

  uint64_t Next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }

  // In [0, bound); bound > 0. The modulo's bias is below 2^-40 for the
  // bounds used here and keeps the stream identical to the Python client's.
  int64_t Below(int64_t bound) {
    return static_cast<int64_t>(Next() % static_cast<uint64_t>(bound));
  }

  // Fisher-Yates from the back.
  void Shuffle(std::vector<int64_t>& items) {
    for (size_t i = items.size(); i > 1; --i) {
      std::swap(items[i - 1], items[static_cast<size_t>(Below(static_cast<int64_t>(i)))]);
    }
  }

  // 0 .. n-1 shuffled.
  std::vector<int64_t> Order(int64_t n) {
    std::vector<int64_t> order(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) order[static_cast<size_t>(i)] = i;
    Shuffle(order);
    return order;
  }

 private:
  uint64_t state_;
};

}  // namespace icd

#endif  // ICD_CORE_SRC_SPLITMIX64_H_
