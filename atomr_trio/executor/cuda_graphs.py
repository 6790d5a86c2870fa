"""DecodeGraphs: decode-only steps replayed from CUDA graphs captured when the Context is built.

Why: a decode step of a small model is hundreds of short kernels (the default model: 30 layers
of about ten each); launched one by one from Python, the launches cost more than the math. A
graph captured once per batch size replays them all in one launch.

How: the step's inputs go into static buffers (token ids, positions, the slots their K/V go
to, block tables, context lengths), padded to the next size of the ladder (`capture_sizes`,
like vLLM's: 1, 2, 4, then every 8), and the graph of that size runs the forward and the
logits over them; the sampler then runs eagerly on the real rows.

Invariants:
- Only steps whose every row is one decode token and which want no prompt logprobs replay, and
  only up to the ladder's largest size; every other step runs eagerly (`ModelRunner`).
- A padding row is token 0 at position 0 with context length 0: attention reads nothing for it
  and returns zeros, and its K/V go to the scratch slot, which no block table holds.
- Block tables are max_blocks wide (the longest context the engine allows); columns past a
  row's context length are never read.
- Without CUDA (`cuda=False`: tests on CPU) the same static buffers and padding run eagerly, so
  what the graphs compute is checked on every machine.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..model.attention import AttentionMetadata, TableDecode
from ..model.llama import LlamaModel

log = logging.getLogger(__name__)

LARGEST_GRAPH = 256  # beyond this many decode rows a step runs eagerly (launches matter less)


def capture_sizes(max_num_seqs: int, largest: int = LARGEST_GRAPH) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, then multiples of 8, up to min(max_num_seqs, largest)
    (which is always in the ladder, so no step up to it pads past the engine's own limit)."""
    top = max(1, min(max_num_seqs, largest))
    ladder = [s for s in [1, 2, 4, *range(8, top + 1, 8)] if s <= top]
    return sorted({*ladder, top})


def padded_size(n: int, sizes: Sequence[int]) -> int | None:
    """The smallest captured size holding n rows; None when n is larger than every one."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv_cache: torch.Tensor, block_size: int, table_op: TableDecode,
                 sizes: Sequence[int], max_blocks: int, scratch_slot: int, cuda: bool) -> None:
        self.model, self.kv_cache, self.block_size, self.table_op = model, kv_cache, block_size, table_op
        self.sizes = list(sizes)
        self.max_blocks = max_blocks
        self.scratch_slot = scratch_slot
        self.cuda = cuda
        dev, n = kv_cache.device, self.sizes[-1]
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), scratch_slot, dtype=torch.long, device=dev)
        self.tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=dev)
        self.ctx_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        vocab = model.lm_head.out_features
        # every size writes its logits here: one [largest, vocab] buffer, not one per captured size
        self.logits = torch.empty(n, vocab, dtype=torch.float32, device=dev)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def capture(self) -> None:
        """Capture one graph per size, largest first, sharing one memory pool. Each size runs
        once eagerly first (compiles the Triton kernels, creates cuBLAS workspaces)."""
        if not self.cuda:
            return
        before = torch.cuda.memory_reserved(self.kv_cache.device)
        pool = None
        stream = torch.cuda.Stream(self.kv_cache.device)
        stream.wait_stream(torch.cuda.current_stream(self.kv_cache.device))
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):
                self._forward(size)
                graph = torch.cuda.CUDAGraph()
                # thread_local: other replicas' device threads may allocate while this one captures
                with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                    out = self._forward(size)
                pool = graph.pool()
                self._graphs[size] = (graph, out)
        torch.cuda.current_stream(self.kv_cache.device).wait_stream(stream)
        taken = torch.cuda.memory_reserved(self.kv_cache.device) - before
        log.info("captured CUDA graphs for decode batches of %s (%.2f GiB)", ", ".join(map(str, self.sizes)),
                 taken / (1 << 30))

    def takes(self, n: int) -> bool:
        return padded_size(n, self.sizes) is not None

    def run(self, token_ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
            on_launch: Callable[[], None] | None = None) -> torch.Tensor:
        """float32 logits [n, vocab] of n decode rows (row i: token_ids[i] at positions[i], its
        K/V into slots[i], its context through tables[i]). `on_launch()` runs once the inputs are
        filled in, right before the replay."""
        n = len(token_ids)
        size = padded_size(n, self.sizes)
        assert size is not None, f"{n} decode rows: no captured graph holds them"
        self._fill(size, token_ids, positions, slots, tables)
        if on_launch is not None:
            on_launch()
        if not self.cuda:
            return self._forward(size)[:n]
        graph, out = self._graphs[size]
        graph.replay()
        return out[:n]

    def _fill(self, size: int, token_ids: list[int], positions: list[int], slots: list[int],
              tables: list[list[int]]) -> None:
        """Copy the step's rows into the static buffers, rows n..size-1 as padding."""
        n = len(token_ids)
        table = np.zeros((size, self.max_blocks), dtype=np.int32)
        for i, row in enumerate(tables):
            width = min(len(row), self.max_blocks)
            table[i, :width] = np.maximum(row[:width], 0)
        pad = size - n
        self._put(self.ids, np.asarray(list(token_ids) + [0] * pad, dtype=np.int64))
        self._put(self.positions, np.asarray(list(positions) + [0] * pad, dtype=np.int64))
        self._put(self.slots, np.asarray(list(slots) + [self.scratch_slot] * pad, dtype=np.int64))
        self._put(self.ctx_lens, np.asarray([p + 1 for p in positions] + [0] * pad, dtype=np.int32))
        self._put(self.tables, table)

    def _put(self, static: torch.Tensor, values: np.ndarray) -> None:
        host = torch.from_numpy(values)
        if self.cuda:
            host = host.pin_memory()
        static[: len(values)].copy_(host, non_blocking=self.cuda)

    def _forward(self, size: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slots[:size], num_decode=size, decode_slots=None, decode_bias=None, prefills=[],
            decode_ctx_lens=self.ctx_lens[:size], decode_block_table=self.tables[:size],
            block_size=self.block_size, table_op=self.table_op,
        )
        hidden = self.model.forward(self.ids[:size], self.positions[:size], meta, self.kv_cache)
        out = self.logits[:size]
        out.copy_(self.model.logits(hidden))
        return out
