"""The process's Python objects as the cyclic garbage collector sees them (not the memory
allocator's heap: that is context.return_freed_heap).

Serving a token allocates a few dozen short-lived objects on the Trio thread, and every so often
those allocations set off a collection of the oldest generation, which walks every object the
process holds: ~220k once the server has started (torch, the web stack, the models), ~120 ms
with the GIL held, during which no stream gets a token (the Trio thread is busy, and the device
thread's Python between forwards waits for the GIL). Measured on the default model, 64
concurrent streams, 128 in / 128 out (2-core Zen 5): 3 such collections, 357 ms, in a 27 s run.

`freeze()` — called by `python -m atomr_trio` once its server listens, not by the library faces
(the heap of a script or a notebook is its owner's) — collects, then moves what survived into the
permanent generation (`gc.freeze`), which later collections skip; objects there are still freed
by reference counting when their last reference goes. Same load, fresh servers in ABBA order,
8 a side: inter-token latency p99 135.6 -> 117.6 ms (lower in every ABBA quad), output tok/s
level (1199.5 -> 1212.9); at 16 concurrent level too (two such sets, against no freeze and against
the collection alone: -2.4%, +1.0%).

What the permanent generation never frees is a garbage cycle with a frozen object in it (and all
that cycle reaches). So where large object graphs alive at the freeze are dropped later — a
Context before its rebuild (worker.py), a deployment removed or replaced (deployment_manager.py)
— the owner calls `collect()`, which unfreezes, collects and freezes again what survives.
"""

from __future__ import annotations

import gc
import threading
import time

_lock = threading.Lock()  # freeze() and collect() run on the Trio thread and on device threads
_frozen_here = False  # freeze() froze the heap; a host's own gc.freeze() is not ours to undo


def freeze() -> None:
    """Collect, then keep every object alive now out of the collector's later walks."""
    global _frozen_here
    with _lock:
        _collect_all()
        gc.freeze()
        _frozen_here = True


def frozen() -> bool:
    """Whether `freeze()` froze this process's heap (and `thaw()` has not undone it)."""
    return _frozen_here


def collect() -> None:
    """A full collection that also reaches what `freeze()` froze; what survives is frozen again.
    Objects of requests in flight then are frozen with it: cycles among them that become garbage
    wait for the next such collection. Where `freeze()` froze nothing, a plain full collection
    (objects a host froze itself stay frozen)."""
    with _lock:
        if _frozen_here:
            gc.unfreeze()
        try:
            _collect_all()
        finally:
            if _frozen_here:
                gc.freeze()


def thaw() -> None:
    """Undo `freeze()`: every frozen object goes back to the collector's walks."""
    global _frozen_here
    with _lock:
        if _frozen_here:
            gc.unfreeze()
            _frozen_here = False


def _collect_all() -> None:
    """`gc.collect()`, again while it collected nothing because another thread's collection was
    under way (CPython then returns at once); a few tries, a millisecond apart."""
    done = gc.get_stats()[-1]["collections"]
    for _ in range(100):
        gc.collect()
        if gc.get_stats()[-1]["collections"] > done:
            return
        time.sleep(0.001)
