"""ChatTemplate on small hand-written templates: continue_final_message leaves the last message
open as transformers does, documents and keyword arguments reach the template, and conflicting
arguments are errors."""

from __future__ import annotations

import pytest

from atomr_trio.text.chat_template import ChatTemplate, ChatTemplateError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PREFILL = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is"}]


def render(source: str, messages: list[dict], **kw) -> str:
    return ChatTemplate(source, bos_token="<s>", eos_token="</s>").render(messages, **kw)


def test_continue_final_message_leaves_the_last_message_open() -> None:
    closed = render(CHATML, PREFILL, add_generation_prompt=False)
    assert closed.endswith("The answer is<|im_end|>\n")
    opened = render(CHATML, PREFILL, add_generation_prompt=False, continue_final_message=True)
    assert opened == closed.removesuffix("<|im_end|>\n")
    spaced = [PREFILL[0], {"role": "assistant", "content": "The answer is "}]  # kept as the template keeps it
    assert render(CHATML, spaced, add_generation_prompt=False, continue_final_message=True).endswith("is ")
    trimming = CHATML.replace("{{ m['content'] }}", "{{ m['content'] | trim }}")
    trimmed = render(trimming, spaced, add_generation_prompt=False, continue_final_message=True)
    assert trimmed.endswith("\nThe answer is")
    parts = [PREFILL[0], {"role": "assistant", "content": [{"type": "text", "text": "The answer is"}]}]
    assert render(CHATML, parts, add_generation_prompt=False, continue_final_message=True) == opened


def test_continue_final_message_errors() -> None:
    with pytest.raises(ChatTemplateError, match="cannot both be set"):
        render(CHATML, PREFILL, add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(ChatTemplateError, match="final message with text"):
        render(CHATML, [PREFILL[0], {"role": "assistant", "content": None}], add_generation_prompt=False,
               continue_final_message=True)
    dropping = "{% for m in messages %}{{ m['role'] }}|{% endfor %}"
    with pytest.raises(ChatTemplateError, match="cannot be continued"):
        render(dropping, PREFILL, add_generation_prompt=False, continue_final_message=True)


def test_documents_and_keyword_arguments_reach_the_template() -> None:
    source = ("{{ tools is none }}|{{ documents is none }}|{% for d in documents or [] %}[{{ d['title'] }}]"
              "{% endfor %}|{{ greeting | default('none') }}|{{ bos_token }}")
    assert render(source, PREFILL) == "True|True||none|<s>"
    docs = [{"title": "A", "text": "a"}, {"title": "B", "text": "b"}]
    assert render(source, PREFILL, documents=docs, extra={"greeting": "hello", "bos_token": "<B>"}) == \
        "True|False|[A][B]|hello|<B>"
    with pytest.raises(ChatTemplateError, match="may not set messages, add_generation_prompt"):
        render(source, PREFILL, extra={"messages": [], "add_generation_prompt": False})
