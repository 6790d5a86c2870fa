"""IncrementalDetokenizer: token ids in, text deltas out, as tokens arrive.

Invariants: a delta never ends in half a UTF-8 character (bytes are held back until the
character completes), and the concatenated deltas plus `flush()` equal the text the generated
ids add after the prompt — a full decode of them, except that a SentencePiece vocabulary's
leading space, which a decode on its own strips, is kept (it follows the prompt). Each step
decodes only a short window of ids, never the whole output.
"""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import Tokenizer

# How many prompt ids give the first generated token its context (spaces, merges).
_CONTEXT = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool,
                 spaces_between_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._spaces = spaces_between_special_tokens
        self._ids: list[int] = list(prompt_ids[-_CONTEXT:])
        self._prefix = 0  # start of the window that gives context
        self._read = len(self._ids)  # ids before this are already emitted as text

    def push(self, new_ids: Sequence[int]) -> str:
        self._ids.extend(new_ids)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if text.endswith("\ufffd") or len(text) <= len(prefix_text):
            return ""  # an incomplete character, or nothing visible yet
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix_text) :]

    def flush(self) -> str:
        """At the end: whatever is held back (a dangling partial character decodes as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(prefix_text) :]

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return self._tok.decode(ids, skip_special_tokens=self._skip, spaces_between_special_tokens=self._spaces)
