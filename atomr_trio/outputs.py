"""Request outputs in vLLM's shape, and RequestTracker, which builds them from engine deltas.

Invariant: the tracker is the only place token ids become text for a request: it detokenizes
incrementally, cuts the text exactly before a stop string, and never streams characters that
could still turn out to be the start of a stop string.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from .engine.messages import RequestMetrics, SeqDelta
from .executor.sampler import TokenLogprobs
from .sampling_params import SamplingParams
from .text.detokenizer import IncrementalDetokenizer
from .text.tokenizer import Tokenizer


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    metrics: RequestMetrics | None = None  # set when the sample finished

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    error: str | None = None
    # with SamplingParams.prompt_logprobs: one entry per prompt token (None for the first), each
    # the token's own logprob plus the top alternatives; None until the prompt was computed
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    @property
    def metrics(self) -> RequestMetrics | None:
        """The first sample's timings (engine clock), once it finished."""
        return self.outputs[0].metrics if self.outputs else None


class RequestError(RuntimeError):
    """The engine could not finish a request; the message says why."""


@dataclass
class _Sample:
    out: CompletionOutput
    detok: IncrementalDetokenizer
    full_text: str = ""  # detokenized text before stop-string truncation
    streamed: int = 0  # characters of out.text already handed out as deltas
    streamed_tokens: int = 0
    streamed_logprobs: int = 0


@dataclass
class RequestTracker:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    tokenizer: Tokenizer
    eos_token_ids: Collection[int]  # the model's whole EOS set (ModelSource.eos_token_ids)
    samples: list[_Sample] = field(default_factory=list)
    num_cached_tokens: int = 0
    error: str | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    prompt_logprobs_streamed: bool = False
    _pieces: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        want_lp = self.params.logprobs is not None
        for i in range(self.params.n):
            out = CompletionOutput(i, "", [], logprobs=[] if want_lp else None,
                                   cumulative_logprob=0.0 if want_lp else None)
            detok = IncrementalDetokenizer(self.tokenizer, self.prompt_token_ids,
                                           self.params.skip_special_tokens,
                                           self.params.spaces_between_special_tokens)
            self.samples.append(_Sample(out, detok))

    @property
    def finished(self) -> bool:
        return all(s.out.finish_reason is not None for s in self.samples)

    def apply(self, delta: SeqDelta) -> bool:
        """Fold one engine delta in. Returns True when a stop string just ended the sample."""
        s = self.samples[delta.index]
        if delta.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None, *(self._entry(lp) for lp in delta.prompt_logprobs)]
        if s.out.finish_reason is not None:
            if delta.metrics is not None and s.out.metrics is None:
                s.out.metrics = delta.metrics  # the engine's view of a sample a stop string ended
            return False  # late events after a stop string: the sample is already complete
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        if delta.error:
            self.error = delta.error
        if delta.metrics is not None:
            s.out.metrics = delta.metrics
        s.out.token_ids.extend(delta.new_token_ids)
        if delta.logprobs and s.out.logprobs is not None:
            for lp in delta.logprobs:
                s.out.logprobs.append(self._entry(lp))
                s.out.cumulative_logprob = (s.out.cumulative_logprob or 0.0) + lp.logprob
        searched = len(s.full_text)
        s.full_text += s.detok.push(delta.new_token_ids)
        if delta.finish_reason is not None:
            s.full_text += s.detok.flush()
        if self._check_stop(s, searched):
            return True
        s.out.text = s.full_text
        if delta.finish_reason is not None:
            s.out.finish_reason = delta.finish_reason
            if delta.finish_reason == "stop" and s.out.token_ids:
                s.out.stop_reason = s.out.token_ids[-1] if self._is_stop_token(s) else None
        return False

    def _check_stop(self, s: _Sample, searched: int) -> bool:
        stops = self.params.stop_strings
        if not stops or len(s.full_text) == searched:
            return False
        # A new match must end inside the new text, so it starts at most len(stop)-1 before it.
        start = max(0, searched - max(len(x) for x in stops) + 1)
        best: tuple[int, str] | None = None
        for stop in stops:
            k = s.full_text.find(stop, start)
            if k != -1 and (best is None or k < best[0]):
                best = (k, stop)
        if best is None:
            return False
        k, stop = best
        end = k + len(stop) if self.params.include_stop_str_in_output else k
        s.out.text = s.full_text[:end]
        s.out.finish_reason = "stop"
        s.out.stop_reason = stop
        return True

    def _is_stop_token(self, s: _Sample) -> bool:
        last = s.out.token_ids[-1]
        return last in (self.params.stop_token_ids or ()) or last in self.eos_token_ids

    def _entry(self, lp: TokenLogprobs) -> dict[int, Logprob]:
        """vLLM's shape: the token's own entry first, then the top alternatives by rank."""
        entry = {lp.token_id: Logprob(lp.logprob, lp.rank, self._piece(lp.token_id))}
        for rank, (tid, val) in enumerate(lp.top, start=1):
            entry.setdefault(tid, Logprob(val, rank, self._piece(tid)))
        return entry

    def _piece(self, token_id: int) -> str:
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return piece

    # ---- views -----------------------------------------------------------------------------
    def output(self) -> RequestOutput:
        """The cumulative state of the request."""
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids,
                             [s.out for s in self.samples], self.finished,
                             self.num_cached_tokens, self.error, self.prompt_logprobs)

    def delta_output(self) -> RequestOutput:
        """What is new since the last delta: text held back while it may begin a stop string."""
        hold = max((len(x) for x in self.params.stop_strings), default=1) - 1
        outs = []
        for s in self.samples:
            o = s.out
            end = len(o.text) if o.finish_reason is not None else max(s.streamed, len(o.text) - hold)
            outs.append(CompletionOutput(
                o.index, o.text[s.streamed:end], o.token_ids[s.streamed_tokens:], o.finish_reason,
                o.stop_reason,
                o.logprobs[s.streamed_logprobs:] if o.logprobs is not None else None,
                o.cumulative_logprob, o.metrics,
            ))
            s.streamed, s.streamed_tokens = end, len(o.token_ids)
            s.streamed_logprobs = len(o.logprobs or [])
        prompt_logprobs = None
        if self.prompt_logprobs is not None and not self.prompt_logprobs_streamed:
            prompt_logprobs, self.prompt_logprobs_streamed = self.prompt_logprobs, True  # once
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs,
                             self.finished, self.num_cached_tokens, self.error, prompt_logprobs)
