"""Which decoder class serves each architecture: `LlamaModel` or a family's subclass of it.

Invariant: every value of `config.SUPPORTED_ARCHITECTURES` (and each GGUF architecture
gguf_file.py maps onto them) has exactly one class here; the classes differ only in the hooks
`LlamaModel` documents, and share its attention, cache and kernels — except Gemma (gemma.py),
whose norms and residual order differ enough that it has its own loading, forward and logits
over the same paged attention and kernels.
"""

from __future__ import annotations

import torch

from .config import SUPPORTED_ARCHITECTURES, ModelConfig, ModelLoadError
from .gemma import GemmaModel
from .llama import LlamaModel
from .moe import MixtralModel, Qwen3MoeModel
from .phi3 import Phi3Model
from .qwen3 import Qwen3Model

MODEL_CLASSES: dict[str, type[LlamaModel]] = {
    "llama": LlamaModel,
    "mistral": LlamaModel,
    "qwen2": LlamaModel,
    "qwen3": Qwen3Model,
    "qwen3_moe": Qwen3MoeModel,
    "mixtral": MixtralModel,
    "phi3": Phi3Model,
    "gemma2": GemmaModel,
    "gemma3": GemmaModel,
}
assert set(MODEL_CLASSES) == set(SUPPORTED_ARCHITECTURES.values())


def build_model(cfg: ModelConfig, dtype: torch.dtype, max_len: int, device: str = "cpu") -> LlamaModel:
    """An empty model of `cfg`'s architecture (weights come with `load_weights`)."""
    cls = MODEL_CLASSES.get(cfg.architecture)
    if cls is None:
        raise ModelLoadError(f"architecture {cfg.architecture!r} is not supported "
                             f"(supported: {', '.join(sorted(MODEL_CLASSES))})")
    return cls(cfg, dtype, max_len, device)
