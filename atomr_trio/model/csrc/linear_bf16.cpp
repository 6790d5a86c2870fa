// bfloat16 matmul by a weight packed for the AVX512-BF16 dot instruction (CPU); built for
// AVX2 + FMA, or NEON on 64-bit Arm, where the -march lacks AVX512-BF16 (the second half of this file).
//
// y[m, n] = sum_k x[m, k] * W[n, k], float32 accumulation, one rounding to bfloat16 at the end.
// The weight is packed once (linear.py) into panels of PW blocks of 16 output columns, as
// wp [panels, K/2, PW * 16, 2]: for each pair of inputs k = 2p, 2p+1, a panel's columns hold
// their two weights side by side — the operand `vdpbf16ps` multiplies against a broadcast pair
// of x — and the whole panel is one contiguous stream. A tile of up to 8 rows x PW blocks keeps
// its float32 accumulators in registers (24 for PW = 3), every weight vector loaded serves every
// row of the tile, and the rows of further tiles find the panel in L2. Threads split the panels.
// Measured against oneDNN's packed bf16 matmul on the default model's shapes, streaming all
// layers' weights (2-core Zen 4): 1 row 1.6x, 16 rows 1.4x, 64 rows 1.15x faster; 1 row vs
// ATen's GEMV 1.25x.
//
// linear_bf16(x [M, K], wp, n, bias?) -> y [M, n]; wp in panels of 3 blocks (PW = 3)
// linear_silu_mul_bf16(x [M, K], wp, n) -> silu(x W_gate^T) * (x W_up^T) as [M, n], where wp
//   has panels of 2 blocks: gate columns 16b..16b+15, then the same up columns (PW = 2).
// linear_argmax_bf16(x [M, K], wp, n, bias?) -> int64 [M]: each row's column of its largest output of
//   linear_bf16 (AVX512-BF16 build only), the outputs never stored
// has_bf16_matmul() -> whether this build has a matmul (else the ops raise and linear.py keeps
//   oneDNN / ATen); bf16_matmul_isa() -> "avx512bf16", "avx2", "neon" or "" (none): which one.
// In C++ only (ops.h): linear_bf16_filled / linear_silu_mul_bf16_filled, the same matmuls over
//   panels that a callback writes into a thread's buffer when needed (quant_matmul.cpp's GGUF
//   blocks at many rows) instead of a packed weight.
// Invariant of both builds: float32 sums of the exact bf16 products, one rounding (to nearest
// even) of each output to bf16, padding columns never stored.
// Built and loaded at run time by native.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops.h"
#include "prefetch.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__)
#include "vec_avx512.h"
#else
#include "vec_wide.h"  // AVX2 + FMA or NEON: ATOMR_WIDE
#endif

namespace {

constexpr int64_t kCols = 16;  // output columns per packed block: one vector of float32
constexpr int kMaxRows = 8;    // rows per tile
constexpr int kPanel = 3;     // blocks per panel of a plain matmul's packed weight
static_assert(kPanel * kCols == atomr_ops::kLinearPanelCols && 2 * kCols == atomr_ops::kSiluPanelCols,
              "the panels that PanelFill writes (ops.h) are these");

// wp [panels, K/2, blocks * 16, 2]; x [M, K].
void check(const at::Tensor& x, const at::Tensor& wp, int64_t blocks) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(),
              "x must be a 2-D bfloat16 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(wp.dim() == 4 && wp.size(2) == blocks * kCols && wp.size(3) == 2 &&
                  wp.scalar_type() == at::kBFloat16 && wp.is_contiguous(),
              "wp must be a bfloat16 weight packed as [panels, K/2, ", blocks * kCols, ", 2], got ", wp.sizes());
  TORCH_CHECK(x.size(1) == 2 * wp.size(1), "x has ", x.size(1), " inputs, the weight ", 2 * wp.size(1));
}

// Where a matmul's panels come from: a weight packed once (linear.py), or `fill`, which writes each
// panel in the same layout into a buffer of the thread that needs it (the GGUF blocks of
// quant_matmul.cpp, dequantized panel by panel for steps of many rows).
struct Panels {
  const int32_t* packed = nullptr;               // [count][pairs][PW * 16] int32, or nullptr
  const atomr_ops::PanelFill* fill = nullptr;    // else this
  int64_t count = 0, pairs = 0;
  // The packed bf16 weight of the matmul that runs next, if known (a decode step's layers): its
  // panels, their count and size in bytes.
  const char* next = nullptr;
  int64_t next_count = 0, next_bytes = 0;

  static Panels of(const at::Tensor& wp, const at::Tensor* next = nullptr) {
    Panels p{reinterpret_cast<const int32_t*>(wp.data_ptr<at::BFloat16>()), nullptr, wp.size(0), wp.size(1)};
    if (next != nullptr) {
      TORCH_CHECK(next->dim() == 4 && next->size(0) > 0 && next->scalar_type() == at::kBFloat16 &&
                      next->is_contiguous(),
                  "the next matmul's weight must be packed bf16 panels, got ", next->sizes());
      p.next = reinterpret_cast<const char*>(next->data_ptr<at::BFloat16>());
      p.next_count = next->size(0);
      p.next_bytes = next->numel() / next->size(0) * 2;
    }
    return p;
  }
  // panel i: in the packed weight, or filled into own (a thread's buffer of one panel)
  const int32_t* at(int64_t i, int64_t panel_size, std::vector<int32_t>& own) const {
    if (packed != nullptr) return packed + i * panel_size;
    own.resize(static_cast<size_t>(panel_size));
    (*fill)(i, own.data());
    return own.data();
  }
};


#if defined(__AVX512BF16__)

using atomr_vec::exp_ps;
using atomr_vec::first_lanes;
using atomr_prefetch::Ask;

// Each row's best output column so far (linear_argmax_bf16): the largest value, the first column of
// equal ones, a NaN above every number and the first NaN kept — NumPy's argmax, which the
// sampler's greedy rows take of the rounded logits. One per row and thread: threads see their
// columns in ascending order, so `offer` keeps the first of equal values, and `ranks_before`
// combines the threads' in any order.
struct Best {
  float v = 0.f;
  int64_t i = -1;  // no column yet

  void offer(float f, int64_t col) {
    if (i < 0 || (std::isnan(f) ? !std::isnan(v) : f > v)) *this = {f, col};
  }
  bool ranks_before(const Best& o) const {
    if (o.i < 0 || i < 0) return i >= 0;
    const bool nan = std::isnan(v), onan = std::isnan(o.v);
    if (nan || onan) return nan && (!onan || i < o.i);
    return v > o.v || (v == o.v && i < o.i);
  }
};

// Calls run(mine), whose matmul epilogue offers each finished value to mine(m0)[m], the running
// thread's Best of row m0 + m; then returns each row's winning column over the threads: int64 [M].
template <typename Run>
at::Tensor argmax_rows(const at::Tensor& x, Run&& run) {
  const int64_t M = x.size(0), threads = at::get_num_threads();
  std::vector<Best> best(static_cast<size_t>(threads * M));
  run([&](int64_t m0) {
    const int64_t t = at::get_thread_num();
    TORCH_CHECK(t < threads, "linear_argmax_bf16: thread ", t, " of ", threads);
    return best.data() + t * M + m0;
  });
  at::Tensor out = at::empty({M}, x.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) {
    Best b;
    for (int64_t t = 0; t < threads; ++t)
      if (best[t * M + m].ranks_before(b)) b = best[t * M + m];
    TORCH_CHECK(b.i >= 0, "linear_argmax_bf16: no thread saw row ", m);
    op[m] = b.i;
  }
  return out;
}

// acc[m][j] = x[m, :] . W[block j] for an MT x PW tile of a panel of PW blocks, stored to
// c [MT][PW * 16]. For pair p, block j's 16 x 2 weights lie at w + (p * PW + j) * 16.
// ask: the lines to request ahead over this tile's pairs (prefetch.h).
template <int PW, int MT>
void tile(const int32_t* x, int64_t ldx, const int32_t* w, int64_t pairs, float* c, Ask ask) {
  __m512 acc[MT][PW];
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < PW; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh wv[PW];
    for (int j = 0; j < PW; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(w + (p * PW + j) * kCols);
    ask.on(pairs);
    for (int m = 0; m < MT; ++m) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(x[m * ldx + p]);
      for (int j = 0; j < PW; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], wv[j], xv);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < PW; ++j) _mm512_storeu_ps(c + (m * PW + j) * kCols, acc[m][j]);
}

template <int PW>
void tile_rows(int mt, const int32_t* x, int64_t ldx, const int32_t* w, int64_t pairs, float* c, Ask ask = {}) {
  switch (mt) {
    case 1: tile<PW, 1>(x, ldx, w, pairs, c, ask); break;
    case 2: tile<PW, 2>(x, ldx, w, pairs, c, ask); break;
    case 3: tile<PW, 3>(x, ldx, w, pairs, c, ask); break;
    case 4: tile<PW, 4>(x, ldx, w, pairs, c, ask); break;
    case 5: tile<PW, 5>(x, ldx, w, pairs, c, ask); break;
    case 6: tile<PW, 6>(x, ldx, w, pairs, c, ask); break;
    case 7: tile<PW, 7>(x, ldx, w, pairs, c, ask); break;
    default: tile<PW, 8>(x, ldx, w, pairs, c, ask);
  }
}

// Runs the tiles of y = x W^T panel by panel and hands each finished tile to
// `epilogue(row0, rows, panel, c)` with c [rows][PW * 16]. Threads take contiguous runs of
// panels, so each streams one contiguous stretch of the packed weight. With more than one tile
// of rows, every tile of a panel asks for its share of the thread's next panel (into L2), spread
// over its pairs, so the next panel arrives while this one computes instead of stalling its first
// tile; a thread's last panel asks so for its first panel of the matmul that runs next, when the
// caller names it (Panels::next: decode_layers.cpp). Measured on a 2-core AMD EPYC (Zen 5), the
// default model's matrices of all 30 layers in a decode step's order and its lm_head, streamed,
// 2 threads, 3 alternated runs, against the last tile alone asking for the whole next panel (as
// before): 64 rows 23.7-23.9 -> 20.4-21.3 ms, 16 rows 10.0-10.2 -> 7.9-8.3, 256 rows 74.6-75.6 ->
// 71.6-73.6; a 64-sequence decode step 34.1-35.0 -> 31.3-32.4 ms, 30.7-31.7 with the next matmul's
// panels asked for too; served (greedy, 128 in / 128 out, 2 alternated rounds) 64 concurrent
// 1038-1048 -> 1128-1139 tok/s, 16 concurrent 809-828 -> 942-973. With one tile the hardware
// prefetcher keeps up by itself (asking ahead there measured level at 1 and 4 rows).
template <int PW, typename Epilogue>
void matmul(const at::Tensor& x, const Panels& src, Epilogue&& epilogue) {
  const int64_t M = x.size(0), panels = src.count, pairs = src.pairs;
  if (M == 0) return;  // no rows: no panel to read or fill
  const int32_t* xp = reinterpret_cast<const int32_t*>(x.data_ptr<at::BFloat16>());
  const int64_t panel_size = pairs * PW * kCols;  // int32 units
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float c[kMaxRows * PW * kCols];
    std::vector<int32_t> own;
    const int64_t tiles = (M + kMaxRows - 1) / kMaxRows;
    // this thread's first panel of the next matmul (at::parallel_for's split: runs of ceil(n / threads),
    // threads as at::get_num_threads() says; a team that OpenMP shrank would only ask for the wrong panel)
    const int64_t threads = at::get_num_threads(), tid = at::get_thread_num();
    const int64_t next_first = tid * ((src.next_count + threads - 1) / threads);
    const char* after = src.next != nullptr && next_first < src.next_count ? src.next + next_first * src.next_bytes
                                                                            : nullptr;
    for (int64_t panel = begin; panel < end; ++panel) {
      const int32_t* w = src.at(panel, panel_size, own);
      // what the tiles ask for: the panel this thread reads next, its own next one or the next
      // matmul's first (a packed weight only: a filled panel's successor does not exist yet)
      const char* ahead = nullptr;
      int64_t bytes = 0;
      if (tiles > 1 && src.packed != nullptr) {
        const bool own = panel + 1 < end;
        ahead = own ? reinterpret_cast<const char*>(w + panel_size) : after;
        bytes = own ? panel_size * 4 : src.next_bytes;
      }
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t m0 = t * kMaxRows;
        const int mt = static_cast<int>(std::min<int64_t>(kMaxRows, M - m0));
        tile_rows<PW>(mt, xp + m0 * pairs, pairs, w, pairs, c, atomr_prefetch::share(ahead, bytes, t, tiles));
        epilogue(m0, mt, panel, c);
      }
    }
  });
}

at::Tensor linear_impl(const at::Tensor& x, const Panels& src, int64_t n, const float* bp) {
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  matmul<kPanel>(x, src, [&](int64_t m0, int mt, int64_t panel, const float* c) {
    for (int j = 0; j < kPanel; ++j) {
      const int64_t col = (panel * kPanel + j) * kCols, valid = std::min(kCols, n - col);
      if (valid <= 0) break;  // padding columns of the last panel
      const __m512 b = bp != nullptr ? _mm512_maskz_loadu_ps(first_lanes(valid), bp + col) : _mm512_setzero_ps();
      for (int m = 0; m < mt; ++m) {
        const __m512 v = _mm512_add_ps(_mm512_loadu_ps(c + (m * kPanel + j) * kCols), b);
        _mm256_mask_storeu_epi16(yp + (m0 + m) * n + col, first_lanes(valid), (__m256i)_mm512_cvtneps_pbh(v));
      }
    }
  });
  return y;
}

at::Tensor silu_mul_impl(const at::Tensor& x, const Panels& src, int64_t n) {
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const __m512 one = _mm512_set1_ps(1.f);
  matmul<2>(x, src, [&](int64_t m0, int mt, int64_t panel, const float* c) {
    const int64_t col = panel * kCols, valid = std::min(kCols, n - col);
    for (int m = 0; m < mt; ++m) {
      const __m512 g = _mm512_loadu_ps(c + (2 * m) * kCols);
      const __m512 u = _mm512_loadu_ps(c + (2 * m + 1) * kCols);
      const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
      _mm256_mask_storeu_epi16(yp + (m0 + m) * n + col, first_lanes(valid),
                               (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(silu, u)));
    }
  });
  return y;
}

// linear_impl's products, rounded to bf16 as it stores them, reduced to each row's argmax
// (Best) in place of being stored: 16 columns compared at once, a scalar pass only where a block
// holds a NaN.
at::Tensor argmax_impl(const at::Tensor& x, const Panels& src, int64_t n, const float* bp) {
  return argmax_rows(x, [&](auto mine) {
    matmul<kPanel>(x, src, [&](int64_t m0, int mt, int64_t panel, const float* c) {
      Best* best = mine(m0);
      __m512 b[kPanel];
      __mmask16 valid[kPanel];
      int64_t col[kPanel];
      for (int j = 0; j < kPanel; ++j) {
        col[j] = (panel * kPanel + j) * kCols;
        valid[j] = first_lanes(std::max<int64_t>(0, n - col[j]));
        b[j] = bp != nullptr ? _mm512_maskz_loadu_ps(valid[j], bp + col[j]) : _mm512_setzero_ps();
      }
      const __m512 none = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int m = 0; m < mt; ++m) {
        __m512 v[kPanel];
        bool nan = false;
        for (int j = 0; j < kPanel; ++j) {
          const __m256bh r = _mm512_cvtneps_pbh(_mm512_add_ps(_mm512_loadu_ps(c + (m * kPanel + j) * kCols), b[j]));
          const __m512 f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)r), 16));
          v[j] = _mm512_mask_mov_ps(none, valid[j], f);  // padding columns never win
          nan |= _mm512_mask_cmp_ps_mask(valid[j], f, f, _CMP_UNORD_Q) != 0;
        }
        Best& row = best[m];
        if (nan) {
          alignas(64) float lanes[kCols];
          for (int j = 0; j < kPanel; ++j) {
            _mm512_store_ps(lanes, v[j]);
            for (int l = 0; l < kCols && col[j] + l < n; ++l) row.offer(lanes[l], col[j] + l);
          }
          continue;
        }
        __m512 top = v[0];
        for (int j = 1; j < kPanel; ++j) top = _mm512_max_ps(top, v[j]);
        const float t = _mm512_reduce_max_ps(top);
        if (row.i >= 0 && !(t > row.v)) continue;  // (a NaN kept stays)
        for (int j = 0; j < kPanel; ++j) {
          const __mmask16 at = _mm512_mask_cmp_ps_mask(valid[j], v[j], _mm512_set1_ps(t), _CMP_EQ_OQ);
          if (at != 0) {
            row = {t, col[j] + __builtin_ctz(at)};
            break;
          }
        }
      }
    });
  });
}

bool has_bf16_matmul() { return true; }
std::string bf16_matmul_isa() { return "avx512bf16"; }

#elif defined(ATOMR_WIDE)

// AVX2 + FMA, or NEON on 64-bit Arm (no bf16 dot instruction): the same packed panels, widened to
// float32 in registers, written once in vec_wide.h's 8-float vector (one AVX register, or two NEON ones).
// A 32-bit lane of a panel holds one column's pair (k even in the low 16 bits, k odd in the
// high 16), so widening costs one shift and one mask (atomr_wide::widen_pairs) and no shuffle.
// - One row (the batch-1 decode GEMV, bound by reading the weight): the pair's two float32
//   vectors take two FMAs against the broadcast x[2p], x[2p+1]; a whole panel (3 blocks x 2
//   halves = 6 accumulators) is one pass, so every weight byte is read once.
// - 2 to kRegsRows rows (the AVX2 build): tiles of kRowsWide rows x one block run straight over
//   the packed panel, each pair's even weights widened in registers for the even input, then its
//   odd ones for the odd input (tile_pairs: per pair 4 loads of weights — each half reloads its
//   2 vectors, which keeps 15 of the 16 registers busy instead of 17 — 2 shifts, 2 masks and
//   2 * kRowsWide broadcasts feed 4 * kRowsWide FMAs). Measured on the default model's four
//   matrices of all 30 layers and its lm_head, 2-core AMD EPYC (Zen 2, AVX2), 3-4 alternated
//   runs against the buffer below: 2 rows 23.5-24.5 -> 20.0-20.7 ms, 4 rows 25.1-26.2 ->
//   21.1-21.9, 16 rows 48.5-52.9 -> 41.4-43.3, 64 rows 117-123 -> 112-120 (level to slightly
//   faster; level at 80-96 rows; 128 and 512 rows 2-4% slower, so they keep the buffer). Not
//   measured on an Intel AVX2 CPU (where shifts and masks share ports with the FMAs) nor for
//   the GGUF panels that quant_matmul.cpp fills at 32-64 rows, which take it too. On Arm,
//   unmeasured, every step of 2+ rows keeps the buffer (the NEON tile_pairs is compiled, not
//   run). The order of the sums is the buffer's, so a row's result does not depend on which
//   path (or how many rows) its step took.
// - more rows: each panel is first widened into a thread-local float32 buffer, block by block
//   ([PW][K][16]: the 16 columns of a block for every input, one contiguous stretch), then tiles
//   of kRowsWide rows x one block (12 accumulators on AVX2; per input 2 loads and kRowsWide broadcasts
//   feed 2 * kRowsWide FMAs, the shape of an fp32 GEMM micro-kernel) run over it: widening is
//   paid once per panel for all rows. While the first tiles of a panel compute, they ask for the
//   thread's next panel, one cache line per input, so that its widening does not wait on memory.
//   Measured on the default model's four matrices of all 30 layers, streamed from memory, 2-core
//   Zen 4 built for Haswell (3 alternated runs of best-of-5; when every count from 2 rows took
//   this buffer), against 4-row x 3-half tiles over a
//   [K][PW * 16] buffer without the prefetch: 4 rows 51-55 -> 60-62 GFLOPS, 16 rows 105-112 ->
//   133-140, 64 rows 139-156 -> 168-191, 512 rows 171-173 -> 186-207 (the float32 FMA peak of
//   the two cores: 234). Before that, against an earlier widening in registers per tile (4 rows
//   x 1 block, not tile_pairs; Zen 4): 2 rows 1.0-1.3x,
//   16 rows 1.1-1.2x, 64 rows 1.2-1.6x, 512 rows 1.3-1.7x faster; and against torch float32
//   F.linear (MKL capped at AVX2): 16 rows 1.1-1.4x faster, 64 rows level, 512 rows level to
//   1.2x slower.
//   Not taken: passes over ~256 inputs at a time, so that a widened block's stretch stays in L1
//   while every tile of rows runs over it (partial sums kept per panel): on a 2-core AMD EPYC with
//   AVX2 (all layers, 3 alternated runs) level at 2-16 rows, 6-9% slower at 64 and 256 rows.
//   Nor with x packed per 6-row tile (one stream of broadcasts instead of six): a standalone copy
//   of this path at 256 rows (one thread, 24 panels of the q|k|v and down shapes, Zen 2) already
//   runs at 102 GFLOPS, the micro-kernel's rate with its data in L2; packed x 102-104, packed x
//   with passes of 128-384 inputs 93-99. What the real matmul loses below that (94-98 a thread)
//   is the widening of x and the epilogue, not x streaming through L2.
// Each thread widens the whole of x to float32 itself, into its own buffer, before its panels:
// no thread idles while one widens, and the copy each one's tiles read is one it wrote (in its
// own core's L2 at 64 rows, 147-393 KiB for the default model; its L3 at 256). Measured against
// one copy widened by the calling thread before the threads start (2-core AMD EPYC Zen 2, AVX2,
// the default model's matrices of all 30 layers, 2 alternated runs each): 64 rows q|k|v 452 ->
// 430 us, o 288 -> 260, gate|up 1354 -> 1325, down 726 -> 675; 256 rows 1609 -> 1530, 1028 ->
// 925, 4955 -> 4830, 2645 -> 2410; a step of 54 decodes and 202 prompt tokens 374 -> 354 ms.
// Every thread widening all of x costs each of T threads ~2T/n of its share of an n-column
// matmul, and T copies of x in memory: past kOwnCopyFloats of x, or with more than n / 64
// threads, the threads widen one shared copy together instead, each taking a run of rows (on
// the machine above: between the two, the down matrix at 256 rows 2551 us; many-core machines
// unmeasured). NEON tiles take 5 rows (vec_wide.h's kRows). The speed
// on Arm is not measured.
// Threads keep static runs. Two ways around a thread that the OS preempts (on a 2-core machine
// the server's own Python thread takes a core ~5% of the time at 64 concurrent) measured no gain
// (Zen 2): work stealing, a thread that finished its run taking single panels from the back of
// the others', served at 16 and 64 concurrent 259-263 / 287 vs 259-261 / 286 tok/s (2 alternated
// rounds); and one thread per matmul while a flag says that Python thread is busy: with a thread
// busy 12 ms of every 130 in the process, a 64-row decode step 119-121 -> 128-129 ms without and
// 130 with it. A preempted thread still holds up every parallel region it has not joined.
// Two requests keep a thread's weights coming from memory ahead of its tiles at 2+ rows of a
// packed weight (not the panels quant_matmul.cpp fills; the GEMV keeps the hardware's own
// prefetch: asking for its next panel measured level):
// - where a thread widens its own copy of x, it asks for the first panel of its run meanwhile,
//   a share of the panel's lines after each row: its tiles would otherwise start on a panel that
//   no one asked for, and a decode step's matrix gives a thread only 6-10 panels of the default
//   model (also on NEON and in the buffered path, where it is unmeasured / measured level);
// - tile_pairs asks for the next panel over all the panel's tiles, a share of its lines per tile
//   spread over the tile's pairs, not one line per input in the first tiles: that burst asked for
//   a whole panel (36-144 KiB in the default model) within its first few tiles of ~1 us each,
//   faster than a core's share of memory serves it. (tile_wide keeps the burst: the buffer's
//   widening reads its panel at once, and spreading measured 8-11% slower at 256 rows.)
// Measured on a 2-core AMD EPYC (Zen 2, AVX2), 2 threads, the default model's matrices of all 30
// layers, 2 alternated runs against one-line-per-input requests in the first tiles only:
// 4 rows q|k|v 82-93 -> 69-70 us, gate|up 224-228 -> 171-175, down 131-138 -> 98-105; 16 rows
// 155-166 -> 128-130, 444-458 -> 366-368, 238-253 -> 200-204; 64 rows 424-425 -> 406-415,
// 1310 -> 1276-1279, 674-678 -> 648; 256 rows level. (A standalone loop of the 6-row tile over
// 400 q|k|v-sized panels streamed from memory, one thread: 89-90 GFLOPS with the burst, 95-97
// spread, 100 with the panels in L2.) Served, 2 alternated rounds: 16 concurrent 238-239 ->
// 260-262 tok/s, 64 concurrent 278 -> 282-286.
namespace wide = atomr_wide;
using wide::f8;
constexpr int kRowsWide = wide::kRows;
#if defined(__AVX2__)
constexpr int64_t kRegsRows = 64;  // steps of 2..64 rows widen in registers (tile_pairs)
#else
constexpr int64_t kRegsRows = 1;  // NEON: none (unmeasured there)
#endif

// acc[h] = x . W[block j, columns 8h..8h+7] for every block j of a panel of PW blocks, one row,
// stored to c [PW * 16].
template <int PW>
void gemv_panel(const float* x, const int32_t* w, int64_t pairs, float* c) {
  f8 acc[2 * PW];
#pragma GCC unroll 8
  for (int h = 0; h < 2 * PW; ++h) acc[h] = wide::zero();
  for (int64_t p = 0; p < pairs; ++p) {
    const f8 xe = wide::broadcast(x + 2 * p), xo = wide::broadcast(x + 2 * p + 1);
#pragma GCC unroll 8
    for (int h = 0; h < 2 * PW; ++h) {
      f8 even, odd;
      wide::widen_pairs(w + (p * 2 * PW + h) * 8, even, odd);
      acc[h] = wide::fmadd(odd, xo, wide::fmadd(even, xe, acc[h]));
    }
  }
#pragma GCC unroll 8
  for (int h = 0; h < 2 * PW; ++h) wide::store(c + h * 8, acc[h]);
}

// A panel [pairs][PW * 16][2] of bf16 pairs -> float32 [PW][2 * pairs][16] in buf.
template <int PW>
void widen_panel(const int32_t* w, int64_t pairs, float* buf) {
  constexpr int W = PW * kCols;
  for (int64_t p = 0; p < pairs; ++p)
    for (int c = 0; c < W; c += 8) {
      f8 even, odd;
      wide::widen_pairs(w + p * W + c, even, odd);
      float* dst = buf + ((c / kCols) * 2 * pairs + 2 * p) * kCols + c % kCols;
      wide::store(dst, even);
      wide::store(dst + kCols, odd);
    }
}

// acc[m][h] = x[m, :] . Wf[block j, columns 8h..8h+7] for MT rows (ldx apart), stored to
// c [MT][PW * 16]; block j of the widened panel is bj [K][16]. kAhead: the first `lines` inputs
// each ask for one cache line of `ahead` (into L2).
template <int PW, int MT, bool kAhead>
void tile_wide(const float* x, int64_t ldx, const float* bj, int64_t K, int j, float* c, const char* ahead,
               int64_t lines) {
  constexpr int W = PW * kCols;
  // (the unroll pragmas keep GCC's aarch64 code from storing every accumulator to the stack in
  // every step: it leaves NEON's two-register f8 arrays in memory unless their loops unroll early)
  f8 acc[MT][2];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = wide::zero();
  for (int64_t k = 0; k < K; ++k) {
    if (kAhead && k < lines) __builtin_prefetch(ahead + k * 64, 0, 2);
    const f8 w0 = wide::load(bj + k * kCols), w1 = wide::load(bj + k * kCols + 8);
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      const f8 xv = wide::broadcast(x + m * ldx + k);
      acc[m][0] = wide::fmadd(w0, xv, acc[m][0]);
      acc[m][1] = wide::fmadd(w1, xv, acc[m][1]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m)
    for (int h = 0; h < 2; ++h) wide::store(c + m * W + j * kCols + h * 8, acc[m][h]);
}

// As tile_wide, but over the packed panel w [pairs][PW * 16][2] itself: for each pair, block j's
// even weights are widened in registers and meet x's even input, then its odd ones the odd input
// (tile_wide's order of sums). kAhead: the `lines` (<= pairs) cache lines of `ahead` are asked
// for one every pairs / lines pairs, spread over the tile instead of one per input from its start.
template <int PW, int MT, bool kAhead>
void tile_pairs(const float* x, int64_t ldx, const int32_t* w, int64_t pairs, int j, float* c, const char* ahead,
                int64_t lines) {
  constexpr int W = PW * kCols;
  f8 acc[MT][2];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = wide::zero();
  const int32_t* wj = w + j * kCols;
  const int64_t every = kAhead && lines > 0 ? std::max<int64_t>(1, pairs / lines) : pairs;
  int64_t asked = 0, wait = 0;
  for (int64_t p = 0; p < pairs; ++p) {
    if (kAhead && --wait <= 0 && asked < lines) {
      __builtin_prefetch(ahead + asked++ * 64, 0, 2);
      wait = every;
    }
    const int32_t* wp = wj + p * W;
#pragma GCC unroll 2
    for (int half = 0; half < 2; ++half) {  // the even input, then the odd one
      const f8 w0 = half == 0 ? wide::widen_even(wp) : wide::widen_odd(wp);
      const f8 w1 = half == 0 ? wide::widen_even(wp + 8) : wide::widen_odd(wp + 8);
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) {
        const f8 xv = wide::broadcast(x + m * ldx + 2 * p + half);
        acc[m][0] = wide::fmadd(w0, xv, acc[m][0]);
        acc[m][1] = wide::fmadd(w1, xv, acc[m][1]);
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m)
    for (int h = 0; h < 2; ++h) wide::store(c + m * W + j * kCols + h * 8, acc[m][h]);
}

// mt (<= kRowsWide) rows over a whole panel, block by block: tile(rows, ask, j, n) runs block j's
// tile (tile_pairs or tile_wide), which asks for n cache lines of `ahead` when ask() is true: at
// most per_block of the `lines` left (tile_wide's caller passes K, tile_pairs' a share of the
// panel's tiles, at most its pairs); `ahead` is advanced past those asked for.
template <int PW, typename Tile>
void over_blocks(int mt, int64_t per_block, const char*& ahead, int64_t& lines, Tile&& tile) {
  for (int j = 0; j < PW; ++j) {
    const int64_t n = std::min(lines, per_block);
    wide::with_rows(mt, [&](auto rows) {
      if (n > 0)
        tile(rows, std::true_type{}, j, n);
      else
        tile(rows, std::false_type{}, j, int64_t{0});
    });
    ahead += n * 64;
    lines -= n;
  }
}

// Rows first .. last - 1 of x [M, K] (bf16, `src`) -> float32 at the same offsets of `out`.
void widen_rows(const uint16_t* src, int64_t first, int64_t last, int64_t K, float* out) {
  int64_t i = first * K;
  const int64_t n = last * K;
  for (; i + 8 <= n; i += 8) wide::store(out + i, wide::load_bf16(src + i));
  for (; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
    std::memcpy(&out[i], &bits, sizeof(float));
  }
}

// Up to this many floats of x (4 MiB: the widest default CPU step — 256 prompt tokens beside 256
// decodes, 512 rows — at 1536 inputs is 786432)
// each thread may widen its own copy (see above).
constexpr int64_t kOwnCopyFloats = int64_t{1} << 20;

// As the AVX512-BF16 `matmul`: tiles panel by panel, each finished tile handed to
// `epilogue(row0, rows, panel, c)` with c [rows][PW * 16]; threads take contiguous runs of panels.
template <int PW, typename Epilogue>
void matmul_wide(const at::Tensor& x, const Panels& src, Epilogue&& epilogue) {
  const int64_t M = x.size(0), panels = src.count, pairs = src.pairs, K = 2 * pairs;
  if (M == 0) return;  // no rows: nothing to widen or store
  const int64_t panel_size = pairs * PW * kCols;  // int32 units
  const int64_t panel_lines = panel_size * static_cast<int64_t>(sizeof(int32_t)) / 64;  // its cache lines
  const bool in_registers = M <= kRegsRows;  // (M == 1: the GEMV below)
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const int64_t team = std::min<int64_t>(at::get_num_threads(), panels);
  const bool own_copies = M * K <= kOwnCopyFloats && team * 64 <= panels * PW * kCols;
  std::unique_ptr<float[]> shared;  // (uninitialised: widen_rows writes every float)
  if (!own_copies) {
    shared.reset(new float[static_cast<size_t>(M * K)]);
    at::parallel_for(0, M, std::max<int64_t>(1, 4096 / K), [&](int64_t first, int64_t last) {
      widen_rows(xs, first, last, K, shared.get());
    });
  }
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> xown;  // this thread's copy of x (see above)
    if (own_copies) {
      xown.reset(new float[static_cast<size_t>(M * K)]);
      if (M == 1 || src.packed == nullptr) {
        widen_rows(xs, 0, M, K, xown.get());
      } else {  // ask for the first panel while widening, a share of its lines after each row
        const char* first = reinterpret_cast<const char*>(src.packed + begin * panel_size);
        for (int64_t m = 0, asked = 0; m < M; ++m) {
          widen_rows(xs, m, m + 1, K, xown.get());
          for (const int64_t upto = panel_lines * (m + 1) / M; asked < upto; ++asked)
            __builtin_prefetch(first + asked * 64, 0, 2);
        }
      }
    }
    const float* xf = own_copies ? xown.get() : shared.get();
    alignas(32) float c[kRowsWide * PW * kCols];
    // (uninitialised: widen_panel writes all of it before the tiles read it)
    std::unique_ptr<float[]> buf(in_registers ? nullptr : new float[static_cast<size_t>(K * PW * kCols)]);
    std::vector<int32_t> own;
    for (int64_t panel = begin; panel < end; ++panel) {
      const int32_t* w = src.at(panel, panel_size, own);
      if (M == 1) {
        gemv_panel<PW>(xf, w, pairs, c);
        epilogue(0, 1, panel, c);
        continue;
      }
      if (!in_registers) widen_panel<PW>(w, pairs, buf.get());
      const char* ahead = reinterpret_cast<const char*>(w + panel_size);  // the thread's next panel, if any
      int64_t lines =  // (a packed weight only: a filled panel's successor does not exist yet)
          panel + 1 < end && src.packed != nullptr ? panel_lines : 0;
      const int64_t tile_blocks = (M + kRowsWide - 1) / kRowsWide * PW,  // tile_pairs' share of them
                    per_block = std::min(pairs, (lines + tile_blocks - 1) / tile_blocks);
      for (int64_t m0 = 0; m0 < M; m0 += kRowsWide) {
        const int mt = static_cast<int>(std::min<int64_t>(kRowsWide, M - m0));
        const float* xt = xf + m0 * K;
        if (in_registers)
          over_blocks<PW>(mt, per_block, ahead, lines, [&](auto rows, auto ask, int j, int64_t n) {
            tile_pairs<PW, rows(), ask()>(xt, K, w, pairs, j, c, ahead, n);
          });
        else
          over_blocks<PW>(mt, K, ahead, lines, [&](auto rows, auto ask, int j, int64_t n) {
            tile_wide<PW, rows(), ask()>(xt, K, buf.get() + j * K * kCols, K, j, c, ahead, n);
          });
        epilogue(m0, mt, panel, c);
      }
    }
  });
}

at::Tensor linear_impl(const at::Tensor& x, const Panels& src, int64_t n, const float* bp) {
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  matmul_wide<kPanel>(x, src, [&](int64_t m0, int mt, int64_t panel, const float* c) {
    for (int j = 0; j < kPanel; ++j)
      for (int h = 0; h < 2; ++h) {
        const int64_t col = (panel * kPanel + j) * kCols + h * 8, valid = std::min<int64_t>(8, n - col);
        if (valid <= 0) return;  // padding columns of the last panel
        f8 b = wide::zero();
        if (bp != nullptr) {
          alignas(32) float tmp[8] = {};
          std::memcpy(tmp, bp + col, static_cast<size_t>(valid) * sizeof(float));
          b = wide::load(tmp);
        }
        for (int m = 0; m < mt; ++m)
          wide::store_bf16(yp + (m0 + m) * n + col, wide::add(wide::load(c + (m * kPanel + j) * kCols + h * 8), b),
                           valid);
      }
  });
  return y;
}

at::Tensor silu_mul_impl(const at::Tensor& x, const Panels& src, int64_t n) {
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const f8 one = wide::set1(1.f);
  matmul_wide<2>(x, src, [&](int64_t m0, int mt, int64_t panel, const float* c) {
    for (int h = 0; h < 2; ++h) {
      const int64_t col = panel * kCols + h * 8, valid = std::min<int64_t>(8, n - col);
      if (valid <= 0) return;
      for (int m = 0; m < mt; ++m) {
        const f8 g = wide::load(c + (2 * m) * kCols + h * 8);
        const f8 u = wide::load(c + (2 * m + 1) * kCols + h * 8);
        const f8 silu = wide::div(g, wide::add(one, wide::exp(wide::neg(g))));
        wide::store_bf16(yp + (m0 + m) * n + col, wide::mul(silu, u), valid);
      }
    }
  });
  return y;
}

bool has_bf16_matmul() { return true; }
std::string bf16_matmul_isa() { return wide::kIsa; }

#else  // neither AVX512-BF16 nor AVX2 + FMA nor NEON: the Python side keeps oneDNN / ATen

at::Tensor linear_impl(const at::Tensor&, const Panels&, int64_t, const float*) {
  TORCH_CHECK(false, "the bf16 matmul needs AVX512-BF16, AVX2 + FMA or 64-bit Arm NEON");
  return {};
}
at::Tensor silu_mul_impl(const at::Tensor&, const Panels&, int64_t) {
  TORCH_CHECK(false, "the bf16 matmul needs AVX512-BF16, AVX2 + FMA or 64-bit Arm NEON");
  return {};
}
bool has_bf16_matmul() { return false; }
std::string bf16_matmul_isa() { return ""; }

#endif

#if !defined(__AVX512BF16__)
// The argmax is AVX512-BF16's alone: in the AVX2 build a scalar reduction of each row's outputs
// cost what not storing them saves (64 rows of the default model's lm_head, a Zen 5 built for
// Haswell: 14.7 ms both ways), so greedy steps keep logits and the sampler there (native.py
// offers linear_argmax only with AVX512-BF16).
at::Tensor argmax_impl(const at::Tensor&, const Panels&, int64_t, const float*) {
  TORCH_CHECK(false, "linear_argmax_bf16 needs the AVX512-BF16 build");
  return {};
}
#endif

// bias as float32 (kept alive by `keep`), or nullptr
const float* bias_of(const c10::optional<at::Tensor>& bias, int64_t n, at::Tensor& keep) {
  if (!bias.has_value()) return nullptr;
  keep = bias->to(at::kFloat).contiguous();
  TORCH_CHECK(keep.dim() == 1 && keep.size(0) == n, "bias must hold n values");
  return keep.data_ptr<float>();
}

// linear_bf16's and linear_argmax_bf16's checks: x and a plain weight's panels for n outputs
void check_linear(const at::Tensor& x, const at::Tensor& wp, int64_t n) {
  check(x, wp, kPanel);
  TORCH_CHECK(n > 0 && (n + kPanel * kCols - 1) / (kPanel * kCols) == wp.size(0), "n = ", n,
              " does not fit ", wp.size(0), " panels");
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& wp, int64_t n, const c10::optional<at::Tensor>& bias,
                       const at::Tensor* next = nullptr) {
  check_linear(x, wp, n);
  at::Tensor keep;
  const float* bp = bias_of(bias, n, keep);
  return linear_impl(x.contiguous(), Panels::of(wp, next), n, bp);
}

// The column of each row's largest output of linear_bf16 (its bf16 values, the first of equal ones,
// a NaN above all: NumPy's argmax of linear_bf16(...).float()), without storing the outputs.
at::Tensor linear_argmax_bf16(const at::Tensor& x, const at::Tensor& wp, int64_t n,
                              const c10::optional<at::Tensor>& bias) {
  check_linear(x, wp, n);
  at::Tensor keep;
  const float* bp = bias_of(bias, n, keep);
  return argmax_impl(x.contiguous(), Panels::of(wp), n, bp);
}

at::Tensor linear_silu_mul_bf16(const at::Tensor& x, const at::Tensor& wp, int64_t n,
                                const at::Tensor* next = nullptr) {
  check(x, wp, 2);
  TORCH_CHECK(n > 0 && (n + kCols - 1) / kCols == wp.size(0), "n = ", n, " does not fit ", wp.size(0),
              " gate/up panels");
  return silu_mul_impl(x.contiguous(), Panels::of(wp, next), n);
}

// x [M, k] bf16, k even and > 0
void check_filled(const at::Tensor& x, int64_t k, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(),
              "x must be a 2-D bfloat16 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(k > 0 && k % 2 == 0 && x.size(1) == k, "x has ", x.size(1), " inputs, the weight ", k);
  TORCH_CHECK(n > 0, "n = ", n);
}

}  // namespace

namespace atomr_ops {  // ops.h
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& wp, int64_t n, const c10::optional<at::Tensor>& bias,
                       const at::Tensor* next) {
  return ::linear_bf16(x, wp, n, bias, next);
}
at::Tensor linear_silu_mul_bf16(const at::Tensor& x, const at::Tensor& wp, int64_t n, const at::Tensor* next) {
  return ::linear_silu_mul_bf16(x, wp, n, next);
}
at::Tensor linear_bf16_filled(const at::Tensor& x, int64_t k, int64_t n, const PanelFill& fill,
                              const c10::optional<at::Tensor>& bias) {
  check_filled(x, k, n);
  at::Tensor keep;
  const float* bp = bias_of(bias, n, keep);
  const int64_t panels = (n + kPanel * kCols - 1) / (kPanel * kCols);
  return linear_impl(x.contiguous(), Panels{nullptr, &fill, panels, k / 2}, n, bp);
}
at::Tensor linear_silu_mul_bf16_filled(const at::Tensor& x, int64_t k, int64_t n, const PanelFill& fill) {
  check_filled(x, k, n);
  return silu_mul_impl(x.contiguous(), Panels{nullptr, &fill, (n + kCols - 1) / kCols, k / 2}, n);
}
bool has_bf16_matmul() { return ::has_bf16_matmul(); }
}  // namespace atomr_ops

TORCH_LIBRARY_FRAGMENT(atomr_trio, m) {
  m.def("linear_bf16(Tensor x, Tensor wp, int n, Tensor? bias) -> Tensor");
  m.def("linear_silu_mul_bf16(Tensor x, Tensor wp, int n) -> Tensor");
  m.def("linear_argmax_bf16(Tensor x, Tensor wp, int n, Tensor? bias) -> Tensor");
  m.def("has_bf16_matmul() -> bool", &::has_bf16_matmul);
  m.def("bf16_matmul_isa() -> str", &bf16_matmul_isa);
}

TORCH_LIBRARY_IMPL(atomr_trio, CPU, m) {
  m.impl("linear_bf16", [](const at::Tensor& x, const at::Tensor& wp, int64_t n, const c10::optional<at::Tensor>& bias) {
    return linear_bf16(x, wp, n, bias);
  });
  m.impl("linear_argmax_bf16", &linear_argmax_bf16);
  m.impl("linear_silu_mul_bf16",
         [](const at::Tensor& x, const at::Tensor& wp, int64_t n) { return linear_silu_mul_bf16(x, wp, n); });
}
