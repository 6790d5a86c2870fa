// Every layer of a decode step in one call (CPU; weights on the native bf16 or int8 panels or GGUF blocks).
//
// A decode step of a small model is a long chain of short kernels: for the default model, 30
// layers x 8 ops, ~35 us each at one sequence. Called one by one from Python, each costs a
// Python frame, the dispatcher, a few tensor views and taking the GIL back (from the Trio
// thread, when it serves). Measured on a 2-core Zen 4, bf16: a one-sequence step 11.0 -> 9.9 ms
// offline; served at 16 concurrent, 10-17% more tokens per second. Here the same kernels — the
// functions behind torch.ops.atomr_trio, called directly (ops.h) — run in a loop in C++, in the
// order and with the arguments of LlamaModel.forward's native path, so the results are the
// same bit for bit; Python runs once per step, and the GIL is free for the Trio thread meanwhile.
//
// Per layer i: x = rms_norm(h += delta) * in_norm[i]; qkv = x qkv[i]^T (+ bias); rope on q and
// k, k and v into kv_cache[i] at slot_mapping; attention of each row over its context
// (dslots, dlens; windows[i] > 0: the last windows[i] positions); h += attn o[i]^T,
// x = rms_norm(h) * post_norm[i]; delta = down(silu(gate) * up). Returns h + delta (h is
// updated in place). Each matrix is the packed bf16 panels of linear.py (`Linear.panels`; its
// entry in `qtypes` is -1), the int8 panels of int8.py (also `Linear.panels`; -2) or GGUF blocks
// (quantized.py's `QuantLinear`; its GGML type),
// `qtypes` holding 4 entries per layer: q|k|v, o, gate|up, down. Where two matrices in a row are
// bf16 panels with no attention between them (o -> gate|up -> down -> the next layer's q|k|v), the
// first matmul is told the second, whose first panels it asks for as it ends (linear_bf16.cpp).
// Measured level and not taken: splitting the rows between the threads, each running every layer
// on its own rows with one-thread kernels (no barrier between ops; the second reads each layer's
// weights from L3): 64 sequences (2-core Zen 5) 32.2-36.1 ms a step vs 32.2-34.2 split by
// panels; with a busy-looping process taking ~30% of a core 48.9-49.5 vs 47.4-47.8 (the one
// barrier left still waits for the preempted thread), and 35.9-37.0 with one thread started
// 0.3-0.6 ms late so that one's attention overlaps the other's matmuls. Also level: steps with
// prompt chunks in this loop too (the chunks' prefill attention called from here, bit for bit the
// Python loop's; default model, 128-token prompts, 64 running, 2-core Zen 5, alternated runs):
// offline such steps 78.3-81.5 ms with the loop vs 79.2-80.4 in one call; served 64 concurrent
// 1110-1178 vs 1129-1198 tok/s, 16 concurrent 998-1039 vs 988-998 (4 and 2 rounds) — so they
// keep the Python loop, whose GIL crossings cost little beside a 300-row step.
// Built and loaded at run time by native.py.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "ops.h"

namespace {

constexpr int64_t kBf16Panels = -1, kInt8Panels = -2;  // qtypes entries that are not GGML types

at::Tensor decode_layers(at::Tensor h, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                         at::Tensor kv_cache, const at::Tensor& slot_mapping, const at::Tensor& dslots,
                         const at::Tensor& dlens, at::TensorList in_norm, at::TensorList post_norm,
                         at::TensorList qkv, const c10::List<std::optional<at::Tensor>>& qkv_bias, at::TensorList o,
                         at::TensorList gate_up, at::TensorList down, at::IntArrayRef qtypes,
                         at::IntArrayRef windows, int64_t nq, int64_t nkv, int64_t ff, double scale, double eps) {
  const int64_t L = static_cast<int64_t>(qkv.size());
  TORCH_CHECK(h.dim() == 2, "h must be [rows, hidden]");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == L, "kv_cache must be [layers, 2, kv_heads, slots, head_dim]");
  TORCH_CHECK(static_cast<int64_t>(in_norm.size()) == L && static_cast<int64_t>(post_norm.size()) == L &&
                  static_cast<int64_t>(qkv_bias.size()) == L && static_cast<int64_t>(o.size()) == L &&
                  static_cast<int64_t>(gate_up.size()) == L && static_cast<int64_t>(down.size()) == L &&
                  static_cast<int64_t>(windows.size()) == L && static_cast<int64_t>(qtypes.size()) == 4 * L,
              "one entry per layer in every list (four in qtypes)");
  const int64_t hidden = h.size(1), hd = kv_cache.size(4), n_qkv = (nq + 2 * nkv) * hd;
  // `w`, the matrix multiplied after matrix j, where both are bf16 panels: matrix j's matmul asks
  // for w's first panels as it ends
  auto then = [&](int64_t j, const at::Tensor& w) -> const at::Tensor* {
    return qtypes[j] == kBf16Panels && qtypes[j + 1] == kBf16Panels ? &w : nullptr;
  };
  // x times matrix j of layer i (n outputs, k inputs): bf16 panels, int8 panels or GGUF blocks
  auto linear = [&](const at::Tensor& x, const at::Tensor& w, int64_t j, int64_t n, int64_t k,
                    const std::optional<at::Tensor>& bias, const at::Tensor* next = nullptr) {
    if (qtypes[j] == kBf16Panels) return atomr_ops::linear_bf16(x, w, n, bias, next);
    if (qtypes[j] == kInt8Panels) return atomr_ops::int8_linear(x, w, n, bias);
    return atomr_ops::quant_linear(x, w, qtypes[j], k, bias);
  };
  auto silu_mul = [&](const at::Tensor& x, const at::Tensor& w, int64_t j, const at::Tensor* next) {
    if (qtypes[j] == kBf16Panels) return atomr_ops::linear_silu_mul_bf16(x, w, ff, next);
    if (qtypes[j] == kInt8Panels) return atomr_ops::int8_linear_silu_mul(x, w, ff);
    return atomr_ops::quant_linear_silu_mul(x, w, qtypes[j], hidden);
  };
  std::optional<at::Tensor> delta;
  for (int64_t i = 0; i < L; ++i) {
    at::Tensor kv = kv_cache.select(0, i);
    at::Tensor x = atomr_ops::add_rms_norm_(h, delta, in_norm[i], eps);
    const std::optional<at::Tensor> bias = qkv_bias.get(i);
    at::Tensor qk = atomr_ops::rope_store_kv(linear(x, qkv[i], 4 * i, n_qkv, hidden, bias), positions, cos, sin, kv,
                                             slot_mapping, nq, nkv);
    const std::optional<int64_t> window = windows[i] > 0 ? std::optional<int64_t>(windows[i]) : std::nullopt;
    at::Tensor attn = atomr_ops::paged_decode_attention(qk.narrow(1, 0, nq), kv, dslots, dlens, scale, window,
                                                        std::nullopt)
                          .view({-1, nq * hd});
    x = atomr_ops::add_rms_norm_(
        h, linear(attn, o[i], 4 * i + 1, hidden, nq * hd, std::nullopt, then(4 * i + 1, gate_up[i])), post_norm[i],
        eps);
    at::Tensor act = silu_mul(x, gate_up[i], 4 * i + 2, then(4 * i + 2, down[i]));
    delta = linear(act, down[i], 4 * i + 3, hidden, ff, std::nullopt, i + 1 < L ? then(4 * i + 3, qkv[i + 1]) : nullptr);
  }
  return delta.has_value() ? h.add_(*delta) : h;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(atomr_trio, m) {
  m.def("decode_layers(Tensor(a!) h, Tensor positions, Tensor cos, Tensor sin, Tensor(b!) kv_cache, "
        "Tensor slot_mapping, Tensor dslots, Tensor dlens, Tensor[] in_norm, Tensor[] post_norm, Tensor[] qkv, "
        "Tensor?[] qkv_bias, Tensor[] o, Tensor[] gate_up, Tensor[] down, int[] qtypes, int[] windows, int nq, "
        "int nkv, int ff, "
        "float scale, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(atomr_trio, CPU, m) { m.impl("decode_layers", &decode_layers); }
