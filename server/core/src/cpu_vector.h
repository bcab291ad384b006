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

// e^x lane by lane: 2^round(x·log2 e) by exponent arithmetic times a degree-5
// fit of 2^f on [-0.5, 0.5] (relative error 1.6e-7, as the CUDA scan's
// Exp2Polynomial); x·log2 e clamped to ±125, so a decay that has all but
// vanished comes out as 2^-125, not 0.
[[gnu::always_inline]] inline void Exp(Vector<float>& value) {
  typedef int32_t Bits __attribute__((vector_size(32)));
  constexpr float kLog2E = 1.4426950408889634f;
  constexpr float kRoundingShift = 12582912.0f;  // 1.5 · 2^23
  Vector<float> exponent = value * kLog2E;
  exponent = exponent < -125.0f ? Vector<float>{} - 125.0f : exponent;
  exponent = exponent > 125.0f ? Vector<float>{} + 125.0f : exponent;
  const Vector<float> shifted = exponent + kRoundingShift;
  const Vector<float> whole = shifted - kRoundingShift;
  const Vector<float> fraction = exponent - whole;
  Vector<float> power = Vector<float>{} + 1.339086331e-03f;
  power = power * fraction + 9.676031768e-03f;
  power = power * fraction + 5.550356954e-02f;
  power = power * fraction + 2.402210683e-01f;
  power = power * fraction + 6.931471825e-01f;
  power = power * fraction + 1.000000119e+00f;
  // round(x) sits in the low mantissa bits of `shifted` (two's complement);
  // moved into the exponent field it scales 2^f.
  // (A cast between GCC vector types of one size reinterprets the bits.)
  const Bits scale = (Bits)shifted << 23;
  value = (Vector<float>)((Bits)power + scale);
}

#if defined(__GNUC__) && defined(__x86_64__)
#define ICD_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define ICD_VECTOR_CLONES
#endif

}  // namespace icd::cpu_vector

#endif  // ICD_CORE_SRC_CPU_VECTOR_H_
