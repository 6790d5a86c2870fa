"""The gateway's app: the OpenAI-compatible HTTP API (Quart-Trio) over the Runtime's deployments,
assembled from its routes (openai_routes, admin_routes), hooks and error handlers (errors.py).

Invariants:
- Every error leaves as `{"error": {message, type, param, code}}`; a client's mistake is a 4xx.
- Before any route runs, `auth.refusal` decides who may call it, and a draining server refuses
  new requests (503); a refused body is still read.
- Handlers reach the runtime only through the GatewayState stored on the app (state.py).
"""

from __future__ import annotations

from typing import Any

from quart import Response, g, request
from quart_trio import QuartTrio

from ..runtime.tree import Runtime
from .admin_routes import admin_routes
from .auth import OPEN_PATHS, refusal
from .bodies import consume_body
from .errors import register_error_handlers
from .openai_routes import openai_routes
from .protocol import MAX_REQUEST_ID, APIError
from .state import GatewayState, gateway_state, install

MAX_BODY_BYTES = 4 << 20


def create_app(runtime: Runtime, api_keys: list[str] | None = None, admin_keys: list[str] | None = None,
               request_timeout: float | None = None) -> QuartTrio:
    """The app. Who may call what is `auth.refusal`: `api_keys` guard all but /health and /admin/*;
    /admin/* needs one of `admin_keys`, is closed when only `api_keys` are set, and answers
    loopback clients alone when neither is. `request_timeout` (seconds, queueing included)
    applies where a deployment sets none."""
    app = QuartTrio("atomr_trio")
    app.config.update(RESPONSE_TIMEOUT=None, BODY_TIMEOUT=60, MAX_CONTENT_LENGTH=MAX_BODY_BYTES)
    install(app, GatewayState(runtime, tuple(k.encode() for k in api_keys or []),
                              tuple(k.encode() for k in admin_keys or []), request_timeout))
    app.before_request(check_key)
    app.after_request(request_id_header)
    register_error_handlers(app)
    app.register_blueprint(openai_routes)
    app.register_blueprint(admin_routes)
    return app


async def check_key() -> Any:
    """Refuse a request its caller may not make (auth.refusal), or any new one while draining."""
    if request.path in OPEN_PATHS:
        return None
    state = gateway_state()
    rule = request.url_rule.rule if request.url_rule is not None else None
    client = request.scope.get("client")  # the connection's peer, never a header
    refused = refusal(request.path, rule, request.headers.get("Authorization", ""),
                      client[0] if client else None, state.api_keys, state.admin_keys)
    if refused is not None:
        await consume_body()
        raise refused
    if state.runtime.is_draining:
        await consume_body()
        raise APIError(503, "the server is shutting down", "service_unavailable")
    return None


async def request_id_header(response: Response) -> Response:
    """Echo X-Request-Id (or the id a generation request got) back, as vLLM does."""
    rid = request.headers.get("X-Request-Id") or g.get("request_id")
    if rid and len(rid) <= MAX_REQUEST_ID and rid.isprintable():
        response.headers["X-Request-Id"] = rid
    return response
