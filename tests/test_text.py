"""Text in and out on the default model: token ids identical to transformers (plain text and
chat template), and incremental detokenization that never splits a UTF-8 character."""

from __future__ import annotations

import pytest

from atomr_trio.model_source import ModelSource
from atomr_trio.text.detokenizer import IncrementalDetokenizer

pytestmark = pytest.mark.real_model

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there!"}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one, in Japanese: 色"},
    ],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "  spaces\n\nand newlines  "},
    ],
]
TEXTS = ["Hello world", "  two leading spaces", "tabs\tand\nnewlines\n\n", "naïve café 😀 日本語 ✓",
         "<|im_start|>user\nhi<|im_end|>", "12345 + 678 = 13023", ""]


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=["user", "system", "multi-turn", "system-multi"])
def test_chat_ids_equal_transformers(default_source: ModelSource, hf_tokenizer, conv) -> None:
    ours = default_source.tokenizer.encode_chat(conv, add_generation_prompt=True)
    theirs = hf_tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
    assert ours == list(theirs)


@pytest.mark.parametrize("conv", [
    [*CONVERSATIONS[0], {"role": "assistant", "content": "The capital of"}],
    [*CONVERSATIONS[3], {"role": "assistant", "content": "Bonjour, je "}],
    [*CONVERSATIONS[2], {"role": "assistant", "content": "青"}],
], ids=["user", "trailing-space", "multi-turn"])
def test_continue_final_message_ids_equal_transformers(default_source: ModelSource, hf_tokenizer, conv) -> None:
    tok = default_source.tokenizer
    text = tok.apply_chat_template(conv, add_generation_prompt=False, continue_final_message=True)
    theirs = hf_tokenizer.apply_chat_template(conv, add_generation_prompt=False, continue_final_message=True,
                                              tokenize=True)
    theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
    assert tok.encode(text, add_special_tokens=False) == list(theirs)


def test_chat_template_inserts_default_system_prompt(default_source: ModelSource) -> None:
    text = default_source.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>assistant\n")


def test_content_parts_render_like_a_string(default_source: ModelSource) -> None:
    tok = default_source.tokenizer
    content = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "you"}]
    parts = [{"role": "user", "content": content}]
    assert tok.encode_chat(parts) == tok.encode_chat([{"role": "user", "content": "Hello you"}])


@pytest.mark.parametrize("text", TEXTS)
def test_plain_ids_equal_transformers(default_source: ModelSource, hf_tokenizer, text: str) -> None:
    assert default_source.tokenizer.encode(text) == hf_tokenizer.encode(text, add_special_tokens=True)


@pytest.mark.parametrize("text", ["naïve café 😀 日本語 ✓ and 🇫🇷 flags", "plain ascii text, nothing odd",
                                  "emoji run 😀😃😄😁 end"])
def test_incremental_detokenization(default_source: ModelSource, text: str) -> None:
    tok = default_source.tokenizer
    ids = tok.encode(text)
    prompt = tok.encode("Say:")
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=True)
    deltas = [detok.push([t]) for t in ids]
    deltas.append(detok.flush())
    assert not any("\ufffd" in d for d in deltas)  # never half a character
    assert "".join(deltas) == tok.decode(ids)
    if any(ord(c) > 0xFFFF for c in text):
        assert "" in deltas[:-1]  # some token really did end inside a character and was held


def test_detokenizer_flushes_a_dangling_partial_character(default_source: ModelSource) -> None:
    tok = default_source.tokenizer
    ids = tok.encode("😀")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    assert detok.push(ids[:-1]) == ""
    assert detok.flush() == tok.decode(ids[:-1])  # what a full decode shows
