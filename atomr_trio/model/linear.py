"""Linear: one weight matrix of the model and the kernel that multiplies by it.

Three kernels, chosen once per Context by probing them (cpu_kernels.py, `LlamaModel.use_kernels`):
- native (CPU with AVX512-BF16 or AVX2 + FMA, or 64-bit Arm without bf16 instructions; bf16):
  `csrc/linear_bf16.cpp`, over the weight packed into panels for the `vdpbf16ps` instruction
  (`pack_panels`). Measured on a 2-core Zen 4,
  streaming every layer of the default model: 1.25x ATen's GEMV at one row, 1.4x oneDNN at 16
  rows, 1.15x at 64, and level with oneDNN for prefill chunks of 128-2048 rows. The plain weight
  is then dropped: the matrices are held once. A gate|up weight also multiplies and applies
  silu(gate) * up in one pass (`silu_mul`).
  Built for AVX2 + FMA or Arm NEON (no bf16 dot instruction), the same panels are widened to
  float32 in registers: a 32-bit lane holds one column's pair, so widening is a shift and a mask (layout
  kept: one packing for both builds, and it measured fast). The same Zen 4 built for Haswell,
  oneDNN/ATen/MKL capped at AVX2, per call (best of alternated rounds on a busy machine):
  1 row x 576 -> 1536 0.07 ms vs float32 F.linear 0.37 ms and plain bf16 F.linear 0.09 ms;
  16 rows 0.30 vs 0.43 ms; 64 rows 0.80 vs 1.10 ms; 512 rows 5.8 vs 5.8 ms (1536 -> 576: 6.0 vs
  5.0 ms): prefill-sized products are level with float32 to 1.2x slower, so they stay native.
- oneDNN packed (bf16, CPUs with AVX512BW/VL/DQ or AVX-NE-CONVERT): `F.linear` hands oneDNN a
  plain weight, which it re-lays out on every call; packed once into oneDNN's blocked layout
  the same product is 1.2-2.7x faster from 2 rows on, bit-identical. For one row ATen's GEMV
  over the plain weight is faster still (see `cpu_gemv.py`), so the plain weight is kept beside
  the packed one (≈270 MB more for the default model).
- plain `F.linear` (float32, CUDA, and bf16 where neither of the above runs, e.g. x86 CPUs without
  AVX2, Arm CPUs with bf16 instructions).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

COLS = 16  # output columns per block of a native panel: one vector of float32
PANEL = 3  # blocks per panel of a plain native weight (linear_bf16.cpp's kPanel)

NativeLinear = Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor | None], torch.Tensor]
NativeSiluMul = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def pack_panels(weight: torch.Tensor, blocks: int = PANEL) -> torch.Tensor:
    """[out, in] -> [panels, in/2, blocks * 16, 2]: linear_bf16.cpp's layout (out padded with zeros)."""
    n, k = weight.shape
    width = blocks * COLS
    panels = -(-n // width)
    padded = F.pad(weight, (0, 0, 0, panels * width - n))
    return padded.view(panels, width, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def gate_up_rows(weight: torch.Tensor) -> torch.Tensor:
    """gate|up stacked [2 * n, in] -> its rows in the order of panels of 2 blocks: 16 gate rows, then
    the same 16 up rows, and so on (each half padded with zero rows to a multiple of 16)."""
    n, k = weight.shape[0] // 2, weight.shape[1]
    blocks = -(-n // COLS)
    gate, up = (F.pad(half, (0, 0, 0, blocks * COLS - n)).view(blocks, COLS, k) for half in weight.chunk(2))
    return torch.stack([gate, up], dim=1).reshape(-1, k)


def pack_gate_up_panels(weight: torch.Tensor) -> torch.Tensor:
    """gate|up stacked [2 * n, in] -> panels of 2 blocks: 16 gate columns, then the same 16 up columns."""
    return pack_panels(gate_up_rows(weight), blocks=2)


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, gate_up: bool = False) -> None:
        self.weight: torch.Tensor | None = weight  # [out, in]; None once the native panels replace it
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.gate_up = gate_up  # the weight is gate|up stacked: `silu_mul` applies
        self.packed: torch.Tensor | None = None  # the same weight in oneDNN's blocked layout
        self.panels: torch.Tensor | None = None  # the same weight packed for the native kernel
        self._native: NativeLinear | None = None
        self._native_silu_mul: NativeSiluMul | None = None
        self._native_argmax: NativeLinear | None = None

    def pack(self) -> None:
        assert self.weight is not None
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 16)

    def pack_native(self, linear: NativeLinear, silu_mul: NativeSiluMul, argmax: NativeLinear | None = None) -> bool:
        """Repack for the native bf16 kernel and drop the plain weight; False if it cannot take it.
        `argmax` (the kernel's linear_argmax_bf16), if given, serves `argmax` (not for a gate|up
        weight: its panels are the silu kind)."""
        w = self.weight
        if w is None or w.dtype != torch.bfloat16 or w.device.type != "cpu" or self.in_features % 2:
            return False
        self.panels = pack_gate_up_panels(w) if self.gate_up else pack_panels(w)
        self._native, self._native_silu_mul = linear, silu_mul
        self._native_argmax = None if self.gate_up else argmax
        self.weight = None
        return True

    def use_int8(self, packed: torch.Tensor, linear: NativeLinear, silu_mul: NativeSiluMul) -> None:
        """Multiply by `packed`, this weight quantized by int8.py's `pack_int8`, on linear_int8.cpp's
        ops from now on, and drop the float weight."""
        self.panels = packed
        self._native, self._native_silu_mul, self._native_argmax = linear, silu_mul, None
        self.weight, self.packed = None, None

    @property
    def int8(self) -> bool:
        """Whether `panels` holds int8.py's packing (uint8) rather than bf16 panels."""
        return self.panels is not None and self.panels.dtype == torch.uint8

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._native is not None:
            assert self.panels is not None
            rows = x.reshape(-1, self.in_features)
            return self._native(rows, self.panels, self.out_features, self.bias).view(*x.shape[:-1], -1)
        assert self.weight is not None
        if self.packed is not None and x.shape[0] > 1:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    @property
    def has_argmax(self) -> bool:
        """Whether `argmax` runs here (else it returns None)."""
        return self._native_argmax is not None

    def argmax(self, x: torch.Tensor) -> torch.Tensor | None:
        """For each row of x (flattened to [rows, in_features]), the index of its largest value of
        `self(x).float()` (the first of equal ones, a NaN above all): int64 [rows], found by the native
        bf16 kernel as it computes the outputs, which it never stores; None where this weight has no
        such kernel (int8, GGUF blocks, oneDNN, torch, a gate|up weight)."""
        if self._native_argmax is None:
            return None
        assert self.panels is not None
        return self._native_argmax(x.reshape(-1, self.in_features), self.panels, self.out_features, self.bias)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(x gate^T) * (x up^T) for a gate|up stacked weight."""
        assert self.gate_up
        if self._native_silu_mul is not None:
            assert self.panels is not None and self.bias is None
            rows = x.reshape(-1, self.in_features)
            return self._native_silu_mul(rows, self.panels, self.out_features // 2).view(*x.shape[:-1], -1)
        gate, up = self(x).chunk(2, dim=-1)
        return F.silu(gate) * up
