"""engine/validation.py on its own: the one check every face and the engine make of a request,
with the messages callers see, and the gateway's OpenAI wording of a context too long."""

from __future__ import annotations

import pytest

from atomr_trio.engine.engine_config import EngineConfig
from atomr_trio.engine.validation import ContextLengthExceeded, check_request, token_ids
from atomr_trio.sampling_params import SamplingParams
from atomr_trio.server.errors import bad_request

VOCAB = 100
CFG = EngineConfig(max_model_len=64, num_kv_blocks=8, block_size=4)  # 32 tokens of KV cache


def test_token_ids_name_every_offending_entry() -> None:
    assert token_ids((1, 2, 99), VOCAB) == [1, 2, 99]
    with pytest.raises(ValueError, match="must be a list of integers"):
        token_ids("12", VOCAB)
    with pytest.raises(ValueError) as e:
        token_ids([5, 100, True, -1, "x"], VOCAB)
    assert str(e.value) == ("prompt token ids must be integers in [0, 100); 4 are not: "
                            "[1] 100, [2] True, [3] -1, [4] 'x'")


def test_a_request_that_fits_passes() -> None:
    check_request([1] * 10, SamplingParams(max_tokens=22), CFG, VOCAB)  # 32 tokens: the whole cache
    check_request([1] * 10, SamplingParams(max_tokens=0), CFG, VOCAB)


@pytest.mark.parametrize(("ids", "params", "says"), [
    ([], SamplingParams(), "the prompt is empty"),
    ([1, 200], SamplingParams(), r"prompt token ids must be integers in \[0, 100\); 1 are not: \[1\] 200"),
    ([1] * 64, SamplingParams(), "the prompt has 64 tokens; this model's maximum context length is 64"),
    ([1], SamplingParams(logit_bias={150: 1.0}), "logit_bias names 1 token id"),
    ([1], SamplingParams(stop_token_ids=[100]), "stop_token_ids names 1 token id"),
    ([1] * 10, SamplingParams(max_tokens=23), "needs up to 33 tokens of KV cache; this engine holds 32"),
    ([1] * 10, SamplingParams(max_tokens=None), "needs up to 64 tokens of KV cache"),
])
def test_refusals_say_why(ids: list[int], params: SamplingParams, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        check_request(ids, params, CFG, VOCAB)


def test_the_completion_must_fit_only_when_asked() -> None:
    roomy = EngineConfig(max_model_len=64, num_kv_blocks=64, block_size=4)
    check_request([1] * 60, SamplingParams(max_tokens=10), roomy, VOCAB)  # ends at the context ("length")
    with pytest.raises(ContextLengthExceeded) as e:
        check_request([1] * 60, SamplingParams(max_tokens=10), roomy, VOCAB, completion_must_fit=True)
    assert (e.value.prompt_tokens, e.value.asked, e.value.max_model_len) == (60, 10, 64)
    with pytest.raises(ContextLengthExceeded) as e:
        check_request([1] * 70, SamplingParams(max_tokens=None), roomy, VOCAB, completion_must_fit=True)
    assert (e.value.prompt_tokens, e.value.asked) == (70, None)


def test_the_gateway_words_a_context_too_long_as_openai_does() -> None:
    asked = bad_request(ContextLengthExceeded(60, 64, 10))
    assert (asked.status, asked.param) == (400, "max_tokens")
    assert asked.message == ("This model's maximum context length is 64 tokens. However, you requested 70 "
                             "tokens (60 in the messages, 10 in the completion). Please reduce the length of "
                             "the messages or completion.")
    prompt = bad_request(ContextLengthExceeded(70, 64))
    assert (prompt.status, prompt.param) == (400, "messages")
    assert prompt.message == ("This model's maximum context length is 64 tokens. However, your prompt has 70 "
                              "tokens. Please reduce the length of the messages.")
    other = bad_request(ValueError("logit_bias names ..."), param="logit_bias")
    assert (other.status, other.param, other.message) == (400, "logit_bias", "logit_bias names ...")


def test_an_unresolved_config_is_a_bug() -> None:
    with pytest.raises(AssertionError):
        check_request([1], SamplingParams(), EngineConfig(), VOCAB)
