"""A conversation with tools, made renderable by any chat template.

Invariant: when the model's template renders `tools` (it reads the variable), the messages and
tools go to it unchanged. When it does not (SmolLM2's does not), the conversation is rewritten
to plain text in the Hermes convention the tool parsers read back: the tools are listed in a
system prompt (`prompting.tools_system_prompt`, joined to the first system message or put
before the conversation), an assistant's `tool_calls` become `<tool_call>` blocks in its
content, and a `tool` message's content is wrapped in `<tool_response>`. Nothing of the
conversation is dropped either way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .prompting import tools_system_prompt


def with_tools(messages: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]] | None,
               template_renders_tools: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) to hand the chat template."""
    has_calls = any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
    if template_renders_tools or not (tools or has_calls):
        return messages, [dict(t) for t in tools] if tools else None
    out = [_as_text(m) for m in messages]
    if tools:
        listing = tools_system_prompt(tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{listing}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out, None


def _as_text(m: dict[str, Any]) -> dict[str, Any]:
    content = _text(m.get("content"))
    if m.get("role") == "assistant" and m.get("tool_calls"):
        blocks = [_call_block(c) for c in m["tool_calls"]]
        content = "\n".join(([content] if content else []) + blocks)
        return {k: v for k, v in {**m, "content": content}.items() if k != "tool_calls"}
    if m.get("role") == "tool":
        return {**m, "content": f"<tool_response>\n{content}\n</tool_response>"}
    return m if m.get("content") is not None else {**m, "content": content}


def _call_block(call: Any) -> str:
    fn = call.get("function", {}) if isinstance(call, Mapping) else {}
    args = fn.get("arguments", "{}")
    try:
        parsed = json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        parsed = args  # kept as the client sent it
    body = json.dumps({"name": fn.get("name", ""), "arguments": parsed}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return str(content)
