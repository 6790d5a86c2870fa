// int8 matmul, weights and activations both int8 (W8A8, `quantization="int8"`; CPU).
//
// y[m, n] = sw[n] * sum_g sx[m, g] * sum_{k in g} qx[m, k] * qw[n, k] (+ bias[n]):
// - the weight is quantized once (int8.py), symmetric per output column: sw[n] = max |W[n, :]| /
//   127, qw = round(W / sw) in -127..127;
// - the activations at every call, symmetric per row and group g of kGroup (64) consecutive
//   inputs (the last group of a row may be shorter): sx[m, g] = max |x[m, g]| / 127,
//   qx = round(x * (127 / max |x[m, g]|)) in float32, to nearest even.
// Each group's sum is exact in int32 and scaled in float32; each output rounded once to x's
// dtype. Groups, not whole rows, for the activations: a row's few large values (the default
// model has them) would leave its other values a handful of levels (int8.py has the measured
// quality of each choice). A group costs its scaling: against per-row scales, 64 rows of the
// default model's matrices 1.57x -> 1.45x bf16's speed, 256 rows 1.79x -> 1.45x.
// Why: a 512-bit `vpdpbusd` does 64 byte products per instruction where `vdpbf16ps` does 32 bf16
// ones — on a 2-core Zen 4, 468 vs 234 G multiply-adds x 2 per second per core in a register-only
// loop — and the weight is half the bytes of bf16. Steps of 16+ rows are bound by the dot
// instruction (the bf16 panel kernel runs at ~90% of its peak), so there int8 is the one way to
// more tokens per second on such a CPU.
//
// `vpdpbusd` multiplies unsigned by signed bytes: the weight is stored as qw + 128 (0..255), and
// the 128 * sx[m, g] * sum_{k in g} qx[m, k] this adds to row m is summed over the groups when x is
// quantized (one float per row) and subtracted from each output. Packed weight, one uint8 tensor
// (int8.py's `pack_int8`):
//   [panels, K/4, PW * 16, 4] uint8 qw + 128: for each quad of inputs k = 4q..4q+3, a panel's
//     columns hold their four weights side by side (the operand `vpdpbusd` multiplies against a
//     broadcast quad of x); panels of PW blocks of 16 columns (PW = 3; gate|up: 2, gate columns
//     16b..16b+15, then the same up columns), padding columns qw = 0;
//   then float32 sw [P] for the P = panels * PW * 16 packed columns, in packed order.
// A tile of up to 8 rows x PW blocks keeps a group's int32 sums in registers and adds them, scaled,
// to float32 totals in L1; threads split the panels (the layout and loop of linear_bf16.cpp).
// Builds with AVX512-VNNI run that; builds with AVX2 (AVX-512 without VNNI included) take the byte
// products with `vpmaddubsw` on qw itself (see "AVX2" below: exact too, no correction); others
// the same loop in plain C++, the same arithmetic without the instructions' speed
// (`int8_matmul_isa`).
//
// int8_linear(x [M, K] f32|bf16, w, n, bias?) -> y [M, n] in x's dtype
// int8_linear_silu_mul(x [M, K], w, n) -> silu(x W_gate^T) * (x W_up^T) [M, n]; w packed as gate|up
// int8_matmul_isa() -> "avx512vnni", "avx2" or "portable"
// Built and loaded at run time by native.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "ops.h"
#include "prefetch.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define INT8_VEC512 1  // vector quantization of x and the silu epilogue
#include <immintrin.h>

#include "vec_avx512.h"
#endif
#if defined(__AVX512VNNI__) && INT8_VEC512
#define INT8_VNNI 1
#elif defined(__AVX2__) && defined(__FMA__)
#define INT8_AVX2 1  // the byte products by vpmaddubsw over sign-moved operands (see there)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kCols = 16;   // output columns per block
constexpr int kMaxRows = 8;     // rows per tile
constexpr int kPanel = 3;       // blocks per panel of a plain weight; gate|up: 2
constexpr int64_t kGroup = 64;  // inputs per activation scale (a multiple of 16)
#if INT8_AVX2
constexpr bool kUnsignedProducts = false;  // the tiles take qw itself: no correction
#else
constexpr bool kUnsignedProducts = true;  // the tiles multiply by qw + 128: corr takes the 128 out
#endif

// The two parts of a packed weight, for n outputs over K inputs in panels of `blocks` blocks
// (gate|up panels, blocks = 2, give 16 outputs each; plain ones blocks * 16).
struct Packed {
  const int32_t* quads;  // [panels, K/4, blocks * 16] of 4 uint8 qw + 128 each
  const float* scale;    // sw [panels * blocks * 16]
  int64_t panels, nquads;
};

Packed unpack(const at::Tensor& x, const at::Tensor& w, int64_t n, int blocks) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be a 2-D float32 or bfloat16 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  const int64_t K = x.size(1), width = blocks * kCols, outs = blocks == 2 ? kCols : width;
  const int64_t panels = (n + outs - 1) / outs, cols = panels * width;
  TORCH_CHECK(K > 0 && K % 4 == 0, "int8 matmul needs inputs in fours, got ", K);
  TORCH_CHECK(n > 0 && w.dim() == 1 && w.scalar_type() == at::kByte && w.is_contiguous() && w.device().is_cpu() &&
                  w.numel() == cols * K + cols * 4,
              "w must be an int8 weight of ", n, " x ", K, " packed in panels of ", blocks, " blocks (",
              cols * K + cols * 4, " bytes), got ", w.sizes());
  const uint8_t* base = w.data_ptr<uint8_t>();
  return {reinterpret_cast<const int32_t*>(base), reinterpret_cast<const float*>(base + cols * K), panels, K / 4};
}

// |v| as float32 bits: for such values the unsigned integer order is the float order, and inf /
// NaN lie above every finite value.
inline uint32_t abs_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b & 0x7fffffffu;
}
inline float load1(const float* x, int64_t k) { return x[k]; }
inline float load1(const c10::BFloat16* x, int64_t k) { return static_cast<float>(x[k]); }
#if INT8_VEC512
inline __m512 load16(const float* x, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, x); }
inline __m512 load16(const c10::BFloat16* x, __mmask16 mask) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
#endif

// One group of x [len] -> qx in q [len]; returns sx (0 for zeros, and for values too small to
// scale, NaN when it holds inf or NaN:
// the row's outputs are then NaN, as a float matmul's would be) and adds sum qx to *sum.
template <typename T>
float quantize_group(const T* x, int64_t len, int8_t* q, int32_t* sum) {
  uint32_t top = 0;  // the largest |x| as bits
#if INT8_VEC512
  __m512i vtop = _mm512_setzero_si512();
  for (int64_t k = 0; k < len; k += kCols) {
    const __m512 v = load16(x + k, atomr_vec::first_lanes(len - k));
    vtop = _mm512_max_epu32(vtop, _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff)));
  }
  top = static_cast<uint32_t>(_mm512_reduce_max_epu32(vtop));
#else
  for (int64_t k = 0; k < len; ++k) top = std::max(top, abs_bits(load1(x, k)));
#endif
  std::memset(q, 0, static_cast<size_t>(len));
  if (top >= 0x7f800000u) return std::numeric_limits<float>::quiet_NaN();
  float amax;
  std::memcpy(&amax, &top, sizeof amax);
  const float inv = 127.f / amax;
  // zeros, or values so small (< ~4e-37) that 127 / max overflows: zeros at this precision
  if (top == 0 || !(inv <= std::numeric_limits<float>::max())) return 0.f;
#if INT8_VEC512
  __m512i vsum = _mm512_setzero_si512();
  for (int64_t k = 0; k < len; k += kCols) {
    const __mmask16 mask = atomr_vec::first_lanes(len - k);
    // |x| * inv <= 127 up to a rounding that rounds back to 127: no clamp needed
    const __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(load16(x + k, mask), _mm512_set1_ps(inv)));
    vsum = _mm512_add_epi32(vsum, _mm512_maskz_mov_epi32(mask, r));
    _mm512_mask_cvtsepi32_storeu_epi8(q + k, mask, r);
  }
  *sum += _mm512_reduce_add_epi32(vsum);
#else
  for (int64_t k = 0; k < len; ++k) {
    const float v = std::clamp(std::nearbyint(load1(x, k) * inv), -127.f, 127.f);  // to nearest even
    q[k] = static_cast<int8_t>(v);
    *sum += q[k];
  }
#endif
  return amax / 127.f;
}

// The activations quantized: qx [M, K], sx [M, groups], and per row the float
// 128 * sum_g sx[m, g] * sum_{k in g} qx[m, k] the unsigned weight adds to each output (0 where
// the tiles multiply by qw itself: kUnsignedProducts false).
struct Rows {
  std::vector<int8_t> q;
  std::vector<float> scale, corr;
  int64_t groups;
};

Rows quantize_rows(const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1), groups = (K + kGroup - 1) / kGroup;
  Rows r{std::vector<int8_t>(static_cast<size_t>(M * K)), std::vector<float>(static_cast<size_t>(M * groups)),
         std::vector<float>(static_cast<size_t>(M)), groups};
  at::parallel_for(0, M, std::max<int64_t>(1, 32768 / K), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      float corr = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t k0 = g * kGroup, len = std::min(kGroup, K - k0);
        int8_t* q = r.q.data() + m * K + k0;
        int32_t sum = 0;
        const float s = x.scalar_type() == at::kFloat
                            ? quantize_group(x.data_ptr<float>() + m * K + k0, len, q, &sum)
                            : quantize_group(x.data_ptr<at::BFloat16>() + m * K + k0, len, q, &sum);
        r.scale[m * groups + g] = s;
        if (kUnsignedProducts) corr += 128.f * s * static_cast<float>(sum);
      }
      r.corr[m] = corr;
    }
  });
  return r;
}

// c[m][16 j + col] = sum_g sx[m, g] * (the int32 sum over group g's quads of the 4 byte products of
// x row m and column (j, col)), for an MT x PW tile of a panel; c [MT][PW * 16]. x rows are ldx
// int32 (quads) apart, their scales ldg apart.
#if INT8_VNNI
std::string int8_matmul_isa() { return "avx512vnni"; }
// The loops are unrolled by pragma: left to -O3, GCC kept an 8 x 3 tile's 24 accumulators on the
// stack (half the speed; -O2 or the explicit unroll keep them in registers).
// One group's int32 sums of an MT x PW tile (quads q0..q1), stored to ci [MT][PW * 16]. Its own
// function, not inlined, and storing its sums rather than scaling them: GCC spilled the 24
// accumulators of an 8 x 3 tile (half the speed) both inside the loop over groups and with the
// scaling here; left to -O3 it did so even alone unless the loops are unrolled by pragma.
template <int PW, int MT>
__attribute__((noinline)) void group_sums(const int32_t* x, int64_t ldx, const int32_t* w, int64_t q0, int64_t q1,
                                          int32_t* ci, atomr_prefetch::Ask& ask, int64_t quads) {
  __m512i acc[MT][PW];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < PW; ++j) acc[m][j] = _mm512_setzero_si512();
  for (int64_t q = q0; q < q1; ++q) {
    __m512i wv[PW];
#pragma GCC unroll 4
    for (int j = 0; j < PW; ++j) wv[j] = _mm512_loadu_si512(w + (q * PW + j) * kCols);
    ask.on(quads);
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      const __m512i xv = _mm512_set1_epi32(x[m * ldx + q]);
#pragma GCC unroll 4
      for (int j = 0; j < PW; ++j) acc[m][j] = _mm512_dpbusd_epi32(acc[m][j], wv[j], xv);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < PW; ++j) _mm512_store_si512(ci + (m * PW + j) * kCols, acc[m][j]);
}

template <int PW, int MT>
void tile(const int32_t* x, int64_t ldx, const float* sx, int64_t ldg, const int32_t* w, int64_t quads, float* c,
          atomr_prefetch::Ask ask) {
  constexpr int64_t kGroupQuads = kGroup / 4;
  alignas(64) int32_t ci[MT * PW * kCols];
  for (int64_t q0 = 0, g = 0; q0 < quads; q0 += kGroupQuads, ++g) {
    group_sums<PW, MT>(x, ldx, w, q0, std::min(quads, q0 + kGroupQuads), ci, ask, quads);
    for (int m = 0; m < MT; ++m) {
      const __m512 s = _mm512_set1_ps(sx[m * ldg + g]);
      for (int j = 0; j < PW; ++j) {
        float* out = c + (m * PW + j) * kCols;
        const __m512 sum = _mm512_cvtepi32_ps(_mm512_load_si512(ci + (m * PW + j) * kCols));
        _mm512_store_ps(out, _mm512_fmadd_ps(sum, s, g == 0 ? _mm512_setzero_ps() : _mm512_load_ps(out)));
      }
    }
  }
}
#elif INT8_AVX2
std::string int8_matmul_isa() { return "avx2"; }
// AVX2 has no byte dot instruction that takes both signs: `vpmaddubsw` multiplies unsigned by
// signed bytes into saturating int16 pairs. Moving x's sign onto the weight (`vpsignb`) makes the
// pair |x_a| (qw_a sgn x_a) + |x_b| (qw_b sgn x_b) = x_a qw_a + x_b qw_b, at most 2 * 127 * 127 =
// 32258 in magnitude: no saturation, so the sums stay exact (qx and qw lie in -127..127). Then
// `vpmaddwd` by ones adds the pairs into int32 lanes, one quad of inputs per output column. The
// weight is stored as qw + 128 (the VNNI layout): one xor by 0x80 gives qw back.
// RT rows x PW blocks (2 registers of 8 columns each) over quads q0..q1, added to acc.
template <int PW, int RT>
inline void quad_sums(const int32_t* x, int64_t ldx, const int32_t* w, int64_t q0, int64_t q1, __m256i (&acc)[RT][2 * PW]) {
  const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t q = q0; q < q1; ++q) {
    __m256i xv[RT], ax[RT];
    for (int m = 0; m < RT; ++m) {
      xv[m] = _mm256_set1_epi32(x[m * ldx + q]);
      ax[m] = _mm256_sign_epi8(xv[m], xv[m]);  // |qx|: qx is never -128
    }
    for (int j = 0; j < 2 * PW; ++j) {
      const __m256i wq = _mm256_xor_si256(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (q * PW * 2 + j) * 8)), flip);
      for (int m = 0; m < RT; ++m) {
        const __m256i pairs = _mm256_maddubs_epi16(ax[m], _mm256_sign_epi8(wq, xv[m]));
        acc[m][j] = _mm256_add_epi32(acc[m][j], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
}

template <int PW, int MT>
void tile(const int32_t* x, int64_t ldx, const float* sx, int64_t ldg, const int32_t* w, int64_t quads, float* c,
          atomr_prefetch::Ask) {
  constexpr int W = PW * kCols;
  constexpr int64_t kGroupQuads = kGroup / 4;
  for (int m = 0; m < MT * W; ++m) c[m] = 0.f;
  for (int64_t q0 = 0, g = 0; q0 < quads; q0 += kGroupQuads, ++g) {
    const int64_t q1 = std::min(quads, q0 + kGroupQuads);
    // two rows at a time (at PW = 3 their 12 accumulators, x, |x| and a weight vector spill a few
    // registers; fewer rows would read the weight more often)
    for (int m0 = 0; m0 < MT; m0 += 2) {
      auto run = [&](auto rows) {
        constexpr int RT = decltype(rows)::value;
        __m256i acc[RT][2 * PW];
        for (int m = 0; m < RT; ++m)
          for (int j = 0; j < 2 * PW; ++j) acc[m][j] = _mm256_setzero_si256();
        quad_sums<PW, RT>(x + m0 * ldx, ldx, w, q0, q1, acc);
        for (int m = 0; m < RT; ++m) {
          const __m256 s = _mm256_set1_ps(sx[(m0 + m) * ldg + g]);
          for (int j = 0; j < 2 * PW; ++j) {
            float* out = c + (m0 + m) * W + j * 8;
            _mm256_storeu_ps(out, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][j]), s, _mm256_loadu_ps(out)));
          }
        }
      };
      if (m0 + 1 < MT)
        run(std::integral_constant<int, 2>{});
      else
        run(std::integral_constant<int, 1>{});
    }
  }
}
#else
std::string int8_matmul_isa() { return "portable"; }
template <int PW, int MT>
void tile(const int32_t* x, int64_t ldx, const float* sx, int64_t ldg, const int32_t* w, int64_t quads, float* c,
          atomr_prefetch::Ask) {
  constexpr int W = PW * kCols;
  constexpr int64_t kGroupQuads = kGroup / 4;
  float total[MT][W] = {};
  for (int64_t q0 = 0, g = 0; q0 < quads; q0 += kGroupQuads, ++g) {
    const int64_t q1 = std::min(quads, q0 + kGroupQuads);
    int32_t acc[MT][W] = {};
    for (int64_t q = q0; q < q1; ++q) {
      const uint8_t* wq = reinterpret_cast<const uint8_t*>(w + q * W);
      for (int m = 0; m < MT; ++m) {
        const int8_t* xq = reinterpret_cast<const int8_t*>(x + m * ldx + q);
        const int32_t x0 = xq[0], x1 = xq[1], x2 = xq[2], x3 = xq[3];
        for (int col = 0; col < W; ++col)
          acc[m][col] += x0 * wq[4 * col] + x1 * wq[4 * col + 1] + x2 * wq[4 * col + 2] + x3 * wq[4 * col + 3];
      }
    }
    for (int m = 0; m < MT; ++m)
      for (int col = 0; col < W; ++col) total[m][col] += static_cast<float>(acc[m][col]) * sx[m * ldg + g];
  }
  std::memcpy(c, total, sizeof total);
}
#endif

template <int PW>
void tile_rows(int mt, const int32_t* x, int64_t ldx, const float* sx, int64_t ldg, const int32_t* w, int64_t quads,
               float* c, atomr_prefetch::Ask ask) {
  switch (mt) {
    case 1: tile<PW, 1>(x, ldx, sx, ldg, w, quads, c, ask); break;
    case 2: tile<PW, 2>(x, ldx, sx, ldg, w, quads, c, ask); break;
    case 3: tile<PW, 3>(x, ldx, sx, ldg, w, quads, c, ask); break;
    case 4: tile<PW, 4>(x, ldx, sx, ldg, w, quads, c, ask); break;
    case 5: tile<PW, 5>(x, ldx, sx, ldg, w, quads, c, ask); break;
    case 6: tile<PW, 6>(x, ldx, sx, ldg, w, quads, c, ask); break;
    case 7: tile<PW, 7>(x, ldx, sx, ldg, w, quads, c, ask); break;
    default: tile<PW, 8>(x, ldx, sx, ldg, w, quads, c, ask);
  }
}

// 16 outputs of one row: (c - corr) * sw (+ bias), stored to y's first `valid` lanes in y's
// dtype (bf16 rounded to nearest even).
struct Scaled {
  const float* c;   // 16 group-scaled sums
  const float* sw;  // their 16 columns' scales
  float corr;       // the row's correction
};
#if INT8_VEC512
inline __m512 value(const Scaled& a) {
  return _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(a.c), _mm512_set1_ps(a.corr)), _mm512_loadu_ps(a.sw));
}
inline void store16(float* y, __m512 v, int64_t valid) { _mm512_mask_storeu_ps(y, atomr_vec::first_lanes(valid), v); }
inline void store16(c10::BFloat16* y, __m512 v, int64_t valid) {
#if defined(__AVX512BF16__)
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
#else
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  const __m256i h = _mm512_cvtepi32_epi16(r);
#endif
  _mm256_mask_storeu_epi16(y, atomr_vec::first_lanes(valid), h);
}
template <typename T>
void finish16(const Scaled& a, const float* bias, T* y, int64_t valid) {
  __m512 v = value(a);
  if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(atomr_vec::first_lanes(valid), bias));
  store16(y, v, valid);
}
template <typename T>
void finish_silu16(const Scaled& gate, const Scaled& up, T* y, int64_t valid) {
  const __m512 g = value(gate);
  const __m512 e = atomr_vec::exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g));
  store16(y, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)), value(up)), valid);
}
#else
inline void values(const Scaled& a, float* v) {
  for (int i = 0; i < kCols; ++i) v[i] = (a.c[i] - a.corr) * a.sw[i];
}
template <typename T>
void finish16(const Scaled& a, const float* bias, T* y, int64_t valid) {
  float v[kCols];
  values(a, v);
  for (int64_t i = 0; i < valid; ++i) y[i] = static_cast<T>(bias != nullptr ? v[i] + bias[i] : v[i]);
}
template <typename T>
void finish_silu16(const Scaled& gate, const Scaled& up, T* y, int64_t valid) {
  float g[kCols], u[kCols];
  values(gate, g);
  values(up, u);
  for (int64_t i = 0; i < valid; ++i) y[i] = static_cast<T>(g[i] / (1.f + std::exp(-g[i])) * u[i]);
}
#endif

// Tiles of y = x W^T panel by panel, each finished one handed to
// `epilogue(row0, rows, panel, c, corr, sw)`: c [rows][PW * 16] the tile's group-scaled sums,
// corr the rows' corrections, sw the panel's column scales. With more than one tile of rows
// every tile asks for its share of the thread's next panel, spread over its quads (as
// linear_bf16.cpp; the VNNI tiles only). Measured level on a 2-core Zen 5 against the last tile
// alone asking for the whole next panel (decode steps of 16 and 64 sequences, 3 alternated runs:
// 9.1-10.1 vs 9.5-9.8 ms, 28.1-29.1 vs 28.7-29.1): int8 panels are half the bytes of bf16 ones.
template <int PW, typename Epilogue>
void matmul(const at::Tensor& x_, const Packed& w, Epilogue&& epilogue) {
  const at::Tensor x = x_.contiguous();
  const int64_t M = x.size(0);
  const Rows rows = quantize_rows(x);
  const int32_t* xq = reinterpret_cast<const int32_t*>(rows.q.data());
  const int64_t quads = w.nquads, panel_size = quads * PW * kCols;  // int32 units
  at::parallel_for(0, w.panels, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float c[kMaxRows * PW * kCols];
    const int64_t tiles = (M + kMaxRows - 1) / kMaxRows;
    for (int64_t panel = begin; panel < end; ++panel) {
      const int32_t* wp = w.quads + panel * panel_size;
      const int64_t ahead = tiles > 1 && panel + 1 < end ? panel_size * 4 : 0;  // bytes of the next panel
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t m0 = t * kMaxRows;
        const int mt = static_cast<int>(std::min<int64_t>(kMaxRows, M - m0));
        tile_rows<PW>(mt, xq + m0 * quads, quads, rows.scale.data() + m0 * rows.groups, rows.groups, wp, quads, c,
                      atomr_prefetch::share(wp + panel_size, ahead, t, tiles));
        epilogue(m0, mt, panel, c, rows.corr.data() + m0, w.scale + panel * PW * kCols);
      }
    }
  });
}

template <typename T>
void linear_into(const at::Tensor& x, const Packed& w, int64_t n, const float* bias, T* y) {
  matmul<kPanel>(x, w, [&](int64_t m0, int mt, int64_t panel, const float* c, const float* corr, const float* sw) {
    for (int j = 0; j < kPanel; ++j) {
      const int64_t col = (panel * kPanel + j) * kCols, valid = std::min(kCols, n - col);
      if (valid <= 0) break;  // padding columns of the last panel
      for (int m = 0; m < mt; ++m)
        finish16(Scaled{c + (m * kPanel + j) * kCols, sw + j * kCols, corr[m]}, bias != nullptr ? bias + col : nullptr,
                 y + (m0 + m) * n + col, valid);
    }
  });
}

template <typename T>
void silu_mul_into(const at::Tensor& x, const Packed& w, int64_t n, T* y) {
  matmul<2>(x, w, [&](int64_t m0, int mt, int64_t panel, const float* c, const float* corr, const float* sw) {
    const int64_t col = panel * kCols, valid = std::min(kCols, n - col);
    for (int m = 0; m < mt; ++m)
      finish_silu16(Scaled{c + 2 * m * kCols, sw, corr[m]}, Scaled{c + (2 * m + 1) * kCols, sw + kCols, corr[m]},
                    y + (m0 + m) * n + col, valid);
  });
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, int64_t n, const c10::optional<at::Tensor>& bias_) {
  const Packed p = unpack(x, w, n, kPanel);
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  at::Tensor bias;
  if (bias_.has_value()) {
    bias = bias_->to(at::kFloat).contiguous();
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == n, "bias must hold n values");
  }
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  if (x.size(0) == 0) return y;
  if (x.scalar_type() == at::kFloat)
    linear_into(x, p, n, bp, y.data_ptr<float>());
  else
    linear_into(x, p, n, bp, y.data_ptr<at::BFloat16>());
  return y;
}

at::Tensor int8_linear_silu_mul(const at::Tensor& x, const at::Tensor& w, int64_t n) {
  const Packed p = unpack(x, w, n, 2);
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  if (x.size(0) == 0) return y;
  if (x.scalar_type() == at::kFloat)
    silu_mul_into(x, p, n, y.data_ptr<float>());
  else
    silu_mul_into(x, p, n, y.data_ptr<at::BFloat16>());
  return y;
}

}  // namespace

namespace atomr_ops {  // ops.h
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, int64_t n, const c10::optional<at::Tensor>& bias) {
  return ::int8_linear(x, w, n, bias);
}
at::Tensor int8_linear_silu_mul(const at::Tensor& x, const at::Tensor& w, int64_t n) {
  return ::int8_linear_silu_mul(x, w, n);
}
}  // namespace atomr_ops

TORCH_LIBRARY_FRAGMENT(atomr_trio, m) {
  m.def("int8_linear(Tensor x, Tensor w, int n, Tensor? bias) -> Tensor");
  m.def("int8_linear_silu_mul(Tensor x, Tensor w, int n) -> Tensor");
  m.def("int8_matmul_isa() -> str", &int8_matmul_isa);
}

TORCH_LIBRARY_IMPL(atomr_trio, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int8_linear_silu_mul", &int8_linear_silu_mul);
}
