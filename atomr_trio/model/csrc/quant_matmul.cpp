// Matmul by a weight kept in GGML's quantized blocks (CPU): Q8_0, Q4_0, Q4_1, Q4_K.
//
// y[m, n] = sum_k x[m, k] * W[n, k] with W row n held as GGML blocks (the GGUF file's bytes,
// one row of `row_bytes` per output), x float32 or bfloat16 (widened to float32 once). Each
// block is dequantized in registers, 32 values at a time, and multiplied into float32
// accumulators: no float copy of the weight exists, so a decode step reads 4.5-8.5 bits per
// weight instead of 16 or 32 — batch-1 decode is bound by exactly that read. Activations stay
// float32 (no int8 requantization of x): the only error against float32 arithmetic on the
// dequantized weight is float32 summation order.
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
// small-batch decode: bound by reading the weight) dequantize each block in registers and use it
// for every row at once. Larger steps dequantize kTileN weight rows at a time into a small float32
// buffer (L1/L2) that every kTileM-row tile of x then reuses, so the dequantization is paid once
// per weight row, not once per tile of x (with AVX512-BF16 and x in bf16: 16 rows into a bf16
// buffer, `vdpbf16ps` tiles, and each row's 16 results stored by one vector epilogue). Either way
// a weight row is read from memory once per call, and x / y move in their own dtype (no extra
// torch ops around the kernel). Vector code:
// AVX-512 (16 lanes), AVX2+FMA (2 x 8 lanes) or portable loops, chosen at compile time
// (native.py builds with -march=native or $ATOMR_TRIO_NATIVE_ARCH).
//
// quant_linear(x [M, K], w uint8 [N, row_bytes], type, K, bias?) -> y [M, N] in x's dtype
// quant_linear_silu_mul(x [M, K], w [2n, row_bytes], type, K) -> silu(x Wg^T) * (x Wu^T) [M, n]
//   for a gate|up stacked weight (gate rows first).
// quant_dequantize(w [N, row_bytes], type, K, rows?) -> float32 [len(rows) or N, K]: the
//   weight's rows (an embedding lookup, or the whole weight for long prefill chunks).
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
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__)
#include "vec_avx512.h"
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
inline V16 from_u8(__m128i q) { return {_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q))}; }
inline V16 from_i8(const uint8_t* p) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
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
inline V16 from_u8(__m128i q) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q, 8)))};
}
inline V16 from_i8(const uint8_t* p) {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)))};
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

// the low / high nibbles of 16 bytes, as 16 floats
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
inline V16 nib_lo(const uint8_t* p) {
  return from_u8(_mm_and_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), _mm_set1_epi8(0x0F)));
}
inline V16 nib_hi(const uint8_t* p) {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return from_u8(_mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(0x0F)));
}
#else
inline V16 nib_lo(const uint8_t* p) {
  V16 r;
  for (int i = 0; i < 16; ++i) r.f[i] = static_cast<float>(p[i] & 0x0F);
  return r;
}
inline V16 nib_hi(const uint8_t* p) {
  V16 r;
  for (int i = 0; i < 16; ++i) r.f[i] = static_cast<float>(p[i] >> 4);
  return r;
}
#endif

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
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
    w0 = fma(nib_lo(b + 2), dv, off);
    w1 = fma(nib_hi(b + 2), dv, off);
  }
};

struct Q4_1 {
  static constexpr int kValues = 32, kBytes = 20, kGroups = 1;
  static void group(const uint8_t* b, int, V16& w0, V16& w1) {
    const V16 d = set1(half_at(b)), m = set1(half_at(b + 2));
    w0 = fma(nib_lo(b + 4), d, m);
    w1 = fma(nib_hi(b + 4), d, m);
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
    if (g % 2 == 0) {
      w0 = fma(nib_lo(q), d, m);
      w1 = fma(nib_lo(q + 16), d, m);
    } else {
      w0 = fma(nib_hi(q), d, m);
      w1 = fma(nib_hi(q + 16), d, m);
    }
  }
};

// out[m] = x[m, :] . W row, for MT rows of x (float32, row stride ldx): the blocks dequantized
// in registers. The path of steps with few rows, where every block read serves few products.
template <class F, int MT>
void dot_tile(const uint8_t* row, int64_t blocks, const float* x, int64_t ldx, float* out) {
  V16 acc0[MT], acc1[MT];  // two chains per row: the FMA latency is hidden at one row too
  for (int m = 0; m < MT; ++m) acc0[m] = acc1[m] = zero();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* blk = row + b * F::kBytes;
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

// Register tile of the many-row path: kTileM rows of x x kTileN dequantized weight rows.
#if defined(__AVX512F__)
constexpr int kTileM = 4, kTileN = 4;  // 16 accumulators, 4 weight and 1 x vector (hsum4 takes 4)
#else
constexpr int kTileM = 2, kTileN = 2;  // AVX2: 8 accumulators of 2 registers
#endif
constexpr int64_t kFewRows = 3;  // steps of up to this many rows dequantize in registers (dot_tile)

// c[m * kTileN + j] = x[m, :] . wbuf[j, :] for MT rows of x, over float32 weight rows in wbuf
template <int MT>
void dot_buffered(const float* wbuf, const float* x, int64_t K, float* c) {
  V16 acc[MT][kTileN];
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < kTileN; ++j) acc[m][j] = zero();
  for (int64_t k = 0; k < K; k += 16) {
    V16 wv[kTileN];
    for (int j = 0; j < kTileN; ++j) wv[j] = load(wbuf + j * K + k);
    for (int m = 0; m < MT; ++m) {
      const V16 xv = load(x + m * K + k);
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

#if defined(__AVX512BF16__)
// bfloat16 x and AVX512-BF16: the weight rows go to the buffer as bfloat16 (the rounding the bf16
// weights of quantization=none have too) and `vdpbf16ps` multiplies 32 pairs per instruction:
// twice the float32 FMA's rate, which bounds steps of many rows.
constexpr bool kBf16Dot = true;

template <class F>
void dequant_row_bf16(const uint8_t* row, int64_t blocks, uint16_t* out) {
  for (int64_t b = 0; b < blocks; ++b) {
    for (int g = 0; g < F::kGroups; ++g) {
      V16 w0, w1;
      F::group(row + b * F::kBytes, g, w0, w1);
      _mm512_storeu_si512(out + b * F::kValues + g * 32, (__m512i)_mm512_cvtne2ps_pbh(w1.v, w0.v));
    }
  }
}

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
#else
constexpr bool kBf16Dot = false;
#endif

template <class F>
void dot_rows(int mt, const uint8_t* row, int64_t blocks, const float* x, int64_t ldx, float* out) {
  switch (mt) {
    case 1: dot_tile<F, 1>(row, blocks, x, ldx, out); break;
    case 2: dot_tile<F, 2>(row, blocks, x, ldx, out); break;
    default: dot_tile<F, 3>(row, blocks, x, ldx, out);
  }
}

// x as float32 rows: the tensor's own data when it is float32, else a widened copy in `copy`.
const float* float_rows(const at::Tensor& x, int64_t k, std::vector<float>& copy) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k && x.device().is_cpu() && x.is_contiguous() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be a contiguous 2-D float32 or bfloat16 CPU tensor with ", k, " columns, got ", x.sizes(),
              " ", x.scalar_type());
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
// of x whose bf16 bits are xh (nullptr: x is float32, or the build lacks AVX512-BF16).
inline bool in_runs(const uint16_t* xh, int64_t M) { return kBf16Dot && xh != nullptr && M > kFewRows; }

#if defined(__AVX512BF16__)
constexpr int64_t kBlock = 16;  // products handed to the epilogue at once: one float32 vector

// The many-row path with x in bfloat16: kBlock weight rows at a time are dequantized (bf16) into a
// buffer that every tile of x rows reuses, kTileN rows per register tile, and each x row's kBlock
// products go to `emit16(m, i0, v, valid)` together (v [kBlock], products i0 .. i0 + valid - 1;
// zeros past `count`): a vector epilogue instead of one call per product, which cost a fifth of
// the call at 64 rows (the default model's GGUF matrices, all layers: 70-72 ms with per-product
// stores, 57 ms with none).
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

// Calls emit(m, i, col, v) for every product x[m] . W[col] of the weight rows col = `cols(i)`, i
// in [0, count) — or, on the bf16 many-row path, emit16 for runs of kBlock of them (see
// products_bf16): steps of few rows dequantize in registers; others dequantize kTileN rows at a
// time into a float32 buffer that every tile of x rows reuses.
template <class F, typename Cols, typename Emit, typename Emit16>
void products(const float* x, const uint16_t* xh, int64_t M, int64_t K, const uint8_t* w, int64_t rb,
              int64_t count, Cols&& cols, Emit&& emit, [[maybe_unused]] Emit16&& emit16) {
  const int64_t blocks = K / F::kValues;
#if defined(__AVX512BF16__)
  if (in_runs(xh, M)) {  // x in bfloat16 (bits in xh): the vdpbf16ps tiles
    products_bf16<F>(xh, M, K, w, rb, count, cols, emit16);
    return;
  }
#endif
  if (M <= kFewRows) {
    // threads take pairs of products (a gate|up output is one pair: see quant_linear_silu_mul)
    at::parallel_for(0, (count + 1) / 2, kGrain / 2, [&](int64_t begin, int64_t end) {
      float c[kFewRows];
      for (int64_t i = 2 * begin; i < std::min(2 * end, count); ++i) {
        const int64_t n = cols(i);
        dot_rows<F>(static_cast<int>(M), w + n * rb, blocks, x, K, c);
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
    std::vector<float> xcopy;
    const float* xp = float_rows(x, k, xcopy);
    const int64_t M = x.size(0), N = w.size(0);
    at::Tensor bias;
    if (bias_.has_value()) {
      bias = bias_->to(at::kFloat).contiguous();
      TORCH_CHECK(bias.dim() == 1 && bias.size(0) == N, "bias must hold ", N, " values");
    }
    const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
    at::Tensor y = at::empty({M, N}, x.options());
    const Out out(y);
#if defined(__AVX512BF16__)
    auto runs = [&](int64_t m, int64_t i0, const float* v, int valid) { out.put16(m, i0, v, valid, bp); };
#else
    std::nullptr_t runs = nullptr;  // no bf16 many-row path in this build
#endif
    products<F>(xp, bf16_bits(x), M, k, w.data_ptr<uint8_t>(), w.size(1), N, [](int64_t i) { return i; },
                [&](int64_t m, int64_t, int64_t n, float v) { out.put(m, n, bp != nullptr ? v + bp[n] : v); }, runs);
    return y;
  });
}

// gate|up: product i < 2n is gate row i / 2 (even i) or up row i / 2 (odd i), so each thread's
// run of products holds both halves of its outputs; the up product finishes an output.
at::Tensor quant_linear_silu_mul(const at::Tensor& x_, const at::Tensor& w, int64_t type, int64_t k) {
  return with_format(type, [&](auto f) {
    using F = decltype(f);
    check_weight<F>(w, k);
    TORCH_CHECK(w.size(0) % 2 == 0, "a gate|up weight has an even number of rows, got ", w.size(0));
    const at::Tensor x = x_.contiguous();
    std::vector<float> xcopy;
    const float* xp = float_rows(x, k, xcopy);
    const int64_t M = x.size(0), n = w.size(0) / 2;
    at::Tensor y = at::empty({M, n}, x.options());
    // the per-product paths keep each gate until its up arrives; the bf16 many-row path needs none
    at::Tensor gate = at::empty({in_runs(bf16_bits(x), M) ? 0 : M, n}, x.options().dtype(at::kFloat));
    float* gp = gate.data_ptr<float>();
    const Out out(y);
#if defined(__AVX512BF16__)  // runs of 16 products start at even i: 8 whole gate, up pairs
    auto runs = [&](int64_t m, int64_t i0, const float* v, int valid) { out.put_silu_mul(m, i0 / 2, v, valid); };
#else
    std::nullptr_t runs = nullptr;  // no bf16 many-row path in this build
#endif
    products<F>(xp, bf16_bits(x), M, k, w.data_ptr<uint8_t>(), w.size(1), 2 * n,
                [n](int64_t i) { return i % 2 == 0 ? i / 2 : n + i / 2; },
                [&](int64_t m, int64_t i, int64_t, float v) {
                  const int64_t j = i / 2;
                  if (i % 2 == 0) {
                    gp[m * n + j] = v;
                  } else {
                    const float g = gp[m * n + j];
                    out.put(m, j, g / (1.f + std::exp(-g)) * v);
                  }
                },
                runs);
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
}

TORCH_LIBRARY_IMPL(atomr_trio, CPU, m) {
  m.impl("quant_linear", &quant_linear);
  m.impl("quant_linear_silu_mul", &quant_linear_silu_mul);
  m.impl("quant_dequantize", &quant_dequantize);
}
