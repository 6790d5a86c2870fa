"""Packed weights give the same numbers as the plain ones, at every row count, with and without bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from atomr_trio.model import cpu_kernels
from atomr_trio.model.linear import Linear


@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_products_equal_plain_ones(with_bias: bool) -> None:
    why = cpu_kernels.unavailable("matmul", "onednn", torch.bfloat16)
    if why:
        pytest.skip(f"onednn kernel path unavailable here: {why}")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(320, 192, generator=g).to(torch.bfloat16)
    b = torch.randn(320, generator=g).to(torch.bfloat16) if with_bias else None
    lin = Linear(w, b)
    lin.pack()
    assert lin.packed is not None
    for rows in (1, 2, 5, 16, 64):
        x = torch.randn(rows, 192, generator=g).to(torch.bfloat16)
        assert torch.equal(lin(x), F.linear(x, w, b)), rows


def test_packed_layouts_are_for_bf16_weights_only() -> None:
    assert cpu_kernels.paths("matmul", torch.float32) == ["torch"]
    for path in ("native", "onednn"):
        assert "bfloat16 weights" in (cpu_kernels.unavailable("matmul", path, torch.float32) or "")
