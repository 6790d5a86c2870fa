"""The ModelRunner on the tiny model, fast enough for `make test-fast`: a prompt computed in
chunks gives the same logits and greedy tokens as one unchunked prefill, and a batch mixing
decodes, a first chunk and a later chunk gives each sequence what it gets alone, and decode steps
give what one prefill of the same tokens gives. Both with the
native CPU kernels (when they load) and on the plain torch path."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from atomr_trio.async_llm import engine_config
from atomr_trio.executor.context import Context
from atomr_trio.executor.model_runner import BatchItem, StepBatch
from atomr_trio.executor.sampler import Sampler, SampleRow
from atomr_trio.model import native
from atomr_trio.model_source import ModelSource
from atomr_trio.sampling_params import SamplingParams

BS = 4  # small blocks, so chunks start inside blocks and cross block boundaries
GREEDY = SamplingParams(temperature=0)


class RecordingSampler:
    """The context's sampler, keeping the logits it was given."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.logits: torch.Tensor | None = None

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> Any:
        self.logits = logits.clone()
        return self.sampler(logits, rows)

    def takes_argmax(self, rows: list[SampleRow]) -> bool:
        return False  # every step through logits, which it records


class Runner:
    """A Context with fresh blocks handed out per sequence, and a step that returns
    {seq_id: (greedy token, logits)} for the sequences it sampled."""

    def __init__(self, source: ModelSource, use_native: bool) -> None:
        cfg = engine_config(dtype="float32", block_size=BS, num_kv_blocks=256, max_model_len=256,
                            torch_threads=1).resolve(source.config)
        self.ctx = Context(source, cfg)
        model = self.ctx.runner.model
        if use_native and model.native is None:
            pytest.skip("the native CPU kernels are not available here")
        if not use_native:
            model.native = None
        self.recorder = RecordingSampler(self.ctx.runner.sampler)
        self.ctx.runner.sampler = self.recorder  # type: ignore[assignment]
        self._next_block = itertools.count()
        self._next_seq = itertools.count()

    def new_seq(self, max_tokens: int = 64) -> tuple[int, list[int]]:
        return next(self._next_seq), [next(self._next_block) for _ in range(-(-max_tokens // BS))]

    def step(self, items: list[BatchItem]) -> dict[int, tuple[int, torch.Tensor]]:
        result = self.ctx.runner.execute(StepBatch(items))
        assert self.recorder.logits is not None
        return {sid: (result.sampled.token_ids[j], self.recorder.logits[j])
                for j, sid in enumerate(result.seq_ids)}


def row() -> SampleRow:
    return SampleRow(GREEDY, None, None, None, 0)


@pytest.fixture(params=["native", "torch"])
def runner(request: pytest.FixtureRequest, tiny_source: ModelSource) -> Iterator[Runner]:
    if request.param == "native" and native.kernels() is None:
        pytest.skip("the native CPU kernels are not available here")
    yield Runner(tiny_source, request.param == "native")


def prompt_of(n: int, salt: int = 0) -> list[int]:
    return [(31 * salt + 11 * j + j * j) % 250 + 3 for j in range(n)]


def greedy_run(r: Runner, prompt: list[int], chunk: int, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Prefill `prompt` in chunks of `chunk` tokens (one step each), then decode greedily."""
    sid, table = r.new_seq(len(prompt) + steps)
    tokens, logits = list(prompt), []
    for start in range(0, len(prompt), chunk):
        piece = prompt[start : start + chunk]
        last = start + len(piece) == len(prompt)
        out = r.step([BatchItem(sid, piece, start, table, row() if last else None)])
        assert bool(out) == last  # only the chunk that reaches the end samples
    for _ in range(steps):
        tok, lg = out[sid]
        tokens.append(tok)
        logits.append(lg)
        out = r.step([BatchItem(sid, [tok], len(tokens) - 1, table, row())])
    return tokens[len(prompt):], logits


@pytest.mark.parametrize("chunk", [8, 5])
def test_chunked_prefill_equals_one_prefill(runner: Runner, chunk: int) -> None:
    prompt = prompt_of(23)
    want_tokens, want_logits = greedy_run(runner, prompt, chunk=len(prompt), steps=6)
    got_tokens, got_logits = greedy_run(runner, prompt, chunk=chunk, steps=6)
    assert got_tokens == want_tokens
    for got, want in zip(got_logits, want_logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_mixed_batch_gives_each_sequence_what_it_gets_alone(runner: Runner) -> None:
    r = runner

    def setup() -> list[BatchItem]:
        """Four sequences, each one step from its next sample: a later prompt chunk, two decodes
        of different context lengths (padding in the decode batch) and a whole prompt, in an
        order the runner must rearrange (decodes first)."""
        decodes = []
        for salt, n in ((1, 13), (2, 6)):  # prefilled, then one decode each
            sid, table = r.new_seq()
            p = prompt_of(n, salt)
            ((tok, _),) = r.step([BatchItem(sid, p, 0, table, row())]).values()
            decodes.append(BatchItem(sid, [tok], n, table, row()))
        sid, table = r.new_seq()  # a 17-token prompt whose first 7 tokens are computed
        p = prompt_of(17, 3)
        assert not r.step([BatchItem(sid, p[:7], 0, table, None)])
        chunk = BatchItem(sid, p[7:], 7, table, row())
        sid, table = r.new_seq()  # a prompt not started yet
        whole = BatchItem(sid, prompt_of(9, 4), 0, table, row())
        return [chunk, decodes[0], whole, decodes[1]]

    alone = [r.step([item])[item.seq_id] for item in setup()]
    mixed_items = setup()
    mixed = r.step(mixed_items)
    assert len(mixed) == 4
    for (tok_alone, logits_alone), item in zip(alone, mixed_items, strict=True):
        tok, logits = mixed[item.seq_id]
        assert tok == tok_alone
        torch.testing.assert_close(logits, logits_alone, atol=1e-4, rtol=1e-4)


def test_decode_steps_give_what_one_prefill_of_the_same_tokens_gives(runner: Runner) -> None:
    """Two sequences of different lengths decode together, their blocks interleaved in the cache
    and each table only as long as its sequence needs (the shorter one padded in the step's
    context table); each step's logits are those of one prefill of the same tokens in fresh
    blocks (the decode rows' positions, cache slots and context tables are built right)."""
    r = runner
    steps = 4
    blocks = [next(r._next_block) for _ in range(10)]
    seqs = []
    for salt, n, table in ((5, 9, blocks[0::2]), (6, 14, blocks[1::2])):
        table = table[: -(-(n + steps + 1) // BS)]
        seqs.append((next(r._next_seq), table, prompt_of(n, salt)))
    assert len(seqs[0][1]) < len(seqs[1][1])
    firsts = [r.step([BatchItem(sid, p, 0, table, row())])[sid][0] for sid, table, p in seqs]
    tokens = [p + [t] for (_, _, p), t in zip(seqs, firsts, strict=True)]
    for _ in range(steps):
        out = r.step([BatchItem(sid, [toks[-1]], len(toks) - 1, table, row())
                      for (sid, table, _), toks in zip(seqs, tokens, strict=True)])
        for (sid, _, _), toks in zip(seqs, tokens, strict=True):
            tok, logits = out[sid]
            fresh, table = r.new_seq()
            ((want_tok, want_logits),) = r.step([BatchItem(fresh, toks, 0, table, row())]).values()
            assert tok == want_tok
            torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)
            toks.append(tok)


def test_on_launch_runs_once_per_step_before_the_layers_write_the_cache(runner: Runner) -> None:
    """The DeviceThread hands the previous step's outcome to the Trio thread in `on_launch`, so
    it must come after the step's own Python (its inputs built) and before the layers' long
    call: the cache still lacks the step's keys when it runs, and a step calls it once."""
    r = runner
    kv = r.ctx.runner.kv_cache
    seen: list[torch.Tensor] = []
    sid, table = r.new_seq()
    prompt = prompt_of(11)
    steps = [BatchItem(sid, prompt, 0, table, row())]
    for item in steps:
        out = r.ctx.runner.execute(StepBatch([item]), on_launch=lambda: seen.append(kv.clone()))
        assert len(seen) == 1
        assert not torch.equal(seen[0], kv), "on_launch ran after the layers wrote the step's keys"
        seen.clear()
        if len(steps) < 3:  # then two decode steps
            steps.append(BatchItem(sid, [out.sampled.token_ids[0]], item.start + len(item.token_ids), table, row()))


def _huge_kib_at(addr: int) -> int:
    """AnonHugePages (KiB) of this process's mapping that holds `addr`."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    return 0


def test_the_cpu_kv_cache_asks_for_huge_pages_before_its_first_touch(tiny_source: ModelSource) -> None:
    """advise_huge_pages: a tensor advised before it is first written is backed by 2 MiB pages
    where Linux hands them out on request (THP `madvise` or `always`); the KV cache of a CPU
    Context is built that way and still starts as zeros."""
    from pathlib import Path

    from atomr_trio.executor.context import advise_huge_pages

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("no transparent huge pages on this system")
    if "THP_enabled:\t0" in Path("/proc/self/status").read_text():
        pytest.skip("transparent huge pages are turned off for this process")
    # Sizes above glibc's largest mmap threshold (32 MiB): a smaller tensor may reuse heap pages
    # the process touched before, which no advice turns into huge pages.
    t = torch.empty(64 << 20, dtype=torch.uint8)
    assert advise_huge_pages(t)
    t.zero_()
    assert _huge_kib_at(t.data_ptr()) >= 2048
    assert not advise_huge_pages(torch.empty(0))
    cfg = engine_config(dtype="float32", block_size=16, num_kv_blocks=16384, max_model_len=256,
                        torch_threads=1).resolve(tiny_source.config)
    kv = Context(tiny_source, cfg).runner.kv_cache
    assert kv.numel() * kv.element_size() >= 64 << 20, "the test needs a cache past glibc's mmap threshold"
    assert _huge_kib_at(kv.data_ptr()) >= 2048
    assert not kv.any()


def test_greedy_steps_take_the_lm_heads_argmax_and_the_same_tokens(tiny_source: ModelSource) -> None:
    """bf16 on the native matmul: a step whose rows are all plain greedy takes the lm_head's argmax
    (`greedy_tokens`; the logits are never computed) and samples what the logits path samples; a
    row that asks for logprobs, or may not stop yet, sends the step through logits and the sampler."""
    cfg = engine_config(dtype="bfloat16", block_size=BS, num_kv_blocks=256, max_model_len=256,
                        torch_threads=2).resolve(tiny_source.config)
    ctx = Context(tiny_source, cfg)
    runner = ctx.runner
    if not runner.model.lm_head.has_argmax:
        pytest.skip("no native bf16 matmul here: the lm_head has no argmax kernel")
    calls = {"logits": 0, "greedy": 0}
    logits, greedy = runner.model.logits, runner.model.greedy_tokens

    def counting(name: str, f: Any) -> Any:
        def g(*a: Any) -> Any:
            calls[name] += 1
            return f(*a)
        return g

    runner.model.logits = counting("logits", logits)  # type: ignore[method-assign]
    runner.model.greedy_tokens = counting("greedy", greedy)  # type: ignore[method-assign]

    def step(params: list[SamplingParams]) -> list[int]:  # fresh prompts, each step in the same blocks
        blocks = itertools.count()
        items = [BatchItem(i, prompt_of(9 + i, i), 0, [next(blocks) for _ in range(6)],
                           SampleRow(p, None, None, None, 0)) for i, p in enumerate(params)]
        return runner.execute(StepBatch(items)).sampled.token_ids

    plain = step([GREEDY] * 12)
    assert calls == {"logits": 0, "greedy": 1}
    with_logprobs = step([GREEDY] * 11 + [SamplingParams(temperature=0, logprobs=1)])
    assert calls == {"logits": 1, "greedy": 1}
    assert with_logprobs == plain
    # min_tokens forbids EOS in the first outputs: the sampler must see the logits
    step([SamplingParams(temperature=0, min_tokens=2)] * 12)
    assert calls == {"logits": 2, "greedy": 1}
    # unless the row ignores EOS and has no stop tokens: nothing is forbidden
    assert step([SamplingParams(temperature=0, min_tokens=2, ignore_eos=True)] * 12) == plain
    assert calls == {"logits": 2, "greedy": 2}
