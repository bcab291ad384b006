#include "traces/assignment.h"

#include <limits>

namespace icd::traces {

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

}  // namespace icd::traces
