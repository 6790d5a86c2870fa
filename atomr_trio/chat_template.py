"""ChatTemplate: render a model's jinja2 chat template the way transformers does.

Invariant: the template runs sandboxed (no attribute access to Python internals) with the same
environment options and helpers as transformers (`trim_blocks`, `lstrip_blocks`, `tojson`,
`raise_exception`, `strftime_now`), so the rendered text — and its token ids — match.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered (the template raised, or a message is malformed)."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str, eos_token: str) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(source)
        self._bos, self._eos = bos_token, eos_token

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                messages=[_normalize(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos,
                eos_token=self._eos,
            )
        except ChatTemplateError:
            raise
        except TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from e


def _normalize(message: dict[str, Any]) -> dict[str, Any]:
    """Join an OpenAI content-part array into one string for templates that expect text."""
    if not isinstance(message, dict) or "role" not in message:
        raise ChatTemplateError("each message must be an object with a 'role'")
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise ChatTemplateError("only content parts of type 'text' are supported")
            texts.append(str(part.get("text", "")))
        return {**message, "content": "".join(texts)}
    return message
