"""Which CPU kernel a one-row matmul uses: ATen's own GEMV instead of oneDNN's.

Fact (2-core AVX2 EPYC, torch 2.13, bf16 weights of the default model's shapes): with one input
row, ATen's GEMV streams the weights at ~20-24 GB/s and oneDNN's at ~9; from 3 rows on oneDNN's
GEMM is faster (4x at 16 rows). Both give bit-identical results, in float32 too (where their
speed is the same). A single-sequence decode step is all one-row matmuls, so it runs with oneDNN
switched off.

The switch is torch's process-wide "mkldnn enabled" flag, while forwards of several replicas may
run at once in their own device threads. `KernelChoice` lets forwards that want the same setting
run together and makes one that wants the other wait for them to finish; entrants go in arrival
order, so neither kind starves. The user's own setting is restored whenever none is running.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class KernelChoice:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._arrivals: deque[object] = deque()
        self._active = 0
        self._onednn = True  # the setting of the running forwards (meaningful while _active > 0)
        self._user = True  # torch's setting before the first of them started

    @contextmanager
    def rows(self, device: torch.device, rows: int) -> Iterator[None]:
        """Run the body with the matmul kernels suited to `rows` input rows on `device`."""
        if device.type != "cpu":
            yield
            return
        me = object()
        with self._cond:
            self._arrivals.append(me)
            if self._active == 0:
                self._user = torch._C._get_mkldnn_enabled()
            want = self._user and rows > 1

            def my_turn() -> bool:
                return self._arrivals[0] is me and (self._active == 0 or self._onednn == want)

            self._cond.wait_for(my_turn)
            self._arrivals.popleft()
            if self._active == 0:
                self._onednn = want
                torch._C._set_mkldnn_enabled(want)
            self._active += 1
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if self._active == 0:
                    torch._C._set_mkldnn_enabled(self._user)
                self._cond.notify_all()


kernels = KernelChoice()  # one per process: the flag it guards is process-wide
