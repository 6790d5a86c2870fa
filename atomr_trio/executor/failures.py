"""What kind of failure a device step raised — the one place that tells them apart.

- "oom": the device ran out of memory (`torch.OutOfMemoryError`, which `torch.cuda.OutOfMemoryError`
  is). Nothing is broken: the allocation failed before the step's results existed, so the engine
  shrinks its batch and runs the step again (engine/recovery.py).
- "device": the Context is poisoned and every later step on it fails too: a CUDA error that
  sticks to the CUDA context (device-side assert, illegal memory access, launch failure...;
  `torch.AcceleratorError` where torch has it — torch raises it for CUDA errors other than OOM,
  and a rebuild is the safe answer to any of them) or the `fail_at_step` hook's InjectedFault.
  The engine rebuilds the Context without asking it anything (a health probe on a poisoned CUDA
  context may itself hang or raise).
- "unknown": anything else; the engine asks the Worker whether its Context still computes and,
  if it does, blames the batch's contents.

Invariant: classification reads only the exception (its type and message), never the device,
so it is cheap, thread-agnostic and testable on a CPU.
"""

from __future__ import annotations

from typing import Literal

import torch

from .context import InjectedFault

FailureKind = Literal["oom", "device", "unknown"]

# Substrings of CUDA error messages after which the CUDA context is unusable ("sticky" errors:
# every later CUDA call in the process returns the same error until the context is recreated).
STICKY_CUDA_ERRORS = (
    "device-side assert triggered",
    "an illegal memory access was encountered",
    "an illegal instruction was encountered",
    "misaligned address",
    "unspecified launch failure",
    "uncorrectable ecc error",
    "the launch timed out and was terminated",
    "cudaerrorillegaladdress",
    "cublas_status_execution_failed",
)

_ACCELERATOR_ERROR: type[BaseException] | None = getattr(torch, "AcceleratorError", None)


def classify(error: BaseException) -> FailureKind:
    """The kind of a step's failure (see the module docstring)."""
    if isinstance(error, torch.OutOfMemoryError):
        return "oom"
    if isinstance(error, InjectedFault):
        return "device"
    message = str(error).lower()
    if "out of memory" in message and "cuda" in message:
        # an OOM outside the caching allocator (pinned host memory, cuBLAS workspaces, a graph
        # launch) comes as AcceleratorError or a plain RuntimeError: still a smaller batch, not a rebuild
        return "oom"
    if _ACCELERATOR_ERROR is not None and isinstance(error, _ACCELERATOR_ERROR):
        return "device"
    if any(marker in message for marker in STICKY_CUDA_ERRORS):
        return "device"
    return "unknown"


__all__ = ["STICKY_CUDA_ERRORS", "FailureKind", "classify"]
