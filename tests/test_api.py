"""The request fields of the HTTP API against a live server on tiny random models: every field is
honoured or refused with a 400 naming it, never silently dropped; a model without a chat template
answers chat with a 400; streamed requests are counted in the request metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serverproc import Server
from test_hf_dir import write_tiny_model

from atomr_trio import LLM
from atomr_trio.chat_template import ChatTemplateError

pytestmark = pytest.mark.slow

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_model(path, "qwen2")
    return path


@pytest.fixture(scope="module")
def bare_dir(tmp_path_factory) -> Path:
    """The tiny model with no chat template."""
    path = tmp_path_factory.mktemp("bare")
    write_tiny_model(path, "qwen2", chat_template=None)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir: Path, bare_dir: Path) -> Iterator[Server]:
    cfg = tmp_path_factory.mktemp("cfg") / "project.toml"
    common = f'dtype = "float32"\nkv_cache_memory_bytes = {16 << 20}'
    cfg.write_text(f"""
[[deployment]]
name = "tiny"
model = "{tiny_dir}"
{common}

[[deployment]]
name = "bare"
model = "{bare_dir}"
{common}

[[deployment]]
name = "counted"
model = "{tiny_dir}"
{common}

[[deployment]]
name = "single"
model = "{tiny_dir}"
max_num_seqs = 1
{common}
""")
    s = Server("--config", str(cfg))
    yield s
    assert s.stop() == 0


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def test_chat_without_a_chat_template_is_a_400(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"model": "bare", "messages": HI, "max_tokens": 2})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages" and "no chat template" in err["message"]
    r = http.post("/tokenize", json={"model": "bare", "messages": HI})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
    # plain prompts still work
    r = http.post("/v1/completions", json={"model": "bare", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_library_chat_without_a_chat_template_says_so(bare_dir: Path) -> None:
    with LLM(str(bare_dir), dtype="float32", num_kv_blocks=16) as llm:
        with pytest.raises(ChatTemplateError, match="no chat template.*plain text prompt"):
            llm.chat(HI)
        assert llm.generate("hi", use_tqdm=False)[0].outputs[0].token_ids
