"""ChatTemplate: render a model's jinja2 chat template the way transformers does.

Invariant: the template runs sandboxed (no attribute access to Python internals) with the same
environment options, helpers and variables as transformers (`trim_blocks`, `lstrip_blocks`,
`tojson`, `raise_exception`, `strftime_now`; `tools`, `documents`, extra keyword arguments), so the
rendered text — and its token ids — match, `continue_final_message` included.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from jinja2 import TemplateError, meta
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered (the template raised, or a message is malformed)."""


# Appended to the final message for continue_final_message: the rendering is cut where it shows
# up. Its trailing space tells whether the template kept the message's trailing whitespace.
_CONTINUE_MARK = "ATOMR_TRIO_CONTINUE_HERE "
# Variables the renderer sets itself; extra keyword arguments may not replace them.
RESERVED_VARIABLES = ("messages", "add_generation_prompt", "continue_final_message", "documents", "tools")


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
        # Whether the template reads `tools` (else a request's tools need another way in).
        self.renders_tools = "tools" in meta.find_undeclared_variables(env.parse(source))

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        documents: list[dict[str, Any]] | None = None,
        extra: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt text. `continue_final_message` leaves the last message open (no end-of-turn
        after its text) so the model continues it; `documents`, `tools` (OpenAI's tool list) and
        `extra` (chat_template_kwargs) are template variables."""
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError("continue_final_message and add_generation_prompt cannot both be set: "
                                    "the first continues the last message, the second starts a new one")
        taken = [k for k in RESERVED_VARIABLES if k in (extra or {})]
        if taken:
            raise ChatTemplateError(f"chat template keyword arguments may not set {', '.join(taken)}")
        msgs = [_normalize(m) for m in messages]
        if continue_final_message:
            if not msgs or not isinstance(msgs[-1].get("content"), str):
                raise ChatTemplateError("continue_final_message needs a final message with text to continue")
            msgs[-1] = {**msgs[-1], "content": msgs[-1]["content"] + _CONTINUE_MARK}
        variables = {"bos_token": self._bos, "eos_token": self._eos, **(extra or {})}
        try:
            text: str = self._template.render(
                **variables,
                messages=msgs,
                tools=tools or None,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
            )
        except ChatTemplateError:
            raise
        except TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from e
        if continue_final_message:
            at = text.rfind(_CONTINUE_MARK.rstrip())
            if at == -1:
                raise ChatTemplateError("continue_final_message: the chat template does not render the final "
                                        "message's text, so it cannot be continued")
            # A template that trims the message trimmed the mark's space, and the text's own
            # trailing whitespace with it: then the continuation starts after the trimmed text.
            text = text[:at] if text.startswith(_CONTINUE_MARK, at) else text[:at].rstrip()
        return text


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
