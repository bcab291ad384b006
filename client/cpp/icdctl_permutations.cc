#include "icdctl_permutations.h"

#include <algorithm>
#include <map>
#include <numeric>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace icd::ctl {

uint64_t SplitMix64::Next() {
  state_ += 0x9E3779B97F4A7C15ULL;
  uint64_t z = state_;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

namespace {

// Fisher-Yates from the back: item i swaps with item next() % (i + 1).
void Shuffle(std::vector<int64_t>& items, SplitMix64& rng) {
  for (size_t i = items.size(); i > 1; --i) {
    const size_t j = static_cast<size_t>(rng.Next() % static_cast<uint64_t>(i));
    std::swap(items[i - 1], items[j]);
  }
}

std::vector<int64_t> Iota(int64_t n) {
  std::vector<int64_t> v(static_cast<size_t>(n));
  std::iota(v.begin(), v.end(), int64_t{0});
  return v;
}

}  // namespace

absl::StatusOr<std::vector<int64_t>> RandomPermutation(const v1::Group& group,
                                                       SplitMix64& rng) {
  const int64_t n = group.size();
  const int64_t b = group.block() > 0 ? group.block() : n;
  const int64_t w = group.whole() > 0 ? group.whole() : 1;
  if (n <= 0 || n % b != 0 || b % w != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "group '", group.name(), "': cannot draw a permutation for size ", n,
        ", block ", group.block(), ", whole ", group.whole(),
        " (block must divide size and whole must divide block)"));
  }
  std::vector<int64_t> index(static_cast<size_t>(n));
  const int64_t chunks = b / w;  // chunks of w per block
  for (int64_t block = 0; block < n / b; ++block) {
    std::vector<int64_t> order = Iota(chunks);
    Shuffle(order, rng);
    for (int64_t c = 0; c < chunks; ++c) {
      std::vector<int64_t> inner = Iota(w);
      Shuffle(inner, rng);
      const int64_t out = (block * chunks + c) * w;
      const int64_t src = (block * chunks + order[static_cast<size_t>(c)]) * w;
      for (int64_t i = 0; i < w; ++i) {
        index[static_cast<size_t>(out + i)] = src + inner[static_cast<size_t>(i)];
      }
    }
  }
  return index;
}

absl::StatusOr<std::vector<v1::Permutation>> RandomPermutations(
    const v1::Symmetries& symmetries, const std::vector<std::string>& groups,
    uint64_t seed) {
  std::map<std::string, const v1::Group*> by_name;
  for (const auto& g : symmetries.groups()) by_name[g.name()] = &g;
  std::vector<const v1::Group*> chosen;
  if (groups.empty()) {
    for (const auto& g : symmetries.groups()) chosen.push_back(&g);
  } else {
    for (const auto& name : groups) {
      auto it = by_name.find(name);
      if (it == by_name.end()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "unknown group '", name, "' (model ", symmetries.model(), " has ",
            symmetries.groups_size(), " groups; see `icdctl symmetries`)"));
      }
      chosen.push_back(it->second);
    }
  }
  SplitMix64 rng(seed);
  std::vector<v1::Permutation> out;
  for (const v1::Group* g : chosen) {
    auto index = RandomPermutation(*g, rng);
    if (!index.ok()) return index.status();
    v1::Permutation p;
    p.set_group(g->name());
    for (int64_t v : *index) p.add_index(v);
    out.push_back(std::move(p));
  }
  return out;
}

namespace {

absl::StatusOr<v1::Permutation> ToPermutation(const std::string& group,
                                              const nlohmann::ordered_json& index) {
  if (!index.is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat("group '", group, "': expected an array of indices"));
  }
  v1::Permutation p;
  p.set_group(group);
  for (const auto& v : index) {
    if (!v.is_number_integer()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "group '", group, "': index ", v.dump(), " is not an integer"));
    }
    p.add_index(v.get<int64_t>());
  }
  return p;
}

}  // namespace

absl::StatusOr<std::vector<v1::Permutation>> ParsePermutationJson(
    const std::string& text, const std::vector<std::string>& only) {
  const auto doc = nlohmann::ordered_json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) {
    return absl::InvalidArgumentError("permutation file: not valid JSON");
  }
  std::vector<v1::Permutation> all;
  if (doc.is_object()) {
    for (const auto& [group, index] : doc.items()) {
      auto p = ToPermutation(group, index);
      if (!p.ok()) return p.status();
      all.push_back(*std::move(p));
    }
  } else if (doc.is_array()) {
    for (const auto& entry : doc) {
      if (!entry.is_object() || !entry.contains("group") || !entry["group"].is_string() ||
          !entry.contains("index")) {
        return absl::InvalidArgumentError(
            "permutation file: array entries must be {\"group\": NAME, \"index\": [...]}");
      }
      auto p = ToPermutation(entry["group"].get<std::string>(), entry["index"]);
      if (!p.ok()) return p.status();
      all.push_back(*std::move(p));
    }
  } else {
    return absl::InvalidArgumentError(
        "permutation file: expected {\"group\": [indices...], ...}");
  }
  if (only.empty()) return all;
  std::vector<v1::Permutation> kept;
  for (const auto& name : only) {
    const bool present = std::any_of(all.begin(), all.end(),
                                     [&](const v1::Permutation& p) { return p.group() == name; });
    if (!present) {
      return absl::InvalidArgumentError(
          absl::StrCat("--groups names '", name, "', which the permutation file lacks"));
    }
  }
  for (auto& p : all) {
    if (std::find(only.begin(), only.end(), p.group()) != only.end()) kept.push_back(p);
  }
  return kept;
}

}  // namespace icd::ctl
