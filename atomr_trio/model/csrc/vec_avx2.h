// AVX2 + FMA helpers shared by the native kernels (included only where __AVX2__ and __FMA__ are
// defined and AVX512-BF16 is not: the AVX-512 builds use vec_avx512.h).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace atomr_avx2 {

// exp(x) for float32 vectors: 2^n * e^r with |r| <= ln2 / 2, degree-6 polynomial (within 3 ulp:
// 2.7 at worst over [-87, 88.3], measured here and on vec_wide.h's NEON copy).
// x is clamped to [-87, 88.3] first, so 2^n stays a normal float (exp(88.3) ~ 2e38, not inf;
// exp(-87) ~ 1.6e-38, not 0): callers that need exact inf / 0 past those points must not use it.
// NaN stays NaN.
inline __m256 exp_ps(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.f), _mm256_min_ps(_mm256_set1_ps(88.3f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

// 8 bfloat16 values (as bits) widened to float32.
inline __m256 load_bf16(const void* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// 8 float32 values rounded to bfloat16 bits (to nearest, ties to even; NaN -> 0x7fc0), as c10 does.
inline __m128i to_bf16(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(nan));
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// The first `valid` (<= 8) of 8 bfloat16 values of `v` stored at dst.
inline void store_bf16(void* dst, __m256 v, int64_t valid) {
  const __m128i h = to_bf16(v);
  if (valid >= 8) {
    _mm_storeu_si128(static_cast<__m128i*>(dst), h);
  } else if (valid > 0) {
    alignas(16) uint16_t tmp[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h);
    std::memcpy(dst, tmp, static_cast<size_t>(valid) * sizeof(uint16_t));
  }
}

// A pair lane of a packed bf16 weight (k even in the low 16 bits, k odd in the high 16) is two
// float32 values once split: even = lane << 16, odd = lane with its low 16 bits cleared.
inline void widen_pairs(__m256i w, __m256& even, __m256& odd) {
  even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}

}  // namespace atomr_avx2
