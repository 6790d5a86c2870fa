"""GGUF tokenizers: a SentencePiece ('llama') vocabulary read from GGUF metadata encodes and
decodes as transformers' tokenizer for it does.

The vocabulary is a BPE with byte fallback trained here on a small corpus (`<unk>`, `<s>`, `</s>`,
the 256 `<0xNN>` byte pieces, `▁` and some hundreds of pieces), written as llama.cpp writes a
SentencePiece vocabulary: pieces with scores (better merges score higher) and token types, no
merges. Two references: transformers' own GGUF loading of the same file, and a LlamaTokenizerFast
built from the trained vocabulary and its true merges (the model's tokenizer.json, as it were).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tokenizers import AddedToken, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from atomr_trio.model.config import ModelLoadError
from atomr_trio.model.gguf_file import GGUFFile
from atomr_trio.text.detokenizer import IncrementalDetokenizer
from atomr_trio.text.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")

_CORPUS = [
    "The quick brown fox jumps over the lazy dog, and the dog does not mind at all.",
    "Hello world! How are you doing today? I am doing well, thank you for asking.",
    "Machine learning models tokenize text into pieces before they read it.",
    "def main():\n    print('hello')\n    return 0\n\nif __name__ == '__main__':\n    main()\n",
    "Les élèves étudient à la bibliothèque pendant que le professeur corrige les copies.",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein, sagt das Lied.",
    "日本語のテキストも少し含めます。東京は大きな都市です。",
    "Numbers like 12345 and 67890 appear here, with 3.14159 and 2.71828 too.",
    "A tokenizer splits words; sentences become tokens, tokens become numbers.",
    "Weather report: sunny in the morning, clouds and rain later in the evening.",
    "She sells sea shells by the sea shore; the shells she sells are surely sea shells.",
    "Mañana vamos a la playa con mis amigos y comeremos paella.",
]
_CONTROL = ["<|im_start|>", "<|im_end|>", "<|eot|>"]
_USER_DEFINED = ["<tool>"]
_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# 20 strings: words, spaces at the ends and in runs, newlines, byte fallback (accents outside
# the vocabulary, CJK, emoji, control characters) and special / added tokens inside the text.
STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing spaces   ",
    "  multiple   spaces  inside  ",
    "line one\nline two\n\nline four",
    "\n\nstarts with newlines",
    "tabs\tand\r\ncarriage returns",
    "Les élèves étudient à la bibliothèque.",
    "Ça coûte 5€ — naïve façade, Øresund, Ångström",
    "日本語のテキスト and 中文字符 mixed",
    "emoji 🦊🐶 and 👩‍💻 zwj sequences",
    "\u0000\u0001 control bytes \u007f",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text before <|im_end|> text after",
    "a <tool> call <tool>twice</tool>",
    "literal <s> and </s> in the middle",
    "<unk> at the start",
    "",
    " ",
]


def _train() -> HFTokenizer:
    tok = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=["<unk>", "<s>", "</s>", *bytes_],
                                  initial_alphabet=["▁"], show_progress=False)
    tok.train_from_iterator(_CORPUS * 10, trainer)
    return tok


@pytest.fixture(scope="module")
def trained() -> dict[str, Any]:
    model = json.loads(_train().to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    return {"vocab": model["vocab"], "merges": merges}


def write_spm_gguf(path: Path, trained: dict[str, Any], metadata: Callable[[Any], None] | None = None,
                   model: str = "llama", arch: str = "llama", extra: tuple[str, ...] = ()) -> None:
    """The trained vocabulary as llama.cpp writes a SentencePiece one: scores, token types, no
    merges; `extra` pieces (user-defined) follow the trained ones."""
    vocab: dict[str, int] = trained["vocab"]
    tokens, scores, types = [], [], []
    for i, piece in enumerate(sorted(vocab, key=vocab.__getitem__)):
        assert vocab[piece] == i
        tokens.append(piece)
        if piece == "<unk>":
            types.append(gguf.TokenType.UNKNOWN)
        elif piece in ("<s>", "</s>"):
            types.append(gguf.TokenType.CONTROL)
        elif piece.startswith("<0x"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
        scores.append(0.0 if types[-1] != gguf.TokenType.NORMAL else -float(i))
    for piece in extra:
        tokens.append(piece)
        types.append(gguf.TokenType.USER_DEFINED)
        scores.append(0.0)
    for piece in _CONTROL + _USER_DEFINED:
        tokens.append(piece)
        types.append(gguf.TokenType.CONTROL if piece in _CONTROL else gguf.TokenType.USER_DEFINED)
        scores.append(0.0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types([int(t) for t in types])
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_eot_token_id(tokens.index("<|eot|>"))
    w.add_pad_token_id(0)
    w.add_chat_template(_TEMPLATE)
    if metadata is not None:
        metadata(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def ours(path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(GGUFFile(path).tokenizer_data(), str(path))


def true_merges_reference(trained: dict[str, Any], add_prefix_space: bool) -> Any:
    """transformers' Llama tokenizer over the trained vocabulary and the merges it was trained with."""
    from transformers import LlamaTokenizerFast

    ref = LlamaTokenizerFast(vocab=dict(trained["vocab"]), merges=list(trained["merges"]),
                             add_prefix_space=add_prefix_space, legacy=False)
    ref.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in _CONTROL]},
        replace_extra_special_tokens=False,
    )
    ref.add_tokens([AddedToken(t, special=False, normalized=False) for t in _USER_DEFINED])
    return ref


def assert_same(tok: Tokenizer, ref: Any, strings: list[str], add_special_tokens: bool) -> None:
    for s in strings:
        ids = tok.encode(s, add_special_tokens=add_special_tokens)
        assert ids == ref.encode(s, add_special_tokens=add_special_tokens), s
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), s
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids), s


def test_the_corpus_reaches_byte_fallback_and_has_hundreds_of_pieces(trained: dict[str, Any]) -> None:
    assert len(trained["vocab"]) - 259 >= 300 and "▁" in trained["vocab"]
    ref = true_merges_reference(trained, True)
    fallback = [s for s in STRINGS if any(t.startswith("<0x") for t in ref.tokenize(s))]
    assert len(fallback) >= 5


def test_spm_gguf_equals_transformers_gguf_loading(trained: dict[str, Any], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = tmp_path / "spm.gguf"
    write_spm_gguf(path, trained)
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    tok = ours(path)
    assert tok.add_bos_token and tok.bos_token == "<s>" and tok.eos_token == "</s>"
    assert_same(tok, ref, STRINGS, add_special_tokens=True)
    assert_same(tok, ref, STRINGS, add_special_tokens=False)


@pytest.mark.parametrize("add_space_prefix", [None, True, False])
def test_spm_gguf_equals_the_tokenizer_trained_with_its_merges(
    trained: dict[str, Any], tmp_path: Path, add_space_prefix: bool | None
) -> None:
    """Merges derived from the scores split text as the true merges do; `add_space_prefix`
    (default true) decides the `▁` before the text and its stripping on decode."""
    path = tmp_path / "spm.gguf"
    def flag(w: Any) -> None:
        if add_space_prefix is not None:
            w.add_add_space_prefix(add_space_prefix)

    write_spm_gguf(path, trained, flag)
    ref = true_merges_reference(trained, add_space_prefix is not False)
    assert_same(ours(path), ref, STRINGS, add_special_tokens=False)


def test_add_bos_and_add_eos_follow_the_file(trained: dict[str, Any], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = tmp_path / "spm.gguf"

    def flags(w: Any) -> None:
        w.add_add_bos_token(False)
        w.add_add_eos_token(True)

    write_spm_gguf(path, trained, flags)
    tok = ours(path)
    assert tok.encode("Hello world")[-1] == 2 and tok.encode("Hello world")[0] != 1
    assert tok.encode("Hello world", add_special_tokens=False)[-1] != 2
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert_same(tok, ref, STRINGS[:5], add_special_tokens=True)


def test_spm_gguf_chat_template_eos_eot_and_padding(trained: dict[str, Any], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = tmp_path / "spm.gguf"
    write_spm_gguf(path, trained)
    tok = ours(path)
    eot = tok.backend.token_to_id("<|eot|>")
    assert tok.eos_token_ids == (2, eot) and tok.pad_token_id == 0
    assert {1, 2, eot, tok.backend.token_to_id("<|im_end|>")} <= tok.special_ids
    messages = [{"role": "user", "content": "Hello world, élève 🦊"}, {"role": "assistant", "content": " two  spaces"}]
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    text = tok.apply_chat_template(messages)
    assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<s><|im_start|>user\n")
    assert tok.encode_chat(messages) == ref.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", ["naïve café 😀 日本語 and 🦊", "Hello world  two", " spaced\n\nlines "])
def test_incremental_detokenization_keeps_the_continuations_spaces(
    trained: dict[str, Any], tmp_path: Path, text: str
) -> None:
    """Streamed deltas of SentencePiece ids are the text they add after the prompt: a leading `▁`
    stays a space there (only a decode from the very start strips it), and no delta holds half a
    character."""
    path = tmp_path / "spm.gguf"
    write_spm_gguf(path, trained)
    tok = ours(path)
    prompt, ids = tok.encode("Say:"), tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=True)
    deltas = [detok.push([t]) for t in ids] + [detok.flush()]
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == tok.decode(prompt + ids)[len(tok.decode(prompt)):]
    fresh = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    assert "".join([fresh.push([t]) for t in ids] + [fresh.flush()]) == tok.decode(ids)


def test_phi3_spm_gguf_equals_transformers(trained: dict[str, Any], tmp_path: Path) -> None:
    """Phi-3's vocabulary prepends `▁` to every stretch of text, as its tokenizer.json does."""
    from transformers import AutoTokenizer

    path = tmp_path / "phi3.gguf"
    write_spm_gguf(path, trained, arch="phi3")
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    tok = ours(path)
    assert tok.encode("a <|im_end|> b", add_special_tokens=False) != ours_llama(trained, tmp_path).encode(
        "a <|im_end|> b", add_special_tokens=False)
    assert_same(tok, ref, STRINGS, add_special_tokens=True)
    assert_same(tok, ref, STRINGS, add_special_tokens=False)


def ours_llama(trained: dict[str, Any], tmp_path: Path) -> Tokenizer:
    path = tmp_path / "llama" / "spm.gguf"
    path.parent.mkdir()
    write_spm_gguf(path, trained)
    return ours(path)


@pytest.mark.parametrize("says", [False, None])
def test_gemma_spm_gguf_equals_transformers(trained: dict[str, Any], tmp_path: Path, says: bool | None) -> None:
    """Gemma: no space prefix (whether or not the file says so), whitespace-run pieces stored with
    real spaces, merges in vocabulary order. (This branch reads no Gemma weights; the tokenizer
    data of a 'llama' file is relabelled instead.)"""
    from transformers import AutoTokenizer

    runs = ("  ", "   ", "    ")

    def flag(w: Any) -> None:
        if says is not None:
            w.add_add_space_prefix(says)

    path = tmp_path / "gemma.gguf"
    write_spm_gguf(path, trained, flag, arch="gemma2", extra=runs)
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    llama = tmp_path / "llama.gguf"
    write_spm_gguf(llama, trained, flag, extra=runs)
    data = dataclasses.replace(GGUFFile(llama).tokenizer_data(), architecture="gemma2")
    tok = Tokenizer.from_gguf(data, str(path))
    assert [tok.id_to_token(i) for i in tok.encode("a    b", add_special_tokens=False)] == ["a", "▁▁▁", "▁b"]
    assert_same(tok, ref, STRINGS, add_special_tokens=True)
    assert_same(tok, ref, STRINGS, add_special_tokens=False)


def test_a_llama2_style_gguf_opens_with_its_sentencepiece_tokenizer(trained: dict[str, Any], tmp_path: Path) -> None:
    """ModelSource reads the vocabulary from the file (no weights needed for that): BOS added,
    EOS and EOT end a sequence, and structured outputs see a byte-fallback vocabulary."""
    from atomr_trio.grammar.compiler import tokenizer_info
    from atomr_trio.model_source import ModelSource

    def llama2(w: Any) -> None:
        w.add_context_length(64)
        w.add_embedding_length(32)
        w.add_block_count(1)
        w.add_feed_forward_length(64)
        w.add_head_count(4)
        w.add_head_count_kv(4)
        w.add_layer_norm_rms_eps(1e-5)

    path = tmp_path / "llama2.gguf"
    write_spm_gguf(path, trained, llama2)
    source = ModelSource.open(path)
    tok = source.tokenizer
    assert source.kind == "gguf" and tok.encode("Hello world")[0] == 1
    assert tok.decode(tok.encode("Hello world  élève 🦊")) == "Hello world  élève 🦊"
    assert source.eos_token_ids[:2] == (2, tok.backend.token_to_id("<|eot|>"))
    info = tokenizer_info(tok, source.config.vocab_size)
    assert info.vocab_type.name == "BYTE_FALLBACK" and info.add_prefix_space


@pytest.mark.parametrize("kind", ["bert", "t5", "rwkv"])
def test_an_unsupported_tokenizer_model_is_refused_by_name(
    trained: dict[str, Any], tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "other.gguf"
    write_spm_gguf(path, trained, model=kind)
    with pytest.raises(ModelLoadError, match=rf"tokenizer\.ggml\.model = '{kind}'.*'gpt2', 'llama'"):
        ours(path)
