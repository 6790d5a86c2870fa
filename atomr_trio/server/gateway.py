"""Gateway: the OpenAI-compatible HTTP API (Quart-Trio) over the Runtime's deployments.

Invariants:
- Every error leaves as `{"error": {message, type, param, code}}`; a client's mistake is a 4xx.
- Each request handler is the request's owner (its Request actor): it validates the body, routes
  to a deployment's replica (the `model` field), streams what the engine has ready as SSE
  events, and if the client goes away (Trio cancellation) `AsyncLLM.generate` aborts the request
  in the engine from a shielded scope.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import replace
from functools import partial
from typing import Any, TypeVar

import trio
from pydantic import BaseModel, ValidationError
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ..async_llm import AsyncLLM
from ..outputs import CompletionOutput, Logprob, RequestError, RequestOutput
from ..runtime.admission import Job, Ticket
from ..runtime.deployment import DeploymentHandle, DeploymentUnavailable
from ..runtime.deployment_spec import DeploymentSpec
from ..runtime.deployment_state import DeploymentSnapshot
from ..runtime.tree import Runtime
from ..sampling_params import MAX_LISTED, SamplingParams
from ..text.chat_template import ChatTemplateError
from .auth import OPEN_PATHS, refusal
from .protocol import MAX_REQUEST_ID, APIError, ChatCompletionRequest, CompletionRequest, check_request_id

log = logging.getLogger(__name__)
ModelT = TypeVar("ModelT", bound=BaseModel)
MAX_BODY_BYTES = 4 << 20
_engine_seq = itertools.count()  # makes engine request ids unique when clients reuse theirs


def create_app(runtime: Runtime, api_keys: list[str] | None = None, admin_keys: list[str] | None = None,
               request_timeout: float | None = None) -> QuartTrio:
    """The app. Who may call what is `auth.refusal`: `api_keys` guard all but /health and /admin/*;
    /admin/* needs one of `admin_keys`, is closed when only `api_keys` are set, and answers
    loopback clients alone when neither is. `request_timeout` (seconds, queueing included)
    applies where a deployment sets none."""
    app = QuartTrio("atomr_trio")
    app.config.update(RESPONSE_TIMEOUT=None, BODY_TIMEOUT=60, MAX_CONTENT_LENGTH=MAX_BODY_BYTES)
    keys = [k.encode() for k in (api_keys or [])]
    admin = [k.encode() for k in (admin_keys or [])]
    manager, metrics = runtime.manager, runtime.metrics

    def deadline_for(dep: DeploymentHandle) -> float:
        timeout = dep.spec.request_timeout or request_timeout
        return trio.current_time() + timeout if timeout else math.inf

    def deployment(name: str) -> DeploymentHandle:
        dep = manager.get(name)
        if dep is None:
            raise APIError(404, f"The model `{name}` does not exist.", "NotFoundError", param="model",
                           code="model_not_found")
        return dep

    @app.before_request
    async def check_key() -> Any:
        if request.path in OPEN_PATHS:
            return None
        rule = request.url_rule.rule if request.url_rule is not None else None
        client = request.scope.get("client")  # the connection's peer, never a header
        refused = refusal(request.path, rule, request.headers.get("Authorization", ""),
                          client[0] if client else None, keys, admin)
        if refused is not None:
            await _consume_body()
            raise refused
        if runtime.is_draining:
            await _consume_body()
            raise APIError(503, "the server is shutting down", "service_unavailable")
        return None

    @app.errorhandler(APIError)
    async def api_error(e: APIError) -> Any:
        headers = {"Retry-After": str(max(1, round(e.retry_after)))} if e.retry_after else {}
        return e.body(), e.status, headers

    @app.errorhandler(HTTPException)
    async def http_error(e: HTTPException) -> Any:
        status = e.code or 500
        # A body too large was never read: the connection cannot carry another request.
        headers = {"Connection": "close"} if status == 413 else {}
        return APIError(status, f"{request.method} {request.path}: {e.name}").body(), status, headers

    @app.errorhandler(DeploymentUnavailable)
    async def unavailable(e: DeploymentUnavailable) -> Any:
        """Admission refused (capacity, queued prompt tokens, token budget) or the deployment is down."""
        metrics.count_request(e.deployment, "rejected" if e.status == 429 else "unavailable")
        err = APIError(e.status, str(e), "rate_limit_error" if e.status == 429 else "service_unavailable",
                       retry_after=e.retry_after)
        return await api_error(err)

    @app.after_request
    async def request_id_header(response: Response) -> Response:
        """Echo X-Request-Id (or the id a generation request got) back, as vLLM does."""
        rid = request.headers.get("X-Request-Id") or g.get("request_id")
        if rid and len(rid) <= MAX_REQUEST_ID and rid.isprintable():
            response.headers["X-Request-Id"] = rid
        return response

    @app.errorhandler(Exception)
    async def internal_error(e: Exception) -> Any:
        log.exception("unhandled error in %s %s (request %s)", request.method, request.path, g.get("request_id"))
        return APIError(500, "internal server error", "server_error").body(), 500

    async def body_of(model: type[BaseModel]) -> Any:
        body = await _validated(model)
        body.check()  # type: ignore[attr-defined]  # a 400 for what this server does not implement
        return body

    def budget(engine: AsyncLLM, n_prompt: int, asked: int | None) -> int:
        max_len = engine.config.max_model_len
        assert max_len is not None
        if asked is not None and n_prompt + asked > max_len:
            raise APIError(400, (
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{n_prompt + asked} tokens ({n_prompt} in the messages, {asked} in the completion). "
                "Please reduce the length of the messages or completion."), param="max_tokens")
        if n_prompt >= max_len:
            raise APIError(400, (
                f"This model's maximum context length is {max_len} tokens. However, your prompt has "
                f"{n_prompt} tokens. Please reduce the length of the messages."), param="messages")
        return asked if asked is not None else max_len - n_prompt

    # ---- routes -----------------------------------------------------------------------------
    @app.get("/health")
    @app.get("/healthz")
    async def health() -> Any:
        states = {d.name: d.state for d in manager.snapshot().deployments}
        ok = bool(states) and all(s == "serving" for s in states.values())
        return {"status": "ok" if ok else "unavailable", "deployments": states}, 200 if ok else 503

    @app.get("/metrics")
    async def metrics_route() -> Any:
        return Response(metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [_model_card(d) for d in manager.snapshot().deployments
                                           if d.state == "serving"]}

    @app.get("/v1/models/<path:model_id>")
    async def model(model_id: str) -> Any:
        dep = deployment(model_id).snapshot()
        if dep.state != "serving":
            raise APIError(404, f"The model `{model_id}` does not exist.", "NotFoundError", param="model",
                           code="model_not_found")
        return _model_card(dep)

    @app.get("/admin/tree")
    async def admin_tree() -> Any:
        return runtime.tree()

    @app.get("/admin/deployments")
    async def list_deployments() -> Any:
        return {"deployments": manager.describe()}

    @app.post("/admin/deployments")
    async def apply_deployment() -> Any:
        spec = await _validated(DeploymentSpec)
        dep = await manager.apply(spec)
        if dep.state == "failed":  # the model could not load: the admin sees why
            raise APIError(422, f"deployment '{dep.name}' failed to load: {dep.reason}", param="model",
                           code="deployment_failed")
        if dep.state in ("pending", "loading"):  # the same spec is still loading from an earlier apply
            return dep.describe(), 202
        if dep.state != "serving":
            raise APIError(503, f"deployment '{dep.name}' is {dep.state}", "service_unavailable")
        return dep.describe(), 200

    @app.get("/admin/deployments/<path:name>")
    async def get_deployment(name: str) -> Any:
        return deployment(name).snapshot().describe()

    @app.delete("/admin/deployments/<path:name>")
    async def delete_deployment(name: str) -> Any:
        dep = await manager.remove(name)
        if dep is None:
            raise APIError(404, f"no deployment named '{name}'", "NotFoundError")
        return dep.describe(), 202

    async def any_engine(data: dict[str, Any]) -> AsyncLLM:
        name = data.get("model")
        names = [d.name for d in manager.snapshot().deployments]
        if name is None and len(names) == 1:
            name = names[0]
        if not isinstance(name, str):
            raise APIError(400, "give 'model'", param="model")
        return deployment(name).prompts()  # tokenizing takes no engine capacity

    @app.post("/tokenize")
    async def tokenize() -> Any:
        data = await _json_object()
        engine = await any_engine(data)
        max_len = engine.config.max_model_len
        if "messages" in data:
            try:
                _, ids = engine.chat_prompt(data["messages"])
            except (ChatTemplateError, TypeError) as e:
                raise APIError(400, str(e), param="messages") from None
        elif isinstance(data.get("prompt"), str):
            special = bool(data.get("add_special_tokens", True))
            ids = engine.tokenizer.encode(data["prompt"], add_special_tokens=special)
        else:
            raise APIError(400, "give 'prompt' (a string) or 'messages'", param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": max_len}

    @app.post("/detokenize")
    async def detokenize() -> Any:
        data = await _json_object()
        engine = await any_engine(data)
        try:
            ids = engine.prepare_prompt({"prompt_token_ids": data.get("tokens")})[1]
        except ValueError as e:
            raise APIError(400, str(e), param="tokens") from None
        return {"prompt": engine.tokenizer.decode(ids, skip_special_tokens=False)}

    async def admitted(body: Any, handler: Any) -> Any:
        """Route a generation request to a replica (its deadline starts now), run the handler,
        and release the admission ticket unless a stream took it over."""
        dep = deployment(body.model)
        deadline = deadline_for(dep)
        engine = dep.prompts()  # the handler tokenizes with it, then admits (`_admit`)
        outcome = _Outcome(runtime, dep.name)
        tickets: list[Ticket] = []
        with _released_unless_streamed(tickets) as keep:
            try:
                return await handler(body, dep, engine, deadline, tickets, keep, outcome)
            except BaseException as e:
                if isinstance(e, trio.Cancelled) or (
                        isinstance(e, BaseExceptionGroup) and e.subgroup(trio.Cancelled) is not None):
                    outcome("disconnected")  # the client went away
                raise

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Any:
        return await admitted(await body_of(ChatCompletionRequest), chat)

    async def chat(body: ChatCompletionRequest, dep: DeploymentHandle, engine: AsyncLLM, deadline: float,
                   tickets: list[Ticket], keep: list[bool], outcome: _Outcome) -> Any:
        rid = f"chatcmpl-{_request_id(body)}"
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            _, ids = engine.chat_prompt(
                messages, body.generation_prompt, continue_final_message=body.continue_final_message,
                documents=body.documents, chat_template_kwargs=body.template_kwargs(),
                add_special_tokens=body.add_special_tokens)
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from None
        # vLLM's reply role: the assistant's, or the last message's when no generation prompt opens a turn
        role = "assistant" if body.generation_prompt else messages[-1]["role"]
        echo = _text_of(messages[-1]) if body.echo and messages[-1]["role"] == role else ""
        ids = _truncated(engine, ids, body.truncate_prompt_tokens)
        asked = body.max_completion_tokens or body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = body.sampling_params(budget(engine, len(ids), asked), logprobs, body.prompt_logprobs)
        engine, ticket = await _admit(dep, engine, tickets, [(len(ids), params.n, params.max_tokens)])
        if body.stream:
            keep.append(True)
            return _sse(_chat_stream(engine, body, rid, ids, params, dep.name, deadline, outcome, role, echo),
                        ticket, outcome)
        out = await _run(runtime, engine, ids, params, rid, None, deadline, outcome)
        outcome("success")
        choices = [{
            "index": o.index,
            "message": {"role": role, "content": echo + o.text},
            "logprobs": _chat_logprobs(_as_ids(o, body), logprobs) if logprobs is not None else None,
            "finish_reason": o.finish_reason,
        } for o in out.outputs]
        return {"id": rid, "object": "chat.completion", "created": int(time.time()),
                "model": dep.name, "choices": choices, "usage": _usage([out]),
                "prompt_logprobs": _prompt_logprobs(out)}

    @app.post("/v1/completions")
    async def completions() -> Any:
        return await admitted(await body_of(CompletionRequest), complete)

    async def complete(body: CompletionRequest, dep: DeploymentHandle, engine: AsyncLLM, deadline: float,
                       tickets: list[Ticket], keep: list[bool], outcome: _Outcome) -> Any:
        rid = f"cmpl-{_request_id(body)}"
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[assignment]
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        jobs = []
        for p in prompts:
            try:
                text, ids = engine.prepare_prompt(p, body.add_special_tokens)  # type: ignore[arg-type]
            except ValueError as e:
                raise APIError(400, str(e), param="prompt") from None
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
            jobs.append((text, _truncated(engine, ids, body.truncate_prompt_tokens)))
        params_list = [body.sampling_params(budget(engine, len(ids), body.max_tokens), body.logprobs,
                                            body.prompt_logprobs_k) for _, ids in jobs]
        engine, ticket = await _admit(dep, engine, tickets, [(len(ids), p.n, p.max_tokens)
                                                             for (_, ids), p in zip(jobs, params_list, strict=True)])
        if body.stream:
            keep.append(True)
            return _sse(_completion_stream(engine, body, rid, jobs, params_list, dep.name, deadline, outcome),
                        ticket, outcome)
        results: list[RequestOutput | None] = [None] * len(jobs)

        async def one(i: int) -> None:
            (text, ids), params = jobs[i], params_list[i]
            results[i] = await _run(runtime, engine, ids, params, f"{rid}-{i}", text, deadline, outcome)

        try:
            async with trio.open_nursery() as nursery:  # the prompts of one request run as a batch
                for i in range(len(jobs)):
                    nursery.start_soon(one, i)
        except BaseExceptionGroup as group:
            api_errors = [e for e in group.exceptions if isinstance(e, APIError)]
            if api_errors and len(api_errors) == len(group.exceptions):
                raise api_errors[0] from None
            raise
        outs = [r for r in results if r is not None]
        choices = []
        for i, (out, (text, ids)) in enumerate(zip(outs, jobs, strict=True)):
            prefix = (text if text is not None else engine.tokenizer.decode(ids)) if body.echo else ""
            for o in out.outputs:
                choices.append({
                    "index": i * body.n + o.index, "text": prefix + o.text,
                    "logprobs": (_completion_logprobs(engine, o, body.logprobs,
                                                      (ids, out.prompt_logprobs) if body.echo else None,
                                                      as_ids=body.return_tokens_as_token_ids)
                                 if body.logprobs is not None else None),
                    "finish_reason": o.finish_reason,
                    "prompt_logprobs": _prompt_logprobs(out),
                })
        outcome("success")
        return {"id": rid, "object": "text_completion", "created": int(time.time()),
                "model": dep.name, "choices": choices, "usage": _usage(outs)}

    return app


def _request_id(body: ChatCompletionRequest | CompletionRequest) -> str:
    """The request's id as vLLM picks it: the X-Request-Id header, else the body's request_id, else
    a random one. The response's id is it with a prefix; engine ids add a unique suffix
    (`_engine_id`), so a client reusing an id in flight disturbs nothing."""
    header = request.headers.get("X-Request-Id")
    if header is not None:
        check_request_id(header, "the X-Request-Id header")
    g.request_id = header or body.request_id or uuid.uuid4().hex
    return str(g.request_id)


def _engine_id(rid: str) -> str:
    return f"{rid}-{next(_engine_seq):x}"


async def _validated(model: type[ModelT]) -> ModelT:
    """The request body as `model`, or a 400 naming every invalid field (`param`: the first)."""
    try:
        return model.model_validate(await _json_object())
    except ValidationError as e:
        errors = [(".".join(str(x) for x in err["loc"]), err["msg"]) for err in e.errors()]
        message = "; ".join(f"{loc}: {msg}" if loc else msg for loc, msg in errors[:MAX_LISTED])
        if len(errors) > MAX_LISTED:
            message += f" (and {len(errors) - MAX_LISTED} more)"
        raise APIError(400, message, param=errors[0][0] or None) from None


def _truncated(engine: AsyncLLM, ids: list[int], k: int | None) -> list[int]:
    try:
        return engine.truncate_prompt(ids, k)
    except ValueError as e:
        raise APIError(400, str(e), param="truncate_prompt_tokens") from None


async def _json_object() -> dict[str, Any]:
    try:
        data = json.loads(await request.get_data())
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    return data


class DeadlineExceeded(Exception):
    pass


class _Outcome:
    """How a routed request ended, for `deployment_requests{outcome}`: counted once (the first
    reason given wins), whether it ends in the handler or, for a stream, in its body."""

    def __init__(self, runtime: Runtime, deployment: str) -> None:
        self._runtime = runtime
        self._count: Callable[[str], None] | None = partial(runtime.metrics.count_request, deployment)

    def __call__(self, reason: str) -> None:
        count, self._count = self._count, None
        if count is not None:
            count(reason)

    def ended(self, finals: list[RequestOutput]) -> None:
        """A request that ran to its end: a success, unless the shutdown aborted it."""
        aborted = any(o.finish_reason == "abort" for out in finals for o in out.outputs)
        self("shutdown" if aborted and self._runtime.is_draining else "success")


def _timeout_error() -> APIError:
    return APIError(504, "the request did not finish before its deadline (request_timeout)", "timeout",
                    code="request_timeout")


async def _run(runtime: Runtime, engine: AsyncLLM, ids: list[int], params: SamplingParams, rid: str,
               text: str | None, deadline: float, count: _Outcome) -> RequestOutput:
    """One request to its end; the deadline covers queueing and generation."""
    out = None
    with trio.move_on_at(deadline):
        try:
            out = await engine.generate_one(text, params, request_id=_engine_id(rid), prompt_ids=ids)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        except RequestError as e:
            count("engine_error")
            raise APIError(503, f"the engine could not finish the request: {e}", "service_unavailable") from None
    if out is None:
        count("timeout")
        raise _timeout_error()
    if runtime.is_draining and any(o.finish_reason == "abort" for o in out.outputs):
        count("shutdown")
        raise APIError(503, "the server shut down before the request finished", "service_unavailable")
    return out


async def _deltas(engine: AsyncLLM, ids: list[int], params: SamplingParams, rid: str, text: str | None,
                  deadline: float) -> AsyncIterator[RequestOutput]:
    """A request's deltas; raises DeadlineExceeded when the deadline passes (the request is
    aborted). Each wait has its own cancel scope, so nothing yields inside one."""
    stream = engine.generate(text, params, request_id=_engine_id(rid), delta=True, prompt_ids=ids)
    async with aclosing(stream):
        while True:
            with trio.move_on_at(deadline) as scope:
                try:
                    delta = await stream.__anext__()
                except StopAsyncIteration:
                    return
            if scope.cancelled_caught:
                raise DeadlineExceeded
            yield delta


async def _consume_body() -> None:
    """Read (bounded by MAX_CONTENT_LENGTH) a body we refuse before its route runs: left unread,
    it would stall the next request on a kept-alive connection."""
    await request.get_data()


async def _admit(dep: DeploymentHandle, prompts: AsyncLLM, tickets: list[Ticket],
                 jobs: list[Job]) -> tuple[AsyncLLM, Ticket]:
    """Admit a tokenized request in one message: the replica to run it on, and its ticket (kept
    in `tickets` for `_released_unless_streamed`)."""
    admission = await dep.admit(jobs)
    tickets.append(admission.ticket)
    return AsyncLLM(admission.engine, prompts.source), admission.ticket


@contextmanager
def _released_unless_streamed(tickets: list[Ticket]) -> Iterator[list[bool]]:
    """Release the admission ticket when the handler returns, unless it handed the request to
    a stream (which then owns the ticket)."""
    keep: list[bool] = []
    try:
        yield keep
    finally:
        if not keep:
            for ticket in tickets:
                ticket.release()


def _sse(events: AsyncIterator[str], ticket: Ticket, outcome: _Outcome) -> Response:
    """The stream sets its outcome when it ends; one that never gets there lost its client."""
    def end() -> None:
        ticket.release()
        outcome("disconnected")

    async def body() -> AsyncIterator[bytes]:
        try:
            async for e in events:
                yield e.encode()
        finally:
            end()

    stream = body()
    # A body that is never iterated (the client left first) never runs its finally: CPython
    # drops the generator with the response, and this ends it then.
    weakref.finalize(stream, end)
    return Response(stream, content_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _chat_stream(engine: AsyncLLM, body: ChatCompletionRequest, rid: str, ids: list[int],
                       params: SamplingParams, model: str, deadline: float, outcome: _Outcome, role: str,
                       echo: str) -> AsyncIterator[str]:
    created = int(time.time())
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    usage = _usage_so_far(body, len(ids))
    yield "".join(_event({**head, "choices": [{"index": i, "delta": {"role": role, "content": ""},
                                                "logprobs": None, "finish_reason": None}], **usage(0)})
                  for i in range(params.n))
    if echo:
        yield "".join(_event({**head, "choices": [{"index": i, "delta": {"content": echo}, "logprobs": None,
                                                    "finish_reason": None}], **usage(0)}) for i in range(params.n))
    final: RequestOutput | None = None
    generated = 0
    done = [0] * params.n  # tokens generated per choice
    try:
        async for delta in _deltas(engine, ids, params, rid, None, deadline):
            final = delta
            generated += sum(len(o.token_ids) for o in delta.outputs)
            events = []
            for o in delta.outputs:
                done[o.index] += len(o.token_ids)
                if o.text or o.finish_reason or (o.logprobs and params.logprobs is not None):
                    events.append(_event({**head, "choices": [{
                        "index": o.index, "delta": {"content": o.text} if o.text else {},
                        "logprobs": (_chat_logprobs(_as_ids(o, body), params.logprobs)
                                     if params.logprobs is not None else None),
                        "finish_reason": o.finish_reason}], **usage(done[o.index])}))
            if events:
                yield "".join(events)
    except RequestError as e:
        outcome("engine_error")
        yield _event({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
    except DeadlineExceeded:
        outcome("timeout")
        yield _event(_timeout_error().body())
    outcome.ended([final] if final else [])
    if final is not None and body.stream_options and body.stream_options.include_usage:
        yield _event({**head, "choices": [], "usage": _usage([final], generated)})
    yield "data: [DONE]\n\n"


async def _completion_stream(engine: AsyncLLM, body: CompletionRequest, rid: str,
                             jobs: list[tuple[str | None, list[int]]], params_list: list[SamplingParams],
                             model: str, deadline: float, outcome: _Outcome) -> AsyncIterator[str]:
    head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model}
    finals: list[RequestOutput] = []
    generated = 0
    try:
        for i, ((text, ids), params) in enumerate(zip(jobs, params_list, strict=True)):
            usage = _usage_so_far(body, len(ids))
            prefix = (text if text is not None else engine.tokenizer.decode(ids)) if body.echo else ""
            sent = [0] * params.n  # characters streamed per choice (text_offset)
            echoed = [not body.echo] * params.n  # as vLLM: the prompt goes out with the first delta
            scored = None  # the prompt's logprobs (they arrive in one delta)
            final = None
            done = [0] * params.n  # tokens generated per choice of this prompt
            async for delta in _deltas(engine, ids, params, f"{rid}-{i}", text, deadline):
                final = delta
                scored = scored or delta.prompt_logprobs
                generated += sum(len(o.token_ids) for o in delta.outputs)
                events = []
                for o in delta.outputs:
                    done[o.index] += len(o.token_ids)
                    echo = not echoed[o.index]
                    if not (echo or o.text or o.finish_reason or (o.logprobs and params.logprobs is not None)):
                        continue
                    out_text = prefix + o.text if echo else o.text
                    events.append(_event({**head, "choices": [{
                        "index": i * body.n + o.index, "text": out_text,
                        "logprobs": (_completion_logprobs(engine, o, params.logprobs,
                                                          (ids, scored) if echo else None, sent[o.index],
                                                          as_ids=body.return_tokens_as_token_ids)
                                     if params.logprobs is not None else None),
                        "finish_reason": o.finish_reason}], **usage(done[o.index])}))
                    echoed[o.index] = True
                    sent[o.index] += len(out_text)
                if events:
                    yield "".join(events)
            if final is not None:
                finals.append(final)
    except RequestError as e:
        outcome("engine_error")
        yield _event({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
    except DeadlineExceeded:
        outcome("timeout")
        yield _event(_timeout_error().body())
    outcome.ended(finals)
    if finals and body.stream_options and body.stream_options.include_usage:
        yield _event({**head, "choices": [], "usage": _usage(finals, generated)})
    yield "data: [DONE]\n\n"


def _text_of(message: dict[str, Any]) -> str:
    """A message's text (content parts joined), for `echo`."""
    content = message.get("content")
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _usage_so_far(body: ChatCompletionRequest | CompletionRequest, prompt: int) -> Callable[[int], dict[str, Any]]:
    """`stream_options.continuous_usage_stats`, as vLLM does it: every chunk carries the usage of
    its choice so far (its prompt's tokens, the tokens generated for it until then)."""
    if not (body.stream_options and body.stream_options.continuous_usage_stats):
        return lambda completion: {}
    return lambda completion: {"usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                         "total_tokens": prompt + completion}}


def _usage(outs: list[RequestOutput], completion: int | None = None) -> dict[str, Any]:
    """Usage of finished requests; a delta stream passes the completion tokens it counted."""
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    if completion is None:
        completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outs)}}


def _model_card(dep: DeploymentSnapshot) -> dict[str, Any]:
    max_len = dep.max_model_len
    return {"id": dep.name, "object": "model", "created": 0, "owned_by": "atomr_trio", "max_model_len": max_len}


def _entries(o: CompletionOutput, k: int) -> list[tuple[Logprob, list[Logprob]]]:
    """(the sampled token's logprob, the top-k alternatives best first) for each token."""
    lps = o.logprobs or []
    tids = o.token_ids[len(o.token_ids) - len(lps):]
    return [(e[t], sorted((x for x in e.values() if (x.rank or 0) <= k), key=lambda x: x.rank or 0))
            for t, e in zip(tids, lps, strict=True)]


def _as_ids(o: CompletionOutput, body: ChatCompletionRequest | CompletionRequest) -> CompletionOutput:
    """`return_tokens_as_token_ids`: each logprob's token reads "token_id:N", as in vLLM, so that
    tokens that are not whole characters stay identifiable."""
    if not body.return_tokens_as_token_ids or o.logprobs is None:
        return o
    entries = [{t: replace(x, decoded_token=f"token_id:{t}") for t, x in e.items()} for e in o.logprobs]
    return replace(o, logprobs=entries)


def _chat_logprobs(o: CompletionOutput, k: int) -> dict[str, Any]:
    def item(x: Logprob) -> dict[str, Any]:
        tok = x.decoded_token or ""
        return {"token": tok, "logprob": x.logprob, "bytes": list(tok.encode())}

    return {"content": [{**item(chosen), "top_logprobs": [item(x) for x in top]}
                        for chosen, top in _entries(o, k)]}


def _clamp(x: float) -> float:
    return max(x, -9999.0)  # as vLLM: JSON has no -inf


def _prompt_logprobs(out: RequestOutput) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token {token_id: {logprob, rank, decoded_token}}."""
    if out.prompt_logprobs is None:
        return None
    return [None if e is None else {str(t): {"logprob": _clamp(x.logprob), "rank": x.rank,
                                            "decoded_token": x.decoded_token} for t, x in e.items()}
            for e in out.prompt_logprobs]


def _completion_logprobs(engine: AsyncLLM, o: CompletionOutput, k: int,
                         prompt: tuple[list[int], list[dict[int, Logprob] | None] | None] | None = None,
                         offset: int = 0, as_ids: bool = False) -> dict[str, Any]:
    """OpenAI's completions logprobs for o's tokens, after the echoed prompt's (token ids and
    prompt logprobs, whose first entry is None: null). `top_logprobs` holds the token's own
    entry first, then the best others: k + 1 at most, as vLLM. `as_ids`
    (`return_tokens_as_token_ids`): tokens read "token_id:N"."""

    def text(tid: int, x: Logprob | None) -> str:
        return x.decoded_token or "" if x is not None else engine.tokenizer.decode([tid], skip_special_tokens=False)

    def name(tid: int, x: Logprob | None) -> str:
        return f"token_id:{tid}" if as_ids else text(tid, x)

    pairs: list[tuple[int, dict[int, Logprob] | None]] = []
    if prompt is not None:
        ids, plp = prompt
        pairs.extend(zip(ids, plp or [None] * len(ids), strict=True))
    lps = o.logprobs or []
    pairs.extend(zip(o.token_ids[len(o.token_ids) - len(lps):], lps, strict=True))
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    for tid, entry in pairs:
        text_offset.append(offset)
        if entry is None:
            tokens.append(name(tid, None))
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            tokens.append(name(tid, entry[tid]))
            token_logprobs.append(_clamp(entry[tid].logprob))
            top_logprobs.append({name(t, x): _clamp(x.logprob) for t, x in list(entry.items())[: k + 1]})
        offset += len(text(tid, entry[tid] if entry is not None else None))
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}
