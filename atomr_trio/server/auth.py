"""Who may call which route: the Gateway asks `refusal()` before every request.

Rules:
- `/health` (`/healthz`) answers everyone.
- The admin API (`/admin/*`: load a model from any path on the server's disk, remove models,
  see the actor tree) needs an admin key (`--admin-key`). With API keys but no admin key it is
  closed (403 naming `--admin-key`): an ordinary key never opens it. With no keys at all it
  answers loopback clients (127.0.0.0/8, ::1) only, and every other address gets 403.
- Every other route needs one of the API keys when any is set, and is open otherwise.
- Keys are compared in constant time against every configured key, whatever matches first.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Sequence

from .protocol import APIError

OPEN_PATHS = frozenset({"/health", "/healthz"})


def is_admin_path(path: str, rule: str | None = None) -> bool:
    """Whether the request is for the admin API, by its path (extra leading slashes ignored) or
    by the route it matched."""
    for p in (path, rule):
        if p is not None:
            p = "/" + p.lstrip("/")
            if p == "/admin" or p.startswith("/admin/"):
                return True
    return False


def is_loopback(host: str | None) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback address; anything else (a name, a missing
    address) is not."""
    if not host:
        return False
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def bearer(authorization: str) -> bytes:
    """The key an `Authorization: Bearer KEY` header carries (b"" when there is none)."""
    scheme, _, key = authorization.partition(" ")
    return key.encode() if scheme.lower() == "bearer" else b""


def key_matches(given: bytes, keys: Sequence[bytes]) -> bool:
    """Constant time in the key's content: every configured key is compared, none is skipped
    because an earlier one matched."""
    return sum(hmac.compare_digest(given, k) for k in keys) > 0


def refusal(path: str, rule: str | None, authorization: str, client_host: str | None,
            api_keys: Sequence[bytes], admin_keys: Sequence[bytes]) -> APIError | None:
    """None when the request may go on; else the error to answer with. `client_host` is the
    peer address of the connection (never a header the client can set)."""
    if path in OPEN_PATHS:
        return None
    if is_admin_path(path, rule):
        if admin_keys:
            if key_matches(bearer(authorization), admin_keys):
                return None
            return APIError(401, "invalid or missing admin key", "authentication_error", code="invalid_api_key")
        if api_keys:
            return APIError(403, "the admin API is closed: API keys do not open /admin; start the server with "
                                 "--admin-key to use it", "permission_error", code="admin_key_required")
        if is_loopback(client_host):
            return None
        return APIError(403, "without --admin-key the admin API answers loopback clients only",
                        "permission_error", code="admin_key_required")
    if api_keys and not key_matches(bearer(authorization), api_keys):
        return APIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")
    return None
