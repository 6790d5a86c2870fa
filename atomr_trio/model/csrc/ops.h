// The native ops that other native code calls directly, in C++ (no dispatcher, no Python):
// decode_layers.cpp runs a decode step's layers through them. Each is defined in its own source
// (linear_bf16.cpp, linear_int8.cpp, quant_matmul.cpp, norm_rope.cpp, paged_decode_attention.cpp), where its header comment gives
// its layouts and semantics; these are the same functions torch.ops.atomr_trio exposes.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <optional>

namespace atomr_ops {

// next (optional): the packed bf16 weight of the matmul that runs after this one; in the
// AVX512-BF16 build, with more than one tile of rows (9+), each thread asks for its first panel of
// it while finishing its own last one.
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& wp, int64_t n, const c10::optional<at::Tensor>& bias,
                       const at::Tensor* next = nullptr);
at::Tensor linear_silu_mul_bf16(const at::Tensor& x, const at::Tensor& wp, int64_t n, const at::Tensor* next = nullptr);
// The same matmuls over a weight given panel by panel: fill(i, dst) writes panel i of the packed
// layout into dst: [k/2][cols] int32, each the bf16 pair of inputs 2p (low half) and 2p + 1 of one
// output column, cols = kLinearPanelCols (outputs 48i .. 48i + 47) for linear_bf16_filled and
// kSiluPanelCols (16 gate outputs 16i .. 16i + 15, then the same 16 up outputs) for the silu one;
// columns past the outputs hold zeros. fill runs on several threads at once, each with its own dst,
// which it reuses from panel to panel: every int32 must be written each time. x: [M, k] bf16.
// Both raise in a build without the bf16 matmul (has_bf16_matmul()).
constexpr int kLinearPanelCols = 48, kSiluPanelCols = 32;
using PanelFill = std::function<void(int64_t panel, int32_t* dst)>;
at::Tensor linear_bf16_filled(const at::Tensor& x, int64_t k, int64_t n, const PanelFill& fill,
                              const c10::optional<at::Tensor>& bias);
at::Tensor linear_silu_mul_bf16_filled(const at::Tensor& x, int64_t k, int64_t n, const PanelFill& fill);
bool has_bf16_matmul();
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& w, int64_t type, int64_t k,
                        const c10::optional<at::Tensor>& bias);
at::Tensor quant_linear_silu_mul(const at::Tensor& x, const at::Tensor& w, int64_t type, int64_t k);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, int64_t n, const c10::optional<at::Tensor>& bias);
at::Tensor int8_linear_silu_mul(const at::Tensor& x, const at::Tensor& w, int64_t n);
at::Tensor add_rms_norm_(at::Tensor h, const c10::optional<at::Tensor>& delta, const at::Tensor& w, double eps);
at::Tensor rope_store_kv(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos,
                         const at::Tensor& sin, at::Tensor kv, const at::Tensor& slots, int64_t nq, int64_t nkv);
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& slots,
                                  const at::Tensor& ctx_lens, double scale, std::optional<int64_t> window,
                                  std::optional<double> softcap);

}  // namespace atomr_ops
