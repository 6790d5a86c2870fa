"""Weights quantized to int8 on loading (`quantization="int8"`), activations at every step (W8A8).

Why: from 16 rows on, a CPU step is bound by the dot instruction, and the bf16 panel kernel
already runs at ~90% of `vdpbf16ps`'s peak. `vpdpbusd` (AVX512-VNNI) does twice the multiply-adds
per instruction on bytes, and the weight is half bf16's bytes, so batch-1 steps (bound by reading
the weight) gain too. The price is precision: each weight row is rounded to 255 levels, each
group of 64 activations too, so greedy tokens are a quality check against the float model (first-token
agreement, logprob gap), not identity. vLLM's W8A8 int8 checkpoints compute the same way; here
any float checkpoint (HF directory or GGUF, dequantized first) is quantized on loading.

The rule (csrc/linear_int8.cpp computes it; `reference_linear` restates it in torch for tests):
- weight row n: sw[n] = max |W[n, :]| / 127, qw = round(W / sw) in -127..127 (per output channel);
- activations, at each matmul, per row m and group g of GROUP consecutive inputs (the last may be
  shorter): sx[m, g] = max |x[m, g]| / 127, qx = round(x * (127 / max |x[m, g]|)), float32, to
  nearest even;
- y[m, n] = sw[n] * sum_g sx[m, g] * sum_{k in g} qx qw (each group's sum exact in int32) + bias[n],
  rounded once to x's dtype.
Groups rather than whole activation rows because a row's few large values would leave the rest
a handful of levels. The same weights simulated in transformers (float32, 8 prompts against
the float model: first tokens, worst top-5 logprob gap): per-row scales 6/8 and 0.93, groups of
64 8/8 and 0.47, groups of 32 8/8 and 0.36 (for a third more work in the kernel). This engine
with groups of 64 on the default model: 7/8 and 0.50 with bf16 activations, 8/8 and 0.45 with
float32 ones.

Measured (2-core Zen 4, AVX512-VNNI, every matrix of the default model's layers and its lm_head
streamed, 2 threads, against the bf16 panel kernel): 1 row 1.8x, 16 rows 1.5x, 64 rows 1.45x,
256 rows 1.45x faster; whole decode steps (benchmarks/profile_step.py) batch 1 7.5 -> 6.0 ms,
batch 16 17.5 -> 12.8 ms, batch 64 56.5 -> 45.7 ms.

Invariants:
- Every `Linear` of the model (attention q|k|v and o, the MLP's and MoE experts', the lm_head;
  not the embedding, norms or an MoE router, which picks the experts) is packed by `pack_int8`
  into one uint8 tensor (`Linear.use_int8`), its float weight dropped: 1 byte per weight plus 4
  per output. Packing goes a few panels at a time, so its float temporaries stay small.
- The native kernels are required (any x86-64 or 64-bit Arm build: AVX512-VNNI where the -march has it, AVX2's
  `vpmaddubsw` where it has that (the same exact sums; built for Haswell, decode steps of the
  default model: batch 1 4.5-6.4 ms against bf16's 8.7-9.8 ms, batch 16 26-29 ms against 36-38,
  batch 64 97 ms against 103-114), plain C++ loops elsewhere: the same arithmetic, slow beyond
  one row; the load log warns). Without them, or if the probe
  answers wrong, the start fails with `KernelUnavailable` and the reason. CUDA is refused at
  `EngineConfig.resolve`.
"""

from __future__ import annotations

import logging
from functools import cache

import torch
import torch.nn.functional as F

from . import native
from .linear import COLS, PANEL, gate_up_rows

log = logging.getLogger(__name__)

GROUP = 64  # inputs per activation scale (linear_int8.cpp's kGroup)
PACK_ROWS = 4096  # weight rows quantized at once by pack_int8


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, K] float -> (int8 [rows, K], float32 scales [rows]): symmetric per row, max |w| -> 127
    (a row of zeros: scale 0, all zeros)."""
    w = w.float()
    scale = w.abs().amax(dim=1) / 127
    q = torch.round(w / torch.where(scale > 0, scale, 1)[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's rule for activations, in torch: (qx int32 [M, K], sx float32 [M, groups]), each
    row's groups of GROUP inputs scaled on their own (the last one may be shorter)."""
    x = x.float()
    m, k = x.shape
    groups = -(-k // GROUP)
    padded = F.pad(x, (0, groups * GROUP - k)).view(m, groups, GROUP)
    amax = padded.abs().amax(dim=2)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    q = torch.round(padded * inv[:, :, None]).clamp(-127, 127).to(torch.int32)
    return q.view(m, -1)[:, :k], amax / 127


def reference_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float64 [M, N]: what int8_linear computes for x [M, K] and the float weight w [N, K], summed exactly."""
    qx, sx = quantize_activations(x)
    qw, sw = quantize_weight(w)
    y = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float64)
    for g in range(sx.shape[1]):
        part = slice(g * GROUP, (g + 1) * GROUP)
        y += (qx[:, part].double() @ qw[:, part].double().T) * sx[:, g].double()[:, None]
    y *= sw.double()[None, :]
    return y if bias is None else y + bias.double()


def pack_int8(weight: torch.Tensor, gate_up: bool = False) -> torch.Tensor:
    """[out, in] float -> linear_int8.cpp's packed uint8 tensor: qw + 128 in panels of 3 blocks of
    16 columns (gate|up stacked weights: 2 blocks, 16 gate columns then the same 16 up columns),
    then the per-column scales, in packed column order."""
    n, k = weight.shape
    if k % 4:
        raise ValueError(f"the int8 matmul takes inputs in fours; this weight has {k}")
    rows, width = (gate_up_rows(weight), 2 * COLS) if gate_up else (weight, PANEL * COLS)
    panels = -(-rows.shape[0] // width)
    cols = panels * width
    out = torch.empty(cols * k + cols * 4, dtype=torch.uint8)
    quads = out[: cols * k].view(panels, k // 4, width, 4)
    scales = out[cols * k :].view(torch.float32)
    step = max(1, PACK_ROWS // width)  # panels at a time: the float temporaries stay a few MB
    for p0 in range(0, panels, step):
        p1 = min(panels, p0 + step)
        part = rows[p0 * width : p1 * width]
        part = F.pad(part, (0, 0, 0, (p1 - p0) * width - part.shape[0]))  # the last panel's padding columns
        q, scale = quantize_weight(part)
        unsigned = (q.to(torch.int16) + 128).to(torch.uint8)
        quads[p0:p1] = unsigned.view(p1 - p0, width, k // 4, 4).permute(0, 2, 1, 3)
        scales[p0 * width : p1 * width] = scale
    return out


def require_kernels() -> native.Kernels:
    """The native kernels with the int8 matmul, probed; KernelUnavailable with the reason if not."""
    return native.require(_probed(), "quantization=int8 needs the native int8 matmul")


@cache
def _probed() -> native.Probed:
    k, why = native.probed(lambda k: k.int8_linear is not None, _probe)
    if k is not None and why is None and k.int8_isa == "portable":
        log.warning("the int8 matmul runs plain C++ loops here (built without AVX512-VNNI or AVX2): "
                    "expect it slower than bf16")
    return k, why


def _probe(k: native.Kernels) -> str | None:
    """int8_linear and its silu_mul on a small random matrix against `reference_linear`."""
    assert k.int8_linear is not None and k.int8_linear_silu_mul is not None
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 200, generator=g), torch.randn(40, 200, generator=g)  # 2 tiles of rows, 4 groups
    want = reference_linear(x, w)
    got = k.int8_linear(x, pack_int8(w), 40, None).double()
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())):
        return f"wrong answer (off by {float((got - want).abs().max()):.3g})"
    gate, up = want.chunk(2, dim=1)
    want = F.silu(gate) * up
    got = k.int8_linear_silu_mul(x, pack_int8(w, gate_up=True), 20).double()
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())):
        return f"silu_mul: wrong answer (off by {float((got - want).abs().max()):.3g})"
    return None
