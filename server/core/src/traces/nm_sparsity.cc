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
#include "splitmix64.h"
#include "traces/assignment.h"
#include "traces/nm_stripes.h"

namespace icd::traces {
namespace {

// Stripes per assignment set: the Hungarian step is O(set³) on the host and
// the gain matrix O(set² · rows) on the device; 32 keeps both small.
constexpr int64_t kAssignmentSet = 32;
// Pair move: at most this many splits of a pair's 2m columns are evaluated
// (all of them for m <= 4: 35 for 2:4; single exchanges only for m = 5..16,
// up to kMaxSingleSplits; no pair move beyond).
constexpr double kMaxSplits = 70;
constexpr double kMaxSingleSplits = 300;
// Automatic rounds: until moves have cost about this many scalar
// evaluations (about 70 rounds for 2752 x 5120, 2:4), within bounds.
constexpr double kWorkBudget = 1.2e10;
constexpr int64_t kMinRounds = 16;
constexpr int64_t kMaxRounds = 3000;
// A descent ends after this many consecutive rounds without improvement.
constexpr int64_t kPatience = 12;
// A kick deals the columns of this many random stripes of one block afresh.
constexpr int64_t kKickStripes = 3;
// Keeps this search's stream apart from others seeded with the same number.
constexpr uint64_t kStreamSalt = 0x4e4d5065726d7574ULL;

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

// Local search over the column order of one saliency matrix. Moves are
// evaluated exactly (up to float rounding, guarded by a tolerance) and
// applied only where they keep more.
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
        options_(saliency.options()),
        order_(start),
        rng_(options.seed ^ kStreamSalt) {
    // Columns as rows, so that a stripe is a contiguous [m, rows] slab.
    columns_ = torch::empty({saliency.size(1), rows_}, options_);
    const int64_t chunk = ChunkRows(rows_);
    for (int64_t first = 0; first < saliency.size(1); first += chunk) {
      const int64_t length = std::min(chunk, saliency.size(1) - first);
      const std::vector<int64_t> sources(order_.begin() + first, order_.begin() + first + length);
      torch::Tensor gathered = gather_scratch_.Get({rows_, length}, options_);
      torch::index_select_out(gathered, saliency, 1, IndexTensor(sources, device_));
      columns_.narrow(0, first, length).copy_(gathered.t());
    }
    // float32 sums of a few thousand terms are good to ~1e-7 relative: gains
    // below 1e-6 of what is at stake are rounding, not improvements.
    relative_tolerance_ = saliency.scalar_type() == torch::kFloat32 ? 1e-6 : 1e-11;
    BuildSplits();
    stripe_scale_ = Kept() / static_cast<double>(stripes_);
  }

  const std::vector<int64_t>& order() const { return order_; }

  // Scalar evaluations spent on moves so far, roughly: what bounds the
  // automatic round count (a measure of work, unlike time, is deterministic).
  double Work() const { return work_; }

  // An assignment move; where it finds nothing, a pair move (a different
  // neighbourhood: exchanges of up to m/2 columns between two stripes).
  // The assignment move is the cheaper per gain on large matrices.
  // Returns whether anything improved.
  bool Round() {
    std::vector<Move> moves = AssignmentMoves();
    if (moves.empty()) moves = PairMoves();
    if (moves.empty()) return false;
    Apply(moves);
    return true;
  }

  // Saliency the current order keeps (float64).
  double Kept() {
    double kept = 0;
    const int64_t chunk = std::max<int64_t>(1, kBatchElements / (m_ * rows_));
    for (int64_t first = 0; first < stripes_; first += chunk) {
      const int64_t length = std::min(chunk, stripes_ - first);
      const torch::Tensor stripes = stripe_scratch_.Get({length, m_, rows_}, options_);
      stripes.copy_(columns_.narrow(0, first * m_, length * m_).view({length, m_, rows_}));
      const torch::Tensor stripe_kept =
          TopNSumAndNth(stripes, n_, 1, spare_scratch_.Get({length, rows_}, options_)).first;
      // Row sums in the saliency's dtype, the total in float64.
      kept += stripe_kept.sum(0).to(torch::kFloat64).sum().item<double>();
    }
    return kept;
  }

  // Leaves a local optimum: the columns of a few random stripes of one random
  // block are dealt afresh at random.
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
  double Tolerance(double at_stake) const {
    return relative_tolerance_ * std::max(at_stake, stripe_scale_);
  }

  // Splits of a pair's 2m columns (stripe A: 0..m-1, B: m..2m-1) into two
  // stripes that exchange d columns: d = 0 (split 0, the identity), 1, 2, ...
  // up to the largest d whose splits all fit in kMaxSplits, single exchanges
  // at least (none, and no pair move, when m is so large that even those
  // exceed kMaxSingleSplits). Each split: the first stripe's m columns, then
  // the second's.
  void BuildSplits() {
    const auto binomial = [](int64_t count, int64_t size) {
      double value = 1;
      for (int64_t i = 1; i <= size; ++i) {
        value = value * static_cast<double>(count - size + i) / static_cast<double>(i);
      }
      return value;
    };
    // C(m, d)² exchanges of d columns; at d = m/2 exchanging X for Y and
    // A\X for B\Y give the same two stripes, so half as many splits.
    const auto splits_at = [&](int64_t d) {
      const double exchanges = binomial(m_, d) * binomial(m_, d);
      return 2 * d == m_ ? exchanges / 2 : exchanges;
    };
    double total = 1 + splits_at(1);
    if (total > kMaxSingleSplits) return;
    int64_t max_distance = 1;
    for (int64_t d = 2; 2 * d <= m_ && total + splits_at(d) <= kMaxSplits; ++d) {
      total += splits_at(d);
      max_distance = d;
    }
    // The size-subsets of 0..count-1.
    const auto subsets = [](int64_t count, int64_t size) {
      std::vector<std::vector<int64_t>> found;
      std::vector<int64_t> chosen;
      const auto recurse = [&](const auto& self, int64_t next) -> void {
        if (static_cast<int64_t>(chosen.size()) == size) {
          found.push_back(chosen);
          return;
        }
        for (int64_t i = next; i < count; ++i) {
          chosen.push_back(i);
          self(self, i + 1);
          chosen.pop_back();
        }
      };
      recurse(recurse, 0);
      return found;
    };
    std::vector<int64_t> both_sides(static_cast<size_t>(2 * m_));
    std::iota(both_sides.begin(), both_sides.end(), 0);  // the identity
    for (int64_t d = 1; d <= max_distance; ++d) {
      const std::vector<std::vector<int64_t>> choices = subsets(m_, d);
      for (const std::vector<int64_t>& leaving_a : choices) {
        if (2 * d == m_ && leaving_a.front() == 0) continue;  // the mirror of another split
        for (const std::vector<int64_t>& leaving_b : choices) {
          std::vector<bool> moves(static_cast<size_t>(2 * m_), false);
          for (int64_t j : leaving_a) moves[static_cast<size_t>(j)] = true;
          for (int64_t j : leaving_b) moves[static_cast<size_t>(m_ + j)] = true;
          // First stripe: A's staying columns and B's leaving ones; second:
          // the rest.
          for (bool first : {true, false}) {
            for (int64_t column = 0; column < 2 * m_; ++column) {
              const bool from_a = column < m_, moving = moves[static_cast<size_t>(column)];
              if ((from_a != moving) == first) both_sides.push_back(column);
            }
          }
        }
      }
    }
    splits_ = static_cast<int64_t>(both_sides.size()) / (2 * m_);
    split_columns_host_ = both_sides;
    split_columns_ = IndexTensor(both_sides, device_);
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
      // Per set: the ejected positions, then each stripe's m-1 remaining ones.
      std::vector<int64_t> positions;
      positions.reserve(static_cast<size_t>(count * size * m_));
      std::vector<int64_t> ejected;
      for (const std::vector<int64_t>& set : sets) {
        const size_t set_begin = positions.size();
        positions.resize(set_begin + static_cast<size_t>(size * m_));
        for (size_t i = 0; i < set.size(); ++i) {
          const int64_t stripe = set[i], slot = rng_.Below(m_);
          ejected.push_back(stripe * m_ + slot);
          positions[set_begin + i] = stripe * m_ + slot;
          size_t next = set_begin + set.size() + i * static_cast<size_t>(m_ - 1);
          for (int64_t j = 0; j < m_; ++j) {
            if (j != slot) positions[next++] = stripe * m_ + j;
          }
        }
      }
      const torch::Tensor position_index = IndexTensor(positions, device_);
      // The gain matrices, and the top-n network (about 2n passes) per column.
      work_ += static_cast<double>(count * size * (size + 2 * n_ * m_) * rows_);
      std::vector<torch::Tensor> gain_parts, base_parts;
      const int64_t batch =
          std::max<int64_t>(1, kBatchElements / (size * std::max(size, m_) * rows_));
      for (int64_t from = 0; from < count; from += batch) {
        const int64_t length = std::min(batch, count - from);
        torch::Tensor gathered = gather_scratch_.Get({length * size * m_, rows_}, options_);
        torch::index_select_out(gathered, columns_, 0,
                                position_index.narrow(0, from * size * m_, length * size * m_));
        gathered = gathered.view({length, size * m_, rows_});
        const torch::Tensor incoming = gathered.narrow(1, 0, size).unsqueeze(2);
        const torch::Tensor remaining =
            gathered.narrow(1, size, size * (m_ - 1)).view({length, size, m_ - 1, rows_});
        // Each stripe's n largest remaining: their sum (base) and the n-th
        // (threshold). With column y added the stripe keeps
        // base + Σ_rows max(0, y - threshold).
        const auto [base, nth] =
            TopNSumAndNth(remaining, n_, 2, spare_scratch_.Get({length, size, rows_}, options_));
        base_parts.push_back(base.sum(-1).sum(-1).to(torch::kFloat64));
        const torch::Tensor threshold = nth.unsqueeze(1);  // [sets, 1, stripe, rows]
        torch::Tensor excess = stripe_scratch_.Get({length, size, size, rows_}, options_);
        torch::sub_out(excess, incoming, threshold);  // [sets, ejected column, stripe, rows]
        gain_parts.push_back(excess.clamp_min_(0).sum(-1).to(torch::kFloat64));
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

  // A random perfect matching of the stripes of each block; every pair takes
  // the best split of its 2m columns into two stripes, when it improves.
  std::vector<Move> PairMoves() {
    std::vector<int64_t> matched;  // [pairs, 2]
    for (const std::vector<int64_t>& block : ShuffledBlocks()) {
      matched.insert(matched.end(), block.begin(),
                     block.begin() + static_cast<int64_t>(block.size() / 2 * 2));
    }
    const auto pairs = static_cast<int64_t>(matched.size()) / 2;
    if (pairs == 0 || splits_ < 2) return {};
    std::vector<int64_t> positions;  // [pairs, 2m]
    positions.reserve(static_cast<size_t>(pairs * 2 * m_));
    for (int64_t stripe : matched) {
      for (int64_t j = 0; j < m_; ++j) positions.push_back(stripe * m_ + j);
    }
    const torch::Tensor position_index = IndexTensor(positions, device_);
    work_ += static_cast<double>(pairs * splits_ * 2 * m_ * 2 * n_ * rows_);
    std::vector<torch::Tensor> kept_parts;
    const int64_t batch = std::max<int64_t>(1, kBatchElements / (splits_ * 2 * m_ * rows_));
    for (int64_t from = 0; from < pairs; from += batch) {
      const int64_t length = std::min(batch, pairs - from);
      torch::Tensor pair_columns = gather_scratch_.Get({length * 2 * m_, rows_}, options_);
      torch::index_select_out(pair_columns, columns_, 0,
                              position_index.narrow(0, from * 2 * m_, length * 2 * m_));
      pair_columns = pair_columns.view({length, 2 * m_, rows_});
      // [pairs, splits · 2 stripes, m, rows]
      torch::Tensor split_stripes =
          stripe_scratch_.Get({length, splits_ * 2 * m_, rows_}, options_);
      torch::index_select_out(split_stripes, pair_columns, 1, split_columns_);
      split_stripes = split_stripes.view({length, splits_ * 2, m_, rows_});
      const torch::Tensor stripe_kept =
          TopNSumAndNth(split_stripes, n_, 2,
                        spare_scratch_.Get({length, splits_ * 2, rows_}, options_))
              .first;  // [pairs, splits · 2, rows]
      kept_parts.push_back(
          stripe_kept.sum(-1).view({length, splits_, 2}).sum(2).to(torch::kFloat64));
    }
    const torch::Tensor kept = torch::cat(kept_parts).to(torch::kCPU).contiguous();
    const double* kept_data = kept.data_ptr<double>();
    std::vector<Move> moves;
    for (int64_t p = 0; p < pairs; ++p) {
      const double* pair_kept = kept_data + p * splits_;
      const int64_t best = std::max_element(pair_kept, pair_kept + splits_) - pair_kept;
      if (pair_kept[best] - pair_kept[0] <= Tolerance(pair_kept[0])) continue;
      const int64_t* pair_positions = positions.data() + p * 2 * m_;
      const int64_t* split = split_columns_host_.data() + best * 2 * m_;
      Move move;
      for (int64_t j = 0; j < 2 * m_; ++j) {
        move.dst.push_back(pair_positions[j]);
        move.src.push_back(pair_positions[split[j]]);
      }
      moves.push_back(std::move(move));
    }
    return moves;
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
    }
    const torch::Tensor moved = columns_.index_select(0, IndexTensor(src, device_));
    columns_.index_copy_(0, IndexTensor(dst, device_), moved);
  }

  const int64_t n_, m_, rows_, stripes_, stripes_per_block_;
  const torch::Device device_;
  const torch::TensorOptions options_;  // the saliency's dtype and device
  std::vector<int64_t> order_;
  SplitMix64 rng_;
  torch::Tensor columns_;  // [channels, rows]: the saliency's columns in order_
  double relative_tolerance_ = 0;
  double stripe_scale_ = 0;
  int64_t splits_ = 0;
  std::vector<int64_t> split_columns_host_;  // [splits, 2m]
  torch::Tensor split_columns_;
  Scratch gather_scratch_, stripe_scratch_, spare_scratch_;
  double work_ = 0;
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

absl::Status CheckContext(const CallContext& ctx) { return CheckCall(ctx, "N:M search"); }

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
    const bool automatic = options.rounds == 0;
    const auto more_rounds = [&] {
      if (!automatic) return solution.rounds < options.rounds;
      return solution.rounds < kMinRounds ||
             (solution.rounds < kMaxRounds && search.Work() < kWorkBudget);
    };
    // Descend until no move improves; then kick the best order and descend
    // again, keeping the result only if it keeps more, while rounds remain
    // and the bound is not reached.
    double best_kept = search.Kept();
    const double reached = solution.upper_bound * (1 - 1e-7);
    while (more_rounds() && best_kept < reached) {
      int64_t idle = 0;
      while (more_rounds() && idle < kPatience) {
        ICD_RETURN_IF_ERROR(CheckContext(ctx));
        idle = search.Round() ? 0 : idle + 1;
        ++solution.rounds;
      }
      const double kept = search.Kept();
      if (kept > best_kept * (1 + 1e-9)) {
        best_kept = kept;
        best = search.order();
      } else {
        search.Restore(best);
      }
      if (more_rounds()) search.Kick();
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
    return InternalFailure("N:M search", e.what());
  }
}

}  // namespace icd::traces
