"""The OpenAI-compatible routes (a Quart Blueprint): chat and text completions, models,
tokenize / detokenize, health and metrics.

Invariants:
- Each generation handler is its request's front: it validates the body, turns it into checked
  `request.Request`s on a replica of the deployment named by `model` (admission.py), charges
  them to the deployment, and answers with the finished outputs or a stream (sse.py). The
  Request owns the engine side: it aborts in the engine whatever way it ends.
- Handlers reach the runtime only through `gateway_state()`.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import TYPE_CHECKING, Any

import trio
from quart import Blueprint, Response, g, request

from ..request import Request, chat_prompt, prepare_prompt
from ..text.chat_template import ChatTemplateError
from .admission import Admitted, admitted
from .bodies import json_object, validate, validated
from .chunks import ChatChoices, CompletionChoices
from .openai_format import chat_completion, model_card, text_completion, text_of
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, TokenizeChat, check_request_id
from .sse import Part
from .state import gateway_state
from .tool_calls import tool_mode

if TYPE_CHECKING:
    from ..model_source import ModelSource
    from ..outputs import RequestOutput

openai_routes = Blueprint("openai", __name__)


@openai_routes.get("/health")
@openai_routes.get("/healthz")
async def health() -> Any:
    states = {d.name: d.state for d in gateway_state().manager.snapshot().deployments}
    ok = bool(states) and all(s == "serving" for s in states.values())
    return {"status": "ok" if ok else "unavailable", "deployments": states}, 200 if ok else 503


@openai_routes.get("/metrics")
async def metrics() -> Any:
    return Response(gateway_state().metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")


@openai_routes.get("/v1/models")
async def models() -> Any:
    return {"object": "list", "data": [model_card(d) for d in gateway_state().manager.snapshot().deployments
                                       if d.state == "serving"]}


@openai_routes.get("/v1/models/<path:model_id>")
async def model(model_id: str) -> Any:
    dep = gateway_state().deployment(model_id).snapshot()
    if dep.state != "serving":
        raise APIError(404, f"The model `{model_id}` does not exist.", "NotFoundError", param="model",
                       code="model_not_found")
    return model_card(dep)


# ---- tokens ------------------------------------------------------------------------------------
async def _any_replica(data: dict[str, Any]) -> tuple[int | None, ModelSource]:
    """(max_model_len, model) of a replica of the deployment `data` names (or the only one)."""
    state = gateway_state()
    name = data.get("model")
    names = [d.name for d in state.manager.snapshot().deployments]
    if name is None and len(names) == 1:
        name = names[0]
    if not isinstance(name, str):
        raise APIError(400, "give 'model'", param="model")
    source, config = state.deployment(name).serving_model()  # tokenizing takes no engine capacity
    return config.max_model_len, source


@openai_routes.post("/tokenize")
async def tokenize() -> Any:
    data = await json_object()
    max_len, source = await _any_replica(data)
    if "messages" in data:
        messages = [m.model_dump(exclude_none=True) for m in validate(TokenizeChat, data).messages]
        try:
            _, ids = chat_prompt(source.tokenizer, messages)
        except (ChatTemplateError, TypeError) as e:
            raise APIError(400, str(e), param="messages") from None
    elif isinstance(data.get("prompt"), str):
        special = bool(data.get("add_special_tokens", True))
        ids = source.tokenizer.encode(data["prompt"], add_special_tokens=special)
    else:
        raise APIError(400, "give 'prompt' (a string) or 'messages'", param="prompt")
    return {"tokens": ids, "count": len(ids), "max_model_len": max_len}


@openai_routes.post("/detokenize")
async def detokenize() -> Any:
    data = await json_object()
    _, source = await _any_replica(data)
    try:
        ids = prepare_prompt(source, {"prompt_token_ids": data.get("tokens")})[1]
    except ValueError as e:
        raise APIError(400, str(e), param="tokens") from None
    return {"prompt": source.tokenizer.decode(ids, skip_special_tokens=False)}


# ---- generation --------------------------------------------------------------------------------
def _request_id(body: ChatCompletionRequest | CompletionRequest) -> str:
    """The request's id as vLLM picks it: the X-Request-Id header, else the body's request_id, else
    a random one. The response's id is it with a prefix; engine ids add a unique suffix
    (`Admitted.request`), so a client reusing an id in flight disturbs nothing."""
    header = request.headers.get("X-Request-Id")
    if header is not None:
        check_request_id(header, "the X-Request-Id header")
    g.request_id = header or body.request_id or uuid.uuid4().hex
    return str(g.request_id)


async def _body_of(model: type[ChatCompletionRequest] | type[CompletionRequest]) -> Any:
    body = await validated(model)
    body.check()  # a 400 for what this server does not implement
    return body


@openai_routes.post("/v1/chat/completions")
async def chat_completions() -> Any:
    body: ChatCompletionRequest = await _body_of(ChatCompletionRequest)
    async with admitted(body.model) as adm:
        return await _chat(body, adm)


async def _chat(body: ChatCompletionRequest, adm: Admitted) -> Any:
    rid = f"chatcmpl-{_request_id(body)}"
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    tools = tool_mode(body, adm.dep.spec)
    try:
        _, ids = chat_prompt(
            adm.source.tokenizer, messages, body.generation_prompt,
            continue_final_message=body.continue_final_message, documents=body.documents,
            chat_template_kwargs=body.template_kwargs(), add_special_tokens=body.add_special_tokens,
            tools=body.tools)
    except ChatTemplateError as e:
        raise APIError(400, str(e), param="messages") from None
    # vLLM's reply role: the assistant's, or the last message's when no generation prompt opens a turn
    role = "assistant" if body.generation_prompt else messages[-1]["role"]
    echo = text_of(messages[-1]) if body.echo and messages[-1]["role"] == role else ""
    ids = adm.truncated(ids, body.truncate_prompt_tokens)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    asked = body.max_completion_tokens or body.max_tokens
    constraint = tools.constraint() if tools is not None and tools.choice != "auto" else body.constraint()
    params = body.sampling_params(adm.max_tokens(len(ids), asked), logprobs, body.prompt_logprobs, constraint)
    if tools is not None and tools.parser == "mistral":  # its [TOOL_CALLS] marker is a special token
        params = dataclasses.replace(params, skip_special_tokens=False)
    req = adm.request(rid, ids, params)
    await adm.admit([req])
    if body.stream:
        choices = ChatChoices(params.n, role, echo, logprobs, body.return_tokens_as_token_ids, tools)
        return adm.stream(rid, "chat.completion.chunk", [Part(req, choices)], body.stream_options)
    out = await adm.finish(req)
    adm.outcome("success")
    return chat_completion(rid, adm.dep.name, out, role, echo, logprobs, body.return_tokens_as_token_ids, tools)


@openai_routes.post("/v1/completions")
async def completions() -> Any:
    body: CompletionRequest = await _body_of(CompletionRequest)
    async with admitted(body.model) as adm:
        return await _complete(body, adm)


async def _complete(body: CompletionRequest, adm: Admitted) -> Any:
    rid = f"cmpl-{_request_id(body)}"
    jobs = _prompts(body, adm)
    constraint = body.constraint()
    reqs = [adm.request(f"{rid}-{i}", ids, body.sampling_params(adm.max_tokens(len(ids), body.max_tokens),
                                                                body.logprobs, body.prompt_logprobs_k, constraint),
                        text)
            for i, (text, ids) in enumerate(jobs)]
    await adm.admit(reqs)
    tokenizer = adm.source.tokenizer
    prefixes = [(text if text is not None else tokenizer.decode(ids)) if body.echo else "" for text, ids in jobs]
    if body.stream:
        parts = [Part(r, CompletionChoices(tokenizer, i, body.n, prefix, r.prompt_ids, body.echo, body.logprobs,
                                           body.return_tokens_as_token_ids))
                 for i, (r, prefix) in enumerate(zip(reqs, prefixes, strict=True))]
        return adm.stream(rid, "text_completion", parts, body.stream_options)
    outs = await _finish_all(adm, reqs)
    adm.outcome("success")
    return text_completion(rid, adm.dep.name, outs, prefixes, body.n, body.logprobs, body.echo,
                           body.return_tokens_as_token_ids, tokenizer)


def _prompts(body: CompletionRequest, adm: Admitted) -> list[tuple[str | None, list[int]]]:
    """(text, token ids truncated as asked) of each prompt of the body."""
    prompts = body.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]  # type: ignore[assignment]
    if not prompts:
        raise APIError(400, "prompt must not be empty", param="prompt")
    jobs = []
    for p in prompts:
        try:
            text, ids = prepare_prompt(adm.source, p, body.add_special_tokens)  # type: ignore[arg-type]
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
        if not ids:
            raise APIError(400, "prompt must not be empty", param="prompt")
        jobs.append((text, adm.truncated(ids, body.truncate_prompt_tokens)))
    return jobs


async def _finish_all(adm: Admitted, reqs: list[Request]) -> list[RequestOutput]:
    """The prompts of one request run as a batch; the first failure (an APIError) answers."""
    results: list[RequestOutput | None] = [None] * len(reqs)

    async def one(i: int) -> None:
        results[i] = await adm.finish(reqs[i])

    try:
        async with trio.open_nursery() as nursery:
            for i in range(len(reqs)):
                nursery.start_soon(one, i)
    except BaseExceptionGroup as group:
        api_errors = [e for e in group.exceptions if isinstance(e, APIError)]
        if api_errors and len(api_errors) == len(group.exceptions):
            raise api_errors[0] from None
        raise
    return [r for r in results if r is not None]
