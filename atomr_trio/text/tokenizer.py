"""Tokenizer: text <-> token ids and the model's chat template, from an HF directory or a GGUF file.

Invariant: chat prompts render the model's own jinja template and encode without adding special
tokens (the template writes them), so ids equal transformers' `apply_chat_template`; plain
prompts get the BOS token (and the EOS token) exactly when the model asks for it.

A GGUF carries no tokenizer.json: its vocabulary is rebuilt here, a byte-level BPE ('gpt2') or a
SentencePiece BPE ('llama', byte fallback, `▁` for spaces) with the normalizer, pre-tokenizer and
decoder transformers gives the same file, so ids and decoded text equal transformers' (one
difference, kept on purpose: a `tokenizer.ggml.add_space_prefix` = false is honoured, as the
model's own tokenizer does, where transformers' GGUF loading prepends a space anyway). Any other
`tokenizer.ggml.model` is a ModelLoadError naming it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from ..model.config import ModelLoadError, UnsupportedModel
from ..model.gguf_file import GGUFTokenizerData
from .chat_template import ChatTemplate, ChatTemplateError

# The pre-tokenizer split used by Llama 3 and Qwen2 byte-level BPE vocabularies.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class Tokenizer:
    def __init__(
        self,
        tok: HFTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        add_bos_token: bool,
        chat_template: str | None,
        source: str,
        add_eos_token: bool = False,
        pad_token_id: int | None = None,
    ) -> None:
        self._tok = tok
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.pad_token_id = pad_token_id
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.source = source
        self.special_ids = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        self.bos_token = tok.id_to_token(bos_token_id) if bos_token_id is not None else None
        eos0 = self.eos_token_ids[0] if self.eos_token_ids else None
        self.eos_token = tok.id_to_token(eos0) if eos0 is not None else None
        self.chat_template = (
            ChatTemplate(chat_template, bos_token=self.bos_token or "", eos_token=self.eos_token or "")
            if chat_template
            else None
        )

    @property
    def backend(self) -> HFTokenizer:
        """The `tokenizers` Tokenizer underneath (its vocabulary, for grammar compilers)."""
        return self._tok

    # ---- construction ------------------------------------------------------------------
    @staticmethod
    def from_hf_dir(path: Path, eos_token_ids: Sequence[int]) -> Tokenizer:
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise ModelLoadError(f"{tj}: no tokenizer.json in the model directory")
        tok = HFTokenizer.from_file(str(tj))
        tc_path = path / "tokenizer_config.json"
        tc: dict[str, Any] = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
        template = tc.get("chat_template")
        jinja = path / "chat_template.jinja"
        if jinja.is_file():
            template = jinja.read_text()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)

        def token_id(key: str) -> int | None:
            v = tc.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            return tok.token_to_id(v) if isinstance(v, str) else None

        eos = list(eos_token_ids)
        tc_eos = token_id("eos_token")
        if tc_eos is not None and tc_eos not in eos:
            eos.insert(0, tc_eos)
        return Tokenizer(
            tok,
            bos_token_id=token_id("bos_token"),
            eos_token_ids=eos,
            # tokenizer.json's post-processor adds BOS when the model wants it.
            add_bos_token=False,
            pad_token_id=token_id("pad_token"),
            chat_template=template,
            source=str(tj),
        )

    @staticmethod
    def from_gguf(data: GGUFTokenizerData, source: str) -> Tokenizer:
        """The tokenizer a GGUF's metadata describes: a byte-level BPE ('gpt2') or a SentencePiece
        ('llama') vocabulary, each built as transformers builds it from the same file."""
        if data.model == "gpt2":
            tok = _byte_level_bpe(data, source)
            add_bos = bool(data.add_bos_token)
        elif data.model == "llama":
            tok = _sentencepiece_bpe(data, source)
            add_bos = data.add_bos_token is None or data.add_bos_token  # llama.cpp's default for these
        else:
            raise UnsupportedModel(
                f"{source}: tokenizer.ggml.model = {data.model!r} is not supported from GGUF "
                f"(supported: {', '.join(repr(m) for m in _GGUF_MODELS)}); load the model's HF directory instead"
            )
        eos = [i for i in (data.eos_token_id, data.eot_token_id, data.eom_token_id) if i is not None]
        return Tokenizer(
            tok,
            bos_token_id=data.bos_token_id,
            eos_token_ids=list(dict.fromkeys(eos)),
            add_bos_token=add_bos,
            add_eos_token=data.add_eos_token,
            pad_token_id=data.pad_token_id,
            chat_template=data.chat_template,
            source=source,
        )

    # ---- use ------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if (
            add_special_tokens
            and self.add_bos_token
            and self.bos_token_id is not None
            and ids[:1] != [self.bos_token_id]
        ):
            ids.insert(0, self.bos_token_id)
        if add_special_tokens and self.add_eos_token and self.eos_token_ids:
            ids.append(self.eos_token_ids[0])
        return ids

    def decode(
        self, ids: Sequence[int], skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True
    ) -> str:
        """Text of `ids`, as the tokenizer's decoder writes it. With `spaces_between_special_tokens`
        false (vLLM's option, which matters only when special tokens are kept), nothing is written
        between two special tokens in a row: a tokenizer without a decoder joins every token with a
        space, byte-level and metaspace decoders put nothing there anyway."""
        ids = list(ids)
        if skip_special_tokens or spaces_between_special_tokens:
            return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))
        cuts = [i for i in range(1, len(ids)) if ids[i] in self.special_ids and ids[i - 1] in self.special_ids]
        bounds = [0, *cuts, len(ids)]
        return "".join(str(self._tok.decode(ids[a:b], skip_special_tokens=False))
                       for a, b in zip(bounds, bounds[1:], strict=False))

    def id_to_token(self, token_id: int) -> str | None:
        tok: str | None = self._tok.id_to_token(token_id)
        return tok

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        continue_final_message: bool = False,
        documents: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        if self.chat_template is None:
            raise ChatTemplateError(
                "this model has no chat template (none in its tokenizer config or GGUF metadata), so chat "
                "messages cannot be rendered; send a plain text prompt (/v1/completions, LLM.generate)"
            )
        return self.chat_template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            documents=documents,
            extra=template_kwargs,
            tools=tools,
        )

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        text = self.apply_chat_template(messages, add_generation_prompt)
        return self.encode(text, add_special_tokens=False)


# tokenizer.ggml.model values read from GGUF: byte-level BPE, SentencePiece (BPE with scores).
_GGUF_MODELS = ("gpt2", "llama")
# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 2, 3, 4


def _add_gguf_tokens(tok: HFTokenizer, data: GGUFTokenizerData, source: str, special_types: tuple[int, ...],
                     vocab: dict[str, int] | None = None) -> None:
    """Tokens the file marks as control (and, for SentencePiece, unknown) become special added
    tokens, user-defined ones plain added tokens: both are matched whole in the text, before the
    model splits what lies between them. With `vocab` (a respelled vocabulary), a user-defined
    token it no longer holds stays a plain piece."""
    types = data.token_types or [1] * len(data.tokens)
    if len(types) != len(data.tokens):
        raise ModelLoadError(f"{source}: {len(types)} tokenizer.ggml.token_type for {len(data.tokens)} tokens")
    tok.add_special_tokens([
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(data.tokens, types, strict=True)
        if ty in special_types
    ])
    tok.add_tokens([
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(data.tokens, types, strict=True)
        if ty == _TOKEN_USER_DEFINED and (vocab is None or t in vocab)
    ])


def _byte_level_bpe(data: GGUFTokenizerData, source: str) -> HFTokenizer:
    """'gpt2': byte-level BPE with the file's merges and the split regex `tokenizer.ggml.pre` names."""
    vocab = {t: i for i, t in enumerate(data.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in data.merges]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))  # type: ignore[arg-type]
    if data.pre in (None, "default", "gpt2", "smollm"):
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif data.pre in ("llama-bpe", "llama3", "qwen2", "smaug-bpe"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        raise UnsupportedModel(f"{source}: tokenizer.ggml.pre = {data.pre!r} is not supported")
    tok.decoder = decoders.ByteLevel()
    _add_gguf_tokens(tok, data, source, (_TOKEN_CONTROL,))
    return tok


def _sentencepiece_bpe(data: GGUFTokenizerData, source: str) -> HFTokenizer:
    """'llama': a SentencePiece BPE vocabulary as transformers runs it (LlamaTokenizer; Gemma's and
    Phi-3's variants by `general.architecture`) — BPE whose merges are the file's, or else every
    split of a piece into two pieces, best-scored piece first; `<0xNN>` pieces as byte fallback;
    spaces as `▁`, one prepended to the text unless `add_space_prefix` is false (and stripped
    again on decode)."""
    tokens = data.tokens
    gemma = data.architecture.startswith("gemma")
    if gemma:  # Gemma files spell whitespace pieces with real spaces, its vocabulary with `▁`
        tokens = [t.replace(" ", "\u2581") if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[str, str]]
    if data.merges:
        merges = [(left, right) for left, _, right in (m.partition(" ") for m in data.merges)]
    else:
        if data.scores and len(data.scores) != len(tokens):
            raise ModelLoadError(f"{source}: {len(data.scores)} tokenizer.ggml.scores for {len(tokens)} tokens")
        # Gemma's scores do not follow its merge order; its vocabulary order does.
        scores = data.scores if data.scores and not gemma else [-float(i) for i in range(len(tokens))]
        merges = _merges_from_scores(tokens, scores, vocab)
    unk = tokens[data.unk_token_id] if data.unk_token_id is not None else ("<unk>" if "<unk>" in vocab else None)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk,
                                 fuse_unk=True, byte_fallback=True))
    # Gemma prepends no space unless its file asks; Llama-style vocabularies do unless it forbids.
    prefix = data.add_space_prefix if data.add_space_prefix is not None else not gemma
    if data.architecture == "phi3" and prefix:
        # Phi-3's tokenizer.json: the prefix comes from a normalizer, so every stretch of text
        # (between added tokens too) gets one, even one already starting with a space.
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
        )
    chain = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        chain.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(chain)
    _add_gguf_tokens(tok, data, source, (_TOKEN_CONTROL, _TOKEN_UNKNOWN), vocab)
    return tok


def _merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: each piece that splits into two pieces
    of the vocabulary is a merge of those two, ranked by the piece's score (higher first), then by
    the longer left, then the longer right part; remaining ties keep the vocabulary's order. This
    is the order transformers derives, so the two tokenizers split text alike."""
    ranked: list[tuple[float, int, int, int, int, int, str, str]] = []
    for index, (piece, score) in enumerate(zip(tokens, scores, strict=True)):
        if vocab.get(piece) != index:  # a repeated piece counts once, where the vocabulary maps it
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            li, ri = vocab.get(left), vocab.get(right)
            if li is not None and ri is not None:
                ranked.append((-score, -len(left), -len(right), index, li, ri, left, right))
    ranked.sort()
    return [(r[6], r[7]) for r in ranked]
