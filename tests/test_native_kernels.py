"""The native CPU kernels (model/native.py): as exact as the torch path, safe on bad input, optional."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from test_int8 import assert_tests_pass_on_build, skip_unless_host_runs

from atomr_trio.model import native
from atomr_trio.model.attention import AttentionMetadata, PrefillChunk, paged_attention
from atomr_trio.model.llama import _rope

needs_compiler = pytest.mark.skipif(  # elsewhere a failed build or probe is a bug: the tests fail
    shutil.which("g++") is None or not native.builds_here(),
    reason="native kernel path unavailable here: " + ("the kernels build for x86-64 and 64-bit Arm only"
                                                      if not native.builds_here() else "no C++ compiler (g++)"))


def _kernels() -> native.Kernels:
    k = native.kernels()
    assert k is not None, "g++ is here on a CPU the kernels build for, so they must build and load"
    return k


def _op() -> native.DecodeAttention:
    return _kernels().decode_attention


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
@pytest.mark.parametrize(  # bf16 with head size 64 / 128 takes the AVX512-BF16 path where the CPU has it
    "nd,L,kvh,group,d",
    [(1, 40, 3, 3, 64), (7, 70, 2, 4, 32), (5, 33, 1, 1, 128), (3, 17, 1, 8, 64), (2, 300, 2, 2, 128),
     # each group size's passes over the values in the AVX2 / NEON kernel (value_columns), D = 128 too
     (2, 45, 2, 4, 128), (3, 29, 1, 5, 64), (2, 23, 1, 6, 128), (2, 57, 1, 7, 64), (3, 40, 2, 3, 128),
     (2, 9, 1, 8, 128), (4, 8, 1, 2, 64)],
)
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
    # bf16 (the AVX512-BF16 kernel asks for the rows of the units one and two ahead): a bad slot in
    # any sequence, first, middle or last of a thread's run, is refused before anything reads it
    q, kv, slots, lens = _paged_case(5, 20, 3, 3, 64, torch.bfloat16)
    lens[:] = 20
    for seq in range(5):
        bad = slots.clone()
        bad[seq * 20 + 3] = kv.shape[2] + 10**9  # far outside: a read there would crash, not return
        with pytest.raises(RuntimeError, match="outside the cache"):
            _op()(q, kv, bad, lens, 0.125)


def _exact_prefill(q, kv, slots, scale, window=None, softcap=None):
    """float64 causal attention of Q queries at positions C - Q .. C - 1 over the C cached ones."""
    Q, H, _ = q.shape
    kvh, C = kv.shape[1], slots.numel()
    k = kv[0][:, slots].double().repeat_interleave(H // kvh, dim=0)  # [H, C, D]
    v = kv[1][:, slots].double().repeat_interleave(H // kvh, dim=0)
    s = (q.double().transpose(0, 1) @ k.transpose(1, 2)) * scale  # [H, Q, C]
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    qpos, kpos = torch.arange(C - Q, C).unsqueeze(1), torch.arange(C).unsqueeze(0)
    visible = kpos <= qpos
    if window:
        visible &= kpos > qpos - window
    return (torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1) @ v).transpose(0, 1)


def _prefill_op() -> native.PrefillAttention | None:
    """The bf16 prefill kernel; None exactly where the build has no bf16 matmul either (none of
    AVX512-BF16, AVX2 + FMA and NEON): both are built for the same vector ISA (asserted)."""
    k = _kernels()
    assert torch.ops.atomr_trio.prefill_attention_isa() == k.matmul_isa, "the prefill kernel and the matmul disagree"
    if k.prefill_attention is None:
        with pytest.raises(RuntimeError, match="needs AVX512-BF16"):
            torch.ops.atomr_trio.prefill_attention(torch.zeros(1, 1, 64, dtype=torch.bfloat16),
                                                   torch.zeros(2, 1, 1, 64, dtype=torch.bfloat16),
                                                   torch.zeros(1, dtype=torch.long), 0.125)
    return k.prefill_attention


@needs_compiler
@pytest.mark.parametrize(  # (queries, context, kv heads, group, head size, window, softcap): tile edges at 16
    "Q,C,kvh,group,d,window,softcap",
    [(1, 1, 1, 1, 64, None, None), (15, 15, 3, 3, 64, None, None), (16, 16, 2, 4, 64, None, None),
     (17, 17, 3, 3, 64, None, None), (128, 128, 3, 3, 64, None, None), (21, 37, 3, 3, 64, None, None),
     (1, 50, 1, 8, 128, None, None), (33, 70, 2, 5, 128, None, None), (40, 90, 1, 2, 64, 17, None),
     (30, 30, 2, 2, 64, None, 20.0), (9, 9, 1, 7, 64, 4, 30.0),
     # group sizes whose rows end mid-tile (G = 6 only on NEON's 5-row tiles), D = 128 with each, a long
     # cached prefix, windows at block edges
     (20, 52, 1, 6, 64, None, None), (19, 45, 2, 6, 128, None, None), (48, 48, 2, 3, 128, None, None),
     (16, 100, 1, 4, 128, None, None), (23, 23, 4, 1, 128, None, None), (21, 40, 1, 1, 64, None, None),
     (25, 61, 2, 2, 128, 20, None), (9, 40, 1, 7, 128, 6, 30.0), (5, 1000, 1, 3, 64, None, None),
     (3, 517, 2, 4, 128, None, 50.0), (37, 301, 1, 3, 64, 100, None), (17, 40, 1, 3, 64, 1, None),
     (10, 100, 1, 3, 64, 64, None), (33, 80, 1, 2, 64, 16, None), (33, 80, 1, 2, 64, 15, None),
     (21, 37, 3, 3, 64, None, 20.0),
     # past 32 MiB of laid-out keys (each unit lays out its own, as with a window)
     (2, 16400, 8, 1, 128, None, None)],
)
def test_prefill_kernel_matches_exact_attention(Q, C, kvh, group, d, window, softcap):
    """bf16 prefill attention over cached keys, causal (with a prefix already cached, a window,
    soft-capping), against float64; the queries a strided view as the model passes them."""
    op = _prefill_op()
    if op is None:
        return
    g = torch.Generator().manual_seed(Q * 1000 + C)
    kv = torch.randn(2, kvh, C + 40, d, generator=g).to(torch.bfloat16)
    slots = torch.randperm(C + 40, generator=g)[:C]
    qk = torch.randn(Q, kvh * group + kvh, d, generator=g).to(torch.bfloat16)  # q and k rows, as rope_store_kv
    q = qk[:, : kvh * group]
    out = op(q, kv, slots, d**-0.5, window, softcap)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    want = _exact_prefill(q, kv, slots, d**-0.5, window, softcap)
    torch.testing.assert_close(out.double(), want, rtol=1e-2, atol=1e-2)
    # over a long context the outputs are small: a dropped or mis-rescaled key block shows here
    assert (out.double() - want).norm() <= 1e-2 * want.norm()


@needs_compiler
def test_prefill_kernel_in_a_mixed_batch_agrees_with_the_torch_path():
    """Decodes, a fresh prompt chunk and a chunk after a cached prefix, through paged_attention
    with the prefill kernel and without it (torch's SDPA), bf16: the same layer output to bf16
    rounding; a bad slot is an error, not a read outside the cache."""
    op = _prefill_op()
    if op is None:
        return
    g = torch.Generator().manual_seed(3)
    H, kvh, D = 9, 3, 64
    kv = torch.randn(2, kvh, 400, D, generator=g).to(torch.bfloat16)
    lens = torch.tensor([20, 37])
    dslots = torch.randperm(400, generator=g)[:74].view(2, 37)
    fresh = torch.arange(300, 306)  # a 6-token prompt, no prior context
    prefix = torch.randperm(250, generator=g)[:60]  # 60 positions, the last 25 new
    slot_mapping = torch.cat([dslots[0, 19:20], dslots[1, 36:37], fresh, prefix[35:]])
    T = 2 + 6 + 25
    q = torch.randn(T, H, D, generator=g).to(torch.bfloat16)
    mask = torch.arange(60).unsqueeze(0) <= torch.arange(35, 60).unsqueeze(1)

    def meta(prefill_op):
        return AttentionMetadata(slot_mapping, 2, dslots.reshape(-1), None,
                                 [PrefillChunk(2, 6, None, None), PrefillChunk(8, 25, prefix, mask)], lens,
                                 _op(), prefill_op=prefill_op)

    got = paged_attention(q, q[:, :kvh], q[:, :kvh], kv.clone(), meta(op))
    want = paged_attention(q, q[:, :kvh], q[:, :kvh], kv.clone(), meta(None))
    torch.testing.assert_close(got.double(), want.double(), rtol=2e-2, atol=2e-2)
    with pytest.raises(RuntimeError, match="outside the cache"):
        op(q[:6], kv, torch.tensor([0, 1, 2, 3, 4, 400]), 0.125)
    with pytest.raises(RuntimeError, match="bfloat16 only"):
        op(q[:6].float(), kv.float(), fresh, 0.125)


@needs_compiler
@pytest.mark.parametrize("rows", [1, 16, 130])
def test_add_rms_norm_adds_in_place_and_normalizes_like_transformers(rows):
    g = torch.Generator().manual_seed(rows)
    h, delta = torch.randn(rows, 576, generator=g), torch.randn(rows, 576, generator=g)
    w = torch.randn(576, generator=g) * 0.1 + 1
    for dtype in (torch.bfloat16, torch.float32):
        hb, db, wb = h.to(dtype), delta.to(dtype), w.to(dtype)
        summed = hb + db
        got_h = hb.clone()
        x = _kernels().add_rms_norm_(got_h, db, wb, 1e-5)
        assert torch.equal(got_h, summed)  # the residual, rounded as torch rounds it
        # transformers' LlamaRMSNorm: normalize in float32, round to the dtype, then scale
        f = summed.float()
        want = (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype) * wb
        if dtype == torch.bfloat16:
            assert torch.equal(x, want)
        else:
            torch.testing.assert_close(x, want, rtol=1e-6, atol=1e-6)
        untouched = summed.clone()
        assert torch.equal(_kernels().add_rms_norm_(untouched, None, wb, 1e-5), x)  # no delta: norm only
        assert torch.equal(untouched, summed)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_store_kv_matches_the_torch_path(dtype):
    g = torch.Generator().manual_seed(3)
    nq, nkv, D, T = 9, 3, 64, 11
    qkv = torch.randn(T, (nq + 2 * nkv) * D, generator=g).to(dtype)
    positions = torch.randint(0, 200, (T,), generator=g)
    cos, sin = torch.randn(256, D, generator=g).to(dtype), torch.randn(256, D, generator=g).to(dtype)
    slots = torch.randperm(300, generator=g)[:T]
    want_kv, got_kv = torch.zeros(2, nkv, 300, D, dtype=dtype), torch.zeros(2, nkv, 300, D, dtype=dtype)
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    want = _rope(qkv[:, : (nq + nkv) * D].view(T, nq + nkv, D), c, s)
    want_kv[0].index_copy_(1, slots, want[:, nq:].transpose(0, 1))
    want_kv[1].index_copy_(1, slots, qkv[:, (nq + nkv) * D :].view(T, nkv, D).transpose(0, 1))
    got = _kernels().rope_store_kv(qkv, positions, cos, sin, got_kv, slots, nq, nkv)
    if dtype == torch.bfloat16:  # every product and sum rounded where torch rounds it
        assert torch.equal(got, want) and torch.equal(got_kv, want_kv)
    else:  # float32: the compiler may fuse a multiply-add (one rounding fewer)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_kv, want_kv, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="outside the cache"):
        _kernels().rope_store_kv(qkv, positions, cos, sin, got_kv, slots + 300, nq, nkv)
    with pytest.raises(RuntimeError, match="outside the rope tables"):
        _kernels().rope_store_kv(qkv, positions + 256, cos, sin, got_kv, slots, nq, nkv)


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


@needs_compiler
@pytest.mark.slow
def test_the_haswell_build_passes_the_kernel_tests():
    """The kernels built for an AVX2-only CPU (ATOMR_TRIO_NATIVE_ARCH=haswell: no AVX-512, so
    bf16 attention takes its AVX2 + FMA version) pass this file's tests too, and a decode step's
    layers in one native call give the Python loop's tokens there as well (test_decode_layers.py),
    in a subprocess whose library is a second cached build (skipped where this machine's own build
    takes the same branches: the tests above ran on it)."""
    skip_unless_host_runs("haswell")
    here = Path(__file__)
    tests = [str(here), f"{here.with_name('test_gemma.py')}::test_native_decode_window",
             str(here.with_name("test_decode_layers.py"))]
    assert_tests_pass_on_build("haswell", tests, "not haswell", timeout=500)


def test_an_empty_arch_variable_builds_for_this_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ATOMR_TRIO_NATIVE_ARCH= cmd` (set but empty) is the default, this CPU, not `-march=`
    (which fails to build, leaving every kernel unavailable)."""
    monkeypatch.setenv("ATOMR_TRIO_NATIVE_ARCH", "")
    assert native.march() == "native"
    monkeypatch.setenv("ATOMR_TRIO_NATIVE_ARCH", "haswell")
    assert native.march() == "haswell"
    monkeypatch.delenv("ATOMR_TRIO_NATIVE_ARCH")
    assert native.march() == "native"
