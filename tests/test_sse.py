"""server/sse.py on its own, with scripted requests in place of an engine: the one writer of both
stream kinds (openings, chunks, error events, usage, [DONE]), the outcome it counts, and the
body that releases what a stream owns exactly once — at its end, when closed, or when a body
never started is dropped."""

from __future__ import annotations

import gc
import json
import math
from collections.abc import AsyncGenerator
from contextlib import ExitStack, aclosing
from types import SimpleNamespace
from typing import Any

import pytest

from atomr_trio.outputs import CompletionOutput, RequestError, RequestOutput
from atomr_trio.request import DeadlineExceeded
from atomr_trio.sampling_params import SamplingParams
from atomr_trio.server.chunks import ChatChoices, CompletionChoices
from atomr_trio.server.outcome import Outcome
from atomr_trio.server.protocol import StreamOptions
from atomr_trio.server.sse import Part, SSEBody, sse_events, sse_response


class Scripted:
    """A request whose deltas are given (then, optionally, an exception)."""

    def __init__(self, deltas: list[RequestOutput], prompt: list[int], n: int = 1,
                 then: BaseException | None = None) -> None:
        self.deltas, self.prompt_ids, self.params, self.then = deltas, prompt, SamplingParams(n=n), then
        self.closed = False

    async def outputs(self, engine: object, *, delta: bool = False,
                      deadline: float = math.inf) -> AsyncGenerator[RequestOutput, None]:
        assert delta and engine == "the-engine"
        try:
            for d in self.deltas:
                yield d
            if self.then is not None:
                raise self.then
        finally:
            self.closed = True


def out(text: str, tokens: list[int], finish: str | None = None, index: int = 0, prompt: int = 3) -> RequestOutput:
    return RequestOutput("r", None, list(range(prompt)), [CompletionOutput(index, text, tokens, finish)],
                         finish is not None)


def counted() -> tuple[Outcome, list[str]]:
    reasons: list[str] = []
    metrics = SimpleNamespace(count_request=lambda deployment, reason: reasons.append(reason))
    return Outcome(SimpleNamespace(metrics=metrics, is_draining=False), "m"), reasons  # type: ignore[arg-type]


async def events(parts: list[Part], outcome: Outcome, options: StreamOptions | None = None,
                 kind: str = "chat.completion.chunk") -> list[Any]:
    engine: Any = "the-engine"
    async with aclosing(sse_events("id-1", kind, "m", engine, parts, outcome, math.inf, options)) as stream:
        text = "".join([e async for e in stream])
    assert text.endswith("data: [DONE]\n\n")
    return [json.loads(e.removeprefix("data: ")) for e in text.split("\n\n")[:-2]]


async def test_a_chat_stream_opens_with_the_role_then_streams_content_and_usage() -> None:
    req = Scripted([out("Hel", [1, 2]), out("", [3]), out("lo", [4], "stop")], [7, 8, 9])
    outcome, reasons = counted()
    chunks = await events([Part(req, ChatChoices(1, "assistant", "", None, False))],  # type: ignore[arg-type]
                          outcome, StreamOptions(include_usage=True))
    assert {c["id"] for c in chunks} == {"id-1"} and {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert [c["choices"] for c in chunks] == [
        [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {"content": "Hel"}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {"content": "lo"}, "logprobs": None, "finish_reason": "stop"}],  # "" said nothing
        [],
    ]
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                                   "prompt_tokens_details": {"cached_tokens": 0}}
    assert reasons == ["success"] and req.closed


async def test_completion_parts_run_in_turn_with_their_own_indexes_and_usage_so_far() -> None:
    tok = SimpleNamespace(decode=lambda ids, **kw: "")
    first, second = Scripted([out("a", [1], "length")], [5]), Scripted([out("b", [2], "length", prompt=2)], [5, 6])
    parts = [Part(r, CompletionChoices(tok, i, 1, f"P{i}", r.prompt_ids, True, None, False))  # type: ignore[arg-type]
             for i, r in enumerate((first, second))]
    outcome, reasons = counted()
    chunks = await events(parts, outcome, StreamOptions(continuous_usage_stats=True), "text_completion")
    assert [(c["choices"][0]["index"], c["choices"][0]["text"]) for c in chunks] == [(0, "P0a"), (1, "P1b")]
    assert [c["usage"] for c in chunks] == [{"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                                            {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}]
    assert reasons == ["success"]


@pytest.mark.parametrize(("error", "reason", "says"), [
    (RequestError("boom"), "engine_error", {"message": "boom", "type": "server_error", "param": None, "code": None}),
    (DeadlineExceeded(), "timeout", {"message": "the request did not finish before its deadline (request_timeout)",
                                      "type": "timeout", "param": None, "code": "request_timeout"}),
])
async def test_a_failed_request_ends_the_stream_with_an_error_event(error: Exception, reason: str,
                                                                    says: dict[str, Any]) -> None:
    req = Scripted([out("x", [1])], [5], then=error)
    later = Scripted([out("y", [2], "stop")], [5])
    outcome, reasons = counted()
    parts = [Part(r, ChatChoices(1, "assistant", "", None, False)) for r in (req, later)]  # type: ignore[arg-type]
    chunks = await events(parts, outcome, StreamOptions(include_usage=True))
    assert chunks[-2] == {"error": says}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 1  # what was generated
    assert reasons == [reason] and req.closed and not later.closed  # the next part never ran


async def _numbers(n: int) -> AsyncGenerator[str, None]:
    for i in range(n):
        yield str(i)


async def test_the_body_releases_what_it_owns_once_at_the_end() -> None:
    released: list[str] = []
    owned = ExitStack()
    owned.callback(released.append, "ticket")
    body = SSEBody(_numbers(2), owned)
    assert [b async for b in body] == [b"0", b"1"]
    await body.aclose()  # the server closes the body it sent
    assert released == ["ticket"]


async def test_the_body_releases_when_closed_mid_stream() -> None:
    released: list[str] = []
    owned = ExitStack()
    owned.callback(released.append, "ticket")
    body = SSEBody(_numbers(5), owned)
    assert await body.__anext__() == b"0"
    assert released == []
    await body.aclose()
    assert released == ["ticket"]


def test_a_body_never_started_releases_when_dropped() -> None:
    released: list[str] = []
    outcome, reasons = counted()
    owned = ExitStack()
    owned.callback(released.append, "ticket")
    response = sse_response(_numbers(1), owned, outcome)
    assert response.mimetype == "text/event-stream" and released == []
    del response
    gc.collect()
    assert released == ["ticket"] and reasons == ["disconnected"]
