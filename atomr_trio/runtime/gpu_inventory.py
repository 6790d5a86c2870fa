"""The GPUs this process may use, as the Placement actor sees them.

Invariants:
- `cuda_inventory` reads torch only, so CUDA_VISIBLE_DEVICES is respected (torch numbers the
  visible GPUs 0..n-1), and it never initialises CUDA where torch reports none: on a CPU machine
  it is `[]` and costs nothing.
- A `GpuInfo` is a reading taken once (total and free bytes at inventory time); the Placement
  actor accounts for what it hands out itself and never reads the GPUs again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GiB = 1 << 30


@dataclass(frozen=True)
class GpuInfo:
    index: int  # torch's index: cuda:<index>
    name: str
    total_bytes: int
    free_bytes: int  # free when the inventory was read

    @property
    def device(self) -> str:
        return f"cuda:{self.index}"

    @property
    def usable_bytes(self) -> int:
        """What placement may hand out in all: the GPU's memory, but no more than was free."""
        return min(self.total_bytes, self.free_bytes)


def cuda_inventory() -> list[GpuInfo]:
    """Every GPU torch sees (CUDA_VISIBLE_DEVICES applied), with its memory now; [] without CUDA."""
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        gpus.append(GpuInfo(i, torch.cuda.get_device_properties(i).name, total, free))
    return gpus


def no_gpu_reason() -> str:
    """Why the inventory is empty, for the refusal of a deployment that asks for CUDA."""
    return f"torch {torch.__version__} sees no CUDA GPU (built with CUDA: {torch.version.cuda or 'no'})"


def gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"
