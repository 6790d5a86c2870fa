"""Linear: one weight matrix of the model and the kernel that multiplies by it.

Fact (2-core AVX2 EPYC, torch 2.13, bf16, the default model's shapes): `F.linear` hands oneDNN a
plain weight, which it re-lays out on every call; a weight packed once into oneDNN's own blocked
layout makes the same product 1.2-2.7x faster from 2 rows on (gate|up at 16 rows: 0.75 -> 0.28
ms), bit-identical. For one row, ATen's GEMV over the plain weight is faster still (see
`cpu_gemv.py`), so the plain weight is kept beside the packed one: the cost is a second copy of
the weight matrices in memory (≈270 MB for the default model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether packed weights are available and measured faster here: bf16 on a oneDNN CPU build."""
    return device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight  # [out, in]
        self.bias = bias
        self.packed: torch.Tensor | None = None  # the same weight in oneDNN's blocked layout

    def pack(self) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.shape[0] > 1:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
