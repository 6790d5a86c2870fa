"""The gateway's error answers: every error leaves as `{"error": {message, type, param, code}}`.

Invariants:
- A client's mistake is a 4xx; an admission refused is 429 (with Retry-After) or 503 and is
  counted; anything unexpected is a 500 that names no internals (the log has the traceback).
- A request refused by `engine.validation.check_request` is a 400 in OpenAI's words: a context
  too long reads as OpenAI (and vLLM) word it, naming `max_tokens` or `messages`.
"""

from __future__ import annotations

import logging
from typing import Any

from quart import Quart, g, request
from werkzeug.exceptions import HTTPException

from ..engine.validation import ContextLengthExceeded
from ..outputs import RequestError
from ..runtime.deployment import DeploymentUnavailable
from .protocol import APIError
from .state import gateway_state

log = logging.getLogger(__name__)


def timeout_error() -> APIError:
    return APIError(504, "the request did not finish before its deadline (request_timeout)", "timeout",
                    code="request_timeout")


def engine_failed(e: RequestError) -> APIError:
    return APIError(503, f"the engine could not finish the request: {e}", "service_unavailable")


def stream_error(e: RequestError) -> dict[str, Any]:
    """The event a stream sends when the engine fails its request (the status is already 200)."""
    return APIError(500, str(e), "server_error").body()


def bad_request(e: ValueError, param: str | None = None) -> APIError:
    """The 400 for a request the library refused (a ValueError), naming `param`."""
    if isinstance(e, ContextLengthExceeded):
        n, max_len, asked = e.prompt_tokens, e.max_model_len, e.asked
        if asked is not None:
            return APIError(400, (
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{n + asked} tokens ({n} in the messages, {asked} in the completion). "
                "Please reduce the length of the messages or completion."), param="max_tokens")
        return APIError(400, (
            f"This model's maximum context length is {max_len} tokens. However, your prompt has "
            f"{n} tokens. Please reduce the length of the messages."), param="messages")
    return APIError(400, str(e), param=param)


async def api_error(e: APIError) -> Any:
    headers = {"Retry-After": str(max(1, round(e.retry_after)))} if e.retry_after else {}
    return e.body(), e.status, headers


async def http_error(e: HTTPException) -> Any:
    status = e.code or 500
    # A body too large was never read: the connection cannot carry another request.
    headers = {"Connection": "close"} if status == 413 else {}
    return APIError(status, f"{request.method} {request.path}: {e.name}").body(), status, headers


async def unavailable(e: DeploymentUnavailable) -> Any:
    """Admission refused (capacity, queued prompt tokens, token budget) or the deployment is down."""
    gateway_state().metrics.count_request(e.deployment, "rejected" if e.status == 429 else "unavailable")
    err = APIError(e.status, str(e), "rate_limit_error" if e.status == 429 else "service_unavailable",
                   retry_after=e.retry_after)
    return await api_error(err)


async def internal_error(e: Exception) -> Any:
    log.exception("unhandled error in %s %s (request %s)", request.method, request.path, g.get("request_id"))
    return APIError(500, "internal server error", "server_error").body(), 500


def register_error_handlers(app: Quart) -> None:
    app.register_error_handler(APIError, api_error)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(DeploymentUnavailable, unavailable)
    app.register_error_handler(Exception, internal_error)
