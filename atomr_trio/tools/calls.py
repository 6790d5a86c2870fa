"""The shapes of tool calls: a finished call (ToolCall), a whole parsed output (ParsedOutput) and
the pieces a stream sends (StreamDelta, ToolDelta), laid out as OpenAI's chat API has them.

Invariants:
- ToolCall.arguments is the JSON text of an object (`json.dumps(obj, ensure_ascii=False)`), the
  way OpenAI sends `function.arguments`; `id` is `new_call_id()`'s, unique per call.
- ParsedOutput.content is None only when the output held tool calls and no other text worth
  showing; an output without tool calls keeps all of its text as content.
- A stream's ToolDeltas for one call share its `index` (0, 1, … in order); the first carries
  the id and the name with `arguments == ""`, the later ones only argument text, and their
  `arguments` joined are the call's ToolCall.arguments.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field


def new_call_id() -> str:
    """A fresh tool call id, OpenAI style: "call_" and 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str  # a function named in the request's tools
    arguments: str  # JSON text of an object


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None  # text that is not a tool call (None: there is none)
    tool_calls: list[ToolCall]


@dataclass
class ToolDelta:
    index: int  # which call of the output (0, 1, …)
    id: str | None = None  # only in a call's first delta
    name: str | None = None  # only in a call's first delta
    arguments: str = ""  # the next piece of the arguments' JSON text


@dataclass
class StreamDelta:
    content: str = ""  # the next piece of content text
    tool_calls: list[ToolDelta] = field(default_factory=list)
