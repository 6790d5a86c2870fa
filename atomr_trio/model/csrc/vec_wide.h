// The 8-float vector that the kernels for CPUs without a bf16 dot instruction are written in (the
// widened bf16 matmul of linear_bf16.cpp, the bf16 decode attention of paged_decode_attention.cpp,
// the bf16 prefill attention of prefill_attention.cpp): one __m256 on AVX2 + FMA, two float32x4_t
// on 64-bit Arm (NEON, part of every AArch64 CPU). ATOMR_WIDE is defined where one of them is available.
//
// Every function has the same meaning on both: loads and stores of 8 floats, a broadcast, fused
// multiply-add, max, bf16 <-> float32 (round to nearest even, NaN -> 0x7fc0, as c10 does), exp
// (the same degree-6 polynomial, x clamped to [-87, 88.3], NaN kept), and sum_each8 (8 vectors'
// lane sums at once; the order of the additions differs between the two). Results agree to the bit
// except where FMA contraction differs, and both keep float32 sums of exact bf16 products.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include "vec_avx2.h"
#define ATOMR_WIDE 1

namespace atomr_wide {

using f8 = __m256;
constexpr const char* kIsa = "avx2";  // (Kernels.matmul_isa)
// rows per tile of the float32 matmul micro-kernels (linear_bf16.cpp, prefill_attention.cpp):
// 6 rows x 2 vectors = 12 accumulators, 2 weight vectors and a broadcast in the 16 registers
constexpr int kRows = 6;

inline f8 zero() { return _mm256_setzero_ps(); }
inline f8 set1(float v) { return _mm256_set1_ps(v); }
inline f8 load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, f8 v) { _mm256_storeu_ps(p, v); }
inline f8 broadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline f8 fmadd(f8 a, f8 b, f8 c) { return _mm256_fmadd_ps(a, b, c); }  // a * b + c
inline f8 add(f8 a, f8 b) { return _mm256_add_ps(a, b); }
inline f8 mul(f8 a, f8 b) { return _mm256_mul_ps(a, b); }
inline f8 div(f8 a, f8 b) { return _mm256_div_ps(a, b); }
inline f8 sub(f8 a, f8 b) { return _mm256_sub_ps(a, b); }
inline f8 neg(f8 a) { return _mm256_sub_ps(_mm256_setzero_ps(), a); }
inline f8 max(f8 a, f8 b) { return _mm256_max_ps(a, b); }  // (b where either is NaN)
inline f8 exp(f8 x) { return atomr_avx2::exp_ps(x); }
// lane i: the sum of v[i]'s 8 lanes
inline f8 sum_each8(const f8* v) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}
inline f8 load_bf16(const void* p) { return atomr_avx2::load_bf16(p); }
inline void store_bf16(void* dst, f8 v, int64_t valid) { atomr_avx2::store_bf16(dst, v, valid); }
// 8 int32 lanes of a packed bf16 weight, each a pair (k even low, k odd high) -> two float32 vectors
inline void widen_pairs(const int32_t* p, f8& even, f8& odd) {
  atomr_avx2::widen_pairs(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), even, odd);
}
// the even (low) or the odd (high) halves of those 8 pairs alone: one load and one shift or mask
inline f8 widen_even(const int32_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), 16));
}
inline f8 widen_odd(const int32_t* p) {
  return _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
                                              _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}

}  // namespace atomr_wide

#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define ATOMR_WIDE 1

namespace atomr_wide {

struct f8 {
  float32x4_t lo, hi;
};
constexpr const char* kIsa = "neon";  // (Kernels.matmul_isa)
// rows per tile (as AVX2's kRows): with 6, the 24 accumulator halves, 4 weight halves and the
// broadcasts fill Arm's 32 vector registers, and GCC 12 spills accumulators in every step (even
// with the unroll pragmas); with 5 it does not
constexpr int kRows = 5;

inline f8 zero() { return {vdupq_n_f32(0.f), vdupq_n_f32(0.f)}; }
inline f8 set1(float v) { return {vdupq_n_f32(v), vdupq_n_f32(v)}; }
inline f8 load(const float* p) { return {vld1q_f32(p), vld1q_f32(p + 4)}; }
inline void store(float* p, f8 v) {
  vst1q_f32(p, v.lo);
  vst1q_f32(p + 4, v.hi);
}
inline f8 broadcast(const float* p) {
  const float32x4_t v = vld1q_dup_f32(p);
  return {v, v};
}
inline f8 fmadd(f8 a, f8 b, f8 c) { return {vfmaq_f32(c.lo, a.lo, b.lo), vfmaq_f32(c.hi, a.hi, b.hi)}; }
inline f8 add(f8 a, f8 b) { return {vaddq_f32(a.lo, b.lo), vaddq_f32(a.hi, b.hi)}; }
inline f8 mul(f8 a, f8 b) { return {vmulq_f32(a.lo, b.lo), vmulq_f32(a.hi, b.hi)}; }
inline f8 div(f8 a, f8 b) { return {vdivq_f32(a.lo, b.lo), vdivq_f32(a.hi, b.hi)}; }
inline f8 sub(f8 a, f8 b) { return {vsubq_f32(a.lo, b.lo), vsubq_f32(a.hi, b.hi)}; }
inline f8 max(f8 a, f8 b) {  // as AVX2's: b where either is NaN (vmaxq would give NaN)
  const uint32x4_t lo = vcgtq_f32(a.lo, b.lo), hi = vcgtq_f32(a.hi, b.hi);
  return {vbslq_f32(lo, a.lo, b.lo), vbslq_f32(hi, a.hi, b.hi)};
}
inline f8 neg(f8 a) {  // 0 - a, as AVX2's (vnegq would give -0 for +0 and flip a NaN's sign)
  return {vsubq_f32(vdupq_n_f32(0.f), a.lo), vsubq_f32(vdupq_n_f32(0.f), a.hi)};
}
// lane i: the sum of v[i]'s 8 lanes (pairwise adds: [a0+a1, a2+a3, b0+b1, b2+b3])
inline f8 sum_each8(const f8* v) {
  float32x4_t s[8];
  for (int i = 0; i < 8; ++i) s[i] = vaddq_f32(v[i].lo, v[i].hi);
  return {vpaddq_f32(vpaddq_f32(s[0], s[1]), vpaddq_f32(s[2], s[3])),
          vpaddq_f32(vpaddq_f32(s[4], s[5]), vpaddq_f32(s[6], s[7]))};
}

// 2^n * e^r with |r| <= ln2 / 2, as atomr_avx2::exp_ps (vmaxq / vminq keep NaN)
inline float32x4_t exp4(float32x4_t x) {
  x = vmaxq_f32(vdupq_n_f32(-87.f), vminq_f32(vdupq_n_f32(88.3f), x));
  const float32x4_t n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504f)));
  float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693145752f));  // x - n * c
  r = vfmsq_f32(r, n, vdupq_n_f32(1.42860677e-06f));
  float32x4_t p = vdupq_n_f32(1.f / 720);
  p = vfmaq_f32(vdupq_n_f32(1.f / 120), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.f / 24), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.f / 6), p, r);
  p = vfmaq_f32(vdupq_n_f32(0.5f), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.f), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.f), p, r);
  const int32x4_t scale = vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127)), 23);
  return vmulq_f32(p, vreinterpretq_f32_s32(scale));
}
inline f8 exp(f8 x) { return {exp4(x.lo), exp4(x.hi)}; }

inline f8 load_bf16(const void* p) {
  const uint16x8_t h = vld1q_u16(static_cast<const uint16_t*>(p));
  return {vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16)), vreinterpretq_f32_u32(vshll_high_n_u16(h, 16))};
}

inline uint16x4_t to_bf16(float32x4_t v) {
  const uint32x4_t b = vreinterpretq_u32_f32(v);
  const uint32x4_t lsb = vandq_u32(vshrq_n_u32(b, 16), vdupq_n_u32(1));
  const uint32x4_t r = vshrq_n_u32(vaddq_u32(b, vaddq_u32(lsb, vdupq_n_u32(0x7fff))), 16);
  return vmovn_u32(vbslq_u32(vceqq_f32(v, v), r, vdupq_n_u32(0x7fc0)));  // v != v: NaN
}
inline void store_bf16(void* dst, f8 v, int64_t valid) {
  const uint16x8_t h = vcombine_u16(to_bf16(v.lo), to_bf16(v.hi));
  if (valid >= 8) {
    vst1q_u16(static_cast<uint16_t*>(dst), h);
  } else if (valid > 0) {
    uint16_t tmp[8];
    vst1q_u16(tmp, h);
    std::memcpy(dst, tmp, static_cast<size_t>(valid) * sizeof(uint16_t));
  }
}

inline void widen_pairs(const int32_t* p, f8& even, f8& odd) {
  const uint32x4_t mask = vdupq_n_u32(0xffff0000u);
  const uint32x4_t a = vld1q_u32(reinterpret_cast<const uint32_t*>(p));
  const uint32x4_t b = vld1q_u32(reinterpret_cast<const uint32_t*>(p) + 4);
  even = {vreinterpretq_f32_u32(vshlq_n_u32(a, 16)), vreinterpretq_f32_u32(vshlq_n_u32(b, 16))};
  odd = {vreinterpretq_f32_u32(vandq_u32(a, mask)), vreinterpretq_f32_u32(vandq_u32(b, mask))};
}
// (as AVX2's; compiled, not run: the NEON matmul keeps its buffer for 2+ rows, linear_bf16.cpp)
inline f8 widen_even(const int32_t* p) {
  const uint32_t* q = reinterpret_cast<const uint32_t*>(p);
  return {vreinterpretq_f32_u32(vshlq_n_u32(vld1q_u32(q), 16)),
          vreinterpretq_f32_u32(vshlq_n_u32(vld1q_u32(q + 4), 16))};
}
inline f8 widen_odd(const int32_t* p) {
  const uint32_t* q = reinterpret_cast<const uint32_t*>(p);
  const uint32x4_t mask = vdupq_n_u32(0xffff0000u);
  return {vreinterpretq_f32_u32(vandq_u32(vld1q_u32(q), mask)),
          vreinterpretq_f32_u32(vandq_u32(vld1q_u32(q + 4), mask))};
}

}  // namespace atomr_wide

#endif

#if defined(ATOMR_WIDE)
#include <type_traits>

namespace atomr_wide {

// f(std::integral_constant<int, mt>{}) for a tile of 1 <= mt <= kRows rows.
template <typename F>
void with_rows(int mt, F&& f) {
  switch (mt) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;  // (kRows on NEON: the default is the same)
    default: f(std::integral_constant<int, kRows>{});
  }
}

}  // namespace atomr_wide
#endif
