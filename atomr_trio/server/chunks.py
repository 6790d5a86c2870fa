"""The choices inside streamed chunks, one class per kind of stream (`sse.Choices`).

Invariant: a chunk's choice says something new — text, a finish reason, logprobs asked for, or
the opening role / echo — and is shaped as OpenAI streams it (`delta` for chat, `text` with
completions' logprobs and text offsets for completions), as vLLM does.
"""

from __future__ import annotations

from typing import Any

from ..outputs import CompletionOutput, Logprob, RequestOutput
from ..text.tokenizer import Tokenizer
from .openai_format import as_token_ids, chat_logprobs, completion_logprobs
from .tool_calls import ToolMode, delta_fields, finish_reason


class ChatChoices:
    """Chat: a role chunk per choice, then the echo (when there is one), then content deltas."""

    def __init__(self, n: int, role: str, echo: str, logprobs: int | None, as_ids: bool,
                 tools: ToolMode | None = None) -> None:
        self._n, self._role, self._echo = n, role, echo
        self._logprobs, self._as_ids = logprobs, as_ids
        self._tool_streams = [tools.stream() for _ in range(n)] if tools is not None else None
        self._called = [False] * n

    def opening(self) -> list[list[dict[str, Any]]]:
        groups = [[{"index": i, "delta": {"role": self._role, "content": ""}, "logprobs": None,
                    "finish_reason": None} for i in range(self._n)]]
        if self._echo:
            groups.append([{"index": i, "delta": {"content": self._echo}, "logprobs": None,
                            "finish_reason": None} for i in range(self._n)])
        return groups

    def choice(self, delta: RequestOutput, o: CompletionOutput) -> dict[str, Any] | None:
        k = self._logprobs
        fields = self._delta(o)
        if not (fields or o.finish_reason or (o.logprobs and k is not None)):
            return None
        return {"index": o.index, "delta": fields,
                "logprobs": chat_logprobs(as_token_ids(o, self._as_ids), k) if k is not None else None,
                "finish_reason": finish_reason(o.finish_reason, self._called[o.index])}

    def _delta(self, o: CompletionOutput) -> dict[str, Any]:
        """The choice's new content, or with tools the content and tool-call fragments read from it."""
        if self._tool_streams is None:
            return {"content": o.text} if o.text else {}
        reader = self._tool_streams[o.index]
        d = reader.feed(o.text)
        if o.finish_reason:
            end = reader.finish()
            d.content += end.content
            d.tool_calls.extend(end.tool_calls)
        self._called[o.index] = self._called[o.index] or bool(d.tool_calls)
        return delta_fields(d)


class CompletionChoices:
    """Completions, prompt `part` of a request: choice indexes part * n + the sample's; with
    echo the prompt (`prefix`, its `ids` and their logprobs) goes out with a sample's first
    chunk, as vLLM does."""

    def __init__(self, tokenizer: Tokenizer, part: int, n: int, prefix: str, ids: list[int], echo: bool,
                 logprobs: int | None, as_ids: bool) -> None:
        self._tokenizer, self._part, self._n = tokenizer, part, n
        self._prefix, self._ids = prefix, ids
        self._logprobs, self._as_ids = logprobs, as_ids
        self._sent = [0] * n  # characters streamed per choice (text_offset)
        self._echoed = [not echo] * n
        self._scored: list[dict[int, Logprob] | None] | None = None  # the prompt's logprobs (in one delta)

    def opening(self) -> list[list[dict[str, Any]]]:
        return []

    def choice(self, delta: RequestOutput, o: CompletionOutput) -> dict[str, Any] | None:
        self._scored = self._scored or delta.prompt_logprobs
        k, echo = self._logprobs, not self._echoed[o.index]
        if not (echo or o.text or o.finish_reason or (o.logprobs and k is not None)):
            return None
        text = self._prefix + o.text if echo else o.text
        choice = {"index": self._part * self._n + o.index, "text": text,
                  "logprobs": (completion_logprobs(self._tokenizer, o, k, (self._ids, self._scored) if echo else None,
                                                   self._sent[o.index], as_ids=self._as_ids)
                               if k is not None else None),
                  "finish_reason": o.finish_reason}
        self._echoed[o.index] = True
        self._sent[o.index] += len(text)
        return choice
