"""The Triton paged decode attention kernel (model/triton_attention.py), compared with a
plain-torch reference written here (each row's positions gathered through its block table, GQA by
repeat_interleave, the window and the soft cap, softmax in float64) and with `table_decode_torch`,
the op it replaces. Without a GPU the kernels run on CPU tensors through Triton's interpreter
(TRITON_INTERPRET=1, set before Triton is imported and before the kernels are built); where torch
sees CUDA they compile and run for real. Cases: GQA 9/3 heads D=64 and 4/1 heads D=128 (and
D=80, 96, 256, padded), ragged context lengths over shuffled blocks, windows, soft caps, bf16 and
float32 caches, the split (flash-decoding) path, padding rows, NaN in every slot a row may not
read (its window's past included), and `out=` written in place."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from atomr_trio.model import triton_attention as ta
from atomr_trio.model.attention import table_decode_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _import_triton() -> None:
    """Import Triton; on CPU with TRITON_INTERPRET=1, since triton.language's own jit functions
    (tl.cdiv, tl.max, ...) take their interpreter form at import. The variable is restored after
    (each test sets it again for the build of our kernels)."""
    if DEVICE == "cuda":
        pytest.importorskip("triton.language", reason="Triton is not installed: the kernel cannot run")
        return
    before = os.environ.get("TRITON_INTERPRET")
    fresh = "triton" not in sys.modules
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        tl = pytest.importorskip("triton.language", reason="Triton is not installed: the kernel cannot run")
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = before
    if not fresh and type(tl.cdiv).__name__ != "InterpretedFunction":
        pytest.skip("Triton was imported before without TRITON_INTERPRET=1: its interpreter cannot run here",
                    allow_module_level=True)


_import_triton()


@pytest.fixture(autouse=True)
def interpreter(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """On CPU, build the kernels under Triton's interpreter and drop them afterwards, so a later
    CUDA build in the same process compiles for real."""
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        ta._kernels.cache_clear()
    yield
    if DEVICE == "cpu":
        ta._kernels.cache_clear()
    ta._scratch.clear()


def _case(lens: list[int], H: int, KVH: int, D: int, bs: int, dtype: torch.dtype, seed: int = 0,
          window: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, kv, block_table, ctx_lens) on DEVICE: shuffled blocks; every slot no row may read is
    NaN (spare blocks, positions before a row's window, the rest of its last block), and table
    columns past each context point at a NaN block."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // bs) for n in lens]
    blocks = sum(need) + 3  # spare blocks: never read, NaN
    kv = torch.full((2, KVH, blocks * bs, D), float("nan"))
    perm = torch.randperm(blocks, generator=g).tolist()
    width = max(max(need), 1) + 1
    table = torch.full((len(lens), width), perm[-1], dtype=torch.int32)  # past the context: a NaN block
    at = 0
    for i, (n, k) in enumerate(zip(lens, need, strict=True)):
        table[i, :k] = torch.tensor(perm[at : at + k], dtype=torch.int32)
        at += k
        first = 0 if window is None else max(0, n - window)
        for p in range(first, n):  # only the slots of visible positions hold data
            slot = perm[at - k + p // bs] * bs + p % bs
            kv[:, :, slot] = torch.randn(2, KVH, D, generator=g)
    q = torch.randn(len(lens), H, D, generator=g).to(dtype)
    ctx = torch.tensor(lens, dtype=torch.int32)
    return q.to(DEVICE), kv.to(dtype).to(DEVICE), table.to(DEVICE), ctx.to(DEVICE)


def _reference(q: torch.Tensor, kv: torch.Tensor, table: torch.Tensor, lens: torch.Tensor, bs: int, scale: float,
               window: int | None, softcap: float | None) -> torch.Tensor:
    """Row by row in float64 on the CPU: gather the visible positions, repeat KV heads, softmax."""
    q, kv, table, lens = q.cpu(), kv.cpu(), table.cpu(), lens.cpu()
    n, H, D = q.shape
    g = H // kv.shape[1]
    out = torch.zeros(n, H, D, dtype=torch.float64)
    for i, length in enumerate(lens.tolist()):
        first = 0 if window is None else max(0, length - window)
        pos = torch.arange(first, length)
        if len(pos) == 0:
            continue
        slots = table[i].long()[pos // bs] * bs + pos % bs
        k = kv[0][:, slots].double().repeat_interleave(g, dim=0)  # [H, L, D]
        v = kv[1][:, slots].double().repeat_interleave(g, dim=0)
        s = torch.einsum("hd,hld->hl", q[i].double(), k) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        out[i] = torch.einsum("hl,hld->hd", torch.softmax(s, dim=-1), v)
    return out


CASES = [  # (H, KVH, D, block_size, lens)
    (9, 3, 64, 16, [1, 17, 40, 5]),
    (4, 1, 128, 8, [13, 1, 30]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,softcap", [(None, None), (6, None), (None, 20.0), (9, 5.0)])
@pytest.mark.parametrize("H,KVH,D,bs,lens", CASES)
def test_the_kernel_matches_the_reference(H: int, KVH: int, D: int, bs: int, lens: list[int],
                                          window: int | None, softcap: float | None, dtype: torch.dtype) -> None:
    q, kv, table, ctx = _case(lens, H, KVH, D, bs, dtype, window=window)
    got = ta.paged_decode_attention(q, kv, table, ctx, bs, D**-0.5, window, softcap)
    assert got.dtype == dtype and got.shape == q.shape
    assert not got.isnan().any()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    want = _reference(q, kv, table, ctx, bs, D**-0.5, window, softcap)
    torch.testing.assert_close(got.double().cpu(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("window,softcap,dtype", [(None, None, torch.float32), (100, None, torch.float32),
                                                  (None, 10.0, torch.bfloat16)])
def test_the_split_path_matches_the_reference(monkeypatch: pytest.MonkeyPatch, window: int | None,
                                              softcap: float | None, dtype: torch.dtype) -> None:
    """Long contexts split over several programs (flash-decoding), some splits empty."""
    monkeypatch.setattr(ta, "num_splits", lambda n, kvh, capacity: 3)
    lens = [300, 1, 0, 65]
    q, kv, table, ctx = _case(lens, 6, 2, 64, 16, dtype, seed=1, window=window)
    got = ta.paged_decode_attention(q, kv, table, ctx, 16, 0.125, window, softcap)
    want = _reference(q, kv, table, ctx, 16, 0.125, window, softcap)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double().cpu(), want, atol=tol, rtol=tol)
    assert torch.equal(got[2], torch.zeros_like(got[2]))


@pytest.mark.parametrize("D", [80, 96, 256])
def test_head_sizes_are_padded_to_a_power_of_two(D: int) -> None:
    q, kv, table, ctx = _case([7, 20], 4, 2, D, 8, torch.float32, seed=2)
    got = ta.paged_decode_attention(q, kv, table, ctx, 8, D**-0.5)
    torch.testing.assert_close(got.double().cpu(), _reference(q, kv, table, ctx, 8, D**-0.5, None, None),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_it_agrees_with_the_engines_torch_op(seed: int) -> None:
    """Random shapes and lengths against `table_decode_torch`, the op this kernel replaces."""
    g = torch.Generator().manual_seed(seed)
    KVH, G = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
    bs = int(torch.randint(1, 9, (1,), generator=g))
    lens = torch.randint(0, 50, (5,), generator=g).tolist()
    window = [None, 1, 11][seed]
    softcap = [None, 30.0, 3.0][seed]
    q, kv, table, ctx = _case(lens, KVH * G, KVH, 32, bs, torch.float32, seed=seed, window=window)
    got = ta.paged_decode_attention(q, kv, table, ctx, bs, 0.2, window, softcap)
    want = table_decode_torch(q, kv, table, ctx, bs, 0.2, window, softcap)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_padding_rows_get_zeros_and_read_nothing() -> None:
    q, kv, table, ctx = _case([0, 9, 0], 9, 3, 64, 16, torch.float32, seed=3)
    got = ta.paged_decode_attention(q, kv, table, ctx, 16, 0.125)
    assert torch.equal(got[0], torch.zeros_like(got[0])) and torch.equal(got[2], torch.zeros_like(got[2]))
    torch.testing.assert_close(got.double().cpu(), _reference(q, kv, table, ctx, 16, 0.125, None, None),
                               atol=1e-5, rtol=1e-5)


def test_out_is_written_in_place_and_returned() -> None:
    q, kv, table, ctx = _case([5, 12], 9, 3, 64, 16, torch.float32, seed=4)
    out = torch.full_like(q, 7.0)
    got = ta.paged_decode_attention(q, kv, table, ctx, 16, 0.125, out=out)
    assert got is out
    torch.testing.assert_close(out.double().cpu(), _reference(q, kv, table, ctx, 16, 0.125, None, None),
                               atol=1e-5, rtol=1e-5)


def test_the_split_count_depends_on_shapes_only() -> None:
    assert ta.num_splits(256, 8, 1 << 15) == 1  # many rows fill the GPU already
    assert ta.num_splits(1, 3, 4096) == ta.MAX_SPLITS  # one long row: split
    assert ta.num_splits(1, 3, 128) == 1  # a short table is not worth splitting


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU run of the engine's graph path (tests/test_cuda.py covers CUDA)")
@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_the_engines_decode_steps_through_the_kernel_match_eager_ones(arch: str, tmp_path: Any) -> None:
    """The kernel as the engine calls it: decode steps replayed through DecodeGraphs' static
    buffers (padded rows, scratch slot) and eager ones through block tables give the tokens and
    logprobs of the engine's own CPU path (Gemma 2: sliding windows and soft-capping)."""
    from test_gpu_path import _context, _drive
    from test_hf_dir import write_tiny_model

    from atomr_trio.executor.cuda_graphs import DecodeGraphs, capture_sizes
    from atomr_trio.model_source import ModelSource

    write_tiny_model(tmp_path, arch, seed=3)
    source = ModelSource.open(str(tmp_path))
    prompts = [[(7 * i + 3 * j) % 250 + 3 for j in range(5 + 7 * i)] for i in range(5)]
    want = _drive(_context(source).runner, prompts, steps=12)
    for graphs in (True, False):
        runner = _context(source).runner
        runner.table_op = ta.paged_decode_attention
        if graphs:
            runner.graphs = DecodeGraphs(runner.model, runner.kv_cache, 8, ta.paged_decode_attention,
                                         capture_sizes(8), max_blocks=32, scratch_slot=63 * 8, cuda=False)
        got = _drive(runner, prompts, steps=12)
        assert [[t for t, _ in g] for g in got] == [[t for t, _ in w] for w in want]
        assert max(abs(a[1] - b[1]) for g, w in zip(got, want, strict=True)
                   for a, b in zip(g, w, strict=True)) < 1e-4
