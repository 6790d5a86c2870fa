// Matmul by a weight kept in GGML's quantized blocks (CPU): Q8_0, Q4_0, Q4_1, Q4_K.
//
// y[m, n] = sum_k x[m, k] * W[n, k] with W row n held as GGML blocks (the GGUF file's bytes,
// one row of `row_bytes` per output), x float32 or bfloat16 (widened to float32 once). Each
// block is dequantized in registers, 32 values at a time, and multiplied into float32
// accumulators: no float copy of the weight exists, so a decode step reads 4.5-8.5 bits per
// weight instead of 16 or 32. Activations stay float (no int8 requantization of x; the one
// exception: AVX2 builds without AVX-512 at 1-3 rows of bf16 x over Q4_0 / Q4_1, "bf16 x at few
// rows on AVX2", which rounds x first): the error against float32 arithmetic on the dequantized
// weight is float32 rounding —
// the summation order, and at few rows over 4-bit blocks the block's offset taken out of the sum
// (see there). bf16 x from 4 rows on (with AVX512-BF16) and at kPanelRows rows or more (the
// panels) meets the weight rounded to bf16 first, as quantization=none holds it.
//
// Block formats (the GGUF file format, as llama.cpp defines it; d, dmin, m are IEEE half):
//   Q8_0  34 bytes / 32 values: d, int8 q[32];                    w = d * q
//   Q4_0  18 bytes / 32 values: d, 16 bytes of nibbles;           w = d * (q - 8)
//   Q4_1  20 bytes / 32 values: d, m, 16 bytes of nibbles;        w = d * q + m
//     (value j < 16 is the low nibble of byte j, value 16 + j its high nibble)
//   Q4_K 144 bytes / 256 values: d, dmin, 12 bytes of 6-bit scales and mins (8 pairs),
//     128 bytes of nibbles; group g of 32 values: w = d * sc[g] * q - dmin * mn[g], where
//     groups 2c and 2c+1 are the low and high nibbles of bytes 32c..32c+31.
//
// Threads split the output rows (at::parallel_for). Steps of up to kFewRows rows (batch-1 and
// small-batch decode) dequantize each block in registers and use it for every row at once; over
// 4-bit blocks they apply the block's scale and offset once per block instead of once per value
// (see "4-bit blocks at few rows"; AVX2 builds without AVX-512 multiply bf16 x's 8-bit blocks by
// the nibbles as integers there instead: "bf16 x at few rows on AVX2"). Larger steps dequantize kTileN weight rows at a time into a small float32
// buffer (L1/L2) that every kTileM-row tile of x then reuses, so the dequantization is paid once
// per weight row, not once per tile of x (with AVX512-BF16 and x in bf16: 16 rows into a bf16
// buffer, `vdpbf16ps` tiles, and each row's 16 results stored by one vector epilogue). Steps of
// kPanelRows rows or more of bf16 x, where the build has linear_bf16.cpp's matmul, hand it the
// weight panel by panel, dequantized to bf16 into its packed layout (fill_panel). Either way a
// weight row is read from memory once per call, and x / y move in their own dtype (no extra
// torch ops around the kernel). Vector code:
// AVX-512 (16 lanes), AVX2+FMA (2 x 8 lanes) or portable loops, chosen at compile time
// (native.py builds with -march=native or $ATOMR_TRIO_NATIVE_ARCH).
//
// quant_linear(x [M, K], w uint8 [N, row_bytes], type, K, bias?) -> y [M, N] in x's dtype
// quant_linear_silu_mul(x [M, K], w [2n, row_bytes], type, K) -> silu(x Wg^T) * (x Wu^T) [M, n]
//   for a gate|up stacked weight (gate rows first).
// quant_dequantize(w [N, row_bytes], type, K, rows?) -> float32 [len(rows) or N, K]: the
//   weight's rows (an embedding lookup, or the whole weight for prefill chunks of float32 x).
// quant_int8_x_rows() -> the rows of bf16 x up to which Q4_0 / Q4_1 products take x in 8-bit
//   blocks (3 on AVX2 builds without AVX-512, else 0).
// Built and loaded at run time by native.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "ops.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
#include "vec_avx512.h"
#elif defined(__AVX2__) && defined(__FMA__)
#include "vec_avx2.h"
#endif

namespace {

// ---- 16 float32 lanes: one AVX-512 vector, two AVX2 vectors, or plain loops -------------------
#if defined(__AVX512F__)
struct V16 {
  __m512 v;
};
inline V16 zero() { return {_mm512_setzero_ps()}; }
inline V16 set1(float f) { return {_mm512_set1_ps(f)}; }
inline V16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void store(float* p, V16 a) { _mm512_storeu_ps(p, a.v); }
inline V16 fma(V16 a, V16 b, V16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline V16 add(V16 a, V16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline float hsum(V16 a) { return _mm512_reduce_add_ps(a.v); }
inline V16 from_i8(const uint8_t* p) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}
inline V16 silu_mul(V16 g, V16 u) {  // silu(g) * u
  const __m512 e = atomr_vec::exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g.v));
  return {_mm512_mul_ps(_mm512_div_ps(g.v, _mm512_add_ps(_mm512_set1_ps(1.f), e)), u.v)};
}
#elif defined(__AVX2__) && defined(__FMA__)
struct V16 {
  __m256 a, b;
};
inline V16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V16 set1(float f) { return {_mm256_set1_ps(f), _mm256_set1_ps(f)}; }
inline V16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void store(float* p, V16 v) {
  _mm256_storeu_ps(p, v.a);
  _mm256_storeu_ps(p + 8, v.b);
}
inline V16 fma(V16 x, V16 y, V16 z) { return {_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b)}; }
inline V16 add(V16 x, V16 y) { return {_mm256_add_ps(x.a, y.a), _mm256_add_ps(x.b, y.b)}; }
inline float hsum(V16 v) {
  const __m256 s = _mm256_add_ps(v.a, v.b);
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}
inline V16 from_i8(const uint8_t* p) {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)))};
}
inline V16 silu_mul(V16 g, V16 u) {  // silu(g) * u
  const __m256 one = _mm256_set1_ps(1.f), zero8 = _mm256_setzero_ps();
  const __m256 ea = atomr_avx2::exp_ps(_mm256_sub_ps(zero8, g.a)), eb = atomr_avx2::exp_ps(_mm256_sub_ps(zero8, g.b));
  return {_mm256_mul_ps(_mm256_div_ps(g.a, _mm256_add_ps(one, ea)), u.a),
          _mm256_mul_ps(_mm256_div_ps(g.b, _mm256_add_ps(one, eb)), u.b)};
}
#else
struct V16 {
  float f[16];
};
inline V16 set1(float x) {
  V16 r;
  for (float& v : r.f) v = x;
  return r;
}
inline V16 zero() { return set1(0.f); }
inline V16 load(const float* p) {
  V16 r;
  std::memcpy(r.f, p, sizeof r.f);
  return r;
}
inline void store(float* p, V16 a) { std::memcpy(p, a.f, sizeof a.f); }
inline V16 fma(V16 a, V16 b, V16 c) {
  for (int i = 0; i < 16; ++i) c.f[i] = std::fma(a.f[i], b.f[i], c.f[i]);
  return c;
}
inline V16 add(V16 a, V16 b) {
  for (int i = 0; i < 16; ++i) a.f[i] += b.f[i];
  return a;
}
inline float hsum(V16 a) {
  float s = 0.f;
  for (float v : a.f) s += v;
  return s;
}
inline V16 from_i8(const uint8_t* p) {
  V16 r;
  for (int i = 0; i < 16; ++i) r.f[i] = static_cast<float>(static_cast<int8_t>(p[i]));
  return r;
}
inline V16 silu_mul(V16 g, V16 u) {  // silu(g) * u
  for (int i = 0; i < 16; ++i) g.f[i] = g.f[i] / (1.f + std::exp(-g.f[i])) * u.f[i];
  return g;
}
#endif

#if defined(__AVX512F__)
// The sums of the lanes of four vectors at once, into c[0..3] (three horizontal adds instead of
// four full reductions: at the model's widths the reductions are a third of a tile's work).
inline void hsum4(const __m512* a, float* c) {
  __m256 h[4];
  for (int j = 0; j < 4; ++j)
    h[j] = _mm256_add_ps(_mm512_castps512_ps256(a[j]),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[j]), 1)));
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
  _mm_storeu_ps(c, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
}
#endif

// The low (high = false) or high nibbles of 16 bytes, as 16 floats.
#if defined(__AVX512F__)
inline V16 nibble_half(const uint8_t* p, bool high) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm512_cvtepi32_ps(high ? _mm512_srli_epi32(b, 4) : _mm512_and_si512(b, _mm512_set1_epi32(0x0F)))};
}
#elif defined(__AVX2__) && defined(__FMA__)
inline V16 nibble_half(const uint8_t* p, bool high) {
  const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
  const __m256i m = _mm256_set1_epi32(0x0F);
  if (high) return {_mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4)), _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4))};
  return {_mm256_cvtepi32_ps(_mm256_and_si256(b0, m)), _mm256_cvtepi32_ps(_mm256_and_si256(b1, m))};
}
#else
inline V16 nibble_half(const uint8_t* p, bool high) {
  V16 r;
  for (int i = 0; i < 16; ++i) r.f[i] = static_cast<float>(high ? p[i] >> 4 : p[i] & 0x0F);
  return r;
}
#endif

// Both halves of a 4-bit block's 16 bytes (inlined: the compiler widens the bytes once for both).
inline void nibbles(const uint8_t* p, V16& lo, V16& hi) {
  lo = nibble_half(p, false);
  hi = nibble_half(p, true);
}

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

// Reading a weight row, ask for the bytes kPrefetchRows rows further on: the rows are consecutive
// in memory, yet at one row of x the hardware prefetcher alone left the default model's Q4_1
// layers waiting on memory (all layers at one row: 5.3 -> 4.3 ms with it, on a Zen 4).
constexpr int64_t kPrefetchRows = 4;
// (the address may lie past the weight's end: a prefetch never faults, and no pointer is formed;
// __builtin_prefetch is prefetcht0 / prefetcht1 on x86 and prfm on Arm)
inline void prefetch(const uint8_t* p, int64_t ahead) {
  __builtin_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(ahead)),
                     0, 3);
}

// Ask for rows first .. first + count - 1 (rb bytes each, consecutive) into L2: a filled panel's
// successor, which the thread most likely fills next, read while this one is filled and multiplied.
inline void prefetch_rows(const uint8_t* w, int64_t rb, int64_t first, int64_t count) {
  if (count <= 0) return;
  const char* p = reinterpret_cast<const char*>(w + first * rb);
  for (int64_t b = 0; b < count * rb; b += 64) __builtin_prefetch(p + b, 0, 2);
}

// ---- the block formats: `group(block, g, w0, w1)` = values 32g..32g+15 and 32g+16..32g+31 ------
enum GGMLType : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kQ4_K = 12 };

struct Q8_0 {
  static constexpr int kValues = 32, kBytes = 34, kGroups = 1;
  static void group(const uint8_t* b, int, V16& w0, V16& w1) {
    const V16 d = set1(half_at(b));
    const V16 z = zero();
    w0 = fma(from_i8(b + 2), d, z);
    w1 = fma(from_i8(b + 18), d, z);
  }
};

struct Q4_0 {
  static constexpr int kValues = 32, kBytes = 18, kGroups = 1;
  static void group(const uint8_t* b, int, V16& w0, V16& w1) {
    const float d = half_at(b);
    const V16 dv = set1(d), off = set1(-8.f * d);  // d * (q - 8), exact: q - 8 and its product fit
    nibbles(b + 2, w0, w1);
    w0 = fma(w0, dv, off);
    w1 = fma(w1, dv, off);
  }
};

struct Q4_1 {
  static constexpr int kValues = 32, kBytes = 20, kGroups = 1;
  static void group(const uint8_t* b, int, V16& w0, V16& w1) {
    const V16 d = set1(half_at(b)), m = set1(half_at(b + 2));
    nibbles(b + 4, w0, w1);
    w0 = fma(w0, d, m);
    w1 = fma(w1, d, m);
  }
};

struct Q4_K {
  static constexpr int kValues = 256, kBytes = 144, kGroups = 8;
  // group g's 6-bit scale and min (the 12 scale bytes: see the header comment)
  static void scale_min(const uint8_t* s, int g, int& sc, int& mn) {
    if (g < 4) {
      sc = s[g] & 63;
      mn = s[g + 4] & 63;
    } else {
      sc = (s[g + 4] & 0x0F) | ((s[g - 4] >> 6) << 4);
      mn = (s[g + 4] >> 4) | ((s[g] >> 6) << 4);
    }
  }
  static void group(const uint8_t* b, int g, V16& w0, V16& w1) {
    int sc, mn;
    scale_min(b + 4, g, sc, mn);
    const V16 d = set1(half_at(b) * static_cast<float>(sc));
    const V16 m = set1(-(half_at(b + 2) * static_cast<float>(mn)));
    const uint8_t* q = b + 16 + 32 * (g / 2);
    w0 = fma(nibble_half(q, g % 2 != 0), d, m);
    w1 = fma(nibble_half(q + 16, g % 2 != 0), d, m);
  }
};

// out[m] = x[m, :] . W row, for MT rows of x (float32, row stride ldx): the blocks dequantized
// in registers. The path of steps with few rows, where every block read serves few products.
template <class F, int MT>
void dot_tile(const uint8_t* row, int64_t blocks, const float* x, int64_t ldx, float* out) {
  V16 acc0[MT], acc1[MT];  // two chains per row: the FMA latency is hidden at one row too
  for (int m = 0; m < MT; ++m) acc0[m] = acc1[m] = zero();
  const int64_t ahead = kPrefetchRows * blocks * F::kBytes;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* blk = row + b * F::kBytes;
    prefetch(blk, ahead);
    for (int g = 0; g < F::kGroups; ++g) {
      V16 w0, w1;
      F::group(blk, g, w0, w1);
      const float* xp = x + b * F::kValues + g * 32;
      for (int m = 0; m < MT; ++m) {
        acc0[m] = fma(w0, load(xp + m * ldx), acc0[m]);
        acc1[m] = fma(w1, load(xp + m * ldx + 16), acc1[m]);
      }
    }
  }
  for (int m = 0; m < MT; ++m) out[m] = hsum(add(acc0[m], acc1[m]));
}

// The weight rows' values, float32, into out (K values per row).
template <class F>
void dequant_row(const uint8_t* row, int64_t blocks, float* out) {
  for (int64_t b = 0; b < blocks; ++b) {
    for (int g = 0; g < F::kGroups; ++g) {
      V16 w0, w1;
      F::group(row + b * F::kBytes, g, w0, w1);
      store(out + b * F::kValues + g * 32, w0);
      store(out + b * F::kValues + g * 32 + 16, w1);
    }
  }
}

#if defined(__AVX512BF16__)
// 4-bit formats (Q4_0, Q4_1, Q4_K): group g's 32 values as bfloat16 (value i in word i) by lookup.
// A group's values are d * q + m for q in 0..15: those 16 are computed (the same float32 fma as
// group()) and rounded once into a table, and vpermw looks each nibble up in it — bit for bit what
// group() and a conversion give, without widening and converting all 32 values. The default
// model's GGUF matrices, all layers, 2 threads (2-core Zen 4, builds alternated, 3 runs each):
// 64 rows 42.0 -> 40.8 ms, 32 rows 26.8 -> 25.8, 16 rows 16.1 -> 15.8; prefill chunks of 256 rows
// level (132 ms).
template <class F>
constexpr bool kLookupGroups = std::is_same_v<F, Q4_0> || std::is_same_v<F, Q4_1> || std::is_same_v<F, Q4_K>;

template <class F>
inline __m512i group_bf16(const uint8_t* b, int g) {
  float d, m;
  __m512i idx;  // word i: the nibble of value i in its low 4 bits (bit 4 may be set: see the table)
  if constexpr (std::is_same_v<F, Q4_K>) {
    int sc, mn;
    Q4_K::scale_min(b + 4, g, sc, mn);
    d = half_at(b) * static_cast<float>(sc);
    m = -(half_at(b + 2) * static_cast<float>(mn));
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16 + 32 * (g / 2)));
    const __m512i q = _mm512_cvtepu8_epi16(bytes);
    idx = g % 2 != 0 ? _mm512_srli_epi16(q, 4) : q;
  } else {
    d = half_at(b);
    m = std::is_same_v<F, Q4_1> ? half_at(b + 2) : -8.f * d;
    // the 16 bytes in both halves, widened to words; words 16..31 shifted to the high nibbles
    const __m512i shift = _mm512_set_epi64(0x0004000400040004, 0x0004000400040004, 0x0004000400040004,
                                           0x0004000400040004, 0, 0, 0, 0);
    const int at = std::is_same_v<F, Q4_1> ? 4 : 2;
    const __m256i q2 = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + at)));
    idx = _mm512_srlv_epi16(_mm512_cvtepu8_epi16(q2), shift);
  }
  const __m512 q = _mm512_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 9.f, 10.f, 11.f, 12.f, 13.f, 14.f, 15.f);
  const __m256i t = (__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(q, _mm512_set1_ps(d), _mm512_set1_ps(m)));
  // vpermw reads an index's low 5 bits: the table twice, so bit 4 of a low nibble's byte is ignored
  return _mm512_permutexvar_epi16(idx, _mm512_broadcast_i64x4(t));
}

// The weight row's values as bfloat16 into out (K values): the rounding that the bf16 weights of
// quantization=none have too.
template <class F>
void dequant_row_bf16(const uint8_t* row, int64_t blocks, uint16_t* out) {
  for (int64_t b = 0; b < blocks; ++b) {
    for (int g = 0; g < F::kGroups; ++g) {
      if constexpr (kLookupGroups<F>) {
        _mm512_storeu_si512(out + b * F::kValues + g * 32, group_bf16<F>(row + b * F::kBytes, g));
      } else {
        V16 w0, w1;
        F::group(row + b * F::kBytes, g, w0, w1);
        _mm512_storeu_si512(out + b * F::kValues + g * 32, (__m512i)_mm512_cvtne2ps_pbh(w1.v, w0.v));
      }
    }
  }
}
#endif

// ---- GGUF panels for linear_bf16.cpp's matmul (steps of kPanelRows bf16 rows or more) ----------
// fill_panel(w, rb, K, W, row_of, dst): one panel of the weight in the matmul's packed layout (ops.h,
// PanelFill), W columns (kLinearPanelCols or kSiluPanelCols): dst[p * W + c] holds values 2p and
// 2p + 1 of the weight row row_of(c) — rows of rb bytes of blocks at w, K values each — as bf16,
// rounded to nearest even (the rounding of quantization=none's bf16 weights), or zeros where
// row_of(c) < 0 (the padding of the last panel).
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// The first two stages of an int32 transpose, which stay within 128-bit lanes, for 8 rows of
// __m256i or 16 of __m512i: out[4q + e], lane L, holds element 4L + e of rows 4q .. 4q + 3.
inline __m256i unpacklo32(__m256i a, __m256i b) { return _mm256_unpacklo_epi32(a, b); }
inline __m256i unpackhi32(__m256i a, __m256i b) { return _mm256_unpackhi_epi32(a, b); }
inline __m256i unpacklo64(__m256i a, __m256i b) { return _mm256_unpacklo_epi64(a, b); }
inline __m256i unpackhi64(__m256i a, __m256i b) { return _mm256_unpackhi_epi64(a, b); }
#if defined(__AVX512F__)
inline __m512i unpacklo32(__m512i a, __m512i b) { return _mm512_unpacklo_epi32(a, b); }
inline __m512i unpackhi32(__m512i a, __m512i b) { return _mm512_unpackhi_epi32(a, b); }
inline __m512i unpacklo64(__m512i a, __m512i b) { return _mm512_unpacklo_epi64(a, b); }
inline __m512i unpackhi64(__m512i a, __m512i b) { return _mm512_unpackhi_epi64(a, b); }
#endif
template <int N, typename V>
void interleave4(const V* r, V* out) {
  V t[N];
  for (int m = 0; m < N / 2; ++m) {
    t[2 * m] = unpacklo32(r[2 * m], r[2 * m + 1]);
    t[2 * m + 1] = unpackhi32(r[2 * m], r[2 * m + 1]);
  }
  for (int q = 0; q < N / 4; ++q) {
    out[4 * q] = unpacklo64(t[4 * q], t[4 * q + 2]);
    out[4 * q + 1] = unpackhi64(t[4 * q], t[4 * q + 2]);
    out[4 * q + 2] = unpacklo64(t[4 * q + 1], t[4 * q + 3]);
    out[4 * q + 3] = unpackhi64(t[4 * q + 1], t[4 * q + 3]);
  }
}
#endif

#if defined(__AVX512F__)
// One row's 32 values of a group as 16 bf16 pairs (value 2i in the low half of lane i).
inline __m512i bf16_pairs(V16 w0, V16 w1) {
#if defined(__AVX512BF16__)
  return (__m512i)_mm512_cvtne2ps_pbh(w1.v, w0.v);
#else  // AVX-512 without BF16: round to nearest even by integer arithmetic (NaN stays NaN)
  auto half = [](__m512 v) {
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(r);
  };
  return _mm512_inserti64x4(_mm512_castsi256_si512(half(w0.v)), half(w1.v), 1);
#endif
}

// In place: lane k of r[i] <-> lane i of r[k] (16 x 16 int32; 64 shuffles).
inline void transpose16(__m512i* r) {
  __m512i b[16];
  interleave4<16>(r, b);
  for (int e = 0; e < 4; ++e) {  // element 4L + e gathers lane L of b[e], b[4 + e], b[8 + e], b[12 + e]
    const __m512i lo0 = _mm512_shuffle_i32x4(b[e], b[4 + e], 0x44), lo1 = _mm512_shuffle_i32x4(b[8 + e], b[12 + e], 0x44);
    const __m512i hi0 = _mm512_shuffle_i32x4(b[e], b[4 + e], 0xEE), hi1 = _mm512_shuffle_i32x4(b[8 + e], b[12 + e], 0xEE);
    r[e] = _mm512_shuffle_i32x4(lo0, lo1, 0x88);
    r[4 + e] = _mm512_shuffle_i32x4(lo0, lo1, 0xDD);
    r[8 + e] = _mm512_shuffle_i32x4(hi0, hi1, 0x88);
    r[12 + e] = _mm512_shuffle_i32x4(hi0, hi1, 0xDD);
  }
}

// 16 rows at a time (one block of columns): each row's group of 32 values becomes one vector of 16
// bf16 pairs, and a transpose turns the 16 rows' vectors into 16 pairs' vectors of the panel.
// Measured against storing each pair on its own (the default model's GGUF matrices, all layers,
// 128 rows, 2 threads, 2-core Zen 4): 80.5 -> 72.5 ms (bf16 weights: 64.3 ms).
template <class F, typename RowOf>
void fill_panel(const uint8_t* w, int64_t rb, int64_t K, int W, RowOf&& row_of, int32_t* dst) {
  const int64_t blocks = K / F::kValues;
  for (int j = 0; j < W / 16; ++j) {
    const uint8_t* rows[16];
    for (int c = 0; c < 16; ++c) {
      const int64_t r = row_of(j * 16 + c);
      rows[c] = r < 0 ? nullptr : w + r * rb;
    }
    for (int64_t b = 0; b < blocks; ++b)
      for (int g = 0; g < F::kGroups; ++g) {
        __m512i v[16];
        for (int c = 0; c < 16; ++c) {
          if (rows[c] == nullptr) {
            v[c] = _mm512_setzero_si512();
            continue;
          }
#if defined(__AVX512BF16__)
          if constexpr (kLookupGroups<F>) {
            v[c] = group_bf16<F>(rows[c] + b * F::kBytes, g);
            continue;
          }
#endif
          V16 w0, w1;
          F::group(rows[c] + b * F::kBytes, g, w0, w1);
          v[c] = bf16_pairs(w0, w1);
        }
        transpose16(v);
        int32_t* out = dst + (b * F::kValues + g * 32) / 2 * W + j * 16;
        for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + i * W, v[i]);
      }
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
// In place: lane k of r[i] <-> lane i of r[k] (8 x 8 int32; 24 shuffles).
inline void transpose8(__m256i* r) {
  __m256i u[8];
  interleave4<8>(r, u);
  for (int e = 0; e < 4; ++e) {  // element 4L + e: lane L of u[e] (rows 0..3), of u[4 + e] (4..7)
    r[e] = _mm256_permute2x128_si256(u[e], u[4 + e], 0x20);
    r[4 + e] = _mm256_permute2x128_si256(u[e], u[4 + e], 0x31);
  }
}

// As the AVX-512 fill, 8 rows (half a block of columns) at a time: each row's group of 32 values
// becomes two vectors of 8 bf16 pairs, and two 8 x 8 transposes turn them into the pairs' vectors.
// Measured against storing each pair on its own (the default model's GGUF matrices, all layers,
// 2 threads, 2-core Zen 4 built for Haswell, 2 alternated runs): 64 rows 94-102 -> 85-95 ms, 128
// rows 160-175 -> 152-167, 256 rows 287-317 -> 277-311 (bf16 weights: 79, 156, 298).
template <class F, typename RowOf>
void fill_panel(const uint8_t* w, int64_t rb, int64_t K, int W, RowOf&& row_of, int32_t* dst) {
  const int64_t blocks = K / F::kValues;
  for (int h = 0; h < W / 8; ++h) {
    const uint8_t* rows[8];
    for (int c = 0; c < 8; ++c) {
      const int64_t r = row_of(h * 8 + c);
      rows[c] = r < 0 ? nullptr : w + r * rb;
    }
    for (int64_t b = 0; b < blocks; ++b)
      for (int g = 0; g < F::kGroups; ++g) {
        __m256i lo[8], hi[8];  // pairs 0..7 and 8..15 of the group, one row each
        for (int c = 0; c < 8; ++c) {
          if (rows[c] == nullptr) {
            lo[c] = hi[c] = _mm256_setzero_si256();
            continue;
          }
          V16 w0, w1;
          F::group(rows[c] + b * F::kBytes, g, w0, w1);
          lo[c] = _mm256_set_m128i(atomr_avx2::to_bf16(w0.b), atomr_avx2::to_bf16(w0.a));
          hi[c] = _mm256_set_m128i(atomr_avx2::to_bf16(w1.b), atomr_avx2::to_bf16(w1.a));
        }
        transpose8(lo);
        transpose8(hi);
        int32_t* out = dst + (b * F::kValues + g * 32) / 2 * W + h * 8;
        for (int i = 0; i < 8; ++i) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * W), lo[i]);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (8 + i) * W), hi[i]);
        }
      }
  }
}
#else
// Portable (64-bit Arm's NEON matmul takes these panels; a build without a bf16 matmul never
// asks, since in_panels is false there): column by column, the row dequantized by dequant_row,
// then rounded to bf16 pairs one value at a time (c10's rounding: to nearest even, NaN -> 0x7fc0).
template <class F, typename RowOf>
void fill_panel(const uint8_t* w, int64_t rb, int64_t K, int W, RowOf&& row_of, int32_t* dst) {
  thread_local std::vector<float> v;
  v.resize(static_cast<size_t>(K));
  for (int c = 0; c < W; ++c) {
    const int64_t r = row_of(c);
    if (r < 0) {  // the padding of the last panel
      for (int64_t p = 0; p < K / 2; ++p) dst[p * W + c] = 0;
      continue;
    }
    dequant_row<F>(w + r * rb, K / F::kValues, v.data());
    for (int64_t p = 0; p < K / 2; ++p) {
      const uint32_t lo = c10::BFloat16(v[2 * p]).x, hi = c10::BFloat16(v[2 * p + 1]).x;
      dst[p * W + c] = static_cast<int32_t>(lo | hi << 16);
    }
  }
}
#endif

// Register tile of the many-row path: kTileM rows of x x kTileN dequantized weight rows.
#if defined(__AVX512F__)
constexpr int kTileM = 4, kTileN = 4;  // 16 accumulators, 4 weight and 1 x vector (hsum4 takes 4)
#else
constexpr int kTileM = 2, kTileN = 4;  // AVX2: 8 accumulators of one register, 4 weight and 1 x vector
#endif
constexpr int64_t kFewRows = 3;  // steps of up to this many rows dequantize in registers (dot_tile)

// fn(std::integral_constant<int, MT>{}) with MT = mt (1 .. kFewRows): the few-row tiles' row count
// as a template argument
template <typename Fn>
void with_few_rows(int64_t mt, Fn&& fn) {
  switch (mt) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    default: fn(std::integral_constant<int, 3>{});
  }
}

// The buffered tile's vector: V16, or with AVX2 one 8-lane register (V16's two registers per
// accumulator spilled there: the tile's accumulators, weight vectors and an x vector must fit 16).
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
struct Lane {
  __m256 v;
};
constexpr int64_t kLane = 8;
inline Lane lane_zero() { return {_mm256_setzero_ps()}; }
inline Lane lane_load(const float* p) { return {_mm256_loadu_ps(p)}; }
inline Lane fma(Lane a, Lane b, Lane c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline float hsum(Lane a) { return hsum(V16{a.v, _mm256_setzero_ps()}); }
#else
using Lane = V16;
constexpr int64_t kLane = 16;
inline Lane lane_zero() { return zero(); }
inline Lane lane_load(const float* p) { return load(p); }
#endif

// c[m * kTileN + j] = x[m, :] . wbuf[j, :] for MT rows of x, over float32 weight rows in wbuf
template <int MT>
void dot_buffered(const float* wbuf, const float* x, int64_t K, float* c) {
  Lane acc[MT][kTileN];
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < kTileN; ++j) acc[m][j] = lane_zero();
  for (int64_t k = 0; k < K; k += kLane) {
    Lane wv[kTileN];
    for (int j = 0; j < kTileN; ++j) wv[j] = lane_load(wbuf + j * K + k);
    for (int m = 0; m < MT; ++m) {
      const Lane xv = lane_load(x + m * K + k);
      for (int j = 0; j < kTileN; ++j) acc[m][j] = fma(wv[j], xv, acc[m][j]);
    }
  }
#if defined(__AVX512F__)
  for (int m = 0; m < MT; ++m) {
    __m512 v[kTileN];
    for (int j = 0; j < kTileN; ++j) v[j] = acc[m][j].v;
    hsum4(v, c + m * kTileN);
  }
#else
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < kTileN; ++j) c[m * kTileN + j] = hsum(acc[m][j]);
#endif
}

void dot_buffered_rows(int mt, const float* wbuf, const float* x, int64_t K, float* c) {
  switch (mt) {
    case 1: dot_buffered<1>(wbuf, x, K, c); break;
#if defined(__AVX512F__)
    case 2: dot_buffered<2>(wbuf, x, K, c); break;
    case 3: dot_buffered<3>(wbuf, x, K, c); break;
    default: dot_buffered<4>(wbuf, x, K, c);
#else
    default: dot_buffered<2>(wbuf, x, K, c);
#endif
  }
}

// ---- 4-bit blocks at few rows -------------------------------------------------------------------
// Steps of up to kFewRows rows over Q4_0 / Q4_1 (batch-1 decode over the default model's layers)
// take the block's offset out of the inner loop:
//   sum_i x_i (d q_i + m) = d * sum_i x_i q_i + m * sum_i x_i      (Q4_0: m = -8d)
// with sum_i x_i per block computed once per call; the nibbles meet x as small integers and d, m
// are applied once per block, four weight rows per tile sharing each x load. Batch-1 decode there
// was bound by the instructions that widened and scaled every nibble, not by reading the blocks.
// Against float32 arithmetic on the dequantized weight this rounds differently (no rounded weight
// d q + m is formed; the two terms can cancel): float32 rounding of |d| sum |x| q + |m| sum |x|.
// (An infinite x gives NaN here where d q + m would keep its sign: inf - inf in the two terms.)
constexpr int kNibRows = 4;
#if defined(__AVX512F__)
constexpr int64_t kNibbleMaxRows = kFewRows;
#else
constexpr int64_t kNibbleMaxRows = 1;  // AVX2 / portable: 2 or 3 rows' tiles spill (slower than dot_tile)
#endif

template <class F>
constexpr bool kNibbleBlocks = std::is_same_v<F, Q4_0> || std::is_same_v<F, Q4_1>;

template <class F>
constexpr int kNibbleAt = std::is_same_v<F, Q4_1> ? 4 : 2;  // after d (Q4_0) or d, m (Q4_1)

// the block's offset m (Q4_0: -8d, exact)
template <class F>
float block_offset(const uint8_t* blk, float d) {
  return std::is_same_v<F, Q4_1> ? half_at(blk + 2) : -8.f * d;
}

// x's sum over each 32-value block, per row: xsum[m * blocks + b]
void block_sums(const float* x, int64_t M, int64_t K, std::vector<float>& xsum) {
  const int64_t blocks = K / 32;
  xsum.resize(M * blocks);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < blocks; ++b)
      xsum[m * blocks + b] = hsum(add(load(x + m * K + b * 32), load(x + m * K + b * 32 + 16)));
}

// out[m * kNibRows + j] = x[m, :] . W row j (rows[j]) for MT rows of float32 x
template <class F, int MT>
void dot_nibbles(const uint8_t* const* rows, int64_t blocks, const float* x, int64_t ldx, const float* xsum,
                 float* out) {
  const int64_t ahead = kPrefetchRows * blocks * F::kBytes;
  V16 acc[MT][kNibRows];
  float off[MT][kNibRows];  // m * sum(x)
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < kNibRows; ++j) {
      acc[m][j] = zero();
      off[m][j] = 0.f;
    }
  for (int64_t b = 0; b < blocks; ++b) {
    for (int j = 0; j < kNibRows; ++j) {
      const uint8_t* blk = rows[j] + b * F::kBytes;
      prefetch(blk, ahead);
      const float d = half_at(blk), mo = block_offset<F>(blk, d);
      V16 lo, hi;
      nibbles(blk + kNibbleAt<F>, lo, hi);
      const V16 dv = set1(d);
      for (int m = 0; m < MT; ++m) {
        const float* xp = x + m * ldx + b * 32;
        acc[m][j] = fma(dv, fma(hi, load(xp + 16), fma(lo, load(xp), zero())), acc[m][j]);
        off[m][j] = std::fma(mo, xsum[m * blocks + b], off[m][j]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < kNibRows; ++j) out[m * kNibRows + j] = hsum(acc[m][j]) + off[m][j];
}

// ---- bf16 x at few rows on AVX2: x in 8-bit blocks ----------------------------------------------
// AVX2 builds (without AVX-512) take steps of up to kFewRows rows of bfloat16 x over Q4_0 / Q4_1
// weights as integer dot products: x is quantized once per call, each 32-value block to int8
// (d = max|x| / 127, q = x * (1 / d) rounded to nearest even; s = d * sum q), and per block and
// weight row vpmaddubsw multiplies the 32 nibbles by x's bytes in pairs, vpmaddwd sums them to 8
// int32, one float32 FMA applies d_w * d_x, and the offset is added once per block (Q4_1: m * s;
// Q4_0: -8 d_w * s). The nibbles never become floats: on AVX2 that widening and converting, not
// reading the blocks, bound batch-1 decode. The default model's GGUF matrices, all layers, 2
// threads, 2-core AMD EPYC (Zen 2) with AVX2, no AVX-512: the Q4_1 layers at one row 6.4 ->
// 4.3 ms, two rows 8.7 -> 6.7, three 10.3 (float32 x) -> 9.3; served batch-1 TPOT, one run
// each, 11.2 -> 8.7 ms against llama.cpp's 11.4 on the same file (which multiplies these formats
// the same way); in docs/benchmarks_avx2.md's run 11.0 against 15.4 ms.
// The products are float32 arithmetic on the weight's exact values and x' = d q: x rounded to
// 8 bits per block, where bf16 x holds 8 significant bits per value. On the default model, the
// second token's top-5 logprobs (decoded alone) against float32 on the same blocks moved by 0.38
// at worst with a float32 reference decoded alone too (bf16 x on the float path: 0.22), and by
// 0.23 in test_quantized's batch-1 check. Q8_0 and Q4_K keep the float path: the default model's
// Q8_0 matrix is the tied embedding and lm_head, whose logits 8-bit x moved by 0.63, for 0.05 ms
// of the TPOT.
// float32 x keeps the float paths too: its products stay within float32 rounding of the
// dequantized weight's. A block of x holding inf or NaN gives NaN products. (A GGUF whose tied
// lm_head is Q4_0 / Q4_1 takes this path for its logits too.)
struct XBlocks {  // x [M, K] in 32-value blocks: q [M, K], d and s [M, K / 32]
  std::vector<int8_t> q;
  std::vector<float> d, s;
};

template <class F>
constexpr bool kInt8Blocks = kNibbleBlocks<F>;

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
constexpr int64_t kInt8XRows = kFewRows;

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline int32_t hsum8_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

// x [M, K] bf16 (K a multiple of 32) into xb
void quantize_blocks(const at::BFloat16* x, int64_t M, int64_t K, XBlocks& xb) {
  const int64_t n = M * K / 32;
  xb.q.resize(static_cast<size_t>(M * K));
  xb.d.resize(static_cast<size_t>(n));
  xb.s.resize(static_cast<size_t>(n));
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t r = 0; r < n; ++r) {  // rows are contiguous: block r of the whole is row r / (K / 32)
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = atomr_avx2::load_bf16(x + r * 32 + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v[i], v[i], _CMP_UNORD_Q));
    }
    const float a = hmax8(amax), d = a / 127.f;
    // d below the normal floats (max |x| < 127 FLT_MIN ~ 1.5e-36, or all zeros): q = 0 (1 / d may overflow)
    const __m256 inv = _mm256_set1_ps(d >= std::numeric_limits<float>::min() ? 1.f / d : 0.f);
    __m256i q[4];
    for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
    const int32_t sum = hsum8_epi32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
    // the packs interleave 128-bit lanes: 4-byte groups come out as q0 lo, q1 lo, q2 lo, q3 lo, q0 hi, ...
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xb.q.data() + r * 32),
                        _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    const bool finite = std::isfinite(a) && _mm256_movemask_ps(nan) == 0;
    xb.d[r] = finite ? d : std::numeric_limits<float>::quiet_NaN();
    xb.s[r] = xb.d[r] * static_cast<float>(sum);
  }
}

// x's blocks in xb where the integer path takes these M rows of x, else nullptr
const XBlocks* int8_blocks(const at::Tensor& x, XBlocks& xb) {
  if (x.scalar_type() != at::kBFloat16 || x.size(0) == 0 || x.size(0) > kInt8XRows) return nullptr;
  quantize_blocks(x.data_ptr<at::BFloat16>(), x.size(0), x.size(1), xb);
  return &xb;
}

// out[m * NR + j] = x'[m, :] . W row j (rows[j]) for MT rows of x in 8-bit blocks
template <class F, int MT, int NR>
void dot_int8(const uint8_t* const* rows, int64_t blocks, const XBlocks& xb, int64_t K, float* out) {
  const int64_t ahead = kPrefetchRows * blocks * F::kBytes;
  const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(0x0F);
  __m256 acc[MT][NR];
  __m128 off[MT][NR];  // lane 0: the offsets, summed
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NR; ++j) {
      acc[m][j] = _mm256_setzero_ps();
      off[m][j] = _mm_setzero_ps();
    }
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i xq[MT];
    __m128 xd[MT], xs[MT];
    for (int m = 0; m < MT; ++m) {
      xq[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb.q.data() + m * K + b * 32));
      xd[m] = _mm_set_ss(xb.d[m * blocks + b]);
      xs[m] = _mm_set_ss(xb.s[m * blocks + b]);
    }
    for (int j = 0; j < NR; ++j) {
      const uint8_t* blk = rows[j] + b * F::kBytes;
      prefetch(blk, ahead);
      int32_t halves;  // d, then (Q4_1) m: both widened by one F16C conversion
      std::memcpy(&halves, blk, 4);
      const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(halves));
      // values 0..15 in byte i: the low nibbles, then the high ones
      const __m128i nib = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + kNibbleAt<F>));
      const __m256i wq = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(nib, 4), nib), low4);
      const __m128 mo = std::is_same_v<F, Q4_1> ? _mm_movehdup_ps(dm) : _mm_mul_ss(dm, _mm_set_ss(-8.f));
      for (int m = 0; m < MT; ++m) {
        const __m256i pairs = _mm256_maddubs_epi16(wq, xq[m]);  // 15 * 127 * 2 at most: no saturation
        acc[m][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones)),
                                    _mm256_broadcastss_ps(_mm_mul_ss(dm, xd[m])), acc[m][j]);
        off[m][j] = _mm_fmadd_ss(mo, xs[m], off[m][j]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NR; ++j)
      out[m * NR + j] = hsum(V16{acc[m][j], _mm256_setzero_ps()}) + _mm_cvtss_f32(off[m][j]);
}
#else
constexpr int64_t kInt8XRows = 0;
const XBlocks* int8_blocks(const at::Tensor&, XBlocks&) { return nullptr; }
#endif

#if defined(__AVX512BF16__)
// bfloat16 x and AVX512-BF16: the weight rows go to the buffer as bfloat16 (the rounding the bf16
// weights of quantization=none have too) and `vdpbf16ps` multiplies 32 pairs per instruction:
// twice the float32 FMA's rate, which bounds steps of many rows.
constexpr bool kBf16Dot = true;

// c[m * ldc + j] = x[m, :] . wbuf[j, :] for MT rows of x and kTileN bf16 weight rows in wbuf
template <int MT>
void dot_buffered_bf16(const uint16_t* wbuf, const uint16_t* x, int64_t K, float* c, int64_t ldc) {
  __m512 acc[MT][kTileN];
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < kTileN; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh wv[kTileN];
    for (int j = 0; j < kTileN; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(wbuf + j * K + k);
    for (int m = 0; m < MT; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
      for (int j = 0; j < kTileN; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], wv[j], xv);
    }
  }
  for (int m = 0; m < MT; ++m) hsum4(acc[m], c + m * ldc);
}

void dot_buffered_bf16_rows(int mt, const uint16_t* wbuf, const uint16_t* x, int64_t K, float* c, int64_t ldc) {
  switch (mt) {
    case 1: dot_buffered_bf16<1>(wbuf, x, K, c, ldc); break;
    case 2: dot_buffered_bf16<2>(wbuf, x, K, c, ldc); break;
    case 3: dot_buffered_bf16<3>(wbuf, x, K, c, ldc); break;
    default: dot_buffered_bf16<4>(wbuf, x, K, c, ldc);
  }
}

// Steps of few rows over 4-bit blocks with x in bfloat16 (see "4-bit blocks at few rows" above):
// a block's 32 nibbles become bf16 integers 0..15 in three instructions (one vpermw lookup; exact)
// and one `vdpbf16ps` takes all 32 products with x (exact products, float32 sums; like every
// vdpbf16ps path it flushes subnormal bf16 inputs to zero).
// out[m * kNibRows + j] = x[m, :] . W row j (rows[j]) for MT rows of x, 4-bit blocks, bf16 x
template <class F, int MT>
void dot_nibbles_bf16(const uint8_t* const* rows, int64_t blocks, const uint16_t* x, int64_t ldx,
                      const float* xsum, float* out) {
  const int64_t ahead = kPrefetchRows * blocks * F::kBytes;
  // bf16 bits of (i & 15) for i < 32: vpermw reads an index's low 5 bits, so the low nibble needs no mask
  alignas(64) static const uint16_t kTable[32] = {
      0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0, 0x4100, 0x4110, 0x4120,
      0x4130, 0x4140, 0x4150, 0x4160, 0x4170, 0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0,
      0x40C0, 0x40E0, 0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};
  const __m512i table = _mm512_load_si512(kTable);
  const __m512i shift = _mm512_set_epi64(0x0004000400040004, 0x0004000400040004, 0x0004000400040004,
                                         0x0004000400040004, 0, 0, 0, 0);  // words 16..31: >> 4
  __m512 acc[MT][kNibRows];
  __m128 off[MT][kNibRows];  // m * sum(x), in lane 0
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < kNibRows; ++j) {
      acc[m][j] = _mm512_setzero_ps();
      off[m][j] = _mm_setzero_ps();
    }
  for (int64_t b = 0; b < blocks; ++b) {
    __m512bh xv[MT];
    __m128 xs[MT];
    for (int m = 0; m < MT; ++m) {
      xv[m] = (__m512bh)_mm512_loadu_si512(x + m * ldx + b * 32);
      xs[m] = _mm_set_ss(xsum[m * blocks + b]);
    }
    for (int j = 0; j < kNibRows; ++j) {
      const uint8_t* blk = rows[j] + b * F::kBytes;
      prefetch(blk, ahead);
      int32_t scales;
      std::memcpy(&scales, blk, 4);  // d, m as halves (Q4_0: d, then nibbles this does not use)
      const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(scales));
      const __m512 d = _mm512_broadcastss_ps(dm);
      const __m128 mo = std::is_same_v<F, Q4_1> ? _mm_movehdup_ps(dm) : _mm_mul_ss(dm, _mm_set_ss(-8.f));
      // the 16 bytes in both halves, widened to words; the upper 16 words shifted to the high nibbles
      const __m256i q2 = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + kNibbleAt<F>)));
      const __m512i qi = _mm512_srlv_epi16(_mm512_cvtepu8_epi16(q2), shift);
      const __m512bh qb = (__m512bh)_mm512_permutexvar_epi16(qi, table);
      for (int m = 0; m < MT; ++m) {
        acc[m][j] = _mm512_fmadd_ps(d, _mm512_dpbf16_ps(_mm512_setzero_ps(), qb, xv[m]), acc[m][j]);
        off[m][j] = _mm_fmadd_ss(mo, xs[m], off[m][j]);
      }
    }
  }
  for (int m = 0; m < MT; ++m) {
    hsum4(acc[m], out + m * kNibRows);
    for (int j = 0; j < kNibRows; ++j) out[m * kNibRows + j] += _mm_cvtss_f32(off[m][j]);
  }
}
#else
constexpr bool kBf16Dot = false;
#endif

void check_x(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k && x.device().is_cpu() && x.is_contiguous() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be a contiguous 2-D float32 or bfloat16 CPU tensor with ", k, " columns, got ", x.sizes(),
              " ", x.scalar_type());
}

// x (checked by check_x) as float32 rows: the tensor's own data when it is float32, else a
// widened copy in `copy`.
const float* float_rows(const at::Tensor& x, std::vector<float>& copy) {
  if (x.scalar_type() == at::kFloat) return x.data_ptr<float>();
  const at::BFloat16* p = x.data_ptr<at::BFloat16>();
  copy.resize(x.numel());
  for (int64_t i = 0; i < x.numel(); ++i) copy[i] = static_cast<float>(p[i]);
  return copy.data();
}

// x's bfloat16 bits where the vdpbf16ps tiles can take them, else nullptr
const uint16_t* bf16_bits(const at::Tensor& x) {
  if (!kBf16Dot || x.scalar_type() != at::kBFloat16) return nullptr;
  return reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
}

// y[m, n] = value, in y's dtype (float32 or bfloat16, rounded to nearest even)
struct Out {
  float* f = nullptr;
  at::BFloat16* h = nullptr;
  int64_t ld = 0;
  explicit Out(at::Tensor& y) : ld(y.size(1)) {
    if (y.scalar_type() == at::kFloat) f = y.data_ptr<float>();
    else h = y.data_ptr<at::BFloat16>();
  }
  void put(int64_t m, int64_t n, float v) const {
    if (f != nullptr) f[m * ld + n] = v;
    else h[m * ld + n] = at::BFloat16(v);
  }
  // y[m, n0 .. n0 + valid) = v[0 .. valid)
  void put_row(int64_t m, int64_t n0, const float* v, int64_t valid) const {
    if (f != nullptr) std::memcpy(f + m * ld + n0, v, static_cast<size_t>(valid) * sizeof(float));
    else
      for (int64_t i = 0; i < valid; ++i) h[m * ld + n0 + i] = at::BFloat16(v[i]);
  }
#if defined(__AVX512BF16__)  // the runs of 16 of the bf16 many-row path (products_bf16)
  // y[m, n0 .. n0 + valid) = v (+ bias[n0 ..]); v holds 16 values
  void put16(int64_t m, int64_t n0, const float* v, int valid, const float* bias) const {
    const __mmask16 k = atomr_vec::first_lanes(valid);
    __m512 r = _mm512_loadu_ps(v);
    if (bias != nullptr) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(k, bias + n0));
    if (f != nullptr) _mm512_mask_storeu_ps(f + m * ld + n0, k, r);
    else _mm256_mask_storeu_epi16(h + m * ld + n0, k, (__m256i)_mm512_cvtneps_pbh(r));
  }
  // y[m, n0 .. n0 + valid / 2) = silu(gate) * up for v = gate, up, gate, up, ... (16 values)
  void put_silu_mul(int64_t m, int64_t n0, const float* v, int valid) const {
    const __m512i even = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 15, 13, 11, 9, 7, 5, 3, 1);
    const __m512 a = _mm512_loadu_ps(v);
    const __m512 g = _mm512_permutexvar_ps(even, a), u = _mm512_permutexvar_ps(odd, a);
    const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f),
                                                       atomr_vec::exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    const __m512 r = _mm512_mul_ps(silu, u);
    const __mmask16 k = atomr_vec::first_lanes(valid / 2);
    if (f != nullptr) _mm512_mask_storeu_ps(f + m * ld + n0, k, r);
    else _mm256_mask_storeu_epi16(h + m * ld + n0, k, (__m256i)_mm512_cvtneps_pbh(r));
  }
#endif
};

// Threads take runs of output rows; grain: enough rows that a thread's share is worth a wake-up.
constexpr int64_t kGrain = 16;

// Whether `products` takes the bf16 many-row path (results in runs of 16, to emit16) for M rows
// of x whose bf16 bits are xh (nullptr: x is float32, or the build lacks AVX512-BF16); with the
// panels below it serves 4 to kPanelRows - 1 rows.
inline bool in_runs(const uint16_t* xh, int64_t M) { return kBf16Dot && xh != nullptr && M > kFewRows; }

// Steps of kPanelRows rows or more of bf16 x go through linear_bf16.cpp's matmul, its panels
// dequantized to bf16 on demand (fill_panel), where the build has that matmul: a panel is
// dequantized once for all rows and its tiles keep 24 accumulators. The default model's GGUF
// matrices, all layers, 2 threads (2-core Zen 4, AVX512-BF16), against the runs of 16 of
// products_bf16: 24 rows 27.7 vs 23.4-26.0 ms, 32 rows 27.3 vs 27.4-32.0, 48 rows 35.3 vs
// 38.6-42.6, 64 rows 41.9 vs 47.1-47.9 (bf16 weights: 34.3); prefill chunks of 256 rows 134 ms
// (bf16 weights 127). (Measured there; the AVX2 builds take the same bound: built for Haswell,
// 48 rows 85 vs 117 ms and 64 rows 104 vs 157 against their float32 block tiles — measured
// when the AVX2 matmul read every step of 2+ rows from its widened buffer; its steps of up to
// 64 rows now widen the filled panel in registers instead, not measured on GGUF panels.)
constexpr int64_t kPanelRows = 32;
// (x already checked by check_x; n = 0 outputs: nothing to fill, the block path returns the empty
// product)
inline bool in_panels(const at::Tensor& x, int64_t n) {
  return x.size(0) >= kPanelRows && n > 0 && x.scalar_type() == at::kBFloat16 && atomr_ops::has_bf16_matmul();
}

#if defined(__AVX512BF16__)
constexpr int64_t kBlock = 16;  // products handed to the epilogue at once: one float32 vector

// The many-row path with x in bfloat16 (below kPanelRows rows): kBlock weight rows at a time are dequantized (bf16) into a
// buffer that every tile of x rows reuses, kTileN rows per register tile, and each x row's kBlock
// products go to `emit16(m, i0, v, valid)` together (v [kBlock], products i0 .. i0 + valid - 1;
// zeros past `count`): a vector epilogue instead of one call per product, which cost a fifth of
// the call at 64 rows (the default model's GGUF matrices, all layers: 70-72 ms with per-product
// stores, 57 ms with none; 64 rows now take the panels).
template <class F, typename Cols, typename Emit16>
void products_bf16(const uint16_t* x, int64_t M, int64_t K, const uint8_t* w, int64_t rb, int64_t count,
                   Cols&& cols, Emit16&& emit16) {
  const int64_t blocks = K / F::kValues, groups = (count + kBlock - 1) / kBlock;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> wbuf(kBlock * K);
    alignas(64) float v[kTileM][kBlock];
    for (int64_t gi = begin; gi < end; ++gi) {
      const int64_t i0 = gi * kBlock, nt = std::min<int64_t>(kBlock, count - i0);
      for (int64_t j = 0; j < kBlock; ++j) {
        if (j < nt) dequant_row_bf16<F>(w + cols(i0 + j) * rb, blocks, wbuf.data() + j * K);
        else std::fill_n(wbuf.data() + j * K, K, uint16_t{0});
      }
      for (int64_t m0 = 0; m0 < M; m0 += kTileM) {
        const int mt = static_cast<int>(std::min<int64_t>(kTileM, M - m0));
        for (int64_t j0 = 0; j0 < kBlock; j0 += kTileN)
          dot_buffered_bf16_rows(mt, wbuf.data() + j0 * K, x + m0 * K, K, &v[0][j0], kBlock);
        for (int m = 0; m < mt; ++m) emit16(m0 + m, i0, v[m], static_cast<int>(nt));
      }
    }
  });
}
#endif

// Threads take tiles of NR products i0 .. i0 + nt - 1 (NR weight rows, the row of product i being
// cols(i)): tile(rows, c) fills c[m * NR + j] = x[m] . W row rows[j] for MT rows of x, and each
// product goes to emit(m, i, cols(i), v). Past the last product a tile gets its row again, and
// those results are dropped.
template <int MT, int NR, typename Cols, typename Emit, typename Tile>
void row_tiles(const uint8_t* w, int64_t rb, int64_t count, Cols&& cols, Emit&& emit, Tile&& tile) {
  at::parallel_for(0, (count + NR - 1) / NR, kGrain / NR, [&](int64_t begin, int64_t end) {
    float c[MT * NR];
    for (int64_t g = begin; g < end; ++g) {
      const int64_t i0 = g * NR, nt = std::min<int64_t>(NR, count - i0);
      const uint8_t* rows[NR];
      for (int64_t j = 0; j < NR; ++j) rows[j] = w + cols(i0 + std::min(j, nt - 1)) * rb;
      tile(rows, c);
      for (int64_t j = 0; j < nt; ++j)
        for (int64_t m = 0; m < MT; ++m) emit(m, i0 + j, cols(i0 + j), c[m * NR + j]);
    }
  });
}

// Calls emit(m, i, col, v) for every product x[m] . W[col] of the weight rows col = `cols(i)`, i
// in [0, count) — or, on the bf16 many-row path, emit16 for runs of kBlock of them (see
// products_bf16): steps of few rows dequantize in registers; others dequantize kTileN rows at a
// time into a float32 buffer that every tile of x rows reuses.
template <class F, typename Cols, typename Emit, typename Emit16>
void products(const float* x, const uint16_t* xh, [[maybe_unused]] const XBlocks* x8, int64_t M, int64_t K,
              const uint8_t* w, int64_t rb, int64_t count, Cols&& cols, Emit&& emit, [[maybe_unused]] Emit16&& emit16) {
  if (M == 0 || count == 0) return;  // nothing to compute (the tiles assume at least one row)
  const int64_t blocks = K / F::kValues;
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  if constexpr (kInt8Blocks<F>) {
    if (x8 != nullptr) {  // see "bf16 x at few rows on AVX2"; 4 weight rows per tile at one row of x, else 2
      with_few_rows(M, [&](auto mt) {
        constexpr int MT = decltype(mt)::value, NR = MT == 1 ? 4 : 2;
        row_tiles<MT, NR>(w, rb, count, cols, emit,
                          [&](const uint8_t* const* rows, float* c) { dot_int8<F, MT, NR>(rows, blocks, *x8, K, c); });
      });
      return;
    }
  }
#endif
#if defined(__AVX512BF16__)
  if (in_runs(xh, M)) {  // x in bfloat16 (bits in xh): the vdpbf16ps tiles
    products_bf16<F>(xh, M, K, w, rb, count, cols, emit16);
    return;
  }
#endif
  if constexpr (kNibbleBlocks<F>) {
    if (M <= kNibbleMaxRows) {  // see "4-bit blocks at few rows"
      std::vector<float> xsum;
      block_sums(x, M, K, xsum);
      with_few_rows(M, [&](auto mt) {
        constexpr int MT = decltype(mt)::value;
        row_tiles<MT, kNibRows>(w, rb, count, cols, emit, [&](const uint8_t* const* rows, float* c) {
#if defined(__AVX512BF16__)
          if (xh != nullptr) return dot_nibbles_bf16<F, MT>(rows, blocks, xh, K, xsum.data(), c);
#endif
          dot_nibbles<F, MT>(rows, blocks, x, K, xsum.data(), c);
        });
      });
      return;
    }
  }
  if (M <= kFewRows) {
    // threads take pairs of products (a gate|up output's two halves side by side)
    at::parallel_for(0, (count + 1) / 2, kGrain / 2, [&](int64_t begin, int64_t end) {
      float c[kFewRows];
      for (int64_t i = 2 * begin; i < std::min(2 * end, count); ++i) {
        const int64_t n = cols(i);
        with_few_rows(M, [&](auto mt) { dot_tile<F, decltype(mt)::value>(w + n * rb, blocks, x, K, c); });
        for (int64_t m = 0; m < M; ++m) emit(m, i, n, c[m]);
      }
    });
    return;
  }
  const int64_t groups = (count + kTileN - 1) / kTileN;
  at::parallel_for(0, groups, std::max<int64_t>(1, kGrain / kTileN), [&](int64_t begin, int64_t end) {
    std::vector<float> wbuf(kTileN * K);
    float c[kTileM * kTileN];
    for (int64_t gi = begin; gi < end; ++gi) {
      const int64_t i0 = gi * kTileN, nt = std::min<int64_t>(kTileN, count - i0);
      for (int64_t j = 0; j < kTileN; ++j) {
        if (j < nt) dequant_row<F>(w + cols(i0 + j) * rb, blocks, wbuf.data() + j * K);
        else std::fill_n(wbuf.data() + j * K, K, 0.f);  // past the last row: zeros, results dropped
      }
      for (int64_t m0 = 0; m0 < M; m0 += kTileM) {
        const int mt = static_cast<int>(std::min<int64_t>(kTileM, M - m0));
        dot_buffered_rows(mt, wbuf.data(), x + m0 * K, K, c);
        for (int m = 0; m < mt; ++m)
          for (int64_t j = 0; j < nt; ++j) emit(m0 + m, i0 + j, cols(i0 + j), c[m * kTileN + j]);
      }
    }
  });
}


template <class F>
int64_t row_bytes_of(int64_t k) {
  TORCH_CHECK(k > 0 && k % F::kValues == 0, "the input width ", k, " is not a whole number of ",
              F::kValues, "-value blocks");
  return k / F::kValues * F::kBytes;
}

// Calls fn(F{}) for the format of `type`.
template <typename Fn>
auto with_format(int64_t type, Fn&& fn) {
  switch (type) {
    case kQ8_0: return fn(Q8_0{});
    case kQ4_0: return fn(Q4_0{});
    case kQ4_1: return fn(Q4_1{});
    case kQ4_K: return fn(Q4_K{});
    default: TORCH_CHECK(false, "GGML type ", type, " is not supported by the quantized matmul "
                                "(Q8_0 = 8, Q4_0 = 2, Q4_1 = 3, Q4_K = 12)");
  }
  return fn(Q8_0{});
}

template <class F>
void check_weight(const at::Tensor& w, int64_t k) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous() && w.device().is_cpu(),
              "w must be a contiguous 2-D uint8 CPU tensor of blocks, got ", w.sizes(), " ", w.scalar_type());
  TORCH_CHECK(w.size(1) == row_bytes_of<F>(k), "w rows hold ", w.size(1), " bytes; ", k,
              " values take ", row_bytes_of<F>(k));
}

at::Tensor quant_linear(const at::Tensor& x_, const at::Tensor& w, int64_t type, int64_t k,
                        const c10::optional<at::Tensor>& bias_) {
  return with_format(type, [&](auto f) {
    using F = decltype(f);
    check_weight<F>(w, k);
    const at::Tensor x = x_.contiguous();
    check_x(x, k);
    const int64_t M = x.size(0), N = w.size(0);
    if (in_panels(x, N)) {  // x [M, K] with many bf16 rows: dequantized panels, the bf16 matmul's tiles
      const uint8_t* wp = w.data_ptr<uint8_t>();
      const int64_t rb = w.size(1);
      constexpr int W = atomr_ops::kLinearPanelCols;  // outputs 48i .. 48i + 47
      return atomr_ops::linear_bf16_filled(x, k, N, [&](int64_t panel, int32_t* dst) {
        prefetch_rows(wp, rb, (panel + 1) * W, std::min<int64_t>(W, N - (panel + 1) * W));
        fill_panel<F>(wp, rb, k, W, [&](int c) { return panel * W + c < N ? panel * W + c : -1; }, dst);
      }, bias_);
    }
    at::Tensor bias;
    if (bias_.has_value()) {
      bias = bias_->to(at::kFloat).contiguous();
      TORCH_CHECK(bias.dim() == 1 && bias.size(0) == N, "bias must hold ", N, " values");
    }
    const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
    XBlocks xblocks;
    const XBlocks* x8 = kInt8Blocks<F> ? int8_blocks(x, xblocks) : nullptr;
    std::vector<float> xcopy;
    const float* xp = x8 != nullptr ? nullptr : float_rows(x, xcopy);
    at::Tensor y = at::empty({M, N}, x.options());
    const Out out(y);
#if defined(__AVX512BF16__)
    auto runs = [&](int64_t m, int64_t i0, const float* v, int valid) { out.put16(m, i0, v, valid, bp); };
#else
    std::nullptr_t runs = nullptr;  // no bf16 many-row path in this build
#endif
    products<F>(xp, bf16_bits(x), x8, M, k, w.data_ptr<uint8_t>(), w.size(1), N, [](int64_t i) { return i; },
                [&](int64_t m, int64_t, int64_t n, float v) { out.put(m, n, bp != nullptr ? v + bp[n] : v); }, runs);
    return y;
  });
}

// gate|up: product i < 2n is gate row i / 2 (even i) or up row i / 2 (odd i), so a run of products
// holds both halves of its outputs (the bf16 many-row path finishes them in its runs of 16). The
// other paths store each half and finish all outputs after, 16 at a time with a vector exp: one
// scalar std::exp per output took 12-14% of the AVX2 many-row path (2-core Zen 4 built for
// Haswell, all layers' matrices: 16 rows 46 -> 41 ms, 64 rows 166 -> 143 ms) and more of a
// batch-1 step (the native AVX512-BF16 build, the gguf decode step, alternated in one hour:
// 7.2-7.7 -> 5.9-6.1 ms).
at::Tensor quant_linear_silu_mul(const at::Tensor& x_, const at::Tensor& w, int64_t type, int64_t k) {
  return with_format(type, [&](auto f) {
    using F = decltype(f);
    check_weight<F>(w, k);
    TORCH_CHECK(w.size(0) % 2 == 0, "a gate|up weight has an even number of rows, got ", w.size(0));
    const at::Tensor x = x_.contiguous();
    check_x(x, k);
    const int64_t M = x.size(0), n = w.size(0) / 2;
    if (in_panels(x, n)) {  // as quant_linear; panels of 16 gate rows, then the same 16 up rows
      const uint8_t* wp = w.data_ptr<uint8_t>();
      const int64_t rb = w.size(1);
      return atomr_ops::linear_silu_mul_bf16_filled(x, k, n, [&](int64_t panel, int32_t* dst) {
        const int64_t next = (panel + 1) * 16, count = std::min<int64_t>(16, n - next);
        prefetch_rows(wp, rb, next, count);      // the next panel's gate rows
        prefetch_rows(wp, rb, n + next, count);  // and its up rows
        fill_panel<F>(wp, rb, k, atomr_ops::kSiluPanelCols, [&](int c) {
          const int64_t j = panel * 16 + c % 16;
          return j < n ? (c < 16 ? j : n + j) : -1;
        }, dst);
      });
    }
    XBlocks xblocks;
    const XBlocks* x8 = kInt8Blocks<F> ? int8_blocks(x, xblocks) : nullptr;
    std::vector<float> xcopy;
    const float* xp = x8 != nullptr ? nullptr : float_rows(x, xcopy);
    at::Tensor y = at::empty({M, n}, x.options());
    // the per-product paths keep gate and up apart and finish them in one vector pass after; the
    // bf16 many-row path needs neither (its runs of 16 hold both)
    const bool runs16 = in_runs(bf16_bits(x), M);
    at::Tensor gate_up = at::empty({runs16 ? 0 : 2, M, n}, x.options().dtype(at::kFloat));
    float* gp = gate_up.data_ptr<float>();
    float* up = runs16 ? nullptr : gp + M * n;
    const Out out(y);
#if defined(__AVX512BF16__)  // runs of 16 products start at even i: 8 whole gate, up pairs
    auto runs = [&](int64_t m, int64_t i0, const float* v, int valid) { out.put_silu_mul(m, i0 / 2, v, valid); };
#else
    std::nullptr_t runs = nullptr;  // no bf16 many-row path in this build
#endif
    products<F>(xp, bf16_bits(x), x8, M, k, w.data_ptr<uint8_t>(), w.size(1), 2 * n,
                [n](int64_t i) { return i % 2 == 0 ? i / 2 : n + i / 2; },
                [&](int64_t m, int64_t i, int64_t, float v) { (i % 2 == 0 ? gp : up)[m * n + i / 2] = v; }, runs);
    if (!runs16 && M > 0 && n > 0) {  // y = silu(gate) * up, 16 outputs at a time
      at::parallel_for(0, M, std::max<int64_t>(1, 4096 / n), [&](int64_t begin, int64_t end) {
        alignas(64) float r[16];
        for (int64_t m = begin; m < end; ++m)
          for (int64_t j = 0; j < n; j += 16) {
            const int64_t valid = std::min<int64_t>(16, n - j);
            if (valid == 16) {
              store(r, silu_mul(load(gp + m * n + j), load(up + m * n + j)));
            } else {
              for (int64_t t = 0; t < valid; ++t) {
                const float g = gp[m * n + j + t];
                r[t] = g / (1.f + std::exp(-g)) * up[m * n + j + t];
              }
            }
            out.put_row(m, j, r, valid);
          }
      });
    }
    return y;
  });
}

at::Tensor quant_dequantize(const at::Tensor& w, int64_t type, int64_t k, const c10::optional<at::Tensor>& rows_) {
  return with_format(type, [&](auto f) {
    using F = decltype(f);
    check_weight<F>(w, k);
    at::Tensor rows;
    if (rows_.has_value()) {
      rows = rows_->to(at::kLong).contiguous().view(-1);
      if (rows.numel() > 0) {
        TORCH_CHECK(rows.min().item<int64_t>() >= 0 && rows.max().item<int64_t>() < w.size(0),
                    "a row index is out of range for ", w.size(0), " rows");
      }
    }
    const int64_t R = rows.defined() ? rows.numel() : w.size(0), blocks = k / F::kValues, rb = w.size(1);
    at::Tensor y = at::empty({R, k}, w.options().dtype(at::kFloat));
    const int64_t* ip = rows.defined() ? rows.data_ptr<int64_t>() : nullptr;
    const uint8_t* wp = w.data_ptr<uint8_t>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, R, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const uint8_t* row = wp + (ip != nullptr ? ip[r] : r) * rb;
        float* out = yp + r * k;
        for (int64_t b = 0; b < blocks; ++b) {
          for (int g = 0; g < F::kGroups; ++g) {
            V16 w0, w1;
            F::group(row + b * F::kBytes, g, w0, w1);
            store(out + b * F::kValues + g * 32, w0);
            store(out + b * F::kValues + g * 32 + 16, w1);
          }
        }
      }
    });
    return y;
  });
}

}  // namespace

namespace atomr_ops {  // ops.h
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& w, int64_t type, int64_t k,
                        const c10::optional<at::Tensor>& bias) {
  return ::quant_linear(x, w, type, k, bias);
}
at::Tensor quant_linear_silu_mul(const at::Tensor& x, const at::Tensor& w, int64_t type, int64_t k) {
  return ::quant_linear_silu_mul(x, w, type, k);
}
}  // namespace atomr_ops

TORCH_LIBRARY_FRAGMENT(atomr_trio, m) {
  m.def("quant_linear(Tensor x, Tensor w, int type, int k, Tensor? bias) -> Tensor");
  m.def("quant_linear_silu_mul(Tensor x, Tensor w, int type, int k) -> Tensor");
  m.def("quant_dequantize(Tensor w, int type, int k, Tensor? rows) -> Tensor");
  m.def("quant_int8_x_rows() -> int", [] { return kInt8XRows; });
}

TORCH_LIBRARY_IMPL(atomr_trio, CPU, m) {
  m.impl("quant_linear", &quant_linear);
  m.impl("quant_linear_silu_mul", &quant_linear_silu_mul);
  m.impl("quant_dequantize", &quant_dequantize);
}
