"""Who may call which route (server/auth.py), checked through the app itself with Quart's test
client — the Runtime runs with no deployment, so nothing loads a model — and at the decision
function for the cases a test client cannot reach."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from atomr_trio.runtime.tree import open_runtime
from atomr_trio.server.app import create_app
from atomr_trio.server.auth import is_admin_path, is_loopback, refusal

KEY, ADMIN = "sk-api-0123456789", "sk-admin-9876543210"
LOCAL, REMOTE = {"client": ("127.0.0.1", 50000)}, {"client": ("203.0.113.7", 50000)}


@asynccontextmanager
async def app_client(**keys: Any) -> AsyncIterator[Any]:
    async with open_runtime([]) as runtime:
        app = create_app(runtime, **keys)
        yield app.test_client()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def near_misses(key: str) -> list[str]:
    """Keys that differ from `key` by a little: a suffix, one character short, the last one changed."""
    last = "x" if key[-1] != "x" else "y"
    return [key + "0", key + " ", key[:-1], key[:-1] + last, key.upper(), ""]


async def test_an_api_key_never_opens_the_admin_api() -> None:
    async with app_client(api_keys=[KEY]) as c:
        for method, path in (("GET", "/admin/tree"), ("GET", "/admin/deployments"),
                             ("POST", "/admin/deployments"), ("DELETE", "/admin/deployments/x")):
            for headers in (bearer(KEY), {}):
                r = await c.open(path, method=method, headers=headers, json={"name": "x", "model": "/etc"},
                                 scope_base=LOCAL)
                assert r.status_code == 403, (method, path)
                err = (await r.get_json())["error"]
                assert "--admin-key" in err["message"] and err["code"] == "admin_key_required"
        assert (await c.get("/v1/models", headers=bearer(KEY), scope_base=LOCAL)).status_code == 200
        assert (await c.get("/health", scope_base=REMOTE)).status_code == 503  # no deployment: open, not ok


async def test_the_admin_key_opens_the_admin_api_and_nothing_else_does() -> None:
    async with app_client(api_keys=[KEY], admin_keys=[ADMIN]) as c:
        for scope in (LOCAL, REMOTE):  # with an admin key the address does not matter
            r = await c.get("/admin/deployments", headers=bearer(ADMIN), scope_base=scope)
            assert r.status_code == 200 and (await r.get_json()) == {"deployments": []}
        for key in [KEY, *near_misses(ADMIN)]:
            r = await c.get("/admin/tree", headers=bearer(key), scope_base=LOCAL)
            assert r.status_code == 401, key
            assert (await r.get_json())["error"]["code"] == "invalid_api_key"
        assert (await c.get("/v1/models", headers=bearer(ADMIN), scope_base=LOCAL)).status_code == 401


async def test_api_key_near_misses_are_refused() -> None:
    async with app_client(api_keys=[KEY, "sk-other-key-42"]) as c:
        for key in (KEY, "sk-other-key-42"):
            assert (await c.get("/v1/models", headers=bearer(key), scope_base=LOCAL)).status_code == 200
        for key in near_misses(KEY):
            r = await c.get("/v1/models", headers=bearer(key), scope_base=LOCAL)
            assert r.status_code == 401, repr(key)
        for header in (KEY, f"Basic {KEY}", f"Bearer  {KEY}", f"Bearer {KEY}, Bearer {KEY}"):
            r = await c.get("/v1/models", headers={"Authorization": header}, scope_base=LOCAL)
            assert r.status_code == 401, header


async def test_without_keys_the_admin_api_answers_loopback_only() -> None:
    async with app_client() as c:
        for scope in (LOCAL, {"client": ("::1", 50000)}, {"client": ("127.8.9.10", 1)}):
            assert (await c.get("/admin/tree", scope_base=scope)).status_code == 200, scope
        for scope in (REMOTE, {"client": ("10.0.0.2", 1)}, {"client": ("::ffff:10.0.0.2", 1)}, {"client": None}):
            r = await c.get("/admin/tree", scope_base=scope)
            assert r.status_code == 403, scope
            assert "loopback" in (await r.get_json())["error"]["message"]
            # a header cannot make a remote client local
            r = await c.get("/admin/tree", headers={"Remote-Addr": "127.0.0.1", "X-Forwarded-For": "127.0.0.1"},
                            scope_base=scope)
            assert r.status_code == 403
        assert (await c.get("/v1/models", scope_base=REMOTE)).status_code == 200  # the rest stays open


async def test_a_model_of_an_unsupported_architecture_is_a_400_naming_what_is_supported(tmp_path: Path) -> None:
    model = tmp_path / "neox"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["GPTNeoXForCausalLM"], "hidden_size": 64}')
    async with app_client() as c:
        r = await c.post("/admin/deployments", json={"name": "neox", "model": str(model)}, scope_base=LOCAL)
        assert r.status_code == 400
        err = (await r.get_json())["error"]
        assert err["code"] == "model_not_supported" and err["param"] == "model"
        assert "GPTNeoXForCausalLM" in err["message"] and "Qwen3ForCausalLM" in err["message"], err


async def test_a_model_that_fails_to_load_is_a_422_with_the_reason(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    async with app_client() as c:
        r = await c.post("/admin/deployments", json={"name": "bad", "model": str(missing)}, scope_base=LOCAL)
        assert r.status_code == 422
        err = (await r.get_json())["error"]
        assert "bad" in err["message"] and "no-such-model" in err["message"], err
        assert err["code"] == "deployment_failed"


def test_refusal_rules() -> None:
    api, admin = [KEY.encode()], [ADMIN.encode()]

    def status(path: str, key: str = "", host: str | None = "127.0.0.1", rule: str | None = None,
               api_keys: list[bytes] = api, admin_keys: list[bytes] = admin) -> int:
        e = refusal(path, rule, f"Bearer {key}" if key else "", host, api_keys, admin_keys)
        return 200 if e is None else e.status

    assert status("/health", host="203.0.113.7") == status("/healthz") == 200
    assert status("/admin/tree", ADMIN, host="203.0.113.7") == 200
    assert status("/admin/tree", KEY) == 401
    assert status("//admin/tree", KEY) == 401  # extra slashes do not dodge the admin rule
    assert status("/x", KEY, rule="/admin/tree") == 401  # nor does a path the route rewrote
    assert status("/admin/tree", KEY, admin_keys=[]) == 403
    assert status("/admin/tree", api_keys=[], admin_keys=[]) == 200
    assert status("/admin/tree", host="203.0.113.7", api_keys=[], admin_keys=[]) == 403
    assert status("/v1/models", host="203.0.113.7", api_keys=[], admin_keys=[]) == 200
    assert status("/v1/models", ADMIN) == 401  # the admin key is no API key


@pytest.mark.parametrize(("host", "local"), [
    ("127.0.0.1", True), ("127.255.0.3", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("128.0.0.1", False), ("10.1.2.3", False), ("::2", False), ("localhost", False), ("", False), (None, False),
    ("<local>", False),
])
def test_loopback(host: str | None, local: bool) -> None:
    assert is_loopback(host) is local


def test_admin_paths() -> None:
    assert is_admin_path("/admin") and is_admin_path("/admin/tree") and is_admin_path("///admin/x")
    assert not is_admin_path("/administrator") and not is_admin_path("/v1/admin")
