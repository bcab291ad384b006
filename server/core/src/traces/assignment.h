// Minimum-cost perfect assignment (the linear assignment problem): the
// Hungarian method as shortest augmenting paths with potentials, O(size³).
// The N:M search deals ejected columns back to stripes with it.
#ifndef ICD_CORE_SRC_TRACES_ASSIGNMENT_H_
#define ICD_CORE_SRC_TRACES_ASSIGNMENT_H_

#include <cstdint>
#include <vector>

namespace icd::traces {

// `cost` is a square matrix, row-major, size × size, of finite values.
// Returns assign[row] = column, a permutation of minimum total cost.
std::vector<int64_t> MinCostAssignment(const std::vector<double>& cost, int64_t size);

}  // namespace icd::traces

#endif  // ICD_CORE_SRC_TRACES_ASSIGNMENT_H_
