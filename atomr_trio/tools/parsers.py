"""Tool-call parsers: the tool calls a model wrote in its text, read whole (`parse`) or as the text
streams in (`stream`), in the format its chat template taught it (vLLM's `--tool-call-parser`).

Formats (PARSERS):
- "hermes" (Hermes, Qwen2.5, SmolLM): text, then one or more
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks with only whitespace
  between and after them.
- "llama3_json" (Llama 3.x): the whole output, after whitespace and an optional `<|python_tag|>`,
  is `{"name": ..., "parameters": {...}}`, or several such objects separated by `;`.
- "mistral": text, then `[TOOL_CALLS]` and a JSON array of `{"name": ..., "arguments": {...}}`.
  The marker is a special token in Mistral's tokenizers, so the text must keep it.
- "json_array" (the output of tool_choice "required", prompting.required_constraint): the whole
  output is a non-empty JSON array of `{"name": ..., "parameters": {...}}`.
Every format takes "arguments" and "parameters" alike; a call without either has no arguments.

Invariants:
- `parse` never raises on any text. An output is all tool calls or none: when any call is
  malformed (bad JSON or markup, an unclosed block, arguments that are not an object, text
  after the calls, a function not in `tools`), the whole text comes back as content and there
  are no tool calls. An output without calls keeps its whole text, as it was, as content.
- Text before the first call is the content, as it was; it is None when it is only JSON whitespace
  (space, tab, newline, carriage return).
- A ToolStream fed any split of a text, then finished, sends content pieces that join to
  `parse(text).content or ""` and tool calls whose (name, arguments) are `parse(text)`'s.
  Content is sent as soon as no continuation could make it part of a call: only a possible
  start of a call marker (`<tool_c`, `[TOOL`, a leading `{` or `[`) is held back, and leading
  whitespace until something follows it. Because one malformed call turns the whole output
  into content, calls are sent by `finish()`, when the output is complete.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from .calls import ParsedOutput, StreamDelta, ToolCall, ToolDelta, new_call_id

_WHITESPACE = " \t\n\r"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity would be sent on as invalid JSON


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


class _Malformed(Exception):
    """The text holds a call that cannot be read; the whole text is content."""


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def _decode(text: str, i: int) -> tuple[Any, int]:
    """The JSON value starting at text[i] and where it ends."""
    try:
        return _DECODER.raw_decode(text, i)
    except (ValueError, RecursionError):
        raise _Malformed from None


def _call(obj: Any) -> tuple[str, dict[str, Any]]:
    """(name, arguments) of a call object `{"name": str, "arguments" | "parameters": object}`."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise _Malformed
    args = obj["arguments"] if "arguments" in obj else obj.get("parameters", {})
    if not isinstance(args, dict):
        raise _Malformed
    return obj["name"], args


def _tool_names(tools: Sequence[Mapping[str, Any]] | None) -> set[str]:
    names: set[str] = set()
    for tool in tools or ():
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            names.add(fn["name"])
    return names


def _marker_hold(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ToolParser:
    """Reads one format's tool calls; subclasses give `_extract` and `_sure_content`."""

    name: ClassVar[str] = ""

    def parse(self, text: str, tools: Sequence[Mapping[str, Any]]) -> ParsedOutput:
        """The content and tool calls of a finished output (never raises; see the invariants)."""
        try:
            found = self._extract(text)
        except (_Malformed, RecursionError):
            found = None
        if found is None:
            return ParsedOutput(text, [])
        content, calls = found
        known = _tool_names(tools)
        if not calls or any(name not in known for name, _ in calls):
            return ParsedOutput(text, [])
        try:
            tool_calls = [ToolCall(new_call_id(), name, json.dumps(args, ensure_ascii=False)) for name, args in calls]
        except (ValueError, RecursionError):
            return ParsedOutput(text, [])
        return ParsedOutput(content if content is not None and content.strip(_WHITESPACE) else None, tool_calls)

    def stream(self, tools: Sequence[Mapping[str, Any]]) -> ToolStream:
        """A fresh incremental reader of one output."""
        return ToolStream(self, tools)

    def _extract(self, text: str) -> tuple[str | None, list[tuple[str, dict[str, Any]]]] | None:
        """(content, [(name, arguments)]) of a text that holds calls, None when it holds none;
        raises _Malformed when a call cannot be read."""
        raise NotImplementedError

    def _sure_content(self, text: str, start: int) -> tuple[int, bool]:
        """(n, begun): text[:n] is content however the text goes on (start: a length already
        known to be so); begun is True once n can no longer grow (the calls may have begun)."""
        raise NotImplementedError


class _MarkedParser(ToolParser):
    """Formats where content comes first and a marker starts the calls."""

    marker: ClassVar[str] = ""

    def _sure_content(self, text: str, start: int) -> tuple[int, bool]:
        at = text.find(self.marker, start)
        if at >= 0:
            n, begun = at, True
        else:
            n, begun = len(text) - _marker_hold(text, self.marker), False
        if start == 0 and not text[:n].strip(_WHITESPACE):
            n = 0  # only whitespace so far: it is no content if a call follows
        return n, begun


class HermesParser(_MarkedParser):
    name = "hermes"
    marker = "<tool_call>"
    end_marker = "</tool_call>"

    def _extract(self, text: str) -> tuple[str | None, list[tuple[str, dict[str, Any]]]] | None:
        at = text.find(self.marker)
        if at < 0:
            return None
        calls = []
        i = at
        while i < len(text):
            if not text.startswith(self.marker, i):
                raise _Malformed  # text after a call
            obj, j = _decode(text, _skip_ws(text, i + len(self.marker)))
            j = _skip_ws(text, j)
            if not text.startswith(self.end_marker, j):
                raise _Malformed  # unclosed, or more than one JSON value in the block
            calls.append(_call(obj))
            i = _skip_ws(text, j + len(self.end_marker))
        return text[:at], calls


class MistralParser(_MarkedParser):
    name = "mistral"
    marker = "[TOOL_CALLS]"

    def _extract(self, text: str) -> tuple[str | None, list[tuple[str, dict[str, Any]]]] | None:
        at = text.find(self.marker)
        if at < 0:
            return None
        return text[:at], _array(text, _skip_ws(text, at + len(self.marker)))


def _array(text: str, i: int) -> list[tuple[str, dict[str, Any]]]:
    """The calls of a non-empty JSON array at text[i] that nothing but whitespace follows."""
    items, end = _decode(text, i)
    if not isinstance(items, list) or not items or _skip_ws(text, end) != len(text):
        raise _Malformed
    return [_call(obj) for obj in items]


class _WholeParser(ToolParser):
    """Formats where the calls are the whole output, which starts with `opener` (after `prefix`)."""

    prefix: ClassVar[str] = ""
    opener: ClassVar[str] = ""

    def _start(self, text: str) -> int | None:
        """Where the calls' JSON starts, None when the text does not start as calls do."""
        i = _skip_ws(text, 0)
        if self.prefix and text.startswith(self.prefix, i):
            i = _skip_ws(text, i + len(self.prefix))
        return i if text.startswith(self.opener, i) else None

    def _sure_content(self, text: str, start: int) -> tuple[int, bool]:
        if start:
            return len(text), False  # already known not to be calls
        i = _skip_ws(text, 0)
        rest = text[i:i + max(len(self.prefix), len(self.opener))]
        if not rest:
            return 0, False  # only whitespace so far
        if rest.startswith(self.opener) or (self.prefix and rest.startswith(self.prefix)):
            return 0, True
        if self.opener.startswith(rest) or self.prefix.startswith(rest):
            return 0, False  # could still become either
        return len(text), False


class Llama3JsonParser(_WholeParser):
    name = "llama3_json"
    prefix = "<|python_tag|>"
    opener = "{"

    def _extract(self, text: str) -> tuple[str | None, list[tuple[str, dict[str, Any]]]] | None:
        i = self._start(text)
        if i is None:
            return None
        calls = []
        while True:
            obj, i = _decode(text, i)
            calls.append(_call(obj))
            i = _skip_ws(text, i)
            if i == len(text):
                break
            if text[i] != ";":
                raise _Malformed
            i = _skip_ws(text, i + 1)
            if i == len(text):
                break  # a trailing ';'
        return None, calls


class JsonArrayParser(_WholeParser):
    name = "json_array"
    opener = "["

    def _extract(self, text: str) -> tuple[str | None, list[tuple[str, dict[str, Any]]]] | None:
        i = self._start(text)
        return None if i is None else (None, _array(text, i))


class ToolStream:
    """Reads one output's tool calls as its text arrives: `feed` each new piece, then `finish`."""

    def __init__(self, parser: ToolParser, tools: Sequence[Mapping[str, Any]]) -> None:
        self.parser = parser
        self.tools = tools
        self.result: ParsedOutput | None = None  # parse() of the whole text, once finished
        self._text = ""
        self._sent = 0  # text[:_sent] was sent as content
        self._begun = False  # no more content is sent before finish()

    def feed(self, delta_text: str) -> StreamDelta:
        """What can be sent now that `delta_text` followed the text so far."""
        if self.result is not None:
            raise RuntimeError("ToolStream.feed after finish")
        self._text += delta_text
        if self._begun or not delta_text:
            return StreamDelta()
        n, self._begun = self.parser._sure_content(self._text, self._sent)
        if n <= self._sent:
            return StreamDelta()
        piece, self._sent = self._text[self._sent:n], n
        return StreamDelta(content=piece)

    def finish(self) -> StreamDelta:
        """The rest: held-back content, or every tool call (a header delta, then its arguments)."""
        if self.result is not None:
            return StreamDelta()
        self.result = self.parser.parse(self._text, self.tools)
        content = self.result.content or ""
        deltas: list[ToolDelta] = []
        for index, call in enumerate(self.result.tool_calls):
            deltas.append(ToolDelta(index, id=call.id, name=call.name))
            deltas.append(ToolDelta(index, arguments=call.arguments))
        return StreamDelta(content=content[self._sent:], tool_calls=deltas)


PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser, JsonArrayParser)
}


def get_parser(name: str) -> ToolParser:
    """The parser called `name` (ValueError listing the names for an unknown one)."""
    try:
        return PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; choose one of {', '.join(sorted(PARSERS))}") from None
