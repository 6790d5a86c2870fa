"""Request validation: the one place that decides whether an engine can serve a request.

Invariant: every face (the library's `AsyncLLM`/`LLM` and the HTTP gateway, through the request
owner in `request.py`) and the EngineCore itself check a request with `check_request` alone, so
a request refused anywhere is refused with the same reason, and one that passes here fits the
engine (its prompt ids exist, it fits the context and the KV cache). Refusals are ValueErrors;
`ContextLengthExceeded` carries its numbers, so an API can word it its own way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..sampling_params import listing

if TYPE_CHECKING:
    from ..sampling_params import SamplingParams
    from .engine_config import EngineConfig


class ContextLengthExceeded(ValueError):
    """The prompt (`asked` None), or the prompt plus the `asked` completion tokens, does not fit
    the model's context."""

    def __init__(self, prompt_tokens: int, max_model_len: int, asked: int | None = None) -> None:
        self.prompt_tokens, self.max_model_len, self.asked = prompt_tokens, max_model_len, asked
        if asked is None:
            message = (f"the prompt has {prompt_tokens} tokens; this model's maximum context length is "
                       f"{max_model_len}")
        else:
            message = (f"the prompt ({prompt_tokens} tokens) and max_tokens ({asked}) exceed this model's "
                       f"maximum context length ({max_model_len})")
        super().__init__(message)


def token_ids(value: Any, vocab_size: int) -> list[int]:
    """Prompt token ids given by a caller, as a list: integers in [0, vocab_size), or ValueError
    naming the offending entries."""
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ValueError("prompt_token_ids must be a list of integers")
    ids = list(value)
    bad = [f"[{i}] {t!r:.20}" for i, t in enumerate(ids)
           if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids must be integers in [0, {vocab_size}); {len(bad)} are not: "
                         f"{listing(bad)}")
    return ids


def check_request(ids: Sequence[int], params: SamplingParams, config: EngineConfig, vocab_size: int,
                  *, completion_must_fit: bool = False, kv_window: int | None = None) -> None:
    """Raise ValueError unless an engine with this (resolved) `config` can serve a request of
    prompt `ids` with `params`. With `completion_must_fit` (the OpenAI API's rule) the prompt plus
    `max_tokens` must fit the context; without it (the library's and the engine's) a completion
    that reaches the context length ends there (finish_reason "length"). `kv_window`: the model's
    window when every layer has one (ModelConfig.window_of_every_layer): the blocks behind it are
    released as a sequence goes, so it needs room for the window and a prefill chunk only."""
    max_len, blocks = config.max_model_len, config.num_kv_blocks
    assert max_len is not None and blocks is not None, "check_request needs a resolved EngineConfig"
    if not ids:
        raise ValueError("the prompt is empty")
    token_ids(ids, vocab_size)
    asked = params.max_tokens
    if completion_must_fit and asked is not None and len(ids) + asked > max_len:
        raise ContextLengthExceeded(len(ids), max_len, asked)
    if len(ids) >= max_len:
        raise ContextLengthExceeded(len(ids), max_len)
    params.check_for_model(vocab_size)
    longest = min(len(ids) + (max_len if asked is None else asked), max_len)
    block = config.resolved_block_size()
    if kv_window is not None:  # at most W - 1 older tokens, a chunk and two partial blocks
        assert config.max_prefill_tokens is not None
        longest = min(longest, kv_window - 1 + config.max_prefill_tokens + 2 * block)
    if -(-longest // block) > blocks:
        raise ValueError(f"the request needs up to {longest} tokens of KV cache; this engine holds "
                         f"{blocks * block}")
