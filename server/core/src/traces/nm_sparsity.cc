#include "traces/nm_sparsity.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <exception>
#include <limits>
#include <map>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "icd/core/status_macros.h"

namespace icd::traces {
namespace {

// Stripes per assignment set: the Hungarian step is O(set³) on the host and
// the gain matrix O(set² · rows) on the device; 32 keeps both small.
constexpr int64_t kAssignmentSet = 32;
// Pair move: at most this many splits of a pair's 2m columns are evaluated.
constexpr int64_t kMaxSplits = 70;
// Pair move: all pairs of stripes of each block are kept evaluated when a
// full evaluation costs at most this many scalar evaluations; else a random
// perfect matching each round.
constexpr double kAllPairsWork = 4e7;
// Elements of one temporary (8 MiB in float32). Temporaries this small are
// reused by the allocator; large fresh ones cost page faults, which dominate
// on some hosts.
constexpr int64_t kBatchElements = int64_t{1} << 21;
// Automatic rounds: about this many scalar evaluations in all, within bounds.
constexpr double kWorkBudget = 1.2e10;
constexpr int64_t kMinRounds = 16;
constexpr int64_t kMaxRounds = 400;
// A descent ends after this many consecutive rounds without improvement.
constexpr int64_t kPatience = 6;
// A kick re-deals the columns of this many random stripes of one block.
constexpr int64_t kKickStripes = 3;

// Portable, seeded stream (splitmix64): the same on every platform and
// standard library, unlike std::shuffle and the std distributions.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed ^ 0x4e4d5065726d7574ULL) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  int64_t Below(int64_t bound) {
    return static_cast<int64_t>(Next() % static_cast<uint64_t>(bound));
  }
  void Shuffle(std::vector<int64_t>& items) {
    for (size_t i = items.size(); i > 1; --i) {
      std::swap(items[i - 1], items[static_cast<size_t>(Below(static_cast<int64_t>(i)))]);
    }
  }

 private:
  uint64_t state_;
};

torch::Tensor IndexTensor(const std::vector<int64_t>& values, torch::Device device) {
  return torch::tensor(values, torch::dtype(torch::kInt64)).to(device);
}

// Rows per chunk when a row holds `width` elements.
int64_t ChunkRows(int64_t width) { return std::max<int64_t>(1, kBatchElements / width); }

// The n largest entries along `dim` of x, largest first, each with `dim`
// removed: an insertion network of elementwise max/min. For the small m of
// N:M patterns it is several times faster than topk, on any device.
std::vector<torch::Tensor> TopN(const torch::Tensor& x, int64_t n, int64_t dim) {
  std::vector<torch::Tensor> top;
  for (int64_t j = 0; j < x.size(dim); ++j) {
    torch::Tensor carry = x.select(dim, j);
    for (size_t k = 0; k < top.size(); ++k) {
      torch::Tensor larger = torch::max(top[k], carry);
      // Once the list is full its last loser drops out: not computed.
      if (k + 1 < top.size() || static_cast<int64_t>(top.size()) < n) {
        carry = torch::min(top[k], carry);
      }
      top[k] = std::move(larger);
    }
    if (static_cast<int64_t>(top.size()) < n) top.push_back(carry);
  }
  return top;
}

// Σ of the n largest entries along `dim` of x.
torch::Tensor TopNSum(const torch::Tensor& x, int64_t n, int64_t dim) {
  if (n * x.size(dim) > 64) {
    return std::get<0>(x.topk(n, dim, /*largest=*/true, /*sorted=*/false)).sum(dim);
  }
  std::vector<torch::Tensor> top = TopN(x, n, dim);
  torch::Tensor sum = top[0].clone();
  for (size_t k = 1; k < top.size(); ++k) sum += top[k];
  return sum;
}

// Minimum-cost perfect assignment of a square matrix (row-major, size
// rows²): shortest augmenting paths with potentials, O(rows³).
// Returns assign[row] = column.
std::vector<int64_t> MinCostAssignment(const std::vector<double>& cost, int64_t size) {
  const double inf = std::numeric_limits<double>::infinity();
  const auto at = [&](int64_t row, int64_t col) {
    return cost[static_cast<size_t>((row - 1) * size + (col - 1))];
  };
  // 1-based; column 0 is the virtual start of each augmenting path.
  std::vector<double> row_potential(static_cast<size_t>(size + 1), 0);
  std::vector<double> col_potential(static_cast<size_t>(size + 1), 0);
  std::vector<int64_t> row_of_col(static_cast<size_t>(size + 1), 0);
  std::vector<int64_t> previous_col(static_cast<size_t>(size + 1), 0);
  for (int64_t row = 1; row <= size; ++row) {
    row_of_col[0] = row;
    int64_t col = 0;
    std::vector<double> slack(static_cast<size_t>(size + 1), inf);
    std::vector<bool> visited(static_cast<size_t>(size + 1), false);
    do {
      visited[static_cast<size_t>(col)] = true;
      const int64_t path_row = row_of_col[static_cast<size_t>(col)];
      double delta = inf;
      int64_t next_col = 0;
      for (int64_t c = 1; c <= size; ++c) {
        const auto uc = static_cast<size_t>(c);
        if (visited[uc]) continue;
        const double reduced = at(path_row, c) - row_potential[static_cast<size_t>(path_row)] -
                               col_potential[uc];
        if (reduced < slack[uc]) {
          slack[uc] = reduced;
          previous_col[uc] = col;
        }
        if (slack[uc] < delta) {
          delta = slack[uc];
          next_col = c;
        }
      }
      for (int64_t c = 0; c <= size; ++c) {
        const auto uc = static_cast<size_t>(c);
        if (visited[uc]) {
          row_potential[static_cast<size_t>(row_of_col[uc])] += delta;
          col_potential[uc] -= delta;
        } else {
          slack[uc] -= delta;
        }
      }
      col = next_col;
    } while (row_of_col[static_cast<size_t>(col)] != 0);
    // Flip the augmenting path.
    do {
      const int64_t from = previous_col[static_cast<size_t>(col)];
      row_of_col[static_cast<size_t>(col)] = row_of_col[static_cast<size_t>(from)];
      col = from;
    } while (col != 0);
  }
  std::vector<int64_t> assign(static_cast<size_t>(size), 0);
  for (int64_t c = 1; c <= size; ++c) {
    assign[static_cast<size_t>(row_of_col[static_cast<size_t>(c)] - 1)] = c - 1;
  }
  return assign;
}

absl::Status Validate(const torch::Tensor& saliency, const NmOptions& options) {
  if (options.n < 1) {
    return absl::InvalidArgumentError(absl::StrCat("N:M: n must be at least 1, got ", options.n));
  }
  if (options.m <= options.n) {
    return absl::InvalidArgumentError(absl::StrCat("N:M: m must exceed n, got ", options.n, ":",
                                                   options.m));
  }
  if (options.rounds < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("N:M: rounds must be >= 0 (0: automatic), got ", options.rounds));
  }
  if (!saliency.defined() || saliency.dim() != 2) {
    return absl::InvalidArgumentError("N:M: saliency must be a 2-D [rows, channels] tensor");
  }
  if (saliency.scalar_type() != torch::kFloat32 && saliency.scalar_type() != torch::kFloat64) {
    return absl::InvalidArgumentError(absl::StrCat(
        "N:M: saliency must be float32 or float64, got ",
        std::string(c10::toString(saliency.scalar_type()))));
  }
  const int64_t rows = saliency.size(0), channels = saliency.size(1);
  if (rows == 0 || channels == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("N:M: saliency is empty (", rows, " x ", channels, ")"));
  }
  if (channels % options.m != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "N:M: ", channels, " channels are not a multiple of m = ", options.m,
        " (a trailing partial group is not supported)"));
  }
  if (options.block < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("N:M: block must be >= 0 (0: none), got ", options.block));
  }
  if (options.block > 0 && (options.block % options.m != 0 || channels % options.block != 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "N:M: block ", options.block, " must be a multiple of m = ", options.m,
        " and divide the ", channels, " channels"));
  }
  // min and max propagate NaN; by row chunks, so no full-size temporary.
  const int64_t chunk_rows = ChunkRows(channels);
  for (int64_t first = 0; first < rows; first += chunk_rows) {
    const torch::Tensor chunk = saliency.narrow(0, first, std::min(chunk_rows, rows - first));
    const double smallest = chunk.min().item<double>();
    const double largest = chunk.max().item<double>();
    if (!(smallest >= 0) || !std::isfinite(largest)) {
      return absl::InvalidArgumentError("N:M: saliency must be finite and non-negative");
    }
  }
  return absl::OkStatus();
}

// One rearrangement: position dst[i] takes the column now at position src[i].
struct Move {
  std::vector<int64_t> dst, src;
};

// Local search over column orders of one saliency matrix. Every move is
// evaluated exactly (up to float rounding, guarded by a tolerance) and
// applied only where it keeps more.
class NmSearch {
 public:
  NmSearch(const torch::Tensor& saliency, const NmOptions& options,
           const std::vector<int64_t>& start)
      : n_(options.n),
        m_(options.m),
        rows_(saliency.size(0)),
        stripes_(saliency.size(1) / options.m),
        stripes_per_block_((options.block > 0 ? options.block : saliency.size(1)) / options.m),
        device_(saliency.device()),
        order_(start),
        rng_(options.seed),
        dirty_(static_cast<size_t>(stripes_), true) {
    // Columns as rows, so that a stripe is a contiguous [m, rows] slab.
    columns_ = torch::empty({saliency.size(1), rows_}, saliency.options());
    const int64_t chunk = ChunkRows(rows_);
    for (int64_t first = 0; first < saliency.size(1); first += chunk) {
      const int64_t length = std::min(chunk, saliency.size(1) - first);
      const std::vector<int64_t> sources(order_.begin() + first, order_.begin() + first + length);
      columns_.narrow(0, first, length).copy_(
          saliency.index_select(1, IndexTensor(sources, device_)).t());
    }
    // float32 sums of a few thousand terms are good to ~1e-7 relative: gains
    // below 1e-6 of what is at stake are rounding, not improvements.
    relative_tolerance_ = saliency.scalar_type() == torch::kFloat32 ? 1e-6 : 1e-11;
    BuildSplits();
    all_pairs_ = static_cast<double>(stripes_) * static_cast<double>(stripes_per_block_ - 1) / 2 *
                     PairCost() <= kAllPairsWork;
    stripe_scale_ = Kept() / static_cast<double>(stripes_);
    if (all_pairs_) {
      const auto entries = static_cast<size_t>(stripes_ * stripes_per_block_);
      pair_gain_.assign(entries, 0);
      pair_split_.assign(entries, 0);
    }
  }

  const std::vector<int64_t>& order() const { return order_; }

  // Scalar evaluations of one round, roughly.
  double WorkPerRound() const {
    const double set = static_cast<double>(std::min(kAssignmentSet, stripes_per_block_));
    const double assignment = static_cast<double>(stripes_) * set * static_cast<double>(rows_);
    // All pairs: after the first round only pairs of changed stripes.
    const double pairs = static_cast<double>(stripes_) * (all_pairs_ ? 1.0 : 0.5);
    return assignment + pairs * PairCost();
  }

  // Rounds without improvement that end a descent: every pair was examined
  // (all pairs each round, or about one random matching per other stripe).
  int64_t Patience() const {
    return all_pairs_ ? kPatience : std::max(kPatience, stripes_per_block_ - 1);
  }

  // An assignment move, then a pair move. Returns whether either improved.
  bool Round() {
    bool improved = false;
    for (int move = 0; move < 2; ++move) {
      const std::vector<Move> moves = move == 0 ? AssignmentMoves() : PairMoves();
      if (moves.empty()) continue;
      Apply(moves);
      improved = true;
    }
    return improved;
  }

  // Saliency the current order keeps (float64).
  double Kept() const {
    double kept = 0;
    const int64_t chunk = std::max<int64_t>(1, kBatchElements / (m_ * rows_));
    for (int64_t first = 0; first < stripes_; first += chunk) {
      const int64_t length = std::min(chunk, stripes_ - first);
      const torch::Tensor stripes =
          columns_.narrow(0, first * m_, length * m_).view({length, m_, rows_});
      kept += TopNSum(stripes, n_, 1).sum(-1).to(torch::kFloat64).sum().item<double>();
    }
    return kept;
  }

  // Leaves a local optimum: the columns of a few random stripes of one random
  // block are dealt again at random.
  void Kick() {
    const int64_t block = rng_.Below(stripes_ / stripes_per_block_);
    std::vector<int64_t> stripes(static_cast<size_t>(stripes_per_block_));
    std::iota(stripes.begin(), stripes.end(), block * stripes_per_block_);
    rng_.Shuffle(stripes);
    stripes.resize(static_cast<size_t>(std::min(kKickStripes, stripes_per_block_)));
    Move move;
    for (int64_t stripe : stripes) {
      for (int64_t j = 0; j < m_; ++j) move.dst.push_back(stripe * m_ + j);
    }
    move.src = move.dst;
    rng_.Shuffle(move.src);
    Apply({move});
  }

  // Goes back to `order` (a permutation of the same columns).
  void Restore(const std::vector<int64_t>& order) {
    std::vector<int64_t> position_of(order_.size());
    for (size_t j = 0; j < order_.size(); ++j) {
      position_of[static_cast<size_t>(order_[j])] = static_cast<int64_t>(j);
    }
    Move move;
    for (size_t j = 0; j < order.size(); ++j) {
      if (order[j] == order_[j]) continue;
      move.dst.push_back(static_cast<int64_t>(j));
      move.src.push_back(position_of[static_cast<size_t>(order[j])]);
    }
    if (!move.dst.empty()) Apply({move});
  }

 private:
  double PairCost() const { return static_cast<double>(splits_ * 2 * m_ * rows_); }

  double Tolerance(double at_stake) const {
    return relative_tolerance_ * std::max(at_stake, stripe_scale_);
  }

  // Splits of a pair's 2m columns (A = 0..m-1, B = m..2m-1) into two stripes,
  // the first holding column 0 (the two stripes are interchangeable), nearest
  // first; split 0 is the identity.
  void BuildSplits() {
    std::vector<std::pair<int64_t, std::vector<int64_t>>> found;  // (distance, members)
    std::vector<int64_t> members = {0};
    const auto recurse = [&](const auto& self, int64_t next) -> void {
      if (static_cast<int64_t>(members.size()) == m_) {
        int64_t taken = 0;  // members from stripe B
        for (int64_t member : members) taken += member >= m_ ? 1 : 0;
        found.emplace_back(std::min(taken, m_ - taken), members);
        return;
      }
      for (int64_t column = next; column < 2 * m_; ++column) {
        members.push_back(column);
        self(self, column + 1);
        members.pop_back();
      }
    };
    recurse(recurse, 1);
    std::stable_sort(found.begin(), found.end(),
                     [](const auto& a, const auto& b) { return a.first < b.first; });
    // The largest distance (columns exchanged) whose splits all fit; single
    // swaps at least.
    int64_t max_distance = 1;
    for (int64_t distance = 2; distance <= m_ / 2; ++distance) {
      const auto count = std::count_if(found.begin(), found.end(),
                                       [&](const auto& s) { return s.first <= distance; });
      if (count > kMaxSplits) break;
      max_distance = distance;
    }
    for (const auto& [distance, subset] : found) {
      if (distance > max_distance) continue;
      std::vector<bool> in_first(static_cast<size_t>(2 * m_), false);
      for (int64_t member : subset) in_first[static_cast<size_t>(member)] = true;
      for (int64_t column = 0; column < 2 * m_; ++column) {
        (in_first[static_cast<size_t>(column)] ? split_first_host_ : split_second_host_)
            .push_back(column);
      }
    }
    splits_ = static_cast<int64_t>(split_first_host_.size()) / m_;
    split_first_ = IndexTensor(split_first_host_, device_);
    split_second_ = IndexTensor(split_second_host_, device_);
  }

  // The stripes of each block, shuffled.
  std::vector<std::vector<int64_t>> ShuffledBlocks() {
    std::vector<std::vector<int64_t>> blocks;
    for (int64_t first = 0; first < stripes_; first += stripes_per_block_) {
      std::vector<int64_t> block(static_cast<size_t>(stripes_per_block_));
      std::iota(block.begin(), block.end(), first);
      rng_.Shuffle(block);
      blocks.push_back(std::move(block));
    }
    return blocks;
  }

  // Every stripe ejects one random column; inside random sets of stripes of
  // a block the ejected columns are dealt back, one per stripe, by an optimal
  // linear assignment.
  std::vector<Move> AssignmentMoves() {
    std::map<int64_t, std::vector<std::vector<int64_t>>> sets_by_size;  // batched by size
    for (const std::vector<int64_t>& block : ShuffledBlocks()) {
      const int64_t count = (stripes_per_block_ + kAssignmentSet - 1) / kAssignmentSet;
      int64_t begin = 0;
      for (int64_t s = 0; s < count; ++s) {
        const int64_t size = stripes_per_block_ / count + (s < stripes_per_block_ % count ? 1 : 0);
        if (size >= 2) {
          sets_by_size[size].emplace_back(block.begin() + begin, block.begin() + begin + size);
        }
        begin += size;
      }
    }
    std::vector<Move> moves;
    for (const auto& [size, sets] : sets_by_size) {
      const auto count = static_cast<int64_t>(sets.size());
      std::vector<int64_t> ejected, remaining_positions;
      for (const std::vector<int64_t>& set : sets) {
        for (int64_t stripe : set) {
          const int64_t slot = rng_.Below(m_);
          ejected.push_back(stripe * m_ + slot);
          for (int64_t j = 0; j < m_; ++j) {
            if (j != slot) remaining_positions.push_back(stripe * m_ + j);
          }
        }
      }
      const torch::Tensor ejected_index = IndexTensor(ejected, device_);
      const torch::Tensor remaining_index = IndexTensor(remaining_positions, device_);
      std::vector<torch::Tensor> gain_parts, base_parts;
      const int64_t batch = std::max<int64_t>(1, kBatchElements / (size * std::max(size, m_) * rows_));
      for (int64_t from = 0; from < count; from += batch) {
        const int64_t length = std::min(batch, count - from);
        const torch::Tensor incoming =
            columns_.index_select(0, ejected_index.narrow(0, from * size, length * size))
                .view({length, size, 1, rows_});
        const torch::Tensor remaining =
            columns_
                .index_select(0, remaining_index.narrow(0, from * size * (m_ - 1),
                                                        length * size * (m_ - 1)))
                .view({length, size, m_ - 1, rows_});
        // The n largest of a stripe's remaining m-1 columns: their sum (base)
        // and the n-th (threshold). With column y added the stripe keeps
        // base + Σ_rows max(0, y - threshold).
        const std::vector<torch::Tensor> top = TopN(remaining, n_, 2);
        torch::Tensor base = top[0].clone();
        for (size_t k = 1; k < top.size(); ++k) base += top[k];
        base_parts.push_back(base.sum(-1).sum(-1).to(torch::kFloat64));
        const torch::Tensor threshold = top.back().unsqueeze(1);  // [sets, 1, stripe, rows]
        // [sets, ejected column, receiving stripe]
        gain_parts.push_back((incoming - threshold).clamp_min_(0).sum(-1).to(torch::kFloat64));
      }
      const torch::Tensor gain = torch::cat(gain_parts).to(torch::kCPU).contiguous();
      const torch::Tensor base = torch::cat(base_parts).to(torch::kCPU).contiguous();
      const double* gain_data = gain.data_ptr<double>();
      const double* base_data = base.data_ptr<double>();
      std::vector<double> cost(static_cast<size_t>(size * size));
      for (int64_t q = 0; q < count; ++q) {
        const double* w = gain_data + q * size * size;
        double current = 0;
        for (int64_t i = 0; i < size; ++i) current += w[i * size + i];
        for (int64_t k = 0; k < size * size; ++k) cost[static_cast<size_t>(k)] = -w[k];
        const std::vector<int64_t> assign = MinCostAssignment(cost, size);
        double best = 0;
        for (int64_t i = 0; i < size; ++i) best += w[i * size + assign[static_cast<size_t>(i)]];
        if (best - current <= Tolerance(base_data[q] + current)) continue;
        Move move;
        for (int64_t i = 0; i < size; ++i) {
          const int64_t to = assign[static_cast<size_t>(i)];
          if (to == i) continue;
          move.dst.push_back(ejected[static_cast<size_t>(q * size + to)]);
          move.src.push_back(ejected[static_cast<size_t>(q * size + i)]);
        }
        moves.push_back(std::move(move));
      }
    }
    return moves;
  }

  // Saliency each pair of stripes keeps under each split: [pairs, splits],
  // float64 on the host. pair_stripes: [pairs, 2].
  std::vector<double> EvaluatePairs(const std::vector<int64_t>& pair_stripes) {
    const auto pairs = static_cast<int64_t>(pair_stripes.size()) / 2;
    std::vector<int64_t> positions;
    positions.reserve(static_cast<size_t>(pairs * 2 * m_));
    for (int64_t stripe : pair_stripes) {
      for (int64_t j = 0; j < m_; ++j) positions.push_back(stripe * m_ + j);
    }
    const torch::Tensor position_index = IndexTensor(positions, device_);
    std::vector<torch::Tensor> kept_parts;
    const int64_t batch = std::max<int64_t>(1, kBatchElements / (splits_ * m_ * rows_));
    for (int64_t from = 0; from < pairs; from += batch) {
      const int64_t length = std::min(batch, pairs - from);
      const torch::Tensor pair_columns =
          columns_.index_select(0, position_index.narrow(0, from * 2 * m_, length * 2 * m_))
              .view({length, 2 * m_, rows_});
      torch::Tensor kept;
      for (const torch::Tensor& split : {split_first_, split_second_}) {
        const torch::Tensor stripe =
            pair_columns.index_select(1, split).view({length, splits_, m_, rows_});
        torch::Tensor stripe_kept = TopNSum(stripe, n_, 2).sum(-1).to(torch::kFloat64);
        kept = kept.defined() ? kept + stripe_kept : stripe_kept;
      }
      kept_parts.push_back(kept);
    }
    const torch::Tensor kept = torch::cat(kept_parts).to(torch::kCPU).contiguous();
    return std::vector<double>(kept.data_ptr<double>(), kept.data_ptr<double>() + kept.numel());
  }

  // Candidate pairs of stripes (all pairs of each block, re-evaluated where a
  // stripe changed; or a random perfect matching of each block), each with
  // its best split of their 2m columns. Improving pairs are taken best first,
  // each stripe at most once.
  std::vector<Move> PairMoves() {
    struct Candidate {
      double gain;
      int64_t first, second, split;
    };
    std::vector<Candidate> candidates;
    const auto best_split = [&](const double* kept) -> std::pair<double, int64_t> {
      const int64_t best = std::max_element(kept, kept + splits_) - kept;
      const double gain = kept[best] - kept[0];
      return gain > Tolerance(kept[0]) ? std::make_pair(gain, best) : std::make_pair(0.0, int64_t{0});
    };
    if (all_pairs_) {
      std::vector<int64_t> stale;  // pairs with a changed stripe
      for (int64_t first = 0; first < stripes_; ++first) {
        const int64_t block_first = first / stripes_per_block_ * stripes_per_block_;
        for (int64_t second = first + 1; second < block_first + stripes_per_block_; ++second) {
          if (dirty_[static_cast<size_t>(first)] || dirty_[static_cast<size_t>(second)]) {
            stale.push_back(first);
            stale.push_back(second);
          }
        }
      }
      std::fill(dirty_.begin(), dirty_.end(), false);
      if (!stale.empty()) {
        const std::vector<double> kept = EvaluatePairs(stale);
        for (size_t p = 0; p < stale.size() / 2; ++p) {
          const auto [gain, split] = best_split(kept.data() + static_cast<int64_t>(p) * splits_);
          const size_t entry = PairEntry(stale[2 * p], stale[2 * p + 1]);
          pair_gain_[entry] = gain;
          pair_split_[entry] = split;
        }
      }
      for (int64_t first = 0; first < stripes_; ++first) {
        const int64_t block_first = first / stripes_per_block_ * stripes_per_block_;
        for (int64_t second = first + 1; second < block_first + stripes_per_block_; ++second) {
          const size_t entry = PairEntry(first, second);
          if (pair_gain_[entry] > 0) {
            candidates.push_back({pair_gain_[entry], first, second, pair_split_[entry]});
          }
        }
      }
    } else {
      std::vector<int64_t> matched;
      for (const std::vector<int64_t>& block : ShuffledBlocks()) {
        matched.insert(matched.end(), block.begin(),
                       block.begin() + static_cast<int64_t>(block.size() / 2 * 2));
      }
      if (matched.empty()) return {};
      const std::vector<double> kept = EvaluatePairs(matched);
      for (size_t p = 0; p < matched.size() / 2; ++p) {
        const auto [gain, split] = best_split(kept.data() + static_cast<int64_t>(p) * splits_);
        if (gain > 0) candidates.push_back({gain, matched[2 * p], matched[2 * p + 1], split});
      }
    }
    // Best first; equal gains keep their (deterministic) order.
    std::stable_sort(candidates.begin(), candidates.end(),
                     [](const Candidate& a, const Candidate& b) { return a.gain > b.gain; });
    std::vector<bool> used(static_cast<size_t>(stripes_), false);
    std::vector<Move> moves;
    for (const Candidate& candidate : candidates) {
      if (used[static_cast<size_t>(candidate.first)] ||
          used[static_cast<size_t>(candidate.second)]) {
        continue;
      }
      used[static_cast<size_t>(candidate.first)] = used[static_cast<size_t>(candidate.second)] =
          true;
      // Pair position k: stripe first's column k, then stripe second's.
      const auto position = [&](int64_t k) {
        return k < m_ ? candidate.first * m_ + k : candidate.second * m_ + (k - m_);
      };
      Move move;
      for (int64_t j = 0; j < m_; ++j) {
        const auto k = static_cast<size_t>(candidate.split * m_ + j);
        move.dst.push_back(position(j));
        move.src.push_back(position(split_first_host_[k]));
        move.dst.push_back(position(m_ + j));
        move.src.push_back(position(split_second_host_[k]));
      }
      moves.push_back(std::move(move));
    }
    return moves;
  }

  size_t PairEntry(int64_t first, int64_t second) const {
    return static_cast<size_t>(first * stripes_per_block_ + second % stripes_per_block_);
  }

  // The moves touch disjoint stripes, so they apply together.
  void Apply(const std::vector<Move>& moves) {
    std::vector<int64_t> dst, src;
    for (const Move& move : moves) {
      dst.insert(dst.end(), move.dst.begin(), move.dst.end());
      src.insert(src.end(), move.src.begin(), move.src.end());
    }
    const std::vector<int64_t> previous = order_;
    for (size_t i = 0; i < dst.size(); ++i) {
      order_[static_cast<size_t>(dst[i])] = previous[static_cast<size_t>(src[i])];
      dirty_[static_cast<size_t>(dst[i] / m_)] = true;
    }
    const torch::Tensor moved = columns_.index_select(0, IndexTensor(src, device_));
    columns_.index_copy_(0, IndexTensor(dst, device_), moved);
  }

  const int64_t n_, m_, rows_, stripes_, stripes_per_block_;
  const torch::Device device_;
  std::vector<int64_t> order_;
  Rng rng_;
  torch::Tensor columns_;  // [channels, rows]: the saliency's columns in order_
  double relative_tolerance_ = 0;
  double stripe_scale_ = 0;
  int64_t splits_ = 0;
  std::vector<int64_t> split_first_host_, split_second_host_;  // [splits, m]
  torch::Tensor split_first_, split_second_;
  // All-pairs mode: the best gain and split of every pair of stripes of a
  // block, [stripes, stripes_per_block]; stripes changed since.
  bool all_pairs_ = false;
  std::vector<double> pair_gain_;
  std::vector<int64_t> pair_split_;
  std::vector<bool> dirty_;
};

// Deal each block's columns, strongest (largest saliency sum) first, into its
// stripes round-robin: every stripe gets one column of each strength tier, so
// N strong columns share a stripe with M-N weak ones. Close to optimal when
// saliency is dominated by per-channel scales (|W|·‖x‖ with outlier channels).
std::vector<int64_t> StrengthDeal(const torch::Tensor& saliency, int64_t m, int64_t block) {
  const int64_t rows = saliency.size(0), channels = saliency.size(1);
  torch::Tensor strength = torch::zeros({channels}, saliency.options().dtype(torch::kFloat64));
  const int64_t chunk = ChunkRows(channels);
  for (int64_t first = 0; first < rows; first += chunk) {
    strength += saliency.narrow(0, first, std::min(chunk, rows - first)).sum(0).to(torch::kFloat64);
  }
  strength = strength.to(torch::kCPU).contiguous();
  const double* strength_data = strength.data_ptr<double>();
  std::vector<int64_t> order(static_cast<size_t>(channels));
  const int64_t stripes_per_block = block / m;
  for (int64_t first = 0; first < channels; first += block) {
    std::vector<int64_t> ranked(static_cast<size_t>(block));
    std::iota(ranked.begin(), ranked.end(), first);
    std::stable_sort(ranked.begin(), ranked.end(), [&](int64_t a, int64_t b) {
      return strength_data[a] > strength_data[b];
    });
    for (int64_t rank = 0; rank < block; ++rank) {
      const int64_t stripe = rank % stripes_per_block, slot = rank / stripes_per_block;
      order[static_cast<size_t>(first + stripe * m + slot)] = ranked[static_cast<size_t>(rank)];
    }
  }
  return order;
}

absl::Status CheckContext(const CallContext& ctx) {
  if (ctx.cancelled && ctx.cancelled()) return absl::CancelledError("N:M search cancelled");
  if (ctx.deadline.has_value() && std::chrono::steady_clock::now() >= *ctx.deadline) {
    return absl::DeadlineExceededError("N:M search passed its deadline");
  }
  return absl::OkStatus();
}

absl::StatusOr<NmSolution> Solve(const torch::Tensor& saliency, const NmOptions& options,
                                 const CallContext& ctx) {
  const int64_t channels = saliency.size(1);
  const int64_t block = options.block > 0 ? options.block : channels;
  std::vector<int64_t> identity(static_cast<size_t>(channels));
  std::iota(identity.begin(), identity.end(), 0);

  NmSolution solution;
  solution.kept_identity = KeptSaliency(saliency, identity, options.n, options.m);
  solution.upper_bound = NmUpperBound(saliency, options.n, options.m, options.block);
  std::vector<int64_t> best = identity;
  if (block / options.m > 1) {
    ICD_RETURN_IF_ERROR(CheckContext(ctx));
    std::vector<int64_t> dealt = StrengthDeal(saliency, options.m, block);
    if (KeptSaliency(saliency, dealt, options.n, options.m) > solution.kept_identity) {
      best = std::move(dealt);
    }
    NmSearch search(saliency, options, best);
    int64_t rounds = options.rounds;
    if (rounds == 0) {
      rounds = std::clamp(static_cast<int64_t>(kWorkBudget / search.WorkPerRound()), kMinRounds,
                          kMaxRounds);
    }
    // Descend until no move improves; then kick the best order and descend
    // again, keeping the result only if it keeps more, while rounds remain.
    double best_kept = search.Kept();
    while (solution.rounds < rounds) {
      int64_t idle = 0;
      while (solution.rounds < rounds && idle < search.Patience()) {
        ICD_RETURN_IF_ERROR(CheckContext(ctx));
        idle = search.Round() ? 0 : idle + 1;
        ++solution.rounds;
      }
      const double kept = search.Kept();
      if (kept > best_kept) {
        best_kept = kept;
        best = search.order();
      } else {
        search.Restore(best);
      }
      if (solution.rounds < rounds) search.Kick();
    }
  }
  solution.kept_solved = KeptSaliency(saliency, best, options.n, options.m);
  // Gains are accepted above a rounding tolerance only, but never hand back
  // an order that keeps less than the identity.
  if (solution.kept_solved < solution.kept_identity) {
    best = identity;
    solution.kept_solved = solution.kept_identity;
  }
  solution.order = std::move(best);
  const double headroom = solution.upper_bound - solution.kept_identity;
  solution.efficacy = headroom > 1e-12 * solution.upper_bound
                          ? (solution.kept_solved - solution.kept_identity) / headroom
                          : 1.0;
  return solution;
}

}  // namespace

absl::StatusOr<NmSolution> SolveNmPermutation(const torch::Tensor& saliency,
                                              const NmOptions& options, const CallContext& ctx) {
  try {
    torch::NoGradGuard no_grad;
    ICD_RETURN_IF_ERROR(Validate(saliency, options));
    return Solve(saliency, options, ctx);
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("N:M search failed: ", std::string(e.what())));
  }
}

double KeptSaliency(const torch::Tensor& saliency, const std::vector<int64_t>& order, int64_t n,
                    int64_t m) {
  torch::NoGradGuard no_grad;
  const int64_t rows = saliency.size(0), channels = saliency.size(1);
  const torch::Tensor index = IndexTensor(order, saliency.device());
  double kept = 0;
  const int64_t chunk = ChunkRows(channels);
  for (int64_t first = 0; first < rows; first += chunk) {
    const int64_t length = std::min(chunk, rows - first);
    const torch::Tensor ordered =
        saliency.narrow(0, first, length).index_select(1, index).to(torch::kFloat64);
    kept += TopNSum(ordered.view({length, channels / m, m}), n, 2).sum().item<double>();
  }
  return kept;
}

double NmUpperBound(const torch::Tensor& saliency, int64_t n, int64_t m, int64_t block) {
  torch::NoGradGuard no_grad;
  const int64_t rows = saliency.size(0), channels = saliency.size(1);
  const int64_t width = block > 0 ? block : channels;
  double bound = 0;
  const int64_t chunk = ChunkRows(channels);
  for (int64_t first = 0; first < rows; first += chunk) {
    const int64_t length = std::min(chunk, rows - first);
    const torch::Tensor blocks =
        saliency.narrow(0, first, length).reshape({length, channels / width, width});
    const torch::Tensor top =
        std::get<0>(blocks.topk(width / m * n, 2, /*largest=*/true, /*sorted=*/false));
    bound += top.to(torch::kFloat64).sum().item<double>();
  }
  return bound;
}

torch::Tensor NmMask(const torch::Tensor& values, int64_t n, int64_t m) {
  torch::NoGradGuard no_grad;
  TORCH_CHECK(values.dim() >= 1 && values.size(-1) % m == 0 && n >= 0 && n <= m,
              "NmMask: the last axis must be a multiple of m, and 0 <= n <= m");
  std::vector<int64_t> grouped = values.sizes().vec();
  grouped.back() /= m;
  grouped.push_back(m);
  const torch::Tensor magnitude = values.abs().reshape(grouped);
  // Stable descending sort: among equal magnitudes the lower index is kept.
  const torch::Tensor ranked =
      std::get<1>(magnitude.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true));
  return torch::zeros_like(magnitude)
      .scatter_(-1, ranked.narrow(-1, 0, n), 1.0)
      .reshape(values.sizes());
}

}  // namespace icd::traces
