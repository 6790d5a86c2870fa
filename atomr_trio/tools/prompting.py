"""The request side of tool calling: checking `tools` and `tool_choice`, the constraints that
tool_choice "required" or a named function puts on the output, and a system prompt that lists
the tools for chat templates that do not render them.

Invariants:
- `check_tools` accepts exactly the shapes the rest of this package reads, and every ValueError
  it raises starts with the parameter at fault ("tools: " or "tool_choice: ").
- The constraints are JSON schemas (StructuredOutputsParams.json, param "tool_choice"):
  "required" admits a non-empty JSON array of `{"name": <a tool's name>, "parameters": <that
  tool's parameters>}`, which parsers.JsonArrayParser reads back; a named function admits
  that function's parameters object alone. A tool without `parameters` takes any object.
- Nothing here reads model output or calls the model; the functions only read their arguments.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..grammar.spec import StructuredOutputsParams

NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
TOOL_CHOICES = ("none", "auto", "required")
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def _function(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    fn = tool.get("function") if isinstance(tool, Mapping) else None
    return fn if isinstance(fn, Mapping) else {}


def _parameters(tool: Mapping[str, Any]) -> dict[str, Any]:
    params = _function(tool).get("parameters")
    return dict(params) if isinstance(params, Mapping) else dict(_ANY_OBJECT)


def tools_system_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """A system prompt that offers `tools` in the Hermes format, read back by the "hermes" parser.

    For chat templates that ignore `tools`: the prompt explains that the assistant may call the
    functions, lists each one's JSON signature on its own line inside <tools></tools>, and asks
    for every call as a <tool_call> block holding {"name": ..., "arguments": {...}}.
    """
    lines = [json.dumps({"type": "function", "function": dict(_function(t))}, ensure_ascii=False) for t in tools]
    return "\n".join([
        "You may call functions to help you answer. Each function you can call is described by one "
        "JSON signature per line inside the <tools></tools> tags:",
        "<tools>",
        *lines,
        "</tools>",
        "To call a function, write a block of this form for each call, with the arguments as a JSON "
        "object that follows the function's parameters:",
        "<tool_call>",
        '{"name": <function-name>, "arguments": <args-json-object>}',
        "</tool_call>",
        "Call only the functions listed above. When no call is needed, answer in plain text.",
    ])


def required_constraint(tools: Sequence[Mapping[str, Any]], max_calls: int | None = None) -> StructuredOutputsParams:
    """The output constraint of tool_choice "required": a non-empty array of calls to `tools`,
    at most `max_calls` of them."""
    if not tools:
        raise ValueError("tool_choice: 'required' needs at least one tool in tools")
    one_of_each = [{
        "type": "object",
        "properties": {"name": {"const": _function(t).get("name")}, "parameters": _parameters(t)},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    } for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": one_of_each}}
    if max_calls is not None:
        schema["maxItems"] = max_calls
    return StructuredOutputsParams(json=schema, param="tool_choice")


def named_constraint(tools: Sequence[Mapping[str, Any]], name: str) -> StructuredOutputsParams:
    """The output constraint of tool_choice naming function `name`: that function's arguments."""
    for tool in tools:
        if _function(tool).get("name") == name:
            return StructuredOutputsParams(json=_parameters(tool), param="tool_choice")
    raise ValueError(f"tool_choice: no function named {name!r} in tools")


def check_tools(tools: Any, tool_choice: Any) -> None:
    """ValueError ("tools: ..." or "tool_choice: ...") unless both are well formed and agree."""
    names = _check_tool_list(tools) if tools is not None else []
    if tool_choice is None or tool_choice == "none":
        return
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICES:
            raise ValueError(f"tool_choice: must be one of {', '.join(map(repr, TOOL_CHOICES))} or "
                             f'{{"type": "function", "function": {{"name": ...}}}}, got {tool_choice!r}')
        if not names:
            raise ValueError(f"tool_choice: {tool_choice!r} needs tools")
        return
    if (not isinstance(tool_choice, Mapping) or tool_choice.get("type") != "function"
            or not isinstance(tool_choice.get("function"), Mapping)
            or not isinstance(tool_choice["function"].get("name"), str)):
        raise ValueError('tool_choice: must be "none", "auto", "required" or '
                         '{"type": "function", "function": {"name": ...}}')
    name = tool_choice["function"]["name"]
    if not names:
        raise ValueError(f"tool_choice: names function {name!r} but no tools are given")
    if name not in names:
        raise ValueError(f"tool_choice: names function {name!r}, which is not in tools "
                         f"({', '.join(names)})")


def _check_tool_list(tools: Any) -> list[str]:
    """The function names of a well-formed tools list, in order."""
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"tools: must be a list of functions, got {type(tools).__name__}")
    if not tools:
        raise ValueError("tools: must hold at least one function (leave tools out for none)")
    names: list[str] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise ValueError(f"tools: {where} must be an object, got {type(tool).__name__}")
        if tool.get("type") != "function":
            raise ValueError(f"tools: {where}.type must be 'function', got {tool.get('type')!r}")
        fn = tool.get("function")
        if not isinstance(fn, Mapping):
            raise ValueError(f"tools: {where}.function must be an object")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ValueError(f"tools: {where}.function.name must be 1 to 64 letters, digits, '_' or '-', "
                             f"got {name!r}")
        if name in names:
            raise ValueError(f"tools: function {name!r} is declared twice")
        if "description" in fn and fn["description"] is not None and not isinstance(fn["description"], str):
            raise ValueError(f"tools: {where}.function.description must be a string")
        if "parameters" in fn and fn["parameters"] is not None and not isinstance(fn["parameters"], Mapping):
            raise ValueError(f"tools: {where}.function.parameters must be a JSON schema object")
        names.append(name)
    return names
