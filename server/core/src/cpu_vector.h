// Native CPU loops' arithmetic as explicit GCC vectors (the Mamba-2 scan,
// the causal conv): the auto-vectorizer does not take these loops at -O2,
// and the build targets baseline x86-64, so hot loops are compiled twice
// (ICD_VECTOR_CLONES: x86-64-v3, i.e. AVX2 and FMA, and the baseline), the
// clone chosen when the program loads.
#ifndef ICD_CORE_SRC_CPU_VECTOR_H_
#define ICD_CORE_SRC_CPU_VECTOR_H_

#include <cstdint>
#include <cstring>

namespace icd::cpu_vector {

// 32 bytes of a scalar type as one GCC vector: AVX registers in the
// x86-64-v3 clone, two SSE registers in the baseline one.
template <class Scalar>
struct VectorOf;
template <>
struct VectorOf<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct VectorOf<double> {
  typedef double type __attribute__((vector_size(32)));
};
template <class Scalar>
using Vector = typename VectorOf<Scalar>::type;

template <class Scalar>
constexpr int64_t kLanes = static_cast<int64_t>(32 / sizeof(Scalar));

// (Through references: a 32-byte vector passed or returned by value would
// change the baseline ABI, which -Wpsabi refuses.)
template <class Scalar>
[[gnu::always_inline]] inline void Load(Vector<Scalar>& value, const Scalar* address) {
  std::memcpy(&value, address, sizeof value);
}

template <class Scalar>
[[gnu::always_inline]] inline void Store(Scalar* address, const Vector<Scalar>& value) {
  std::memcpy(address, &value, sizeof value);
}

#if defined(__GNUC__) && defined(__x86_64__)
#define ICD_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define ICD_VECTOR_CLONES
#endif

}  // namespace icd::cpu_vector

#endif  // ICD_CORE_SRC_CPU_VECTOR_H_
