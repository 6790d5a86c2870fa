// Prefill attention over the paged KV cache (CPU, bfloat16; AVX512-BF16, AVX2 + FMA or Arm NEON builds).
//
// A prompt chunk of Q query tokens sits at positions C - Q .. C - 1 of a context of C tokens
// whose keys and values — the chunk's own included, already written — are in the cache at
// `slots[0 .. C-1]`. Each query attends causally to positions 0..its own (the last `window` of
// them with a window > 0), scores scaled, optionally soft-capped (c * tanh(s / c)), softmax in
// float32, values summed in float32, one rounding to bf16 at the end.
//
// Why: torch's CPU SDPA for a 128-token bf16 prompt with grouped KV heads took ~430 us per layer
// on a 2-core Zen 4 (16% of a prefill step; the matmuls are at the machine's bf16 peak), i.e.
// ~80 GFLOP/s. Here the work is shaped like a matmul instead: a block of 16 keys is transposed
// once into `vdpbf16ps` pair layout and shared by every query row of the unit (G query heads x
// 16 query tokens), so one row's 16 scores cost D/2 `vdpbf16ps` and no horizontal sums; the
// softmax runs online (flash-attention style: a running maximum and denominator per row, the
// accumulator rescaled when the maximum grows), so nothing of size Q x C is materialised.
// AVX512-BF16: without a window the context's keys are laid out so once per call for all units (up to kSharedBytes)
// (each unit laid out every block it sees again: with causal masks ~C/32 times each); a query
// token's G rows keep their accumulators in registers across up to KC key blocks; the scores of
// two blocks are computed at once (each broadcast of q serves both, 4G independent chains); the
// accumulator is rescaled only when a row's maximum grows (else the factor is exactly 1). Same
// operations in the same order: the same bits as one block at a time (140 shapes, windows and
// soft-caps checked). Measured (default model's heads, 2 threads, 2-core AMD EPYC Zen 5): one
// layer's prefill attention, 128 tokens 92 -> 72 us, 512 1.28 -> 0.90 ms, 2048 20.9 -> 13.4 ms;
// a whole prefill step of one 2048-token prompt 1126-1132 -> 916-940 ms.
// Without AVX512-BF16 (AVX2 + FMA, or NEON on 64-bit Arm, in vec_wide.h's 8-float vector) the
// same units and online softmax run as a float32 matmul: each key block (16 keys) widened and
// transposed once, tiles of kRows = 6 rows (5 on NEON) x 16 keys for the scores and x 16 columns
// for the values, per step 2 loads and kRows broadcasts for 2 * kRows FMAs. Measured on the default model,
// bf16, 2 threads, a whole prefill step (2-core AMD EPYC, Zen 2, AVX2; 3 alternated runs of
// best-of-3) against torch's SDPA: 2 prompts x 128 tokens 363-373 -> 343-346 ms, one prompt of
// 1024 tokens 1773-1825 -> 1595-1643 ms. Here too, without a window, the blocks are laid out once per
// call for all units (kSharedBytes): a Zen 5 built for Haswell, one layer's attention, 128 tokens
// 140 -> 122 us, 512 1.91 -> 1.66 ms, 2048 29.8 -> 25.1 ms, same bits (not measured on an AVX2-only
// CPU). On Arm it runs under emulation (scripts/emulated_arm.sh:
// results tested, speed not measured).
//
// Layouts: q [Q, H, D] (heads contiguous, any token stride); kv [2, KVH, num_slots, D]
// (contiguous); slots [C] int64 (C >= Q); query heads h*G .. h*G+G-1 share KV head h.
// prefill_attention_isa() -> "avx512bf16", "avx2" or "neon": what this build's kernel is written
// in; "" where it has none (the Python side keeps torch's SDPA there). Built and loaded at run
// time by native.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__)
#include "vec_avx512.h"
#else
#include "vec_wide.h"  // AVX2 + FMA or NEON: ATOMR_WIDE
#endif

namespace {

#if defined(__AVX512BF16__) || defined(ATOMR_WIDE)

constexpr int64_t QB = 16;  // query tokens per unit
constexpr int64_t KB = 16;  // keys per block (one AVX-512 score vector, or two f8)

struct Problem {
  const c10::BFloat16* q;
  int64_t q_stride;  // elements between query tokens
  const c10::BFloat16* k;  // KV head 0's key rows (row of slot s at k + s * D)
  const c10::BFloat16* v;
  int64_t head_stride;  // elements between KV heads in the cache
  const int64_t* slots;
  int64_t C, Q, H, G;
  float scale, softcap;
  int64_t window;
  c10::BFloat16* out;  // [Q, H, D]
};

// What a unit (KV head h, query tokens q0 .. q1-1, G query heads each) reads and which keys its
// rows see; both builds' units start from it.
struct Span {
  int64_t rows, offset;  // G * (q1 - q0) rows; query i is at position offset + i
  int64_t first, last;   // the first and the last key any row sees
  const c10::BFloat16* kh;  // this KV head's key and value rows
  const c10::BFloat16* vh;
  Span(const Problem& pb, int64_t G, int64_t h, int64_t q0, int64_t q1)
      : rows((q1 - q0) * G),
        offset(pb.C - pb.Q),
        first(pb.window > 0 ? std::max<int64_t>(0, offset + q0 - pb.window + 1) : 0),
        last(offset + q1 - 1),
        kh(pb.k + h * pb.head_stride),
        vh(pb.v + h * pb.head_stride) {}
};

// The lanes lo .. hi of the key block at k0 (n keys) that the query at position pos sees (none
// where hi < lo).
inline void visible(const Problem& pb, int64_t pos, int64_t k0, int64_t n, int64_t& lo, int64_t& hi) {
  hi = std::min<int64_t>(n - 1, pos - k0);
  lo = pb.window > 0 ? std::max<int64_t>(0, pos - pb.window + 1 - k0) : 0;
}

// Each row's running state cleared: accumulator, maximum, denominator.
template <int D, typename Scratch>
void clear_rows(Scratch& s, int64_t rows) {
  std::fill(s.acc.begin(), s.acc.begin() + rows * D, 0.f);
  std::fill(s.mx.begin(), s.mx.begin() + rows, -std::numeric_limits<float>::infinity());
  std::fill(s.den.begin(), s.den.begin() + rows, 0.f);
}

// Without a window every unit's key blocks start at position 0, so each build lays the context's
// blocks out once per call for all units (shared_keys), up to this many bytes of layout (32 MiB:
// 16384 positions of 8 KV heads of 128 in the AVX512-BF16 layout, a quarter of that in the float32
// keys and values of the others).
constexpr int64_t kSharedBytes = int64_t{32} << 20;

// n elements of T, 64-byte aligned (the tiles' aligned loads), uninitialised.
template <typename T>
using Aligned = std::unique_ptr<T[], void (*)(void*)>;
template <typename T>
Aligned<T> aligned(int64_t n) {
  const int64_t bytes = (n * static_cast<int64_t>(sizeof(T)) + 63) / 64 * 64;
  Aligned<T> p(static_cast<T*>(std::aligned_alloc(64, bytes)), std::free);
  TORCH_CHECK(p != nullptr, "prefill_attention: out of memory for ", bytes, " bytes of scratch");
  return p;
}

// Every block of the context for every KV head laid out once, [kvh][blocks][per] elements of T
// (64-byte aligned), block (h, k0) of n keys written by lay(h, k0, n, out); null with a window or
// past kSharedBytes.
template <typename T, typename Lay>
Aligned<T> lay_out_context(const Problem& pb, int64_t kvh, int64_t per, Lay&& lay) {
  const int64_t blocks = (pb.C + KB - 1) / KB, bytes = kvh * blocks * per * static_cast<int64_t>(sizeof(T));
  if (pb.window > 0 || bytes > kSharedBytes) return Aligned<T>(nullptr, std::free);
  Aligned<T> out = aligned<T>(kvh * blocks * per);
  at::parallel_for(0, kvh * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t h = w / blocks, k0 = (w % blocks) * KB;
      lay(h, k0, std::min<int64_t>(KB, pb.C - k0), out.get() + w * per);
    }
  });
  return out;
}

#if defined(__AVX512BF16__)

constexpr int64_t KC = 32;  // key blocks laid out at once (512 keys: ~384 KiB of scratch at D = 128)

// One thread's scratch: up to KC key blocks in pair layout and their value blocks widened, and
// each row's accumulator, running maximum and denominator between chunks of KC blocks.
template <int D>
struct Scratch {
  Aligned<uint32_t> kp{nullptr, std::free};  // [KC][D/2][KB]: key j's elements 2p, 2p+1 (none with `shared`)
  Aligned<float> vf{nullptr, std::free};     // [KC][KB][D]
  std::vector<float> acc, mx, den;
  const uint32_t* shared = nullptr;  // every unit's keys laid out once (shared_keys), if so
  int64_t shared_blocks = 0;         // ... per KV head
  explicit Scratch(int64_t rows) : vf(aligned<float>(KC * KB * D)), acc(rows * D), mx(rows), den(rows) {}
  uint32_t* keys(int64_t b) {  // (allocated on first use: not at all where `shared` serves)
    if (kp == nullptr) kp = aligned<uint32_t>(KC * (D / 2) * KB);
    return kp.get() + b * (D / 2) * KB;
  }
  float* values(int64_t b) { return vf.get() + b * KB * D; }
};

// Keys k0 .. k0+n-1 of one KV head (rows at kh) into pair layout: out[p * KB + j] holds key j's
// elements 2p, 2p+1; lanes n .. KB-1 zero.
template <int D>
void lay_out_keys(const c10::BFloat16* kh, const int64_t* slots, int64_t k0, int64_t n, uint32_t* out) {
  for (int64_t j = 0; j < KB; ++j) {
    if (j < n) {
      const uint32_t* kr = reinterpret_cast<const uint32_t*>(kh + slots[k0 + j] * D);
      for (int p = 0; p < D / 2; ++p) out[p * KB + j] = kr[p];
    } else {
      for (int p = 0; p < D / 2; ++p) out[p * KB + j] = 0;
    }
  }
}

// The keys of the whole context laid out once, [kvh][blocks][D/2][KB] (see kSharedBytes), where a
// unit would lay out each block again for itself (a unit's later blocks hold keys it does not see:
// its masks leave them out); null past kSharedBytes.
using Keys = Aligned<uint32_t>;
template <int D>
Keys shared_keys(const Problem& pb, int64_t kvh) {
  return lay_out_context<uint32_t>(pb, kvh, (D / 2) * KB, [&](int64_t h, int64_t k0, int64_t n, uint32_t* out) {
    lay_out_keys<D>(pb.k + h * pb.head_stride, pb.slots, k0, n, out);
  });
}

// The unit (KV head h, query tokens q0 .. q1-1): G * (q1 - q0) rows. Its keys are laid out KC
// blocks at a time (each key block transposed once into pairs, its values widened once); then each
// query token runs over those blocks with its G rows' accumulators in registers, in the order of
// operations of one block at a time (so a chunk boundary changes no bit).
template <int G, int D>
void unit(const Problem& pb, int64_t h, int64_t q0, int64_t q1, Scratch<D>& s) {
  constexpr int NA = D / 16;
  const Span u(pb, G, h, q0, q1);
  const int64_t rows = u.rows, offset = u.offset;
  clear_rows<D>(s, rows);
  for (int64_t c0 = u.first; c0 <= u.last; c0 += KC * KB) {
    const int64_t blocks = std::min<int64_t>(KC, (u.last + 1 - c0 + KB - 1) / KB);
    // the chunk's key blocks in pair layout (laid out here, or once for all units); values widened
    const uint32_t* chunk_keys = s.shared != nullptr
                                     ? s.shared + (h * s.shared_blocks + c0 / KB) * (D / 2) * KB
                                     : s.keys(0);
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t k0 = c0 + b * KB, n = std::min<int64_t>(KB, u.last + 1 - k0);
      if (s.shared == nullptr) lay_out_keys<D>(u.kh, pb.slots, k0, n, s.keys(b));
      float* vf = s.values(b);
      for (int64_t j = 0; j < n; ++j) {
        const c10::BFloat16* vr = u.vh + pb.slots[k0 + j] * D;
        for (int c = 0; c < NA; ++c) _mm512_store_ps(vf + j * D + c * 16, atomr_vec::load_bf16(vr + c * 16));
      }
    }
    for (int64_t i = q0; i < q1; ++i) {
      const int64_t pos = offset + i, r0 = (i - q0) * G;
      const uint32_t* qr = reinterpret_cast<const uint32_t*>(pb.q + i * pb.q_stride + h * G * D);
      float* ar = s.acc.data() + r0 * D;
      __m512 acc[G][NA];
      float mx[G], den[G];
      for (int g = 0; g < G; ++g) {
        mx[g] = s.mx[r0 + g];
        den[g] = s.den[r0 + g];
        for (int c = 0; c < NA; ++c) acc[g][c] = _mm512_loadu_ps(ar + g * D + c * 16);
      }
      // the token's last visible key block of this chunk (causal: the blocks after it see nothing)
      const int64_t seen = std::min<int64_t>(blocks, (pos - c0) / KB + 1);
      for (int64_t b0 = 0; b0 < seen; b0 += 2) {
        // scores of two blocks at once: each broadcast pair of q serves both, and the 2 x G x 2
        // sums are independent chains (2 per row and block, over alternate pairs, as one block's)
        const int nb = b0 + 1 < seen ? 2 : 1;
        __m512 part[2][G][2];
        for (int bb = 0; bb < 2; ++bb)
          for (int g = 0; g < G; ++g) part[bb][g][0] = part[bb][g][1] = _mm512_setzero_ps();
        const uint32_t* kp0 = chunk_keys + b0 * (D / 2) * KB;
        const uint32_t* kp1 = chunk_keys + (b0 + nb - 1) * (D / 2) * KB;  // (one block: its scores twice)
        for (int p = 0; p < D / 2; p += 2) {
#pragma GCC unroll 2
          for (int a = 0; a < 2; ++a) {
            const __m512bh k0v = (__m512bh)_mm512_load_si512(kp0 + (p + a) * KB);
            const __m512bh k1v = (__m512bh)_mm512_load_si512(kp1 + (p + a) * KB);
#pragma GCC unroll 8
            for (int g = 0; g < G; ++g) {
              const __m512bh qv = (__m512bh)_mm512_set1_epi32(static_cast<int>(qr[g * (D / 2) + p + a]));
              part[0][g][a] = _mm512_dpbf16_ps(part[0][g][a], k0v, qv);
              part[1][g][a] = _mm512_dpbf16_ps(part[1][g][a], k1v, qv);
            }
          }
        }
        for (int bb = 0; bb < nb; ++bb) {
          const int64_t b = b0 + bb, k0 = c0 + b * KB, n = std::min<int64_t>(KB, u.last + 1 - k0);
          // visible keys of this block: lo .. hi (block lanes)
          int64_t lo, hi;
          visible(pb, pos, k0, n, lo, hi);
          if (hi < lo) continue;
          const __mmask16 mask = static_cast<__mmask16>(((1u << (hi + 1)) - 1) & ~((1u << lo) - 1));
          __m512 sc[G];
          for (int g = 0; g < G; ++g)
            sc[g] = _mm512_mul_ps(_mm512_add_ps(part[bb][g][0], part[bb][g][1]), _mm512_set1_ps(pb.scale));
          if (pb.softcap > 0.f) {
            for (int g = 0; g < G; ++g) {
              alignas(64) float t[KB];
              _mm512_store_ps(t, sc[g]);
              for (int64_t j = lo; j <= hi; ++j) t[j] = pb.softcap * std::tanh(t[j] / pb.softcap);
              sc[g] = _mm512_load_ps(t);
            }
          }
          alignas(64) float e[G][KB];  // the block's softmax numerators
          for (int g = 0; g < G; ++g) {
            const float m_new = std::max(mx[g], _mm512_mask_reduce_max_ps(mask, sc[g]));
            const __m512 eg =
                _mm512_maskz_mov_ps(mask, atomr_vec::exp_ps(_mm512_sub_ps(sc[g], _mm512_set1_ps(m_new))));
            if (m_new != mx[g]) {  // the maximum grew: rescale (else the factor is exactly 1)
              const float c = std::exp(mx[g] - m_new);  // 0 for the first block (mx = -inf)
              den[g] *= c;
              const __m512 corr = _mm512_set1_ps(c);
              for (int cc = 0; cc < NA; ++cc) acc[g][cc] = _mm512_mul_ps(acc[g][cc], corr);
            }
            mx[g] = m_new;
            den[g] += _mm512_reduce_add_ps(eg);
            _mm512_store_ps(e[g], eg);
          }
          const float* vf = s.values(b);
          for (int64_t j = lo; j <= hi; ++j) {
            __m512 vj[NA];
            for (int c = 0; c < NA; ++c) {
              vj[c] = _mm512_load_ps(vf + j * D + c * 16);
              __asm__("" : "+v"(vj[c]));  // one load per vector, in a register for every row's FMA
            }
            for (int g = 0; g < G; ++g) {
              const __m512 pj = _mm512_set1_ps(e[g][j]);
              for (int c = 0; c < NA; ++c) acc[g][c] = _mm512_fmadd_ps(pj, vj[c], acc[g][c]);
            }
          }
        }
      }
      for (int g = 0; g < G; ++g) {
        s.mx[r0 + g] = mx[g];
        s.den[r0 + g] = den[g];
        for (int c = 0; c < NA; ++c) _mm512_storeu_ps(ar + g * D + c * 16, acc[g][c]);
      }
    }
  }
  for (int64_t i = q0; i < q1; ++i)
    for (int g = 0; g < G; ++g) {
      const int64_t r = (i - q0) * G + g;
      const __m512 inv = _mm512_set1_ps(s.den[r] > 0.f ? 1.f / s.den[r] : 0.f);
      c10::BFloat16* o = pb.out + (i * pb.H + h * G + g) * D;
      for (int c = 0; c < NA; ++c)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + c * 16),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(s.acc.data() + r * D + c * 16), inv)));
    }
}

#else  // ATOMR_WIDE

namespace wide = atomr_wide;
using wide::f8;

// One thread's scratch: the unit's query rows widened to float32, the key block widened and
// transposed (kt[d] holds element d of the block's 16 keys), the value block widened, each
// row's block of scores (then softmax numerators), accumulator, running maximum, denominator
// and the factor its accumulator takes when the maximum grows.
template <int D>
struct Scratch {
  alignas(32) float kt[D][KB];
  alignas(32) float vf[KB][D];
  std::vector<float> qf, p, acc, mx, den, corr;
  const float* shared = nullptr;  // every unit's blocks laid out once (shared_keys), if so
  int64_t shared_blocks = 0;      // ... per KV head
  explicit Scratch(int64_t rows)
      : qf(rows * D), p(rows * KB), acc(rows * D), mx(rows), den(rows), corr(rows) {}
};

// Keys k0 .. k0+n-1 of one KV head widened and transposed into kt [D][KB] (kt[d * KB + j]: element d
// of key j), their values widened into vf [KB][D]; lanes and rows n .. KB-1 zero.
template <int D>
void lay_out_block(const c10::BFloat16* kh, const c10::BFloat16* vh, const int64_t* slots, int64_t k0, int64_t n,
                   float* kt, float* vf) {
  constexpr int NV = D / 8;
  for (int64_t j = 0; j < KB; ++j) {
    if (j < n) {
      const uint16_t* kr = reinterpret_cast<const uint16_t*>(kh + slots[k0 + j] * D);
      for (int d = 0; d < D; ++d) {
        const uint32_t bits = static_cast<uint32_t>(kr[d]) << 16;
        std::memcpy(&kt[d * KB + j], &bits, sizeof(float));
      }
      const c10::BFloat16* vr = vh + slots[k0 + j] * D;
      for (int c = 0; c < NV; ++c) wide::store(vf + j * D + c * 8, wide::load_bf16(vr + c * 8));
    } else {
      for (int d = 0; d < D; ++d) kt[d * KB + j] = 0.f;
      for (int c = 0; c < NV; ++c) wide::store(vf + j * D + c * 8, wide::zero());
    }
  }
}

// The AVX512-BF16 build's shared_keys for this build's blocks (keys and values in float32,
// [kvh][blocks][kt | vf]); a unit's later blocks hold keys and values it does not see: its
// numerators there are 0. Null past kSharedBytes.
using Keys = Aligned<float>;
template <int D>
Keys shared_keys(const Problem& pb, int64_t kvh) {
  return lay_out_context<float>(pb, kvh, 2 * KB * D, [&](int64_t h, int64_t k0, int64_t n, float* out) {
    lay_out_block<D>(pb.k + h * pb.head_stride, pb.v + h * pb.head_stride, pb.slots, k0, n, out, out + KB * D);
  });
}

// out[m * ldo + 0..15] = sum_k x[m * ldx + k] * b[k * ldb + 0..15] for MT rows: the scores
// (x: query rows, b: kt, K = D); with kAcc, out rows = scale[m] * out rows + numerators x values
// (x: numerator rows of KB, b: the block's value columns, K = KB).
template <int MT, bool kAcc>
void tile16(const float* x, int64_t ldx, const float* b, int64_t ldb, int64_t K, float* out, int64_t ldo,
            const float* scale) {
  f8 acc[MT][2];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) {
    if (kAcc) {
      const f8 c = wide::set1(scale[m]);
      acc[m][0] = wide::mul(wide::load(out + m * ldo), c);
      acc[m][1] = wide::mul(wide::load(out + m * ldo + 8), c);
    } else {
      acc[m][0] = acc[m][1] = wide::zero();
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const f8 b0 = wide::load(b + k * ldb), b1 = wide::load(b + k * ldb + 8);
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      const f8 xv = wide::broadcast(x + m * ldx + k);
      acc[m][0] = wide::fmadd(xv, b0, acc[m][0]);
      acc[m][1] = wide::fmadd(xv, b1, acc[m][1]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) {
    wide::store(out + m * ldo, acc[m][0]);
    wide::store(out + m * ldo + 8, acc[m][1]);
  }
}

// The unit (KV head h, query tokens q0 .. q1-1): G * (q1 - q0) rows, row (i - q0) * G + g for
// query head g of token i. As the AVX512-BF16 unit, block by block of 16 keys with an online
// softmax, but both products as tiles of a float32 matmul: the key block is widened and
// transposed once, so a tile of kRows rows x 16 keys takes per element of the head 2 loads and
// kRows broadcasts for 2 * kRows FMAs; the values likewise per key, 16 columns at a time.
template <int G, int D>
void unit(const Problem& pb, int64_t h, int64_t q0, int64_t q1, Scratch<D>& s) {
  constexpr int NV = D / 8;
  const Span u(pb, G, h, q0, q1);
  const int64_t rows = u.rows, offset = u.offset;
  for (int64_t i = q0; i < q1; ++i)  // the unit's query rows, widened and scaled
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < NV; ++c)
        wide::store(s.qf.data() + ((i - q0) * G + g) * D + c * 8,
                    wide::mul(wide::load_bf16(pb.q + i * pb.q_stride + (h * G + g) * D + c * 8),
                              wide::set1(pb.scale)));
  clear_rows<D>(s, rows);
  for (int64_t k0 = u.first; k0 <= u.last; k0 += KB) {
    const int64_t n = std::min<int64_t>(KB, u.last + 1 - k0);
    // the key block widened and transposed, its values widened: laid out here, or once for all units
    const float* kt = &s.kt[0][0];
    const float* vf = &s.vf[0][0];
    if (s.shared != nullptr) {
      kt = s.shared + (h * s.shared_blocks + k0 / KB) * 2 * KB * D;
      vf = kt + KB * D;
    } else {
      lay_out_block<D>(u.kh, u.vh, pb.slots, k0, n, &s.kt[0][0], &s.vf[0][0]);
    }
    // the rows that see a key of this block: tokens ilo .. q1-1 (causal: position >= k0)
    const int64_t ilo = std::max(q0, k0 - offset);
    const int64_t r_lo = (ilo - q0) * G;
    for (int64_t r = r_lo; r < rows; r += wide::kRows)
      wide::with_rows(static_cast<int>(std::min<int64_t>(wide::kRows, rows - r)), [&](auto mt) {
        tile16<mt(), false>(s.qf.data() + r * D, D, kt, KB, D, s.p.data() + r * KB, KB, nullptr);
      });
    for (int64_t r = r_lo; r < rows; ++r) {  // online softmax over the keys row r sees
      const int64_t pos = offset + q0 + r / G;
      int64_t lo, hi;
      visible(pb, pos, k0, n, lo, hi);
      float* pr = s.p.data() + r * KB;
      if (hi < lo) {  // nothing of this block seen (unreachable as the units are cut: kept as a guard)
        std::fill(pr, pr + KB, 0.f);
        s.corr[r] = 1.f;
        continue;
      }
      if (pb.softcap > 0.f)
        for (int64_t j = lo; j <= hi; ++j) pr[j] = pb.softcap * std::tanh(pr[j] / pb.softcap);
      const bool all = lo == 0 && hi == KB - 1;  // (every row but those near the diagonal or a window's edge)
      alignas(32) float lanes[8];
      float top = -std::numeric_limits<float>::infinity();
      if (all) {
        wide::store(lanes, wide::max(wide::load(pr), wide::load(pr + 8)));
        for (float v : lanes) top = std::max(top, v);
      } else {
        for (int64_t j = lo; j <= hi; ++j) top = std::max(top, pr[j]);
      }
      const float m_old = s.mx[r], m_new = std::max(m_old, top);
      const float c = std::exp(m_old - m_new);  // 0 for the first block (m_old = -inf)
      const f8 m = wide::set1(m_new);
      const f8 e0 = wide::exp(wide::sub(wide::load(pr), m)), e1 = wide::exp(wide::sub(wide::load(pr + 8), m));
      wide::store(pr, e0);
      wide::store(pr + 8, e1);
      float add = 0.f;
      if (all) {
        wide::store(lanes, wide::add(e0, e1));
        for (float v : lanes) add += v;
      } else {
        for (int64_t j = 0; j < KB; ++j) {
          if (j < lo || j > hi) pr[j] = 0.f;  // keys this row does not see weigh nothing
          add += pr[j];
        }
      }
      s.mx[r] = m_new;
      s.den[r] = s.den[r] * c + add;
      s.corr[r] = c;
    }
    for (int64_t r = r_lo; r < rows; r += wide::kRows)  // acc = corr * acc + numerators x values
      wide::with_rows(static_cast<int>(std::min<int64_t>(wide::kRows, rows - r)), [&](auto mt) {
        for (int c = 0; c < D; c += 16)
          tile16<mt(), true>(s.p.data() + r * KB, KB, vf + c, D, KB, s.acc.data() + r * D + c, D,
                             s.corr.data() + r);
      });
  }
  for (int64_t i = q0; i < q1; ++i)
    for (int g = 0; g < G; ++g) {
      const int64_t r = (i - q0) * G + g;
      const f8 inv = wide::set1(s.den[r] > 0.f ? 1.f / s.den[r] : 0.f);
      c10::BFloat16* o = pb.out + (i * pb.H + h * G + g) * D;
      for (int c = 0; c < NV; ++c)
        wide::store_bf16(o + c * 8, wide::mul(wide::load(s.acc.data() + r * D + c * 8), inv), 8);
    }
}

#endif

template <int G, int D>
void run(const Problem& pb, int64_t kvh) {
  const int64_t nqb = (pb.Q + QB - 1) / QB, units = kvh * nqb;
  // Later query blocks see more keys: units are taken first, last, second, second to last ...
  // so that the contiguous ranges parallel_for hands each thread carry similar work.
  const Keys keys = shared_keys<D>(pb, kvh);
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    Scratch<D> s(QB * pb.G);
    if (keys != nullptr) {
      s.shared = keys.get();
      s.shared_blocks = (pb.C + KB - 1) / KB;
    }
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / kvh, h = u % kvh;
      const int64_t qb = b % 2 == 0 ? b / 2 : nqb - 1 - b / 2;
      unit<G, D>(pb, h, qb * QB, std::min(pb.Q, (qb + 1) * QB), s);
    }
  });
}

#if defined(__AVX512BF16__)
std::string prefill_attention_isa() { return "avx512bf16"; }
#else
std::string prefill_attention_isa() { return wide::kIsa; }
#endif

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& slots, double scale,
                             std::optional<int64_t> window, std::optional<double> softcap) {
  TORCH_CHECK(q.dim() == 3, "q must be [tokens, heads, head_dim], got ", q.sizes());
  TORCH_CHECK(kv.dim() == 4 && kv.size(0) == 2 && kv.size(3) == q.size(2),
              "kv must be [2, kv_heads, slots, head_dim] matching q, got ", kv.sizes());
  TORCH_CHECK(kv.size(1) > 0 && q.size(1) % kv.size(1) == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && kv.scalar_type() == at::kBFloat16, "bfloat16 only");
  TORCH_CHECK(q.device().is_cpu() && kv.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(kv.is_contiguous(), "kv must be contiguous");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1, "slots must be one int64 row");
  TORCH_CHECK(slots.size(0) >= q.size(0), "slots must cover the context (", slots.size(0), " < ", q.size(0), ")");
  const int64_t D = q.size(2);
  TORCH_CHECK(D == 64 || D == 128, "head size 64 or 128 only, got ", D);
  TORCH_CHECK(q.size(1) / kv.size(1) <= 8, "at most 8 query heads per kv head, got ", q.size(1) / kv.size(1));
  at::Tensor qc = (q.stride(2) == 1 && q.stride(1) == D) ? q : q.contiguous();
  at::Tensor sc = slots.contiguous();
  const int64_t C = sc.size(0), S = kv.size(2), kvh = kv.size(1);
  const int64_t* sp = sc.data_ptr<int64_t>();
  bool in_range = true;
  for (int64_t l = 0; l < C; ++l) in_range &= sp[l] >= 0 && sp[l] < S;
  TORCH_CHECK(in_range, "prefill_attention: a slot lies outside the cache");
  at::Tensor out = at::empty({q.size(0), q.size(1), D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (q.size(0) == 0) return out;
  const c10::BFloat16* kp = kv.data_ptr<c10::BFloat16>();
  Problem pb{qc.data_ptr<c10::BFloat16>(), qc.stride(0), kp, kp + kvh * S * D, S * D, sp, C, q.size(0), q.size(1),
             q.size(1) / kvh, static_cast<float>(scale),
             softcap.has_value() ? static_cast<float>(*softcap) : 0.f,
             window.has_value() ? *window : 0, out.data_ptr<c10::BFloat16>()};
  switch (pb.G * 1000 + D) {
#define ATOMR_PREFILL_CASE(g) \
    case g * 1000 + 64: run<g, 64>(pb, kvh); break; \
    case g * 1000 + 128: run<g, 128>(pb, kvh); break;
    ATOMR_PREFILL_CASE(1) ATOMR_PREFILL_CASE(2) ATOMR_PREFILL_CASE(3) ATOMR_PREFILL_CASE(4)
    ATOMR_PREFILL_CASE(5) ATOMR_PREFILL_CASE(6) ATOMR_PREFILL_CASE(7) ATOMR_PREFILL_CASE(8)
#undef ATOMR_PREFILL_CASE
  }
  return out;
}

#else  // neither AVX512-BF16 nor AVX2 + FMA nor NEON: the Python side keeps torch's SDPA for prefills

std::string prefill_attention_isa() { return ""; }

at::Tensor prefill_attention(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, std::optional<int64_t>,
                             std::optional<double>) {
  TORCH_CHECK(false, "prefill_attention needs AVX512-BF16, AVX2 + FMA or 64-bit Arm NEON");
  return {};
}

#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(atomr_trio, m) {
  m.def("prefill_attention(Tensor q, Tensor kv, Tensor slots, float scale, int? window=None, float? softcap=None) "
        "-> Tensor");
  m.def("prefill_attention_isa() -> str", &prefill_attention_isa);
}

TORCH_LIBRARY_IMPL(atomr_trio, CPU, m) { m.impl("prefill_attention", &prefill_attention); }
