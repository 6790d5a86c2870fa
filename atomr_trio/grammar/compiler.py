"""GrammarCompiler: a model's structured-output constraints compiled to xgrammar grammars, once.

Invariants:
- One compiler per tokenizer (ModelSource.grammars). Its vocabulary table (xgrammar's
  TokenizerInfo) is built once, on first use, in a worker thread.
- `compile` runs the compilation in a worker thread, never on the Trio loop, and gives up after
  `timeout_s` with a ValueError (the server's 400). Compiled grammars are kept in an LRU cache
  keyed by `StructuredOutputsParams.key`; concurrent requests for one key wait for one
  compilation (from any thread or Trio loop), so 16 requests with one schema compile it once.
- Every way a constraint fails to compile (a bad schema, regex or grammar) is a ValueError that
  names the parameter; nothing else escapes as an error of the request.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import trio

from .spec import StructuredOutputsParams

if TYPE_CHECKING:
    import xgrammar

    from ..text.tokenizer import Tokenizer

CACHE_SIZE = 256  # compiled grammars kept per model
# Whitespace characters allowed in a row between JSON tokens: enough to indent, too few for a
# small model to loop on newlines until max_tokens.
MAX_WHITESPACE = 12
COMPILE_TIMEOUT_S = 10.0


class GrammarCompiler:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, *, cache_size: int = CACHE_SIZE,
                 timeout_s: float = COMPILE_TIMEOUT_S) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's logits width (may exceed the tokenizer's)
        self.cache_size = cache_size
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str, bool], Future[xgrammar.CompiledGrammar]] = OrderedDict()
        self._compiler: xgrammar.GrammarCompiler | None = None
        self.compilations = 0  # how many constraints were compiled (not taken from the cache)
        self.compile_s = 0.0  # seconds spent compiling them

    async def compile(self, spec: StructuredOutputsParams) -> xgrammar.CompiledGrammar:
        """The compiled grammar of `spec` (ValueError when it does not compile in time)."""
        with trio.move_on_after(self.timeout_s) as scope:
            return await trio.to_thread.run_sync(self.compile_sync, spec, abandon_on_cancel=True)
        assert scope.cancelled_caught
        raise ValueError(f"{spec.param}: the {spec.kind} constraint took longer than {self.timeout_s:g} s "
                         f"to compile; simplify it")

    def compile_sync(self, spec: StructuredOutputsParams) -> xgrammar.CompiledGrammar:
        """`compile` for a worker thread (blocks until compiled, by this thread or another)."""
        with self._lock:
            fut = self._cache.get(spec.key)
            owner = fut is None
            if fut is None:
                fut = self._cache[spec.key] = Future()
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(spec.key)
        if owner:
            try:
                t0 = time.perf_counter()
                fut.set_result(_compile(self._xgr_compiler(), spec))
                with self._lock:
                    self.compilations += 1
                    self.compile_s += time.perf_counter() - t0
            except BaseException as e:  # noqa: BLE001 - the waiters must wake whatever it was
                with self._lock:
                    if self._cache.get(spec.key) is fut:
                        del self._cache[spec.key]  # a failure is not cached: the next try compiles again
                fut.set_exception(e)
        return fut.result()

    def _xgr_compiler(self) -> xgrammar.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                import xgrammar

                self._compiler = xgrammar.GrammarCompiler(tokenizer_info(self.tokenizer, self.vocab_size),
                                                          cache_enabled=False)
            return self._compiler


def tokenizer_info(tokenizer: Tokenizer, vocab_size: int) -> xgrammar.TokenizerInfo:
    """xgrammar's view of the vocabulary: each id's token string (as the tokenizer stores it),
    the vocabulary's encoding (byte-level BPE or byte fallback) and the ids that end a text."""
    import xgrammar

    backend = tokenizer.backend
    metadata = xgrammar.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
    size = backend.get_vocab_size(with_added_tokens=True)
    encoded = [backend.id_to_token(i) or "" for i in range(size)]
    return xgrammar.TokenizerInfo(encoded, metadata["vocab_type"], vocab_size=max(vocab_size, size),
                                  stop_token_ids=list(tokenizer.eos_token_ids),
                                  add_prefix_space=metadata["add_prefix_space"])


def _compile(compiler: xgrammar.GrammarCompiler, spec: StructuredOutputsParams) -> xgrammar.CompiledGrammar:
    any_ws = not spec.disable_any_whitespace
    kind = spec.kind
    try:
        if kind in ("json", "json_object"):
            schema: Any = spec.json if kind == "json" else {"type": "object"}
            return compiler.compile_json_schema(json.dumps(schema), any_whitespace=any_ws, strict_mode=kind == "json",
                                                max_whitespace_cnt=MAX_WHITESPACE if any_ws else None)
        if kind == "regex":
            assert spec.regex is not None
            return compiler.compile_regex(spec.regex)
        if kind == "choice":
            assert spec.choice is not None
            return compiler.compile_grammar(choice_grammar(spec.choice))
        if kind == "grammar":
            assert spec.grammar is not None
            return compiler.compile_grammar(spec.grammar)
        assert isinstance(spec.structural_tag, dict)  # the spec parsed a string
        return _structural_tag(compiler, spec.structural_tag)
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{spec.param}: the {kind} constraint does not compile: {_first_line(e)}") from None


def _structural_tag(compiler: xgrammar.GrammarCompiler, tag: dict[str, Any]) -> xgrammar.CompiledGrammar:
    """xgrammar's structural tag ({"type": "structural_tag", "format": {...}}), or vLLM's older
    form ({"structures": [{"begin", "schema", "end"}], "triggers": [...]})."""
    import xgrammar

    if "structures" in tag:
        items = [xgrammar.StructuralTagItem(begin=s["begin"], schema=json.dumps(s.get("schema", {})), end=s["end"])
                 for s in tag["structures"]]
        return compiler.compile_structural_tag(items, list(tag.get("triggers", [])))
    return compiler.compile_structural_tag(json.dumps({**tag, "type": "structural_tag"}))


def choice_grammar(choices: tuple[str, ...] | list[str]) -> str:
    """An EBNF grammar whose sentences are exactly the choices."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


_NATIVE_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[10:12:02] /project/cpp/x.cc:94: "


def _first_line(e: BaseException) -> str:
    """The compiler's message for a client: its last line, without the native source location."""
    text = str(e).strip() or type(e).__name__
    return _NATIVE_PREFIX.sub("", text.splitlines()[-1])[:500]
