"""StructuredOutputsParams: the one constraint a request's output follows — a JSON schema, any
JSON object, a regex, one of a list of strings, an EBNF grammar or a structural tag (vLLM's
`structured_outputs`; OpenAI's `response_format` and the tools' choices are translated to it).

Invariants:
- A StructuredOutputsParams that constructed without error names exactly one constraint, and
  is small enough to compile: its text (a schema, a grammar, a regex, the choices) is at most
  MAX_SPEC_CHARS, a schema nests at most MAX_SCHEMA_DEPTH levels and lists at most
  MAX_ENUM_VALUES enum/const values. Whether it compiles is the compiler's answer
  (grammar.compiler), which says what is wrong as a ValueError too.
- `key` is the same for two equal constraints however their JSON was spelled, so a cache keyed
  by it compiles each once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MAX_SPEC_CHARS = 64 * 1024
MAX_SCHEMA_DEPTH = 64  # JSON nesting levels (each "properties" level counts two)
MAX_ENUM_VALUES = 4096
MAX_CHOICES = 1024

KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: dict[str, Any] | str | bool | None = None  # a JSON schema (or its text)
    json_object: bool | None = None  # any JSON object
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None  # EBNF (xgrammar's dialect, GBNF-like)
    structural_tag: dict[str, Any] | str | None = None  # xgrammar's structural tag format
    # JSON laid out as json.dumps does (", " and ": "), no other whitespace between tokens. vLLM
    # defaults to False; a small model given free whitespace can loop on newlines until
    # max_tokens, so here it is True. False allows up to compiler.MAX_WHITESPACE in a row.
    disable_any_whitespace: bool = True
    param: str = field(default="structured_outputs", compare=False)  # what errors name

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            what = ", ".join(given) if given else "none"
            raise ValueError(f"{self.param}: give exactly one of {', '.join(KINDS)} (got {what})")
        if isinstance(self.json, str):
            object.__setattr__(self, "json", _parse_json(self.param, self.json, "json"))
        if isinstance(self.structural_tag, str):
            object.__setattr__(self, "structural_tag", _parse_json(self.param, self.structural_tag, "structural_tag"))
        kind = given[0]
        if kind == "json":
            if not isinstance(self.json, (dict, bool)):
                raise ValueError(f"{self.param}: a JSON schema must be an object, got {type(self.json).__name__}")
            _check_schema(self.param, self.json)
        elif kind in ("regex", "grammar"):
            text = getattr(self, kind)
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{self.param}: {kind} must be a non-empty string")
            _check_size(self.param, kind, len(text))
        elif kind == "choice":
            choices = self.choice
            if not isinstance(choices, (list, tuple)) or not choices:
                raise ValueError(f"{self.param}: choice must be a non-empty list of strings")
            if len(choices) > MAX_CHOICES:
                raise ValueError(f"{self.param}: choice may hold at most {MAX_CHOICES} strings")
            if not all(isinstance(c, str) for c in choices):
                raise ValueError(f"{self.param}: every choice must be a string")
            _check_size(self.param, "choice", sum(len(c) for c in choices))
            object.__setattr__(self, "choice", tuple(choices))
        elif kind == "structural_tag":
            if not isinstance(self.structural_tag, dict):
                raise ValueError(f"{self.param}: structural_tag must be a JSON object")
            _check_size(self.param, kind, len(json.dumps(self.structural_tag)))
        elif self.json_object is not True:
            raise ValueError(f"{self.param}: json_object must be true")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, str, bool]:
        """(kind, canonical text, disable_any_whitespace): equal for equal constraints."""
        value = getattr(self, self.kind)
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))
        return self.kind, text, self.disable_any_whitespace


def _parse_json(param: str, text: str, kind: str) -> Any:
    _check_size(param, kind, len(text))
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{param}: {kind} is not valid JSON ({e})") from None


def _check_size(param: str, kind: str, chars: int) -> None:
    if chars > MAX_SPEC_CHARS:
        raise ValueError(f"{param}: {kind} is {chars} characters; at most {MAX_SPEC_CHARS} are compiled")


def _check_schema(param: str, schema: dict[str, Any] | bool) -> None:
    """Size limits that keep a hostile schema from costing the compiler time or memory."""
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{param}: the JSON schema is not JSON ({e})") from None
    _check_size(param, "json", len(text))
    enum_values = 0
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"{param}: the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(node, dict):
            if isinstance(node.get("enum"), list):
                enum_values += len(node["enum"])
            if "const" in node:
                enum_values += 1
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, (dict, list)))
    if enum_values > MAX_ENUM_VALUES:
        raise ValueError(f"{param}: the JSON schema lists {enum_values} enum/const values; at most "
                         f"{MAX_ENUM_VALUES} are compiled")
