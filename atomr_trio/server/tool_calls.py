"""Tool calls in chat responses: what a request's `tools` and `tool_choice` ask of its output,
and how the output's text becomes OpenAI `tool_calls` (whole, or as stream deltas).

Invariants:
- `tool_choice` "required" and a named function constrain the output with a grammar built from
  the tools' schemas (tools.prompting), so what they produce always parses into calls of
  declared tools whose arguments follow their schema; "auto" leaves the output free and reads
  calls from it with the deployment's parser, any text that is not a well-formed call staying
  content (never an error).
- A streamed choice's tool-call deltas reassemble (id and name first, then argument fragments)
  into the calls the same text gives unstreamed, and a choice that made calls finishes with
  "tool_calls".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..grammar.spec import StructuredOutputsParams
from ..runtime.deployment_spec import DeploymentSpec
from ..tools.calls import ParsedOutput, StreamDelta, ToolCall, ToolDelta, new_call_id
from ..tools.parsers import get_parser
from ..tools.prompting import named_constraint, required_constraint
from .protocol import APIError, ChatCompletionRequest

# Calls one "required" answer may make with parallel_tool_calls (one without): a bound that keeps
# a model that repeats itself from calling until max_tokens cuts the array short.
MAX_PARALLEL_CALLS = 8


@dataclass(frozen=True)
class ToolMode:
    tools: list[dict[str, Any]]
    choice: str  # "auto" | "required" | "named"
    parser: str  # the parser of the text: the deployment's for "auto", "json_array" for "required"
    name: str | None = None  # the function, for "named"
    parallel: bool = True  # parallel_tool_calls: more than one call in an answer

    def constraint(self) -> StructuredOutputsParams | None:
        if self.choice == "required":
            return required_constraint(self.tools, MAX_PARALLEL_CALLS if self.parallel else 1)
        if self.choice == "named":
            assert self.name is not None
            return named_constraint(self.tools, self.name)
        return None

    def parse(self, text: str) -> ParsedOutput:
        if self.choice == "named":
            return _named_call(self.name or "", text)
        return get_parser(self.parser).parse(text, self.tools)

    def stream(self) -> Any:
        """A fresh incremental reader (`feed(text) -> StreamDelta`, `finish() -> StreamDelta`)."""
        if self.choice == "named":
            return NamedCallStream(self.name or "")
        return get_parser(self.parser).stream(self.tools)


def tool_mode(body: ChatCompletionRequest, spec: DeploymentSpec) -> ToolMode | None:
    """How the body's tools shape its output (None: they do not; the model may still read them)."""
    tools, choice = body.tools, body.tool_choice
    if not tools or choice == "none":
        return None
    if choice is None:  # OpenAI's default with tools is "auto"; vLLM's only when auto is enabled
        if not spec.enable_auto_tool_choice:
            return None
        choice = "auto"
    if choice == "auto":
        if not spec.enable_auto_tool_choice:
            raise APIError(400, f"tool_choice 'auto' needs the deployment {spec.name!r} served with "
                                "--enable-auto-tool-choice (and a --tool-call-parser)", param="tool_choice")
        return ToolMode(tools, "auto", spec.tool_call_parser)
    if choice == "required":
        return ToolMode(tools, "required", "json_array", parallel=body.parallel_tool_calls is not False)
    return ToolMode(tools, "named", "named", choice["function"]["name"])


def _named_call(name: str, text: str) -> ParsedOutput:
    import json

    try:
        args = json.loads(text)
    except json.JSONDecodeError:
        args = None
    if not isinstance(args, dict):  # cut short (max_tokens): the text is all there is
        return ParsedOutput(text or None, [])
    return ParsedOutput(None, [ToolCall(new_call_id(), name, json.dumps(args, ensure_ascii=False))])


class NamedCallStream:
    """A named function's call streamed as it is generated: the call's id and name with the
    first text, then every piece of text as an argument fragment."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._id: str | None = None

    def feed(self, text: str) -> StreamDelta:
        if not text:
            return StreamDelta()
        head = self._id is None
        if head:
            self._id = new_call_id()
        return StreamDelta(tool_calls=[ToolDelta(0, self._id if head else None, self._name if head else None, text)])

    def finish(self) -> StreamDelta:
        return StreamDelta()


def message_fields(parsed: ParsedOutput) -> dict[str, Any]:
    """The assistant message's content and tool_calls (OpenAI's shape: content null beside calls)."""
    fields: dict[str, Any] = {"content": parsed.content}
    if parsed.tool_calls:
        fields["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                for c in parsed.tool_calls]
    return fields


def delta_fields(d: StreamDelta) -> dict[str, Any]:
    """A stream chunk's delta: its content and tool-call fragments."""
    fields: dict[str, Any] = {}
    if d.content:
        fields["content"] = d.content
    if d.tool_calls:
        fields["tool_calls"] = [
            {"index": t.index, **({"id": t.id, "type": "function"} if t.id else {}),
             "function": {**({"name": t.name} if t.name else {}), "arguments": t.arguments}}
            for t in d.tool_calls]
    return fields


def finish_reason(reason: str | None, called: bool) -> str | None:
    """A choice that made tool calls and stopped by itself finishes with "tool_calls"."""
    return "tool_calls" if called and reason == "stop" else reason
