"""The native decode attention (model/native.py): exact enough, safe on bad input, optional."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from atomr_trio.model import native
from atomr_trio.model.attention import AttentionMetadata, PrefillChunk, paged_attention

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler here")


def _op() -> native.DecodeAttention:
    op = native.decode_attention()
    assert op is not None, "g++ is here, so the kernel must build and load"
    return op


def _paged_case(nd: int, L: int, kvh: int, group: int, d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    bs = 16
    nb = -(-L // bs)
    slots_total = (nd * nb + 4) * bs
    kv = torch.randn(2, kvh, slots_total, d, generator=g).to(dtype)
    table = torch.randperm(nd * nb + 4, generator=g)[: nd * nb].view(nd, nb)
    pos = torch.arange(L)
    slots = (table[:, pos // bs] * bs + pos % bs).reshape(-1)
    lens = torch.randint(1, L + 1, (nd,), generator=g)
    lens[0] = L
    q = torch.randn(nd, kvh * group, d, generator=g).to(dtype)
    return q, kv, slots, lens


def _exact(q, kv, slots, lens):
    """float64 attention of each query over its own context."""
    nd, H, D = q.shape
    kvh = kv.shape[1]
    L = slots.numel() // nd
    out = torch.empty(nd, H, D, dtype=torch.float64)
    for n in range(nd):
        s = slots.view(nd, L)[n, : lens[n]]
        k = kv[0][:, s].double().repeat_interleave(H // kvh, dim=0)  # [H, len, D]
        v = kv[1][:, s].double().repeat_interleave(H // kvh, dim=0)
        p = torch.softmax((q[n].double().unsqueeze(1) @ k.transpose(1, 2)) * D**-0.5, dim=-1)
        out[n] = (p @ v).squeeze(1)
    return out


@needs_compiler
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("nd,L,kvh,group,d", [(1, 40, 3, 3, 64), (7, 70, 2, 4, 32), (5, 33, 1, 1, 128)])
def test_kernel_matches_exact_attention(dtype, tol, nd, L, kvh, group, d):
    q, kv, slots, lens = _paged_case(nd, L, kvh, group, d, dtype)
    out = _op()(q, kv, slots, lens, d**-0.5)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), _exact(q, kv, slots, lens), rtol=tol, atol=tol)


@needs_compiler
def test_kernel_and_torch_path_agree_in_a_mixed_batch():
    """Decodes through the kernel, then a prefill chunk: the layer output matches the torch path."""
    torch.manual_seed(1)
    H, kvh, D, bs = 9, 3, 64, 16
    kv = torch.randn(2, kvh, 64 * bs, D)
    ctx = [20, 37, 5]
    tables = [list(range(i * 4, i * 4 + 4)) for i in range(3)]
    L = max(ctx)
    slots = torch.tensor([tables[i][p // bs] * bs + p % bs for i in range(3) for p in range(L)])
    lens = torch.tensor(ctx)
    new_slots = torch.tensor([tables[i][(c - 1) // bs] * bs + (c - 1) % bs for i, c in enumerate(ctx)])
    chunk_slots = torch.arange(40 * bs, 40 * bs + 6)  # a 6-token prompt chunk, no prior context
    T = 3 + 6
    q, k, v = torch.randn(T, H, D), torch.randn(T, kvh, D), torch.randn(T, kvh, D)
    bias = torch.zeros(1, 3, 1, L)
    bias.masked_fill_((torch.arange(L).unsqueeze(0) >= lens.unsqueeze(1)).view(1, 3, 1, L), float("-inf"))

    def meta(op):
        return AttentionMetadata(torch.cat([new_slots, chunk_slots]), 3, slots, bias,
                                 [PrefillChunk(3, 6, None, None)], lens, op)

    want = paged_attention(q, k, v, kv.clone(), meta(None))
    got = paged_attention(q, k, v, kv.clone(), meta(_op()))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_compiler
def test_a_slot_outside_the_cache_is_an_error_not_a_crash():
    q, kv, slots, lens = _paged_case(2, 20, 3, 3, 64, torch.float32)
    bad = slots.clone()
    bad[5] = kv.shape[2]  # one past the last slot
    with pytest.raises(RuntimeError, match="outside the cache"):
        _op()(q, kv, bad, lens, 0.125)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        _op()(q.half(), kv.half(), slots, lens, 0.125)


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("ATOMR_TRIO_NATIVE", "0")
    assert native._load() is None


def test_a_failed_build_falls_back_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("ATOMR_TRIO_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with caplog.at_level(logging.WARNING, logger="atomr_trio.model.native"):
        assert native._load() is None
    assert "unavailable" in caplog.text
    assert not list(tmp_path.rglob("*.so"))
