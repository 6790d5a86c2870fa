"""Packed weights give the same numbers as the plain ones, at every row count, with and without bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from atomr_trio.model.linear import Linear, can_pack

CPU = torch.device("cpu")


@pytest.mark.skipif(not can_pack(CPU, torch.bfloat16), reason="no oneDNN in this torch build")
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_products_equal_plain_ones(with_bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(320, 192, generator=g).to(torch.bfloat16)
    b = torch.randn(320, generator=g).to(torch.bfloat16) if with_bias else None
    lin = Linear(w, b)
    lin.pack()
    assert lin.packed is not None
    for rows in (1, 2, 5, 16, 64):
        x = torch.randn(rows, 192, generator=g).to(torch.bfloat16)
        assert torch.equal(lin(x), F.linear(x, w, b)), rows


def test_packing_is_for_bf16_on_cpu_only() -> None:
    assert not can_pack(CPU, torch.float32)
    assert not can_pack(torch.device("meta"), torch.bfloat16)
