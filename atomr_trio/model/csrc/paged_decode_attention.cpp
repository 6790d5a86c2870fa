// Decode attention that reads the paged KV cache in place (CPU; float32 or bfloat16).
//
// One query token per sequence attends to positions 0..ctx_len-1 of its own context, whose
// keys and values sit at cache slots `slots[n * L + pos]`. The torch version of this (see
// attention.py) first copies every context into one tensor and then runs a batch of tiny
// matmuls; here each (sequence, KV head) pair is one unit of work that reads its K/V rows
// where they are, keeps scores in float32 and rounds once at the end.
//
// Layouts: q [nd, H, D]; kv [2, KVH, num_slots, D] (contiguous); slots [nd * L] int64;
// ctx_lens [nd] int64 (each <= L). Query heads h*G .. h*G+G-1 share KV head h (G = H / KVH).
// window (optional, > 0): sliding-window attention — the query sees only the last `window`
// positions of its context (itself included), max(0, ctx_len - window) .. ctx_len - 1, as
// transformers' sliding-window mask does; none (or <= 0): the whole context.
// softcap (optional, > 0): each scaled score s becomes softcap * tanh(s / softcap) before the
// softmax (Gemma 2's attention-logit soft-capping); none (or <= 0): no capping.
// Built and loaded at run time by native.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__)
#include "vec_avx512.h"
#else
#include "vec_wide.h"  // AVX2 + FMA or NEON: ATOMR_WIDE
#endif

namespace {

inline float as_float(float x) { return x; }
inline float as_float(c10::BFloat16 x) { return static_cast<float>(x); }

// One cache row of head_dim values, widened to float32 into `out`.
template <typename T>
inline void load_row(const T* src, float* out, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) out[d] = as_float(src[d]);
}

// Where one unit of work — a sequence's query heads sharing one KV head — finds its data.
template <typename T>
struct Unit {
  const T* q;          // [G, D] query rows
  const T* k;          // the KV head's key rows; the row of slot s at k + s * D
  const T* v;          // ... and value rows
  const int64_t* slots;  // [len] cache slots of positions 0..len-1
  int64_t len;
  T* out;              // [G, D]
  const Unit* next = nullptr;  // the unit this thread works on after this one, if any; its own
                               // `next` is set too, or nullptr (the AVX512-BF16 kernel reads two units ahead)
};

// The rows of a unit are gathered through its slots, which leaves the hardware prefetcher
// little to follow. So the bf16 kernels ask for them ahead of use: while key row l is dotted,
// value row l (into L1: the values are read after all the keys) and the next unit's key row l
// (into L2); while value row l is added, the next unit's value row l. Measured on 30 layers'
// caches, 2 threads, G = 3, D = 64 (2-core Zen 4): AVX512-BF16, 16 sequences x 150 positions
// 88-90 -> 64-68 us a layer, 64 x 190 429-446 -> 340 us, 16 x 512 271 -> 228 us; the AVX2
// build, 16 x 150 137-142 -> 81-87 us. (The portable loop, which float32 caches take, is bound
// by its arithmetic: there the prefetches cost 5-10% and it has none.)
// The AVX512-BF16 kernel also asks for the rows of the unit after next (locality 1, the T2 hint): it
// computes fast enough that one unit of lead left it waiting on memory. Measured on a 2-core
// AMD EPYC (Zen 5), 30 layers' caches on huge pages, 64 sequences x 233 positions, blocks
// scattered, 3 alternated runs: 10.6-11.1 -> 9.6-10.1 ms (the AVX2 kernel keeps one unit of lead).
// Measured level there and not taken: the far rows into L2 (locality 2) instead; and asking for
// the next layer's rows from the tiles of the MLP matmuls, whose DRAM bandwidth sits mostly idle
// (all of them: a 64-sequence decode step 33.3-35.3 -> 35.7-37.3 ms; ~40% of them: level,
// 33.7-34.8 vs 34.0-36.9). Cache blocks of 32-128 positions instead of 16 measured level on
// caches just large enough for their sequences, but not on a cache of the served size (1 GiB,
// blocks handed out by its LRU queue): there longer runs of adjacent rows (a block's rows of one
// head) pay, and the CPU default is 64 (engine_config.py has the figures).
// Every line needs its own request: one line per 128-byte row (the other left to the adjacent-line
// prefetcher) took 19.4 ms instead of 9.7-9.9, the next units' rows asked for only at the first
// position of each 16 (the rest left to the stream prefetchers, blocks of 16 or 64 positions)
// 14.5-17.3 ms. The requests are not free: with every row already in L1/L2 (all sequences on the
// same slots) the 30 layers take 5.0-5.3 ms with them and 3.5-3.6 ms without.
constexpr int kFarLocality = 1;
template <int Locality, typename T>
inline void prefetch_row(const T* base, int64_t slot, int64_t D) {
  const char* row = reinterpret_cast<const char*>(base + slot * D);
  for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(row + b, 0, Locality);
}

// Portable version: any dtype, head size and group. kD > 0: head size known at compile time
// (lets the compiler unroll the row loops); 0: any.
template <typename T, int64_t kD>
struct Generic {
  int64_t G, D, L;
  float scale, softcap;
  std::vector<float> qf, acc, row, scores, denom;
  Generic(int64_t G_, int64_t D_, int64_t L_, float s, float cap)
      : G(G_), D(kD > 0 ? kD : D_), L(L_), scale(s), softcap(cap), qf(G * D), acc(G * D), row(D), scores(G * L),
        denom(G) {}

  void operator()(const Unit<T>& u) {
    for (int64_t i = 0; i < G * D; ++i) qf[i] = as_float(u.q[i]) * scale;

    // scores[g, l] = q_g . k_l
    for (int64_t l = 0; l < u.len; ++l) {
      const float* r = row.data();
      load_row(u.k + u.slots[l] * D, row.data(), D);
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qf.data() + g * D;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < D; ++d) s += qg[d] * r[d];
        scores[g * L + l] = s;
      }
    }

    if (softcap > 0.f)
      for (int64_t g = 0; g < G; ++g)
        for (int64_t l = 0; l < u.len; ++l) scores[g * L + l] = softcap * std::tanh(scores[g * L + l] / softcap);

    // softmax numerators in place; denominators kept apart
    for (int64_t g = 0; g < G; ++g) {
      float* sg = scores.data() + g * L;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t l = 0; l < u.len; ++l) mx = std::max(mx, sg[l]);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t l = 0; l < u.len; ++l) {
        sg[l] = std::exp(sg[l] - mx);
        sum += sg[l];
      }
      denom[g] = sum;
    }

    // out_g = sum_l p[g, l] * v_l / denom[g]
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t l = 0; l < u.len; ++l) {
      const float* r = row.data();
      load_row(u.v + u.slots[l] * D, row.data(), D);
      for (int64_t g = 0; g < G; ++g) {
        const float p = scores[g * L + l];
        float* ag = acc.data() + g * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ag[d] += p * r[d];
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      const float inv = denom[g] > 0.f ? 1.f / denom[g] : 0.f;  // len == 0: zeros
      for (int64_t d = 0; d < D; ++d) u.out[g * D + d] = static_cast<T>(acc[g * D + d] * inv);
    }
  }
};

#if defined(__AVX512BF16__)
// Lane i of the result: the sum of v[i]'s 16 lanes (a transposing tree of pairwise sums). Its
// first two levels shuffle within 128-bit lanes (unpack), only the last two across them: with
// every level a two-source `vpermt2ps` before, the default model's 64 x 233 positions over 30
// layers' caches held in L3 took 7.3-8.2 ms, now 6.8 (2-core Zen 5).
inline __m512 sum_each(const __m512* v) {
  // within each 128-bit lane: (v[2i], v[2i+1]) -> [a0+a2, b0+b2, a1+a3, b1+b3]
  __m512 t[8];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  // (t[2j], t[2j+1]) -> each 128-bit lane holds its share of the sums of v[4j] .. v[4j+3]
  __m512 u[4];
  for (int j = 0; j < 4; ++j) {
    const __m512d a = _mm512_castps_pd(t[2 * j]), b = _mm512_castps_pd(t[2 * j + 1]);
    u[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // across the 128-bit lanes: lanes (0+1, 2+3) of two vectors, then of those
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}

// bfloat16 with AVX512-BF16, G query heads per KV head, head size D: the query rows live in
// registers; each key row costs D/32 loads and G * D/32 `vdpbf16ps`, and the dot products of
// 16 keys are finished together by `sum_each`; the value rows are widened once and added into
// G * D/16 float32 accumulators held in registers.
template <int G, int D>
struct Bf16 {
  static constexpr int NK = D / 32;  // bf16 vectors per row
  static constexpr int NA = D / 16;  // float32 vectors per row
  int64_t L;
  float scale, softcap;
  std::vector<float> scores;
  Bf16(int64_t L_, float s, float cap) : L((L_ + 15) / 16 * 16), scale(s), softcap(cap), scores(G * L) {}

  void operator()(const Unit<c10::BFloat16>& u) {
    using atomr_vec::first_lanes;
    const int64_t len = u.len;
    const Unit<c10::BFloat16>* far = u.next != nullptr ? u.next->next : nullptr;  // the unit after next
    __m512bh qv[G][NK];
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < NK; ++i) qv[g][i] = (__m512bh)_mm512_loadu_si512(u.q + g * D + i * 32);

    // scores, 16 keys at a time
    __m512 part[G][16];
    __m512 mx[G];
    for (int g = 0; g < G; ++g) mx[g] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t l0 = 0; l0 < len; l0 += 16) {
      const int n = static_cast<int>(std::min<int64_t>(16, len - l0));
      for (int i = 0; i < 16; ++i) {
        if (i >= n) {
          for (int g = 0; g < G; ++g) part[g][i] = _mm512_setzero_ps();
          continue;
        }
        const c10::BFloat16* k = u.k + u.slots[l0 + i] * D;
        prefetch_row<3>(u.v, u.slots[l0 + i], D);
        if (u.next != nullptr && l0 + i < u.next->len) prefetch_row<2>(u.next->k, u.next->slots[l0 + i], D);
        if (far != nullptr && l0 + i < far->len) prefetch_row<kFarLocality>(far->k, far->slots[l0 + i], D);
        __m512bh kv[NK];
        for (int j = 0; j < NK; ++j) kv[j] = (__m512bh)_mm512_loadu_si512(k + j * 32);
        for (int g = 0; g < G; ++g) {
          __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), kv[0], qv[g][0]);
          for (int j = 1; j < NK; ++j) a = _mm512_dpbf16_ps(a, kv[j], qv[g][j]);
          part[g][i] = a;
        }
      }
      const __mmask16 mask = first_lanes(n);
      for (int g = 0; g < G; ++g) {
        const __m512 s = _mm512_mul_ps(sum_each(part[g]), _mm512_set1_ps(scale));
        _mm512_mask_storeu_ps(scores.data() + g * L + l0, mask, s);
        mx[g] = _mm512_mask_max_ps(mx[g], mask, mx[g], s);
      }
    }

    // softmax numerators in place; 1 / denominators kept apart
    float inv[G];
    for (int g = 0; g < G; ++g) {
      float top = _mm512_reduce_max_ps(mx[g]);
      float* sg = scores.data() + g * L;
      if (softcap > 0.f) {  // capping is monotonic: the capped maximum is the cap of the maximum
        for (int64_t l = 0; l < len; ++l) sg[l] = softcap * std::tanh(sg[l] / softcap);
        top = softcap * std::tanh(top / softcap);
      }
      const __m512 m = _mm512_set1_ps(top);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t l0 = 0; l0 < len; l0 += 16) {
        const __mmask16 mask = first_lanes(len - l0);
        const __m512 e = _mm512_maskz_mov_ps(mask, atomr_vec::exp_ps(_mm512_sub_ps(_mm512_loadu_ps(sg + l0), m)));
        _mm512_storeu_ps(sg + l0, e);
        sum = _mm512_add_ps(sum, e);
      }
      const float d = _mm512_reduce_add_ps(sum);
      inv[g] = d > 0.f ? 1.f / d : 0.f;  // len == 0: zeros
    }

    // out_g = sum_l p[g, l] * v_l / denominator
    __m512 acc[G][NA];
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < NA; ++i) acc[g][i] = _mm512_setzero_ps();
    for (int64_t l = 0; l < len; ++l) {
      const c10::BFloat16* v = u.v + u.slots[l] * D;
      if (u.next != nullptr && l < u.next->len) prefetch_row<2>(u.next->v, u.next->slots[l], D);
      if (far != nullptr && l < far->len) prefetch_row<kFarLocality>(far->v, far->slots[l], D);
      __m512 vf[NA];
      for (int i = 0; i < NA; ++i) vf[i] = atomr_vec::load_bf16(v + i * 16);
      for (int g = 0; g < G; ++g) {
        const __m512 p = _mm512_set1_ps(scores[g * L + l]);
        for (int i = 0; i < NA; ++i) acc[g][i] = _mm512_fmadd_ps(p, vf[i], acc[g][i]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < NA; ++i)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(u.out + g * D + i * 16),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[g][i], _mm512_set1_ps(inv[g]))));
  }
};
#elif defined(ATOMR_WIDE)
namespace wide = atomr_wide;
using wide::f8;

// bfloat16 with AVX2 + FMA, or NEON on 64-bit Arm (no bf16 dot instruction; vec_wide.h's 8-float
// vector), G query heads per KV head, head size D.
// Scores: each key row is widened once (D/8 vectors) and dotted with the G float32 query rows,
// the dot products of 8 keys finished together by `sum_each8` (the portable loop reduces each
// one on its own). Softmax numerators by a vector exp (the portable loop calls std::exp per
// score). Values: NC * 8 columns at a time (value_columns below), G x NC float32 accumulators in
// registers across the whole context. Measured against the portable loop on bf16 (2-core Zen 4 built for Haswell,
// 3 KV heads, G = 3, D = 64, one layer; a busy machine, so best of 30 and ranges over runs):
// one sequence x 156 tokens 19-31 -> 9-11 us; 16 x 156: 2 threads ~240 -> ~80 us, one thread
// 375-466 -> 151-205 us; 16 x 1024, one thread: 4.0-5.8 -> 1.9-3.6 ms. (float32 caches keep
// the portable loop: they read twice the bytes, and it was level with bf16's before.) On Arm the
// kernel, value passes included, runs under emulation (scripts/emulated_arm.sh: results tested,
// speed not measured).
// The values took 16 columns (G x 2 accumulators) per pass over the context until passes of
// NC * 8 columns (G x NC accumulators, value_columns below — AVX2: 64 columns for G = 1, 32 for
// G = 2-3 (the default model's G = 3), 16 for G = 4-6, 8 for G = 7-8, where 16 would need 17-19
// registers; NEON: 64, 32, 16 for G = 3-4, 8 for G = 5-8; unmeasured but for G = 3 on AVX2): for G = 3 half the
// passes, each position's G weights broadcast half as often, and 12 independent FMA chains
// instead of 6 (each waits on its own previous FMA). The scores of 8 keys are stored
// straight into the padded score row (a copy of 8 floats had compiled to `rep movs`). Same sums
// in the same order, so the same bits. Measured on 30 layers' caches, 64 sequences x 130-260
// positions, 2 threads, G = 3, D = 64 (2-core AMD EPYC, Zen 2, AVX2; alternated runs): cache
// resident 15.0-15.8 -> 12.3-12.7 ms; each sequence's blocks adjacent in memory 18.8 -> 15.8-16.5
// ms; blocks scattered 23.5-25.8 -> 22.1-23.7 ms (there the reads from memory bound it).
//
// Value vectors per pass of Bf16Wide: the most of 8, 4, 2, 1 dividing a row's NV vectors whose
// G * NC accumulators, plus what the inner loop keeps live beside them — G broadcast weights
// when G <= NC (each value vector then loaded once and used at once), else NC value vectors
// (each weight broadcast and used at once) — and one more, fit in kRegs f8 registers: AVX2's 16.
// NEON's f8 is two of its 32 registers; it budgets 12, a cautious choice (GCC's aarch64 code has
// spilled f8 arrays that fill the registers; the matmul's 5-row NEON tiles keep 13 live without
// spilling) that keeps G = 3 at its G x 2 accumulators of before; unmeasured there.
#if defined(__AVX2__)
constexpr int kRegs = 16;
#else
constexpr int kRegs = 12;
#endif
constexpr int value_columns(int G, int NV) {
  for (int nc = 8; nc > 1; nc /= 2)
    if (NV % nc == 0 && G * nc + (G <= nc ? G : nc) + 1 <= kRegs) return nc;
  return 1;
}

template <int G, int D>
struct Bf16Wide {
  static constexpr int NV = D / 8;  // float32 vectors per row
  static constexpr int NC = value_columns(G, NV);
  int64_t L;
  float scale, softcap;
  std::vector<float> qf, scores;
  Bf16Wide(int64_t L_, float s, float cap)
      : L((L_ + 7) / 8 * 8), scale(s), softcap(cap), qf(G * D), scores(G * L) {}

  void operator()(const Unit<c10::BFloat16>& u) {
    const int64_t len = u.len;
    for (int i = 0; i < G * D; i += 8)
      wide::store(qf.data() + i, wide::mul(wide::load_bf16(u.q + i), wide::set1(scale)));

    // scores, 8 keys at a time
    float top[G];
    for (int g = 0; g < G; ++g) top[g] = -std::numeric_limits<float>::infinity();
    for (int64_t l0 = 0; l0 < len; l0 += 8) {
      const int n = static_cast<int>(std::min<int64_t>(8, len - l0));
      f8 part[G][8];
      for (int i = 0; i < 8; ++i) {
        if (i >= n) {
          for (int g = 0; g < G; ++g) part[g][i] = wide::zero();
          continue;
        }
        const c10::BFloat16* k = u.k + u.slots[l0 + i] * D;
        prefetch_row<3>(u.v, u.slots[l0 + i], D);
        if (u.next != nullptr && l0 + i < u.next->len) prefetch_row<2>(u.next->k, u.next->slots[l0 + i], D);
        f8 kf[NV];
        for (int j = 0; j < NV; ++j) kf[j] = wide::load_bf16(k + j * 8);
        for (int g = 0; g < G; ++g) {
          const float* qg = qf.data() + g * D;
          f8 a0 = wide::mul(kf[0], wide::load(qg)), a1 = wide::mul(kf[1], wide::load(qg + 8));
          for (int j = 2; j < NV; j += 2) {
            a0 = wide::fmadd(kf[j], wide::load(qg + j * 8), a0);
            a1 = wide::fmadd(kf[j + 1], wide::load(qg + j * 8 + 8), a1);
          }
          part[g][i] = wide::add(a0, a1);
        }
      }
      for (int g = 0; g < G; ++g) {  // (L is a multiple of 8: the 8 lanes fit past the last key)
        float* sg = scores.data() + g * L + l0;
        wide::store(sg, wide::sum_each8(part[g]));
        for (int i = 0; i < n; ++i) top[g] = std::max(top[g], sg[i]);
      }
    }

    // softmax numerators in place; 1 / denominators kept apart
    float inv[G];
    for (int g = 0; g < G; ++g) {
      float* sg = scores.data() + g * L;
      if (softcap > 0.f) {  // capping is monotonic: the capped maximum is the cap of the maximum
        for (int64_t l = 0; l < len; ++l) sg[l] = softcap * std::tanh(sg[l] / softcap);
        top[g] = softcap * std::tanh(top[g] / softcap);
      }
      const f8 m = wide::set1(top[g]);
      f8 sum = wide::zero();
      int64_t l = 0;
      for (; l + 8 <= len; l += 8) {
        const f8 e = wide::exp(wide::sub(wide::load(sg + l), m));
        wide::store(sg + l, e);
        sum = wide::add(sum, e);
      }
      alignas(32) float lanes[8];
      wide::store(lanes, sum);
      float d = 0.f;
      for (float v : lanes) d += v;
      for (; l < len; ++l) {
        sg[l] = std::exp(sg[l] - top[g]);
        d += sg[l];
      }
      inv[g] = d > 0.f ? 1.f / d : 0.f;  // len == 0: zeros
    }

    // out_g = sum_l p[g, l] * v_l / denominator, NC * 8 columns at a time
    for (int c = 0; c < D; c += NC * 8) {
      f8 acc[G][NC];
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
        for (int j = 0; j < NC; ++j) acc[g][j] = wide::zero();
      for (int64_t l = 0; l < len; ++l) {
        const c10::BFloat16* v = u.v + u.slots[l] * D + c;
        if (c == 0 && u.next != nullptr && l < u.next->len) prefetch_row<2>(u.next->v, u.next->slots[l], D);
        if constexpr (G <= NC) {  // (value_columns: which of the two stays in registers)
          f8 p[G];
#pragma GCC unroll 8
          for (int g = 0; g < G; ++g) p[g] = wide::broadcast(scores.data() + g * L + l);
#pragma GCC unroll 8
          for (int j = 0; j < NC; ++j) {
            const f8 vj = wide::load_bf16(v + j * 8);
#pragma GCC unroll 8
            for (int g = 0; g < G; ++g) acc[g][j] = wide::fmadd(p[g], vj, acc[g][j]);
          }
        } else {
          f8 vj[NC];
#pragma GCC unroll 8
          for (int j = 0; j < NC; ++j) vj[j] = wide::load_bf16(v + j * 8);
#pragma GCC unroll 8
          for (int g = 0; g < G; ++g) {
            const f8 p = wide::broadcast(scores.data() + g * L + l);
#pragma GCC unroll 8
            for (int j = 0; j < NC; ++j) acc[g][j] = wide::fmadd(p, vj[j], acc[g][j]);
          }
        }
      }
      for (int g = 0; g < G; ++g)
        for (int j = 0; j < NC; ++j)
          wide::store_bf16(u.out + g * D + c + j * 8, wide::mul(acc[g][j], wide::set1(inv[g])), 8);
    }
  }
};
#endif

// Runs `Kernel` (one per thread) over every (sequence, KV head) unit, after checking that each
// unit's slots lie inside the cache.
template <typename T, typename Kernel, typename... Args>
void run_units(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& slots, const at::Tensor& ctx_lens,
               int64_t window, at::Tensor& out, Args... args) {
  std::atomic<bool> bad_slot{false};
  const int64_t nd = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KVH = kv.size(1), S = kv.size(2);
  const int64_t L = slots.size(0) / nd;
  const int64_t G = H / KVH;
  const T* qp = q.data_ptr<T>();
  const T* kp = kv.data_ptr<T>();
  const T* vp = kp + KVH * S * D;
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = ctx_lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();

  // Unit w, if its slots lie inside the cache.
  auto unit = [&](int64_t w, Unit<T>& u) {
    const int64_t n = w / KVH, h = w % KVH;
    const int64_t ctx = std::min(lp[n], L);
    const int64_t start = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;  // first visible position
    const int64_t len = ctx - start;
    const int64_t* srow = sp + n * L + start;
    bool in_range = true;
    for (int64_t l = 0; l < len; ++l) in_range &= srow[l] >= 0 && srow[l] < S;
    const int64_t first = (n * H + h * G) * D;
    u = Unit<T>{qp + first, kp + h * S * D, vp + h * S * D, srow, len, op + first};
    return in_range;
  };
  at::parallel_for(0, nd * KVH, 1, [&](int64_t begin, int64_t end) {
    Kernel kernel(args...);
    Unit<T> units[3];
    bool ok = unit(begin, units[0]);
    bool ok1 = begin + 1 < end && unit(begin + 1, units[1]);
    for (int64_t w = begin; w < end; ++w) {
      Unit<T>& u = units[(w - begin) % 3];
      Unit<T>& n1 = units[(w - begin + 1) % 3];
      Unit<T>& n2 = units[(w - begin + 2) % 3];
      const bool ok2 = w + 2 < end && unit(w + 2, n2);
      n1.next = ok2 ? &n2 : nullptr;
      u.next = ok1 ? &n1 : nullptr;
      if (ok)
        kernel(u);
      else  // never read outside the cache; the caller gets an error instead
        bad_slot = true;
      ok = ok1;
      ok1 = ok2;
    }
  });
  TORCH_CHECK(!bad_slot, "paged_decode_attention: a slot lies outside the cache");
}

template <typename T>
void dispatch(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& slots, const at::Tensor& ctx_lens,
              float scale, int64_t window, float softcap, at::Tensor& out) {
  const int64_t G = q.size(1) / kv.size(1), D = q.size(2), L = slots.size(0) / q.size(0);
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
#define ATOMR_BF16_CASE(g)                                                      \
  if (G == g && D == 64) return run_units<T, Bf16<g, 64>>(q, kv, slots, ctx_lens, window, out, L, scale, softcap); \
  if (G == g && D == 128) return run_units<T, Bf16<g, 128>>(q, kv, slots, ctx_lens, window, out, L, scale, softcap);
    ATOMR_BF16_CASE(1) ATOMR_BF16_CASE(2) ATOMR_BF16_CASE(3) ATOMR_BF16_CASE(4)
    ATOMR_BF16_CASE(5) ATOMR_BF16_CASE(6) ATOMR_BF16_CASE(7) ATOMR_BF16_CASE(8)
#undef ATOMR_BF16_CASE
  }
#elif defined(ATOMR_WIDE)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
#define ATOMR_BF16_CASE(g)                                                      \
  if (G == g && D == 64) return run_units<T, Bf16Wide<g, 64>>(q, kv, slots, ctx_lens, window, out, L, scale, softcap); \
  if (G == g && D == 128) return run_units<T, Bf16Wide<g, 128>>(q, kv, slots, ctx_lens, window, out, L, scale, softcap);
    ATOMR_BF16_CASE(1) ATOMR_BF16_CASE(2) ATOMR_BF16_CASE(3) ATOMR_BF16_CASE(4)
    ATOMR_BF16_CASE(5) ATOMR_BF16_CASE(6) ATOMR_BF16_CASE(7) ATOMR_BF16_CASE(8)
#undef ATOMR_BF16_CASE
  }
#endif
  switch (D) {
    case 64: return run_units<T, Generic<T, 64>>(q, kv, slots, ctx_lens, window, out, G, D, L, scale, softcap);
    case 128: return run_units<T, Generic<T, 128>>(q, kv, slots, ctx_lens, window, out, G, D, L, scale, softcap);
    default: return run_units<T, Generic<T, 0>>(q, kv, slots, ctx_lens, window, out, G, D, L, scale, softcap);
  }
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& slots,
                                  const at::Tensor& ctx_lens, double scale, std::optional<int64_t> window,
                                  std::optional<double> softcap) {
  TORCH_CHECK(q.dim() == 3, "q must be [sequences, heads, head_dim], got ", q.sizes());
  TORCH_CHECK(kv.dim() == 4 && kv.size(0) == 2 && kv.size(3) == q.size(2),
              "kv must be [2, kv_heads, slots, head_dim] matching q, got ", kv.sizes());
  TORCH_CHECK(kv.size(1) > 0 && q.size(1) % kv.size(1) == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(q.scalar_type() == kv.scalar_type(), "q and kv must have one dtype");
  TORCH_CHECK(q.device().is_cpu() && kv.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(kv.is_contiguous(), "kv must be contiguous");
  TORCH_CHECK(slots.scalar_type() == at::kLong && ctx_lens.scalar_type() == at::kLong,
              "slots and ctx_lens must be int64");
  TORCH_CHECK(ctx_lens.dim() == 1 && ctx_lens.size(0) == q.size(0), "one ctx_len per sequence");
  TORCH_CHECK(slots.dim() == 1 && q.size(0) > 0 && slots.size(0) % q.size(0) == 0,
              "slots must hold L slots per sequence");
  at::Tensor qc = q.contiguous();
  at::Tensor sc = slots.contiguous();
  at::Tensor lc = ctx_lens.contiguous();
  at::Tensor out = at::empty_like(qc);
  const float s = static_cast<float>(scale);
  const int64_t w = window.has_value() ? *window : 0;
  const float cap = softcap.has_value() ? static_cast<float>(*softcap) : 0.f;
  if (q.scalar_type() == at::kBFloat16) {
    dispatch<c10::BFloat16>(qc, kv, sc, lc, s, w, cap, out);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kFloat, "float32 or bfloat16 only, got ", q.scalar_type());
    dispatch<float>(qc, kv, sc, lc, s, w, cap, out);
  }
  return out;
}

}  // namespace

namespace atomr_ops {  // ops.h
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& slots,
                                  const at::Tensor& ctx_lens, double scale, std::optional<int64_t> window,
                                  std::optional<double> softcap) {
  return ::paged_decode_attention(q, kv, slots, ctx_lens, scale, window, softcap);
}
}  // namespace atomr_ops

TORCH_LIBRARY(atomr_trio, m) {
  m.def("paged_decode_attention(Tensor q, Tensor kv, Tensor slots, Tensor ctx_lens, float scale, int? window=None, float? softcap=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(atomr_trio, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
