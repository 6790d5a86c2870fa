"""SamplingParams: valid values are normalized, bad ones raise ValueError naming the parameter."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from atomr_trio.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_N, MAX_STOP_STRINGS, SamplingParams


def test_defaults_are_valid() -> None:
    p = SamplingParams()
    assert p.n == 1 and p.max_tokens == 16 and p.stop_strings == ()
    assert not p.greedy and not p.uses_penalties


def test_normalization() -> None:
    p = SamplingParams(top_k=-1, stop="###", logit_bias={"5": 2, 7: -1.5}, stop_token_ids=[3])
    assert p.top_k == 0  # -1 means "no top-k", as 0 does
    assert p.stop_strings == ("###",)
    assert p.logit_bias == {5: 2.0, 7: -1.5}  # JSON object keys arrive as strings
    assert p.stop_token_ids == [3]
    assert SamplingParams(stop=["a", "b"]).stop_strings == ("a", "b")


def test_greedy_and_penalty_flags() -> None:
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=0.01).greedy
    assert SamplingParams(repetition_penalty=1.1).uses_penalties
    assert SamplingParams(presence_penalty=-0.5).uses_penalties
    assert SamplingParams(frequency_penalty=0.1).uses_penalties


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": MAX_N},
        {"temperature": 0},
        {"temperature": 100},
        {"top_p": 1e-6},
        {"top_k": 1},
        {"min_p": 1.0},
        {"seed": -1},
        {"presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"repetition_penalty": 0.01},
        {"max_tokens": None, "min_tokens": 100},
        {"min_tokens": 16, "max_tokens": 16},
        {"stop": ["x"] * MAX_STOP_STRINGS},
        {"logprobs": 0},
        {"logprobs": MAX_LOGPROBS},
        {"prompt_logprobs": 0},
        {"prompt_logprobs": MAX_LOGPROBS},
        {"max_tokens": 0},  # score the prompt only
        {"logit_bias": {i: 1.0 for i in range(MAX_LOGIT_BIAS)}},
        {"logit_bias": {0: -100, 1: 100}},
        {"priority": -10},
    ],
)
def test_accepts_boundary_values(kwargs: dict[str, Any]) -> None:
    SamplingParams(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n": 0}, "n"),
        ({"n": MAX_N + 1}, "n"),
        ({"n": 2.0}, "n"),
        ({"n": True}, "n"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": math.nan}, "min_p"),
        ({"seed": 1 << 63}, "seed"),
        ({"seed": True}, "seed"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"frequency_penalty": math.nan}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": -1}, "repetition_penalty"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 1.0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": False}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"stop": ["x"] * (MAX_STOP_STRINGS + 1)}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"stop": ["x" * 1025]}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"prompt_logprobs": MAX_LOGPROBS + 1}, "prompt_logprobs"),
        ({"prompt_logprobs": 1.0}, "prompt_logprobs"),
        ({"min_tokens": 1, "max_tokens": 0}, "min_tokens"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {1: 101.0}}, "logit_bias"),
        ({"logit_bias": {1: math.nan}}, "logit_bias"),
        ({"logit_bias": {1: True}}, "logit_bias"),
        ({"logit_bias": {i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)}}, "logit_bias"),
        ({"priority": 1 << 31}, "priority"),
        ({"priority": True}, "priority"),
    ],
)
def test_rejects_bad_values_naming_the_parameter(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=rf"(?<![\w]){re.escape(name)}(?![\w])"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"stop_token_ids": [True]}, "stop_token_ids"),
        ({"stop_token_ids": [1.5]}, "stop_token_ids"),
        ({"stop_token_ids": ["eos"]}, "stop_token_ids"),
        ({"stop_token_ids": [None]}, "stop_token_ids"),
        ({"logit_bias": {1.5: 1.0}}, "logit_bias"),
        ({"logit_bias": {"abc": 1.0}}, "logit_bias"),
        ({"logit_bias": {None: 1.0}}, "logit_bias"),
    ],
)
def test_rejects_non_integer_token_ids_naming_the_parameter(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=rf"(?<![\w]){re.escape(name)}(?![\w])"):
        SamplingParams(**kwargs)


def test_rejects_a_non_list_stop_naming_the_parameter() -> None:
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=5)  # type: ignore[arg-type]


def test_check_for_model_rejects_token_ids_outside_the_vocabulary() -> None:
    SamplingParams(logit_bias={99: 1.0}, stop_token_ids=[99]).check_for_model(100)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={100: 1.0}).check_for_model(100)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[5, 100]).check_for_model(100)


def test_errors_about_a_map_or_a_list_name_every_offending_entry() -> None:
    with pytest.raises(ValueError, match=r"^logit_bias .*'abc'.*'5': 300") as e:
        SamplingParams(logit_bias={"abc": 1.0, "5": 300, "7": 1.0})
    assert "'7'" not in str(e.value)
    with pytest.raises(ValueError, match=r"^stop_token_ids .*\[0\] -1.*\[2\] 'x'"):
        SamplingParams(stop_token_ids=[-1, 5, "x"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"^stop.*\[1\] ''.*\[2\] 3"):
        SamplingParams(stop=["ok", "", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"^logit_bias names 2 token id\(s\) .*: 100, 250"):
        SamplingParams(logit_bias={100: 1.0, 5: 1.0, 250: 1.0}).check_for_model(100)
    with pytest.raises(ValueError, match=r"stop_token_ids names .*: 100, 101, 102, .*109 \(and 5 more\)$"):
        SamplingParams(stop_token_ids=list(range(100, 115))).check_for_model(100)
