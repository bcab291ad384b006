#include "engine/placement.h"

#include <algorithm>
#include <limits>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "io/config.h"

namespace icd::engine_internal {
namespace {

absl::Status Refused(const std::string& text, const std::string& fault) {
  return absl::InvalidArgumentError(absl::StrCat(
      "placement '", text, "': ", fault,
      " (expected \"auto\" or DEVICE=FIRST-LAST,... naming every layer once, in order)"));
}

}  // namespace

PlacementSizes SizesOf(const ModelConfig& config, int64_t element_bytes) {
  PlacementSizes sizes;
  sizes.layers.assign(static_cast<size_t>(std::max<int64_t>(config.n_layer, 0)), 0);
  for (const auto& [name, shape] : ExpectedShapes(config)) {
    int64_t bytes = element_bytes;
    for (const int64_t size : shape) bytes *= size;
    const int64_t layer = LayerOfTensor(name);
    if (layer >= 0 && layer < config.n_layer) {
      sizes.layers[static_cast<size_t>(layer)] += bytes;
    } else if (name == kEmbeddingTensor) {
      sizes.first += bytes;
    } else {
      sizes.last += bytes;
    }
  }
  return sizes;
}

absl::StatusOr<std::vector<LayerRange>> ParsePlacement(const std::string& text,
                                                       int64_t n_layer) {
  std::vector<LayerRange> ranges;
  int64_t next = 0;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    const std::vector<std::string> sides = absl::StrSplit(part, absl::MaxSplits('=', 1));
    if (sides.size() != 2 || sides[0].empty() || sides[1].empty()) {
      return Refused(text, absl::StrCat("'", part, "' is not DEVICE=FIRST-LAST"));
    }
    LayerRange range;
    range.device = sides[0];
    const std::vector<std::string> ends = absl::StrSplit(sides[1], absl::MaxSplits('-', 1));
    if (!absl::SimpleAtoi(ends[0], &range.first) ||
        !absl::SimpleAtoi(ends.size() == 2 ? ends[1] : ends[0], &range.last)) {
      return Refused(text, absl::StrCat("'", sides[1], "' is not a layer range"));
    }
    if (range.first != next || range.last < range.first) {
      return Refused(text, absl::StrCat("range ", range.first, "-", range.last, " of ",
                                        range.device, " should start at layer ", next,
                                        " and not end before it starts"));
    }
    if (range.last >= n_layer) {
      return Refused(text, absl::StrCat("layer ", range.last, " past the model's ", n_layer,
                                        " layers"));
    }
    next = range.last + 1;
    ranges.push_back(std::move(range));
  }
  if (next != n_layer) {
    return Refused(text, absl::StrCat("layers ", next, "-", n_layer - 1, " are on no device"));
  }
  return ranges;
}

absl::StatusOr<std::vector<LayerRange>> BalancePlacement(
    const PlacementSizes& sizes, const std::vector<std::string>& devices,
    const std::vector<int64_t>& capacities) {
  const auto n = static_cast<int64_t>(sizes.layers.size());
  const auto k = static_cast<int64_t>(devices.size());
  if (k == 0 || n == 0) return std::vector<LayerRange>{};
  const bool by_capacity =
      capacities.size() == devices.size() &&
      std::all_of(capacities.begin(), capacities.end(), [](int64_t c) { return c > 0; });
  // prefix[i]: bytes of layers [0, i), the embedding counted with layer 0
  // and the tail with the last layer.
  std::vector<int64_t> prefix(static_cast<size_t>(n) + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    int64_t bytes = sizes.layers[static_cast<size_t>(i)];
    if (i == 0) bytes += sizes.first;
    if (i == n - 1) bytes += sizes.last;
    prefix[static_cast<size_t>(i) + 1] = prefix[static_cast<size_t>(i)] + bytes;
  }
  const auto span = [&](int64_t from, int64_t to) {  // layers [from, to)
    return prefix[static_cast<size_t>(to)] - prefix[static_cast<size_t>(from)];
  };
  // The load of device j holding layers [from, to): its bytes, or the
  // fraction of its free bytes they fill.
  const auto load = [&](int64_t j, int64_t from, int64_t to) {
    const auto bytes = static_cast<double>(span(from, to));
    return by_capacity ? bytes / static_cast<double>(capacities[static_cast<size_t>(j)]) : bytes;
  };
  // best[j][i]: the smallest largest load splitting layers [0, i) over the
  // first j devices; cut[j][i] where device j-1's part starts (i: it holds
  // nothing, as a device with no room must). A part is left empty only when
  // that is strictly better. n and k are small (layers, GPUs of one node).
  constexpr double kNone = std::numeric_limits<double>::infinity();
  std::vector<std::vector<double>> best(
      static_cast<size_t>(k) + 1, std::vector<double>(static_cast<size_t>(n) + 1, kNone));
  std::vector<std::vector<int64_t>> cut(
      static_cast<size_t>(k) + 1, std::vector<int64_t>(static_cast<size_t>(n) + 1, 0));
  best[0][0] = 0;
  for (int64_t j = 1; j <= k; ++j) {
    for (int64_t i = 0; i <= n; ++i) {
      best[static_cast<size_t>(j)][static_cast<size_t>(i)] =
          best[static_cast<size_t>(j) - 1][static_cast<size_t>(i)];
      cut[static_cast<size_t>(j)][static_cast<size_t>(i)] = i;
      for (int64_t from = 0; from < i; ++from) {
        const double before = best[static_cast<size_t>(j) - 1][static_cast<size_t>(from)];
        if (before == kNone) continue;
        const double largest = std::max(before, load(j - 1, from, i));
        if (largest < best[static_cast<size_t>(j)][static_cast<size_t>(i)]) {
          best[static_cast<size_t>(j)][static_cast<size_t>(i)] = largest;
          cut[static_cast<size_t>(j)][static_cast<size_t>(i)] = from;
        }
      }
    }
  }
  if (by_capacity && best[static_cast<size_t>(k)][static_cast<size_t>(n)] > 1.0) {
    int64_t free = 0;
    for (int64_t j = 0; j < k; ++j) free += capacities[static_cast<size_t>(j)];
    return absl::ResourceExhaustedError(absl::StrCat(
        "placement 'auto': the model's ", span(0, n), " bytes of weights do not fit the ",
        free, " bytes free on ", k, " device(s) in layer ranges (the fullest would be ",
        static_cast<int64_t>(100 * best[static_cast<size_t>(k)][static_cast<size_t>(n)]),
        "% full); unload a model, or load it in a smaller dtype"));
  }
  std::vector<LayerRange> ranges;
  int64_t end = n;
  for (int64_t j = k; j >= 1; --j) {
    const int64_t from = cut[static_cast<size_t>(j)][static_cast<size_t>(end)];
    if (from == end) continue;  // this device holds nothing
    LayerRange range;
    range.device = devices[static_cast<size_t>(j) - 1];
    range.first = from;
    range.last = end - 1;
    range.bytes = span(from, end);
    ranges.insert(ranges.begin(), std::move(range));
    end = from;
  }
  return ranges;
}

void CountRangeBytes(const PlacementSizes& sizes, std::vector<LayerRange>* ranges) {
  for (LayerRange& range : *ranges) {
    range.bytes = 0;
    for (int64_t layer = range.first; layer <= range.last; ++layer) {
      range.bytes += sizes.layers[static_cast<size_t>(layer)];
    }
  }
  if (ranges->empty()) return;
  ranges->front().bytes += sizes.first;
  ranges->back().bytes += sizes.last;
}

std::map<std::string, int64_t> BytesByDevice(const std::vector<LayerRange>& ranges) {
  std::map<std::string, int64_t> parts;
  for (const LayerRange& range : ranges) parts[range.device] += range.bytes;
  return parts;
}

const LayerRange& RangeOfTensor(const std::string& name,
                                const std::vector<LayerRange>& placement) {
  if (name == kEmbeddingTensor) return placement.front();
  const int64_t layer = LayerOfTensor(name);
  if (layer < 0) return placement.back();
  for (const LayerRange& range : placement) {
    if (layer <= range.last) return range;
  }
  return placement.back();
}

}  // namespace icd::engine_internal
