"""Read the weights of an HF model directory: one or many `*.safetensors` shards.

Invariant: every tensor is yielded once, with the name of the shard file it came from, so a
loading error can name both.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from .config import ModelLoadError


def safetensors_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors files in the model directory")
    return files


def hf_weights(path: Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    from safetensors import safe_open

    for file in safetensors_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name), file
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"{file}: cannot read safetensors file ({e})") from e
