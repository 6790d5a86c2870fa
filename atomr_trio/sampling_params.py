"""SamplingParams: how one request is sampled and when it stops.

Invariant: a SamplingParams that constructed without error is valid for any model; checks that
need the model (token ids inside the vocabulary, context length) happen in `check_for_model`.
Bad values raise `ValueError` naming the parameter (and, for a list or a map, every offending
entry up to MAX_LISTED), in the caller's thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .grammar.spec import StructuredOutputsParams

# Upper bounds that keep one request from dominating memory or the sampler.
MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_LEN = 1024
MAX_LOGIT_BIAS = 1024
MAX_LISTED = 10  # offending entries an error names; past that it gives their count


def listing(items: Sequence[str]) -> str:
    """Offending entries for an error message: the first MAX_LISTED, then how many more."""
    more = len(items) - MAX_LISTED
    return ", ".join(items[:MAX_LISTED]) + (f" (and {more} more)" if more > 0 else "")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    max_tokens: int | None = 16  # None: up to the context length; 0: score the prompt only
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives; 0 = only the sampled token
    prompt_logprobs: int | None = None  # the same for every prompt position after the first
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # False: nothing between special tokens in a row (when kept)
    priority: int = 0  # scheduling order: lower values first, then arrival
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last k tokens; -1: max_model_len
    # The output follows this constraint (a JSON schema, regex, choice, grammar, ...); a dict
    # is taken as StructuredOutputsParams' fields.
    structured_outputs: StructuredOutputsParams | dict[str, Any] | None = None
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _int_in("n", self.n, 1, MAX_N)
        _num_in("temperature", self.temperature, 0.0, 100.0)
        _num_in("top_p", self.top_p, 0.0, 1.0)
        if self.top_p <= 0.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _int_in("top_k", self.top_k, -1, 1 << 30)
        if self.top_k == -1:
            self.top_k = 0
        _num_in("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            _int_in("seed", self.seed, -(1 << 63), (1 << 63) - 1)
        _num_in("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _num_in("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _num_in("repetition_penalty", self.repetition_penalty, 0.0, 100.0)
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logit_bias is not None:
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries")
            clean: dict[int, float] = {}
            bad: list[str] = []
            for k, v in self.logit_bias.items():
                tid = _as_token_id(k)
                if tid is None:
                    bad.append(f"key {k!r} is not a token id (an integer >= 0)")
                elif isinstance(v, bool) or not isinstance(v, (int, float)) or not -100.0 <= v <= 100.0:
                    bad.append(f"{k!r}: {v!r} is not a number in [-100, 100]")
                else:
                    clean[tid] = float(v)
            if bad:
                raise ValueError(f"logit_bias has {len(bad)} invalid entries: {listing(bad)}")
            self.logit_bias = clean
        if self.max_tokens is not None:
            _int_in("max_tokens", self.max_tokens, 0, 1 << 30)
        _int_in("min_tokens", self.min_tokens, 0, 1 << 30)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
            )
        if self.stop is not None and not isinstance(self.stop, (str, list, tuple)):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"stop may hold at most {MAX_STOP_STRINGS} strings")
        bad = [f"[{i}] {s!r:.40}" for i, s in enumerate(stops)
               if not isinstance(s, str) or not s or len(s) > MAX_STOP_STRING_LEN]
        if bad:
            raise ValueError(
                f"stop: each stop string must be a non-empty string of at most {MAX_STOP_STRING_LEN} "
                f"characters; not so: {listing(bad)}"
            )
        self.stop_strings = tuple(stops)
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)):
                raise ValueError("stop_token_ids must be a list of token ids")
            ids = [_as_token_id(t) for t in self.stop_token_ids]
            bad = [f"[{i}] {t!r}" for i, (t, tid) in enumerate(zip(self.stop_token_ids, ids, strict=True))
                   if tid is None]
            if bad:
                raise ValueError(f"stop_token_ids token ids must be integers >= 0; not so: {listing(bad)}")
            self.stop_token_ids = [t for t in ids if t is not None]
        if self.logprobs is not None:
            _int_in("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _int_in("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS)
        _int_in("priority", self.priority, -(1 << 31), (1 << 31) - 1)
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens != -1:
            _int_in("truncate_prompt_tokens", self.truncate_prompt_tokens, 1, 1 << 30)
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as e:
                raise ValueError(f"structured_outputs: {e}") from None
        elif self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams or a dict of its fields")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def uses_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def check_for_model(self, vocab_size: int) -> None:
        """Checks that need the model: every token id named must exist."""
        for name, ids in (
            ("logit_bias", list(self.logit_bias or ())),
            ("stop_token_ids", self.stop_token_ids or []),
        ):
            bad = [str(t) for t in ids if t >= vocab_size]
            if bad:
                raise ValueError(
                    f"{name} names {len(bad)} token id(s) outside the vocabulary (size {vocab_size}): "
                    f"{listing(bad)}"
                )


def _as_token_id(value: object) -> int | None:
    """A token id given as an int or a decimal string (JSON object keys are strings); None if
    it is neither."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _int_in(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")


def _num_in(name: str, value: object, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not lo <= float(value) <= hi:  # also rejects NaN
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
