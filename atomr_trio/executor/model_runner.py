"""ModelRunner: one engine step on the device — batch tensors, one forward, sampling.

Invariant: the runner reads only the `StepBatch` snapshot it is handed (never live Sequence
objects), so the Trio side may change sequences while a step runs in the device thread.
Single-token entries (decodes) come first in the flattened batch, then each prompt chunk.
Prompt-logprob rows cost only the requests that ask for them: their logits are computed in
slices of at most PROMPT_LOGPROBS_ROWS rows, reduced to the chosen token's logprob and rank and
the top-k in batched ops, and dropped before the next slice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..model.attention import AttentionMetadata, PrefillChunk, TableDecode
from ..model.cpu_gemv import kernels
from ..model.llama import LlamaModel
from .cuda_graphs import DecodeGraphs
from .sampler import Sampler, SamplerOutput, SampleRow, TokenLogprobs, token_logprobs

PLACEHOLDER = -1  # a token the previous step samples; the Worker fills it in before the step runs
PROMPT_LOGPROBS_ROWS = 256  # logits rows held at once ([rows, vocab] float32: 50 MB at 49k vocab)


@dataclass
class PromptRows:
    """Prompt-logprob rows of one item: item rows first .. first + len(targets) - 1, each
    scored against the prompt token that follows it."""

    first: int  # index into the item's token_ids
    targets: list[int]
    k: int  # top alternatives per row


@dataclass
class BatchItem:
    seq_id: int
    token_ids: list[int]  # the tokens computed this step
    start: int  # position of token_ids[0]
    block_table: list[int]
    sample: SampleRow | None  # set when this step reaches the sequence's end
    prompt_logprobs: PromptRows | None = None


@dataclass
class StepBatch:
    items: list[BatchItem]
    follows: bool = False  # scheduled before the previous step returned: it may hold PLACEHOLDERs


def fill_placeholders(batch: StepBatch, sampled: dict[int, int]) -> StepBatch:
    """The batch with each PLACEHOLDER (in a row's tokens, or in the output history penalties
    read) replaced by the token the previous step sampled for that sequence (`sampled`, by
    seq_id). New items: the engine keeps the ones it sent."""
    items = []
    for it in batch.items:
        if PLACEHOLDER in it.token_ids:
            if it.seq_id not in sampled:
                raise RuntimeError(f"internal: the previous step sampled nothing for sequence {it.seq_id}")
            tok = sampled[it.seq_id]
            it = replace(it, token_ids=[tok if t == PLACEHOLDER else t for t in it.token_ids])
            row = it.sample
            if row is not None and row.output_ids is not None and PLACEHOLDER in row.output_ids:
                it.sample = replace(row, output_ids=[tok if t == PLACEHOLDER else t for t in row.output_ids])
        items.append(it)
    return StepBatch(items)


@dataclass
class StepResult:
    seq_ids: list[int]  # sampled sequences, in the order of the sampler output
    sampled: SamplerOutput
    forward_s: float  # seconds spent in the model forward and logits (or the lm_head's argmax: greedy_tokens)
    prompt_logprobs: dict[int, list[TokenLogprobs]] = field(default_factory=dict)  # by seq_id


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: torch.Tensor, block_size: int, sampler: Sampler,
                 table_op: TableDecode | None = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.sampler = sampler
        self.device = kv_cache.device
        self.table_op = table_op  # decode rows read the cache through block tables (CUDA)
        self.graphs: DecodeGraphs | None = None  # set by the Context when it captured them

    def execute(self, batch: StepBatch, on_launch: Callable[[], None] | None = None) -> StepResult:
        """Run one step. `on_launch` is called once its inputs are built, right before the
        layers run (the DeviceThread hands the previous step's outcome over then)."""
        items = sorted(batch.items, key=lambda it: len(it.token_ids) > 1)  # decodes first
        if self._replays(items):
            return self._replay(items, on_launch)
        input_ids, positions, meta, last_rows = self._prepare(items)
        t0 = time.perf_counter()
        with self._matmuls(len(input_ids)):
            hidden = self.model.forward(input_ids, positions, meta, self.kv_cache, on_launch=on_launch)
        prompt_lps = self._prompt_logprobs(hidden, items, last_rows)
        sampling = [(row, it) for row, it in zip(last_rows, items, strict=True) if it.sample]
        if not sampling:
            return StepResult([], SamplerOutput([], []), time.perf_counter() - t0, prompt_lps)
        rows = [it.sample for _, it in sampling if it.sample is not None]
        with self._matmuls(len(sampling)):
            last = hidden[self._on_device(torch.tensor([r for r, _ in sampling]))]
            # greedy rows that read nothing else of their logits: the lm_head's argmax, logits never stored
            tokens = self.model.greedy_tokens(last) if self.sampler.takes_argmax(rows) else None
            logits = self.model.logits(last) if tokens is None else None
        forward_s = time.perf_counter() - t0
        if tokens is not None:
            return StepResult([it.seq_id for _, it in sampling], SamplerOutput(tokens.tolist(), [None] * len(rows)),
                              forward_s, prompt_lps)
        assert logits is not None
        out = self.sampler(logits, rows)
        return StepResult([it.seq_id for _, it in sampling], out, forward_s, prompt_lps)

    def _replays(self, items: list[BatchItem]) -> bool:
        """Does this step run from a captured graph? Decode rows only, each sampled, no prompt logprobs."""
        return (self.graphs is not None and self.graphs.takes(len(items))
                and all(len(it.token_ids) == 1 and it.sample is not None and it.prompt_logprobs is None
                        for it in items))

    def _replay(self, items: list[BatchItem], on_launch: Callable[[], None] | None) -> StepResult:
        assert self.graphs is not None
        bs = self.block_size
        t0 = time.perf_counter()
        slots = [max(it.block_table[it.start // bs], 0) * bs + it.start % bs for it in items]
        logits = self.graphs.run([it.token_ids[0] for it in items], [it.start for it in items], slots,
                                 [it.block_table for it in items], on_launch)
        forward_s = time.perf_counter() - t0
        out = self.sampler(logits, [it.sample for it in items if it.sample is not None])
        return StepResult([it.seq_id for it in items], out, forward_s)

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host-built input on the runner's device: through pinned memory, copied without
        waiting, on a GPU; as it is on the CPU."""
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    @torch.inference_mode()
    def _prompt_logprobs(
        self, hidden: torch.Tensor, items: list[BatchItem], last_rows: list[int]
    ) -> dict[int, list[TokenLogprobs]]:
        """Each asking item's prompt rows: log-softmax of their logits at the next prompt token
        (its logprob and rank: 1 + how many tokens score strictly higher) and the top-k."""
        rows: list[int] = []
        targets: list[int] = []
        ks: list[int] = []
        owners: list[tuple[int, int]] = []  # (seq_id, number of rows), in row order
        for it, last in zip(items, last_rows, strict=True):
            pr = it.prompt_logprobs
            if pr is None or not pr.targets:
                continue
            base = last - len(it.token_ids) + 1 + pr.first
            rows.extend(range(base, base + len(pr.targets)))
            targets.extend(pr.targets)
            ks.extend([pr.k] * len(pr.targets))
            owners.append((it.seq_id, len(pr.targets)))
        if not rows:
            return {}
        entries: list[TokenLogprobs] = []
        device = self.kv_cache.device
        for lo in range(0, len(rows), PROMPT_LOGPROBS_ROWS):
            idx = torch.tensor(rows[lo : lo + PROMPT_LOGPROBS_ROWS], device=device)
            tgt = torch.tensor(targets[lo : lo + PROMPT_LOGPROBS_ROWS], device=device)
            with self._matmuls(len(idx)):
                logits = self.model.logits(hidden[idx])
            lp = torch.log_softmax(logits, dim=-1)
            del logits
            entries.extend(token_logprobs(lp, tgt, ks[lo : lo + PROMPT_LOGPROBS_ROWS]))
        out: dict[int, list[TokenLogprobs]] = {}
        at = 0
        for seq_id, n in owners:
            out[seq_id] = entries[at : at + n]
            at += n
        return out

    def _matmuls(self, rows: int) -> AbstractContextManager[None]:
        """The matmul kernel for `rows` input rows: ATen's GEMV for one row where the plan says so."""
        return kernels.rows(self.kv_cache.device, rows) if self.model.one_row_gemv else nullcontext()

    def _prepare(
        self, items: list[BatchItem]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        bs = self.block_size
        ids: list[int] = []
        pos_parts: list[np.ndarray] = []
        slot_parts: list[np.ndarray] = []
        last_rows: list[int] = []
        decodes: list[BatchItem] = []
        prefills: list[PrefillChunk] = []
        # decode rows (first in `items`): one position and slot each, in plain ints (NumPy's
        # per-call cost, paid per row, took ~0.5 ms of a 64-row step)
        for it in items:
            if len(it.token_ids) != 1:
                break
            last_rows.append(len(ids))
            ids.append(it.token_ids[0])
            decodes.append(it)
        if decodes:
            starts = [d.start for d in decodes]
            pos_parts.append(np.array(starts, dtype=np.int64))
            # released entries (block_manager.RELEASED, -1: outside every window) read block 0, masked
            slot_parts.append(np.array([max(d.block_table[p // bs], 0) * bs + p % bs
                                        for d, p in zip(decodes, starts, strict=True)], dtype=np.int64))
        for it in items[len(decodes):]:
            n = len(it.token_ids)
            bt = np.maximum(np.asarray(it.block_table, dtype=np.int64), 0)  # (released entries: as above)
            pos = np.arange(it.start, it.start + n, dtype=np.int64)
            q_start = len(ids)
            ids.extend(it.token_ids)
            pos_parts.append(pos)
            slot_parts.append(_slots(bt, pos, bs))
            last_rows.append(q_start + n - 1)
            if n == 1:
                decodes.append(it)
            elif it.start == 0:
                prefills.append(PrefillChunk(q_start, n, None, None))
            else:
                ctx = it.start + n
                all_pos = np.arange(ctx, dtype=np.int64)
                kv_slots = torch.from_numpy(_slots(bt, all_pos, bs))
                mask = (None if self.model.prefill_attention is not None  # the kernel masks by itself
                        else torch.arange(ctx).unsqueeze(0) <= torch.from_numpy(pos).unsqueeze(1))
                prefills.append(PrefillChunk(q_start, n, kv_slots, mask))
        decode_slots = decode_bias = decode_lens = decode_table = None
        if decodes and self.table_op is not None:
            decode_table, decode_lens = self._decode_tables(decodes)
        elif decodes:
            nd = len(decodes)
            ctx_lens = np.array([d.start + 1 for d in decodes], dtype=np.int64)
            L = int(ctx_lens.max())  # the longest context among them
            width = -(-L // bs)  # padding reads block 0, masked
            table = np.array([list(d.block_table[:width]) + [0] * (width - len(d.block_table)) for d in decodes],
                             dtype=np.int64)
            np.maximum(table, 0, out=table)
            decode_slots = self._on_device(torch.from_numpy(_slots(table, np.arange(L), bs).reshape(-1)))
            decode_lens = self._on_device(torch.from_numpy(ctx_lens))
            if self.model.native is None:  # the torch path masks padding with a bias
                hidden = torch.arange(L).unsqueeze(0) >= torch.from_numpy(ctx_lens).unsqueeze(1)
                decode_bias = torch.zeros(1, nd, 1, L, dtype=self.model.dtype)
                decode_bias = self._on_device(decode_bias.masked_fill_(hidden.view(1, nd, 1, L), float("-inf")))
        meta = AttentionMetadata(
            slot_mapping=self._on_device(torch.from_numpy(np.concatenate(slot_parts))),
            num_decode=len(decodes),
            decode_slots=decode_slots,
            decode_bias=decode_bias,
            prefills=[self._chunk_on_device(p) for p in prefills],
            decode_ctx_lens=decode_lens,
            decode_op=self.model.native.decode_attention if self.model.native else None,
            prefill_op=self.model.prefill_attention,
            decode_block_table=decode_table,
            block_size=bs,
            table_op=self.table_op,
        )
        input_ids = self._on_device(torch.tensor(ids, dtype=torch.long))
        positions = self._on_device(torch.from_numpy(np.concatenate(pos_parts)))
        return input_ids, positions, meta, last_rows

    def _decode_tables(self, decodes: list[BatchItem]) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode rows' block tables [nd, longest] (int32) and context lengths, on the device."""
        width = max(len(d.block_table) for d in decodes)
        table = np.zeros((len(decodes), width), dtype=np.int32)
        for i, d in enumerate(decodes):
            table[i, : len(d.block_table)] = np.maximum(d.block_table, 0)
        lens = np.array([d.start + 1 for d in decodes], dtype=np.int32)
        return self._on_device(torch.from_numpy(table)), self._on_device(torch.from_numpy(lens))

    def _chunk_on_device(self, p: PrefillChunk) -> PrefillChunk:
        if self.device.type == "cpu" or p.kv_slots is None:
            return p
        assert p.mask is not None
        return PrefillChunk(p.q_start, p.q_len, self._on_device(p.kv_slots), self._on_device(p.mask))


def _slots(table: np.ndarray, pos: np.ndarray, bs: int) -> np.ndarray:
    """Cache slots of positions `pos` through block table(s) `table` ([blocks] or [seqs, blocks])."""
    return table[..., pos // bs] * bs + pos % bs
