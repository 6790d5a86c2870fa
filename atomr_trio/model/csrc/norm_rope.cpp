// Fused per-layer element-wise work of the decoder (CPU; float32 or bfloat16).
//
// Each of these replaces several torch ops, each of which costs microseconds of dispatch on a
// CPU — more than the arithmetic for a decode step's few rows. Every intermediate is rounded to
// the tensor's dtype exactly where the torch version (llama.py, attention.py) rounds it, so the
// results match it (bit for bit in bfloat16 but for the float32 sum order inside the norm).
//
// add_rms_norm_(h, delta?, w, eps) -> x: h += delta in place (when given), x = rms_norm(h) * w.
// rope_store_kv(qkv, positions, cos, sin, kv, slots, nq, nkv) -> qk: q and k of the packed
//   q|k|v rows rotated (half-split rotary, tables [max_len, D]); k and v written to cache slots
//   `slots` of kv [2, KVH, num_slots, D]; returns q|k rotated as [T, nq + nkv, D].
// Built and loaded at run time by native.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops.h"

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

// bfloat16 is handled as its bits (uint16_t): plain integer ops the compiler vectorizes.
inline float load(const float* p) { return *p; }
inline float load(const uint16_t* p) {
  uint32_t u = static_cast<uint32_t>(*p) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void store(float* p, float f) { *p = f; }
inline void store(uint16_t* p, float f) {  // round to nearest even, as torch does; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u & 0x7fffffffu) > 0x7f800000u;
  *p = static_cast<uint16_t>(nan ? 0x7fc0u : rounded);
}
template <typename T>
inline float round_to(float f) {  // f as the dtype would hold it
  T t;
  store(&t, f);
  return load(&t);
}

inline uint16_t* bits(c10::BFloat16* p) { return reinterpret_cast<uint16_t*>(p); }

template <typename T>
void add_rms_rows(T* h, const T* delta, const T* w, T* out, int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* hr = h + r * n;
      T* orow = out + r * n;
      if (delta != nullptr) {
        const T* dr = delta + r * n;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) store(hr + i, load(hr + i) + load(dr + i));
      }
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < n; ++i) {
        const float v = load(hr + i);
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) store(orow + i, round_to<T>(load(hr + i) * inv) * load(w + i));
    }
  });
}

template <typename T>
void rope_rows(const T* qkv, const int64_t* pos, const T* cos, const T* sin, T* kv, const int64_t* slots,
               T* qk, int64_t rows, int64_t nq, int64_t nkv, int64_t D, int64_t S) {
  const int64_t width = (nq + 2 * nkv) * D, half = D / 2;
  T* kc = kv;
  T* vc = kv + nkv * S * D;
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* row = qkv + t * width;
      const T* c = cos + pos[t] * D;
      const T* s = sin + pos[t] * D;
      T* out = qk + t * (nq + nkv) * D;
      for (int64_t hd = 0; hd < nq + nkv; ++hd) {
        const T* x = row + hd * D;
        T* o = out + hd * D;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {  // x * cos + cat(-x2, x1) * sin, rounded as torch does
          const float a = round_to<T>(load(x + i) * load(c + i));
          const float b = round_to<T>(-load(x + half + i) * load(s + i));
          store(o + i, a + b);
          const float a2 = round_to<T>(load(x + half + i) * load(c + half + i));
          const float b2 = round_to<T>(load(x + i) * load(s + half + i));
          store(o + half + i, a2 + b2);
        }
      }
      const int64_t slot = slots[t];
      for (int64_t h = 0; h < nkv; ++h) {
        std::memcpy(kc + (h * S + slot) * D, out + (nq + h) * D, D * sizeof(T));
        std::memcpy(vc + (h * S + slot) * D, row + (nq + nkv + h) * D, D * sizeof(T));
      }
    }
  });
}

at::Tensor add_rms_norm_(at::Tensor h, const c10::optional<at::Tensor>& delta, const at::Tensor& w, double eps) {
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous(), "h must be a contiguous [rows, hidden] tensor");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == h.size(1) && w.scalar_type() == h.scalar_type(), "weight: [hidden]");
  at::Tensor d;
  if (delta.has_value()) {
    TORCH_CHECK(delta->sizes() == h.sizes() && delta->scalar_type() == h.scalar_type(), "delta must match h");
    d = delta->contiguous();
  }
  at::Tensor wc = w.contiguous();
  at::Tensor out = at::empty_like(h);
  const float e = static_cast<float>(eps);
  if (h.scalar_type() == at::kBFloat16) {
    using T = c10::BFloat16;
    add_rms_rows<uint16_t>(bits(h.data_ptr<T>()), d.defined() ? bits(d.data_ptr<T>()) : nullptr,
                           bits(wc.data_ptr<T>()), bits(out.data_ptr<T>()), h.size(0), h.size(1), e);
  } else {
    TORCH_CHECK(h.scalar_type() == at::kFloat, "float32 or bfloat16 only, got ", h.scalar_type());
    add_rms_rows<float>(h.data_ptr<float>(), d.defined() ? d.data_ptr<float>() : nullptr, wc.data_ptr<float>(),
                        out.data_ptr<float>(), h.size(0), h.size(1), e);
  }
  return out;
}

at::Tensor rope_store_kv(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos,
                         const at::Tensor& sin, at::Tensor kv, const at::Tensor& slots, int64_t nq, int64_t nkv) {
  TORCH_CHECK(kv.dim() == 4 && kv.size(0) == 2 && kv.size(1) == nkv && kv.is_contiguous(),
              "kv must be a contiguous [2, kv_heads, slots, head_dim] tensor");
  const int64_t D = kv.size(3), S = kv.size(2), T = qkv.size(0);
  TORCH_CHECK(D % 2 == 0, "head_dim must be even");
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (nq + 2 * nkv) * D, "qkv must be [tokens, (nq + 2 nkv) * head_dim]");
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == D && sin.sizes() == cos.sizes(), "rope tables: [max_len, head_dim]");
  TORCH_CHECK(qkv.scalar_type() == kv.scalar_type() && cos.scalar_type() == kv.scalar_type() &&
              sin.scalar_type() == kv.scalar_type(), "one dtype for qkv, tables and cache");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slots.scalar_type() == at::kLong &&
              positions.numel() == T && slots.numel() == T, "one int64 position and slot per token");
  at::Tensor qc = qkv.contiguous(), pc = positions.contiguous(), sc = slots.contiguous();
  at::Tensor cc = cos.contiguous(), snc = sin.contiguous();
  const int64_t* pp = pc.data_ptr<int64_t>();
  const int64_t* sp = sc.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {  // never write or read outside the tables and the cache
    TORCH_CHECK(pp[t] >= 0 && pp[t] < cos.size(0), "position ", pp[t], " outside the rope tables");
    TORCH_CHECK(sp[t] >= 0 && sp[t] < S, "slot ", sp[t], " outside the cache");
  }
  at::Tensor qk = at::empty({T, nq + nkv, D}, qkv.options());
  if (kv.scalar_type() == at::kBFloat16) {
    using E = c10::BFloat16;
    rope_rows<uint16_t>(bits(qc.data_ptr<E>()), pp, bits(cc.data_ptr<E>()), bits(snc.data_ptr<E>()),
                        bits(kv.data_ptr<E>()), sp, bits(qk.data_ptr<E>()), T, nq, nkv, D, S);
  } else {
    TORCH_CHECK(kv.scalar_type() == at::kFloat, "float32 or bfloat16 only, got ", kv.scalar_type());
    rope_rows<float>(qc.data_ptr<float>(), pp, cc.data_ptr<float>(), snc.data_ptr<float>(), kv.data_ptr<float>(),
                     sp, qk.data_ptr<float>(), T, nq, nkv, D, S);
  }
  return qk;
}

}  // namespace

namespace atomr_ops {  // ops.h
at::Tensor add_rms_norm_(at::Tensor h, const c10::optional<at::Tensor>& delta, const at::Tensor& w, double eps) {
  return ::add_rms_norm_(std::move(h), delta, w, eps);
}
at::Tensor rope_store_kv(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos,
                         const at::Tensor& sin, at::Tensor kv, const at::Tensor& slots, int64_t nq, int64_t nkv) {
  return ::rope_store_kv(qkv, positions, cos, sin, std::move(kv), slots, nq, nkv);
}
}  // namespace atomr_ops

TORCH_LIBRARY_FRAGMENT(atomr_trio, m) {
  m.def("add_rms_norm_(Tensor(a!) h, Tensor? delta, Tensor weight, float eps) -> Tensor");
  m.def("rope_store_kv(Tensor qkv, Tensor positions, Tensor cos, Tensor sin, Tensor(a!) kv, Tensor slots, "
        "int nq, int nkv) -> Tensor");
}

TORCH_LIBRARY_IMPL(atomr_trio, CPU, m) {
  m.impl("add_rms_norm_", &add_rms_norm_);
  m.impl("rope_store_kv", &rope_store_kv);
}
