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
// Built and loaded at run time by native.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

namespace {

inline float as_float(float x) { return x; }
inline float as_float(c10::BFloat16 x) { return static_cast<float>(x); }

// One cache row of head_dim values, widened to float32 into `out`.
template <typename T>
inline void load_row(const T* src, float* out, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) out[d] = as_float(src[d]);
}

// kD > 0: head size known at compile time (lets the compiler unroll the row loops); 0: any.
template <typename T, int64_t kD>
void decode_attention(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& slots,
                      const at::Tensor& ctx_lens, float scale, at::Tensor& out) {
  std::atomic<bool> bad_slot{false};
  const int64_t nd = q.size(0), H = q.size(1);
  const int64_t D = kD > 0 ? kD : q.size(2);
  const int64_t KVH = kv.size(1), S = kv.size(2);
  const int64_t L = slots.size(0) / nd;
  const int64_t G = H / KVH;
  const T* qp = q.data_ptr<T>();
  const T* kp = kv.data_ptr<T>();
  const T* vp = kp + KVH * S * D;
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = ctx_lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();

  at::parallel_for(0, nd * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), row(D), scores(G * L), denom(G);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t n = w / KVH, h = w % KVH;
      const int64_t len = std::min(lp[n], L);
      const int64_t* srow = sp + n * L;
      bool in_range = true;
      for (int64_t l = 0; l < len; ++l) in_range &= srow[l] >= 0 && srow[l] < S;
      if (!in_range) {  // never read outside the cache; the caller gets an error instead
        bad_slot = true;
        continue;
      }
      const T* qrow = qp + (n * H + h * G) * D;
      for (int64_t i = 0; i < G * D; ++i) qf[i] = as_float(qrow[i]) * scale;

      // scores[g, l] = q_g . k_l
      for (int64_t l = 0; l < len; ++l) {
        const float* r = row.data();
        load_row(kp + (h * S + srow[l]) * D, row.data(), D);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf.data() + g * D;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += qg[d] * r[d];
          scores[g * L + l] = s;
        }
      }

      // softmax numerators in place; denominators kept apart
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * L;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t l = 0; l < len; ++l) mx = std::max(mx, sg[l]);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t l = 0; l < len; ++l) {
          sg[l] = std::exp(sg[l] - mx);
          sum += sg[l];
        }
        denom[g] = sum;
      }

      // out_g = sum_l p[g, l] * v_l / denom[g]
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t l = 0; l < len; ++l) {
        const float* r = row.data();
        load_row(vp + (h * S + srow[l]) * D, row.data(), D);
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * L + l];
          float* ag = acc.data() + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ag[d] += p * r[d];
        }
      }
      T* orow = op + (n * H + h * G) * D;
      for (int64_t g = 0; g < G; ++g) {
        const float inv = denom[g] > 0.f ? 1.f / denom[g] : 0.f;  // len == 0: zeros
        for (int64_t d = 0; d < D; ++d) orow[g * D + d] = static_cast<T>(acc[g * D + d] * inv);
      }
    }
  });
  TORCH_CHECK(!bad_slot, "paged_decode_attention: a slot lies outside the cache");
}

template <typename T>
void dispatch_head_size(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& slots,
                        const at::Tensor& ctx_lens, float scale, at::Tensor& out) {
  switch (q.size(2)) {
    case 64: decode_attention<T, 64>(q, kv, slots, ctx_lens, scale, out); break;
    case 128: decode_attention<T, 128>(q, kv, slots, ctx_lens, scale, out); break;
    default: decode_attention<T, 0>(q, kv, slots, ctx_lens, scale, out);
  }
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& slots,
                                  const at::Tensor& ctx_lens, double scale) {
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
  if (q.scalar_type() == at::kBFloat16) {
    dispatch_head_size<c10::BFloat16>(qc, kv, sc, lc, s, out);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kFloat, "float32 or bfloat16 only, got ", q.scalar_type());
    dispatch_head_size<float>(qc, kv, sc, lc, s, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(atomr_trio, m) {
  m.def("paged_decode_attention(Tensor q, Tensor kv, Tensor slots, Tensor ctx_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(atomr_trio, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
