"""Weights kept in GGUF's quantized blocks (`quantization="gguf"`), and the matmul over them.

Why: a batch-1 decode step is bound by reading the weights. The default model's Q4_1 layers
are 5 bits per weight (Q8_0 8.5): kept as the file's blocks, a step reads 3-6x fewer bytes than
bf16 / float32 weights. `QuantLinear` multiplies by them with csrc/quant_matmul.cpp, which
dequantizes each block in registers and accumulates in float32 (activations stay float), so its
results are float32 arithmetic on the dequantized weight, up to summation order (bf16 activations
from 4 rows on meet the weight rounded to bf16, as quantization=none holds it: see the
invariants). One exception, for speed: AVX2 builds without AVX-512 quantize 1-3 rows of bf16
activations to int8 per 32-value block over Q4_0 / Q4_1 and multiply as integers, as llama.cpp
does (`native.Kernels.quant_int8_x_rows`; the kernel's header says what it costs in precision).

Measured (default model, decode steps, shared 2-core Zen 4, benchmarks/profile_step.py, best runs):
batch 1: gguf 8-10 ms, bf16 (native panels) 11.5 ms, float32 51 ms; batch 16: gguf 32 ms, bf16
21 ms, float32 92 ms. Built as AVX2 (haswell, oneDNN/ATen capped at AVX2), float32 activations:
batch 1 12 vs 65 ms, batch 16 63 vs 140 ms. Hence `quantization` defaults to none: with the bf16
panel kernel, batches of 16 are faster in bf16; without it (AVX2), gguf wins at both sizes.

Invariants:
- A `QuantizedWeight` is the file's bytes, one row of blocks per output: [out, row_bytes]
  uint8. Blocks never straddle rows (a row is whole blocks), so every row operation the loader
  needs — llama.cpp's q/k row permutation, the partial-rotary head reorder, q|k|v and gate|up
  concatenation, phi3's split of fused tensors — is the same operation on the byte rows
  (`permute_rows`, `cat_rows`, `split_rows`), exact.
- Only Q8_0, Q4_0, Q4_1 and Q4_K stay quantized (`KEPT`); other types are dequantized by the
  reader as before. A concatenation over mixed types dequantizes that group (`cat_rows`).
- Norms, biases, MoE experts and the router, and Gemma's weights are float (the loader
  dequantizes a `QuantizedWeight` it does not keep: `LlamaModel.keeps_quantized`).
- The native kernels are required: without them (no compiler, neither x86-64 nor 64-bit Arm, ATOMR_TRIO_NATIVE=0)
  or if their probe answers wrong, `require_kernels` raises `KernelUnavailable` with the reason,
  and the start fails (as a forced kernel path does). CUDA is refused at `EngineConfig.resolve`.
- Steps of many rows (prefill chunks) are compute-bound, and the blocked kernel's per-row
  dequantization would be repeated work there. With bf16 activations on a build that has the
  native bf16 matmul (linear_bf16.cpp), quant_matmul.cpp takes steps of 32 rows or more
  (kPanelRows) through that matmul: it dequantizes the weight to bf16 one panel at a time, in the
  thread that needs it, and runs the matmul's tiles over it, so the weight is read once from its
  blocks and no dequantized copy of it exists. Measured on the default model (2-core Zen 4,
  AVX512-BF16, prefill steps of 2 and 8 prompts of 128 tokens): 1562-1648 and 1677-1698 tok/s,
  against 880-890 and 1245-1588 when the whole weight was dequantized for F.linear each step
  (bf16 weights: 1628-1798). Otherwise (float32 activations, or no native bf16 matmul) steps of
  more than `DEQUANT_ROWS` rows dequantize the weight once into the activations' dtype for
  F.linear, the rows padded to a multiple of `DEQUANT_ROWS` so that F.linear sees few shapes:
  torch's bf16 matmul (oneDNN) keeps state per shape, and a chunk of every length made a
  server's memory grow for as long as it ran.
- An embedding lookup dequantizes only the looked-up rows; a tied lm_head is a `QuantLinear`
  over the same bytes (one copy).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F

from . import native
from .linear import Linear, NativeLinear, NativeSiluMul

log = logging.getLogger(__name__)

# GGML type id -> (name, values per block, bytes per block): the types the kernel takes
KEPT = {8: ("Q8_0", 32, 34), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 12: ("Q4_K", 256, 144)}
DEQUANT_ROWS = 64  # steps with more rows of float32 x (or no native bf16 matmul): F.linear


@dataclass
class QuantizedWeight:
    """One weight matrix as GGUF blocks: `data` [out, row_bytes] uint8 for logical `shape` [out, in]."""

    ggml_type: int
    shape: tuple[int, int]
    data: torch.Tensor

    def __post_init__(self) -> None:
        name, per_block, size = KEPT[self.ggml_type]
        out, k = self.shape
        if k % per_block or tuple(self.data.shape) != (out, k // per_block * size):
            raise ValueError(f"{name} weight of shape {self.shape} cannot be held in bytes {tuple(self.data.shape)}")

    def dim(self) -> int:
        return 2

    @property
    def type_name(self) -> str:
        return KEPT[self.ggml_type][0]

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def rows(self, index: torch.Tensor) -> QuantizedWeight:
        """The rows `index` (a permutation or a selection), as blocks."""
        return QuantizedWeight(self.ggml_type, (len(index), self.shape[1]), self.data[index].contiguous())

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [rows, in] (every row by default), by the native op, else by the gguf package."""
        k = _kernels()
        if k is not None and k.quant_dequantize is not None:
            return k.quant_dequantize(self.data, self.ggml_type, self.shape[1], rows)
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        data = self.data if rows is None else self.data[rows]
        arr = dequantize(data.numpy(), GGMLQuantizationType(self.ggml_type))
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


Weight = torch.Tensor | QuantizedWeight


def from_gguf(ggml_type: int, shape: tuple[int, int], raw: np.ndarray) -> QuantizedWeight:
    """A GGUF tensor's raw bytes (flat uint8) as a QuantizedWeight of logical shape [out, in]."""
    data = torch.from_numpy(np.array(raw, dtype=np.uint8, copy=True)).view(shape[0], -1)
    return QuantizedWeight(ggml_type, shape, data)


def to_float(w: Weight, dtype: torch.dtype) -> torch.Tensor:
    return w.dequantize().to(dtype) if isinstance(w, QuantizedWeight) else w


def permute_rows(w: Weight, index: torch.Tensor) -> Weight:
    return w.rows(index) if isinstance(w, QuantizedWeight) else w[index].contiguous()


def split_rows(w: Weight, sizes: Sequence[int]) -> list[Weight]:
    if not isinstance(w, QuantizedWeight):
        return list(torch.split(w, list(sizes)))
    starts = np.cumsum([0, *sizes])
    return [w.rows(torch.arange(int(a), int(b))) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def cat_rows(ws: Sequence[Weight], dtype: torch.dtype) -> Weight:
    """Row concatenation: blocks stay blocks when all parts share one type, else all go float."""
    first = ws[0]
    if isinstance(first, QuantizedWeight) and all(
            isinstance(w, QuantizedWeight) and w.ggml_type == first.ggml_type for w in ws):
        qs = [w for w in ws if isinstance(w, QuantizedWeight)]
        data = torch.cat([w.data for w in qs])
        return QuantizedWeight(first.ggml_type, (data.shape[0], first.shape[1]), data)
    return torch.cat([to_float(w, dtype) for w in ws])


def make_linear(w: Weight, bias: torch.Tensor | None = None, gate_up: bool = False) -> Linear:
    """A `Linear` over a float weight, or a `QuantLinear` over GGUF blocks."""
    if isinstance(w, QuantizedWeight):
        return QuantLinear(w, bias, gate_up)
    return Linear(w, bias, gate_up)


class QuantLinear(Linear):
    """`Linear`'s interface over a QuantizedWeight (the native kernel layout of `pack_native` and
    oneDNN's `pack` do not apply: the blocks are the layout)."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None, gate_up: bool = False) -> None:
        self.qweight = weight
        self.weight = None
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.gate_up = gate_up
        self.packed = None
        self.panels = None
        self._native = None
        self._native_silu_mul = None
        self._native_argmax = None

    def pack(self) -> None:
        """Nothing to pack: the blocks are the layout."""

    def pack_native(self, linear: NativeLinear, silu_mul: NativeSiluMul, argmax: NativeLinear | None = None) -> bool:
        return True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        w = self.qweight
        if rows.shape[0] > DEQUANT_ROWS and not _in_panels(rows):
            y = _dequantized_linear(rows, w, self.bias)
        else:
            y = _op("quant_linear")(rows, w.data, w.ggml_type, self.in_features, self.bias)
        return y.view(*x.shape[:-1], -1)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        assert self.gate_up and self.bias is None
        rows = x.reshape(-1, self.in_features)
        w = self.qweight
        if rows.shape[0] > DEQUANT_ROWS and not _in_panels(rows):
            gate, up = _dequantized_linear(rows, w, None).chunk(2, dim=-1)
            y = F.silu(gate) * up
        else:
            y = _op("quant_linear_silu_mul")(rows, w.data, w.ggml_type, self.in_features)
        return y.view(*x.shape[:-1], -1)


def _in_panels(rows: torch.Tensor) -> bool:
    """Whether the native op takes these many rows itself: bf16 rows, and a build with the native
    bf16 matmul whose tiles it feeds with dequantized panels (see the module's invariants)."""
    k = _kernels()
    return rows.dtype == torch.bfloat16 and k is not None and k.matmul_isa != ""


def _dequantized_linear(rows: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear over the dequantized weight, its rows padded to a multiple of DEQUANT_ROWS (the
    padding rows are zeros and are cut off). Measured on the default model's GGUF, prefill chunks
    of random lengths: memory grew ~2.7 MB a step, flat with a fixed length."""
    m = rows.shape[0]
    padded = -(-m // DEQUANT_ROWS) * DEQUANT_ROWS
    if padded != m:
        rows = F.pad(rows, (0, 0, 0, padded - m))
    return F.linear(rows, w.dequantize().to(rows.dtype), bias)[:m]


def embedding(ids: torch.Tensor, weight: Weight, dtype: torch.dtype) -> torch.Tensor:
    """F.embedding over a float or a quantized embedding (only the looked-up rows dequantized)."""
    if isinstance(weight, QuantizedWeight):
        flat = ids.reshape(-1)
        return weight.dequantize(flat).to(dtype).view(*ids.shape, -1)
    return F.embedding(ids, weight)


def _op(name: str) -> Callable[..., torch.Tensor]:
    op = getattr(require_kernels(), name)
    assert op is not None
    return op


def _kernels() -> native.Kernels | None:
    return native.kernels() if native.builds_here() else None


def require_kernels() -> native.Kernels:
    """The native kernels with the quantized matmul, probed; KernelUnavailable with the reason if not."""
    return native.require(_probed(), "quantization=gguf needs the native quantized matmul")


@cache
def _probed() -> native.Probed:
    return native.probed(lambda k: k.quant_linear is not None, _probe)


def _probe(k: native.Kernels) -> str | None:
    """Each kept type's kernel on a small random block matrix, float32 and bf16 x, against the gguf
    package's dequantize."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    assert k.quant_linear is not None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 256, generator=g)
    for t, (name, _, _) in KEPT.items():
        data = random_blocks(t, 20, 256, g)
        ref = torch.from_numpy(dequantize(data.numpy(), GGMLQuantizationType(t)).astype(np.float32))
        want = x.double() @ ref.double().T
        got = k.quant_linear(x, data, t, 256, None).double()
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())):
            return f"{name}: wrong answer (off by {float((got - want).abs().max()):.3g})"
        # bf16 x: rounded outputs, and (AVX2 builds, Q4_0 / Q4_1) x in 8-bit blocks; a wrong lane is far off
        for xh in (x.to(torch.bfloat16), x[:1].to(torch.bfloat16)):  # 3 rows, and one (the batch-1 tiles)
            want = xh.double() @ ref.double().T
            off = float((k.quant_linear(xh, data, t, 256, None).double() - want).abs().max())
            if not off <= 2e-2 * float(want.abs().max()):
                return f"{name}, bf16 x ({xh.shape[0]} rows): wrong answer (off by {off:.3g})"
    return None


def random_blocks(ggml_type: int, rows: int, k: int, g: torch.Generator) -> torch.Tensor:
    """[rows, row_bytes] of valid random blocks of `ggml_type` (small, finite half scales)."""
    _, per_block, size = KEPT[ggml_type]
    n = rows * (k // per_block)
    raw = torch.randint(0, 256, (n, size), generator=g, dtype=torch.uint8)
    scale_bytes = 4 if ggml_type in (3, 12) else 2  # Q4_1 and Q4_K lead with two half scales, the others one
    scales = (torch.rand(n, scale_bytes // 2, generator=g) * 0.02 + 0.001).half().view(torch.uint8)
    raw[:, :scale_bytes] = scales.view(n, scale_bytes)
    return raw.view(rows, -1).contiguous()


def describe(linears: Sequence[Linear]) -> str:
    """`Q4_1 x 210, Q8_0 x 1`-style count of the quantized matrices, for the load log line."""
    counts: dict[str, int] = {}
    for lin in linears:
        if isinstance(lin, QuantLinear):
            counts[lin.qweight.type_name] = counts.get(lin.qweight.type_name, 0) + 1
    return ", ".join(f"{n} x {c}" for n, c in sorted(counts.items()))
