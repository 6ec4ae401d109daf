// Shared inline helpers for the CPU kernels of fastdino._C:
//   * FASTDINO_MULTIVERSION: function multiversioning for the hot loops,
//   * ScopedFlushDenormals: FTZ/DAZ for the duration of a kernel task,
//   * exp_ps: a branch-free float32 exp that gcc vectorizes inside `omp simd` loops,
//   * bfloat16 / float16 <-> float32 conversions written as plain integer / float arithmetic so
//     they vectorize too (the c10 conversions are scalar code with branches),
//   * Elem<T>: storage type + load / store for T in {float, c10::BFloat16, c10::Half},
//   * dispatch_float_type: runtime ScalarType -> compile-time element type.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

// The package is built without -march=native (wheels must run on any x86-64), so the hot loops are
// compiled three times and the dynamic loader picks one per machine (an ifunc resolver, glibc):
//   arch=x86-64-v4: AVX-512 F/BW/CD/DQ/VL,
//   arch=x86-64-v3: AVX2 + FMA + F16C (Haswell / Zen and later),
//   default:        baseline SSE2.
// Feature levels rather than single ISA flags because gcc splits a clone string on commas:
// target_clones("avx2,fma") makes two clones, "avx2" (no FMA) and "fma" (no AVX2), and
// "avx512f" alone does not enable FMA either. gcc 12 resolves "arch=x86-64-vN" by CPU features
// (not by CPU model), so an AMD Zen 3 gets the v3 clone. Other compilers / platforms: one version.
// A build can pass -DFASTDINO_MULTIVERSION= to get the single baseline version (to test it).
#if !defined(FASTDINO_MULTIVERSION)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
#define FASTDINO_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTDINO_MULTIVERSION
#endif
#endif

// The helpers must be inlined into each clone (a call would run the baseline-ISA copy).
#define FASTDINO_INLINE inline __attribute__((always_inline))

namespace fastdino {

// Flush-to-zero + denormals-are-zero on the calling thread while in scope, restored after. x86
// handles denormal operands and results with microcode assists costing ~100 cycles each; softmax
// produces them in bulk (exp of logits far below the row max), which slowed the loss kernel by
// ~15%. Values below FLT_MIN (1.2e-38) become 0, far below anything float32 losses resolve.
class ScopedFlushDenormals {
 public:
  ScopedFlushDenormals() {
#if defined(__SSE__)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8040u);  // FTZ | DAZ
#endif
  }
  ~ScopedFlushDenormals() {
#if defined(__SSE__)
    _mm_setcsr(saved_);
#endif
  }
  ScopedFlushDenormals(const ScopedFlushDenormals&) = delete;
  ScopedFlushDenormals& operator=(const ScopedFlushDenormals&) = delete;

 private:
  unsigned int saved_ = 0;
};

FASTDINO_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

FASTDINO_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Branch-free selection for the conversions below. A C++ ?: or std::min is a branch in gcc's IR
// until the vectorizer's if-conversion, and jump threading / PRE can first split the loop body on
// it (they did, for the float16 conversions in the v3 clone), after which the loop is not
// vectorized. A mask built from a comparison value is plain data flow.
FASTDINO_INLINE uint32_t mask_if(bool c) { return 0u - static_cast<uint32_t>(c); }

FASTDINO_INLINE uint32_t blend(uint32_t mask, uint32_t if_set, uint32_t if_clear) {
  return (if_set & mask) | (if_clear & ~mask);
}

// exp(x) in float32, Cephes expf scheme: x = n ln2 + r with |r| <= ln2/2, exp(r) by a degree-7
// polynomial, times 2^n. At most ~1 ulp wherever the result is >= 2^-125.5 (~1.7e-38), checked
// exhaustively against double exp; smaller results underflow to 0 (see the scale below).
// Written so that loops calling it vectorize (no calls, no data-dependent branches):
//   * x is clamped to [-87.6, 89] with the x86 min/max semantics "bound > x ? bound : x", which
//     keeps NaN (the comparison is false) and maps -inf -> -87.6 (result 0) and +inf -> 89
//     (result inf). The input's low 8 mantissa bits are OR-ed back (no change for an unclamped
//     x, a clamped one stays beyond its bound): without that gcc folds exp(bound) to a constant
//     and splits the loop body on "clamped?", and the vectorizer gives up on the split loop.
//   * 2^n with n in [-126, 128] is applied as (y * 2^(n-1)) * 2, one shift of the integer n into
//     the exponent field: n = 128 (x just below the overflow threshold 88.72) still works, and
//     n = -126 gives a zero scale, which is where the underflow to 0 comes from. Gradual
//     underflow would need two scale factors (~20% slower), for results nobody can use: the
//     kernels run with denormals flushed anyway (ScopedFlushDenormals).
//   * n is rounded with the 1.5 * 2^23 trick (exact: no -ffast-math in this build).
FASTDINO_INLINE float exp_ps(float x) {
  float xc = -87.6f > x ? -87.6f : x;
  xc = 89.0f < xc ? 89.0f : xc;
  xc = bits_to_float(float_to_bits(xc) | (float_to_bits(x) & 0xFFu));
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = xc * 1.44269504088896341f + magic;
  const float n = t - magic;
  // ln2 split in two: n * 0.693359375 is exact (0.693359375 has 9 significant bits).
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = (p * (r * r) + r) + 1.0f;
  // The low bits of t hold n + bits(magic); bits of 2^(n-1) = (n + 126) << 23.
  const float scale = bits_to_float((float_to_bits(t) + (126u - float_to_bits(magic))) << 23);
  return (y * scale) * 2.0f;
}

// bfloat16 is the high half of a float32.
FASTDINO_INLINE float bf16_bits_to_float(uint16_t h) {
  return bits_to_float(static_cast<uint32_t>(h) << 16);
}

// The comparisons below are on values below 2^31, written as signed compares: AVX2 has no
// unsigned vector compare, so an unsigned one costs two extra instructions.

// Round to nearest even; overflow rounds to inf; NaN stays NaN (sign and top payload bits kept,
// quiet bit forced so that truncating the payload cannot turn it into inf). Blended at 32 bits and
// shifted once: written the other way round gcc packs each operand to 16 bits separately.
FASTDINO_INLINE uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = u + 0x7FFFu + ((u >> 16) & 1u);
  const uint32_t is_nan = mask_if(static_cast<int32_t>(u & 0x7FFFFFFFu) > 0x7F800000);
  return static_cast<uint16_t>(blend(is_nan, u | 0x00400000u, rounded) >> 16);
}

// IEEE half -> float, exact, branch-free (the method of M. Dukhan's FP16 library): normal,
// inf and NaN halves are placed into a float by shifting the exponent/mantissa field and
// rebiasing with one multiply by 2^-112; subnormal halves (exponent field 0) by the
// "magic 0.5" subtraction.
FASTDINO_INLINE float half_bits_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;  // drops the sign
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = blend(mask_if((h & 0x7C00u) == 0), float_to_bits(denormalized),
                                   float_to_bits(normalized));
  return bits_to_float(sign | magnitude);
}

// float -> IEEE half, round to nearest even, overflow -> inf, NaN -> quiet NaN (same source):
// the two scalings round the value at half precision (including the subnormal range) with the
// float adder, then the half fields are read out of the float's bits.
FASTDINO_INLINE uint16_t float_to_half_bits(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_to_bits(f);
  const uint32_t sign = w & 0x80000000u;
  const int32_t exp_bits = static_cast<int32_t>(w & 0x7F800000u);
  const uint32_t bias = static_cast<uint32_t>(
      blend(mask_if(exp_bits < 0x38800000), 0x38800000u, static_cast<uint32_t>(exp_bits)));
  base = bits_to_float(bias + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const uint32_t is_nan = mask_if(static_cast<int32_t>(w & 0x7FFFFFFFu) > 0x7F800000);
  return static_cast<uint16_t>((sign >> 16) | blend(is_nan, 0x7E00u, nonsign));
}

// Element access for the three supported dtypes. Kernels work on the raw storage (float or
// uint16_t bits) so the loops see only arithmetic the vectorizer understands.
template <class T>
struct Elem;

template <>
struct Elem<float> {
  using storage = float;
  static FASTDINO_INLINE float load(float v) { return v; }
  static FASTDINO_INLINE float store(float f) { return f; }
};

template <>
struct Elem<c10::BFloat16> {
  using storage = uint16_t;
  static FASTDINO_INLINE float load(uint16_t v) { return bf16_bits_to_float(v); }
  static FASTDINO_INLINE uint16_t store(float f) { return float_to_bf16_bits(f); }
};

template <>
struct Elem<c10::Half> {
  using storage = uint16_t;
  static FASTDINO_INLINE float load(uint16_t v) { return half_bits_to_float(v); }
  static FASTDINO_INLINE uint16_t store(float f) { return float_to_half_bits(f); }
};

template <class T>
using storage_t = typename Elem<T>::storage;

template <class T>
struct TypeTag {
  using type = T;
};

inline bool is_supported_float_type(c10::ScalarType st) {
  return st == c10::ScalarType::Float || st == c10::ScalarType::BFloat16 ||
         st == c10::ScalarType::Half;
}

// Calls f(TypeTag<T>{}) for the element type T of st (float32, bfloat16 or float16). Callers
// check the dtype first with a message naming the argument; this is the last line of defence.
template <class F>
decltype(auto) dispatch_float_type(c10::ScalarType st, F&& f) {
  switch (st) {
    case c10::ScalarType::Float:
      return f(TypeTag<float>{});
    case c10::ScalarType::BFloat16:
      return f(TypeTag<c10::BFloat16>{});
    case c10::ScalarType::Half:
      return f(TypeTag<c10::Half>{});
    default:
      TORCH_CHECK(false, "fastdino: unsupported dtype ", st,
                  " (expected float32, bfloat16 or float16)");
  }
}

}  // namespace fastdino
