// One sampling step's random draws on the CPU: temperature, the top-k / top-p / min-p cut and the
// draw itself, one row at a time (float32 logits).
//
// sample_rows_(logits [n, V] float32 contiguous, temperature [n], top_k [n], top_p [n], min_p [n],
// u [n]) -> tokens [n] int64. Row i:
// - temperature[i] == 0 (greedy): its argmax (the first of equal logits; a NaN counts as the
//   largest, as numpy and torch take it); the row is not touched.
// - otherwise the row is divided by its temperature (float32, in place; 1: left as it is), then cut
//   in place, every token outside the cut set to -inf and the kept logits untouched:
//   - top_k[i] in 1 .. V - 1: the row's top_k best tokens, ties broken by the lower index; any
//     other value: no limit.
//   - top_p[i] < 1: of those, the smallest best-first prefix (the same order) such that every kept
//     token has less than top_p of probability before it, the probabilities being the softmax over
//     the top_k set (top_p is raised to FLT_MIN at least, so the best token always stays).
//   - min_p[i] > 0: then every token whose logit is below max + log(min_p) (its probability below
//     min_p times the best one's), computed in float32 as m + (float)log(min_p).
//   and the token is drawn by inverting the kept tokens' cumulative probability, in index order,
//   at u[i] in [0, 1): sums of chunks of kChunk tokens find the chunk, then that chunk's tokens one
//   by one (running sums in float64), so a token of probability 0 is never drawn. This is
//   sampler.py's draw_rows over the softmax of the cut row, without the softmax.
//   A row with a NaN, or whose best logit is not finite (+inf, or every token -inf), has nothing to
//   draw from: it is left as its temperature made it and gets token 0, as the torch path's argmax
//   of its NaN probabilities gives. A token more than 87 below the row's best (after the
//   temperature) has probability 0 here (float32's exp of it is subnormal at most).
//
// How, without sorting the vocabulary: a token's distance below its row's best logit, d = m - x,
// is bucketed into kBuckets even buckets over the row's span of logits (at most kSpan; d past it:
// the last bucket). A bucket's index never decreases as the logit falls, and equal logits share a
// bucket. Each bucket's count (and, for top_p, its mass: exp(x - m) by the kernels' float32
// vector exp, summed in float64), taken from the best bucket down, says in which bucket the top_k
// or top_p boundary lies; only that bucket's tokens are sorted (logit descending, index ascending)
// to place the cut inside it. A row costs a few passes over its logits: [64, 49152] flat under top_p ~3 ms on a
// 2-core Zen 4, where the torch path's mass histograms took ~75 ms (see sampler.py). The draw
// takes one pass more (exp and chunk sums) and one chunk.
// Built and loaded at run time by native.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512BF16__)
#include "vec_avx512.h"
#elif defined(__AVX2__) && defined(__FMA__)
#include "vec_avx2.h"
#endif

namespace {

constexpr int32_t kBuckets = 4096;
constexpr uint16_t kLast = kBuckets - 1;
constexpr uint16_t kMasked = kBuckets;  // the bucket of -inf logits: never kept
constexpr float kSpan = 128.f;  // logits further than this below the best share the last bucket
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kScan = 64;  // tokens looked at together when gathering a bucket's members

struct Scratch {
  std::vector<uint16_t> bucket;
  std::vector<float> e;
  std::vector<int64_t> count;
  std::vector<double> mass;
  std::vector<int64_t> members;
  bool e_is_row = false;  // e holds exp(x - m) of the row cut_row just cut (its top_p pass computed it)
};

// e[j] = exp(x[j] - m) for the row (x <= m; a -inf logit's value is never read). x - m is raised
// to kExpFloor first (float32's exp is 0 or a subnormal there): the AVX-512 vector exp's range
// reduction would turn a logit far below the best (-1e20, float32's lowest as a mask) into inf or
// NaN. (The AVX2 one clamps at -87 by itself and gives 1.6e-38 below it, not 0: see draw_row.)
constexpr float kExpFloor = -104.f;

#if !defined(__AVX512BF16__) && !(defined(__AVX2__) && defined(__FMA__))
// (memcpy, not std::bit_cast: GCC 10, which Debian 11 ships for Arm, has -std=c++20 but no bit_cast)
inline int32_t bits_of(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}
inline float float_of(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

// exp(x) for x in [kExpFloor, 0] (NaN stays NaN) without a library call: x = n ln 2 + r with n
// rounded to nearest (the 1.5 * 2^23 trick leaves n in the low mantissa bits), exp(r) by the
// degree-6 polynomial of vec_avx512.h's exp_ps, times 2^n as two normal powers of two (n reaches
// -150, below float32's normal exponents; the product underflows to a subnormal or 0 as exp does).
inline float exp_nonpositive(float x) {
  constexpr float kRound = 12582912.f;
  const float t = x * 1.44269504f + kRound;
  const float n = t - kRound;
  float r = x - n * 0.693145752f;
  r = r - n * 1.42860677e-06f;
  float p = 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t ni = bits_of(t) - bits_of(kRound);  // n, in [-150, 0]
  const int32_t half = ni >> 1;
  return p * float_of((half + 127) << 23) * float_of((ni - half + 127) << 23);
}
#endif

void exp_below(const float* x, float m, float* e, int64_t V) {
#if defined(__AVX512BF16__) || (defined(__AVX2__) && defined(__FMA__))
  int64_t j = 0;
#if defined(__AVX512BF16__)
  const __m512 vm = _mm512_set1_ps(m), floor = _mm512_set1_ps(kExpFloor);
  for (; j + 16 <= V; j += 16)
    _mm512_storeu_ps(e + j, atomr_vec::exp_ps(_mm512_max_ps(_mm512_sub_ps(_mm512_loadu_ps(x + j), vm), floor)));
#else
  const __m256 vm = _mm256_set1_ps(m), floor = _mm256_set1_ps(kExpFloor);
  for (; j + 8 <= V; j += 8)
    _mm256_storeu_ps(e + j, atomr_avx2::exp_ps(_mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm), floor)));
#endif
  for (; j < V; ++j) e[j] = std::exp(std::max(x[j] - m, kExpFloor));
#else
  // the vector builds' exp in a plain loop, which the compiler vectorizes (NEON on Arm, SSE2 on
  // baseline x86-64); std::exp would be one call per token
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    const float v = x[j] - m;
    e[j] = exp_nonpositive(v > kExpFloor ? v : kExpFloor);
  }
#endif
}

// The row's tokens in bucket b (there are `size` of them), best first: logit descending, then
// index ascending. Blocks of kScan tokens without one are skipped after one vector compare.
void sorted_members(const float* x, const uint16_t* bucket, int64_t V, uint16_t b, int64_t size,
                    std::vector<int64_t>& out) {
  out.clear();
  out.reserve(static_cast<size_t>(size));
  for (int64_t j0 = 0; j0 < V && static_cast<int64_t>(out.size()) < size; j0 += kScan) {
    const int64_t j1 = std::min(V, j0 + kScan);
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t j = j0; j < j1; ++j) any |= bucket[j] == b;
    if (any)
      for (int64_t j = j0; j < j1; ++j)
        if (bucket[j] == b) out.push_back(j);
  }
  // (gathered in index order, and a stable sort keeps that order among equal logits)
  std::stable_sort(out.begin(), out.end(), [x](int64_t a, int64_t c) { return x[a] > x[c]; });
}

// Cuts row x in place; false if the row has nothing to draw from (a NaN, or no finite best
// logit), left as it is. m: the row's best logit.
bool cut_row(float* x, int64_t V, int64_t top_k, double top_p, double min_p, Scratch& s, float& m) {
  s.e_is_row = false;
  m = kNegInf;
  float low = std::numeric_limits<float>::infinity();  // the worst finite logit
  int64_t nans = 0;
#pragma omp simd reduction(max : m) reduction(min : low) reduction(+ : nans)
  for (int64_t j = 0; j < V; ++j) {
    const float v = x[j];
    nans += v != v;
    m = v > m ? v : m;
    low = v != kNegInf && v < low ? v : low;
  }
  if (nans || !std::isfinite(m)) return false;
  const bool by_k = top_k > 0 && top_k < V, by_p = top_p < 1.0;
  const float floor = min_p > 0 ? m + static_cast<float>(std::log(min_p)) : kNegInf;
  if (!by_k && !by_p) {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) x[j] = x[j] < floor ? kNegInf : x[j];
    return true;
  }

  // Buckets spread evenly over the row's own span of logits (up to kSpan), so a flat row's
  // tokens do not crowd into a few buckets nor a peaked row's into the last one.
  const float span = std::min(m - low, kSpan);
  // (capped: a span too small for 4095 / span to be finite would make the best token's 0 * inf NaN)
  const float per = span > 0 ? std::min(static_cast<float>(kLast) / span, FLT_MAX) : 0.f;
  uint16_t* bucket = s.bucket.data();
  int64_t masked = 0;
#pragma omp simd reduction(+ : masked)
  for (int64_t j = 0; j < V; ++j) {
    // t never decreases as x falls; a -inf logit skips it (inf * 0 would be NaN where the span is 0)
    const bool out = x[j] == kNegInf;
    const float t = out ? 0.f : std::min((m - x[j]) * per, static_cast<float>(kLast));
    bucket[j] = out ? kMasked : static_cast<uint16_t>(t);
    masked += out;
  }
  int64_t* count = s.count.data();
  double* mass = s.mass.data();
  const float* e = s.e.data();
  if (by_k) {
    std::fill(s.count.begin(), s.count.end(), 0);
    for (int64_t j = 0; j < V; ++j) ++count[bucket[j]];
  }
  if (by_p) {
    exp_below(x, m, s.e.data(), V);
    s.e_is_row = true;  // the cut leaves m and the kept logits as they are: the draw reuses it
    std::fill(s.mass.begin(), s.mass.end(), 0.0);
    for (int64_t j = 0; j < V; ++j) mass[bucket[j]] += e[j];
  }

  // The cut: tokens in buckets below `cut` stay, those above it go, and of bucket `cut`'s sorted
  // members the first `keep` stay (cut = kBuckets: every finite token stays).
  int32_t cut = kBuckets;
  int64_t keep = 0;
  std::vector<int64_t>& members = s.members;
  if (by_k && top_k < V - masked) {
    int64_t before = 0;
    uint16_t b = 0;
    while (before + count[b] < top_k) before += count[b++];
    sorted_members(x, bucket, V, b, count[b], members);
    cut = b;
    keep = top_k - before;
  }
  if (by_p) {
    double total = 0;
    for (int32_t b = 0; b < cut; ++b) total += mass[b];
    for (int64_t i = 0; cut < kBuckets && i < keep; ++i) total += e[members[i]];
    const double target = std::max(top_p, static_cast<double>(FLT_MIN)) * total;
    double before = 0;
    int32_t b = 0;
    while (b < cut && before + mass[b] < target) before += mass[b++];
    if (b < kBuckets) {  // the boundary lies in bucket b (the top_k bucket when b == cut)
      if (b < cut) {
        sorted_members(x, bucket, V, static_cast<uint16_t>(b), V, members);
        keep = static_cast<int64_t>(members.size());
      }
      int64_t kept = 0;
      while (kept < keep && before < target) before += e[members[kept++]];
      cut = b;
      keep = kept;
    }  // else float rounding left the whole mass under top_p: every token stays
  }

  const int32_t last = cut;
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) x[j] = bucket[j] > last || x[j] < floor ? kNegInf : x[j];
  if (cut < kBuckets)
    for (size_t i = static_cast<size_t>(keep); i < members.size(); ++i) x[members[i]] = kNegInf;
  return true;
}

constexpr int64_t kChunk = 1024;  // tokens per chunk of the draw
// x - m below it: probability 0 (exp(-87) ~ 1.6e-38, near float32's least normal, ~1.2e-38)
constexpr float kDrawFloor = -87.f;

// The token drawn from cut row x (best logit m, finite) at u in [0, 1).
int64_t draw_row(const float* x, int64_t V, float m, double u, Scratch& s) {
  float* e = s.e.data();
  if (!s.e_is_row) exp_below(x, m, e, V);
  const int64_t chunks = (V + kChunk - 1) / kChunk;
  double total = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t j1 = std::min(V, (c + 1) * kChunk);
    float sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = c * kChunk; j < j1; ++j) {
      // a dropped token, or one so far below the best that float32's exp of it is subnormal or 0
      // (every exp here, vector or not, then answers 0): probability 0 exactly, never drawn
      e[j] = x[j] - m < kDrawFloor ? 0.f : e[j];
      sum += e[j];
    }
    s.mass[c] = sum;
    total += sum;
  }
  // the point, strictly below the total (u * total never rounds up to it, kept for safety)
  const double point = std::min(u * total, std::nextafter(total, 0.0));
  double before = 0;
  int64_t c = 0;
  while (c + 1 < chunks && before + s.mass[c] <= point) before += s.mass[c++];
  const int64_t j0 = c * kChunk, j1 = std::min(V, j0 + kChunk);
  int64_t last = j0;  // the chunk's last token of positive probability so far
  for (int64_t j = j0; j < j1; ++j) {
    if (e[j] <= 0.f) continue;
    before += e[j];
    last = j;
    if (before > point) return j;
  }
  return last;  // float rounding left the point at the chunk's end: its last possible token
}

// The row's argmax: the first NaN if any, else the first of its largest values.
int64_t argmax_row(const float* x, int64_t V) {
  int64_t best = 0;
  for (int64_t j = 0; j < V; ++j) {
    if (x[j] != x[j]) return j;
    if (x[j] > x[best]) best = j;
  }
  return best;
}

at::Tensor sample_rows_(at::Tensor logits, at::ArrayRef<double> temperature, at::IntArrayRef top_k,
                        at::ArrayRef<double> top_p, at::ArrayRef<double> min_p, at::ArrayRef<double> u) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2 &&
                  logits.is_contiguous(),
              "sample_rows_: logits must be a contiguous float32 CPU matrix");
  const int64_t n = logits.size(0), V = logits.size(1);
  for (const size_t size : {temperature.size(), top_k.size(), top_p.size(), min_p.size(), u.size()})
    TORCH_CHECK(static_cast<int64_t>(size) == n, "sample_rows_: one temperature, top_k, top_p, min_p and u per row");
  TORCH_CHECK(V > 0 || n == 0, "sample_rows_: an empty vocabulary");
  at::Tensor tokens = at::empty({n}, logits.options().dtype(at::kLong));
  int64_t* out = tokens.data_ptr<int64_t>();
  float* base = logits.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    s.bucket.resize(V);
    s.e.resize(V);
    s.count.resize(kBuckets + 1);
    s.mass.resize(std::max<int64_t>(kBuckets + 1, (V + kChunk - 1) / kChunk));
    for (int64_t i = begin; i < end; ++i) {
      float* x = base + i * V;
      if (temperature[i] == 0) {
        out[i] = argmax_row(x, V);
        continue;
      }
      if (temperature[i] != 1) {
        const float t = static_cast<float>(temperature[i]);
#pragma omp simd
        for (int64_t j = 0; j < V; ++j) x[j] = x[j] / t;
      }
      float m = 0;
      out[i] = cut_row(x, V, top_k[i], top_p[i], min_p[i], s, m) ? draw_row(x, V, m, u[i], s) : 0;
    }
  });
  return tokens;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(atomr_trio, m) {
  m.def("sample_rows_(Tensor(a!) logits, float[] temperature, int[] top_k, float[] top_p, float[] min_p, "
        "float[] u) -> Tensor");
}

TORCH_LIBRARY_IMPL(atomr_trio, CPU, m) { m.impl("sample_rows_", &sample_rows_); }
