"""The benchmark commands run end to end against a tiny model and report consistent figures."""

from __future__ import annotations

import argparse
import json
import shutil
import ssl
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio
from serverproc import Server
from test_hf_dir import write_tiny_model

from atomr_trio.loadgen import serving as bench_serve
from atomr_trio.model_source import ModelSource

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench-tiny")
    write_tiny_model(path, "qwen2", max_positions=1024)
    return path


def _bench(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "atomr_trio", "bench", *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_bench_serve_reports_vllm_metrics(tiny_dir: Path, tmp_path: Path) -> None:
    server = Server("--model", str(tiny_dir), "--dtype", "float32")
    try:
        result = tmp_path / "result.json"
        _bench("serve", "--base-url", server.url, "--model", tiny_dir.name, "--tokenizer", str(tiny_dir),
               "--num-prompts", "12", "--max-concurrency", "4", "--input-len", "24", "--output-len", "16",
               "--ignore-eos", "--goodput", "ttft:60000", "--result-file", str(result))
    finally:
        assert server.stop() == 0
    s = json.loads(result.read_text())
    assert s["completed"] == 12 and s["failed"] == 0
    assert s["total_output_tokens"] == 12 * 16 and s["total_input_tokens"] >= 12 * 20
    assert s["output_throughput"] == pytest.approx(s["total_output_tokens"] / s["duration_s"])
    assert s["request_goodput"] == pytest.approx(s["request_throughput"])
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert 0 < s[key]["median"] <= s[key]["p99"]
    assert s["ttft_ms"]["mean"] < s["e2el_ms"]["mean"]


def test_bench_offline(tiny_dir: Path, tmp_path: Path) -> None:
    result = tmp_path / "offline.json"
    _bench("offline", "--model", str(tiny_dir), "--dtype", "float32", "--num-prompts", "8", "--input-len", "16",
           "--output-len", "8", "--result-file", str(result))
    r = json.loads(result.read_text())
    assert r["output_tokens_per_s"] > 0 and 0 < r["forward_share"] <= 1


async def test_bench_serve_counts_tokens_itself_when_the_server_sends_no_usage(tiny_dir: Path) -> None:
    """llama.cpp's server streams no usage: bench serve then tokenizes what came back, like vLLM's."""
    pieces = ["Hello", " there", ", friend", "."]  # a completion streamed in four chunks, no usage
    tok = ModelSource.open(str(tiny_dir)).tokenizer
    expected = len(tok.encode("".join(pieces), add_special_tokens=False))

    async def handle(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some()
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(next(v for k, v in (ln.split(b":", 1) for ln in head.split(b"\r\n")[1:])
                          if k.strip().lower() == b"content-length"))
        while len(body) < length:
            body += await stream.receive_some()
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
        for piece in pieces:
            await trio.sleep(0.01)
            await stream.send_all(f"data: {json.dumps({'choices': [{'index': 0, 'text': piece}]})}\n\n".encode())
        await stream.send_all(b"data: [DONE]\n\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        p = argparse.ArgumentParser()
        bench_serve.add_arguments(p)
        args = p.parse_args(["--base-url", f"http://127.0.0.1:{port}", "--tokenizer", str(tiny_dir),
                             "--num-prompts", "3", "--max-concurrency", "1", "--input-len", "12"])
        s = await bench_serve.run(args)
        nursery.cancel_scope.cancel()
    assert s["completed"] == 3 and s["failed"] == 0
    assert s["total_output_tokens"] == 3 * expected
    assert s["total_input_tokens"] >= 3 * 10
    assert 0 < s["ttft_ms"]["median"] < s["e2el_ms"]["median"]
    assert s["itl_ms"]["median"] >= 5  # three gaps of ~10 ms per request


async def _serve_raw(reply: bytes, byte_by_byte: bool, url: str = "http://127.0.0.1:{port}/v1/completions?x=1",
                     server_ssl: ssl.SSLContext | None = None) -> tuple[bench_serve.RequestResult, bytes]:
    """One bench request against a server that answers `reply` (one byte per send when asked),
    then closes the connection (over TLS with `server_ssl`, without close_notify)."""
    seen = []

    async def handle(stream: trio.SocketStream) -> None:
        conn: trio.abc.Stream = stream
        if server_ssl is not None:
            conn = trio.SSLStream(stream, server_ssl, server_side=True)
        data = b""
        while b"\r\n\r\n" not in data:
            data += await conn.receive_some()
        seen.append(data)
        for i in range(len(reply)) if byte_by_byte else [None]:
            await conn.send_all(reply if i is None else reply[i:i + 1])
            await trio.sleep(0)
        await stream.aclose()  # the TCP stream: no TLS close_notify, as many HTTPS servers

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        res = await bench_serve.one_request(url.format(port=port), {"prompt": "hi"}, {"Authorization": "Bearer k"})
        nursery.cancel_scope.cancel()
    return res, seen[0]


async def test_bench_serve_reads_events_split_anywhere_and_crlf_lines() -> None:
    """An SSE event may arrive in pieces (here a byte per read), its lines ended by CRLF, in a
    chunked body: every chunk is still read once, in order, and its usage counted."""
    events = [{"choices": [{"index": 0, "text": t}]} for t in ("Hel", "lo", "!")]
    events.append({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}})
    sse = b"".join(b"data: " + json.dumps(e).encode() + b"\r\n\r\n" for e in events) + b"data: [DONE]\r\n\r\n"
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(sse), sse)
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n" + body
    res, request = await _serve_raw(reply, byte_by_byte=True)
    assert res.ok and res.error == ""
    assert res.text == "Hello!" and len(res.itl) == 2
    assert (res.prompt_tokens, res.output_tokens) == (5, 3)
    assert request.startswith(b"POST /v1/completions?x=1 HTTP/1.1\r\n")
    assert b"authorization: bearer k" in request.lower()


async def test_bench_serve_reports_an_http_error_as_a_failed_request() -> None:
    reply = (b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: 19\r\n\r\n"
             b'{"error": "full"}\r\n')
    res, _ = await _serve_raw(reply, byte_by_byte=False)
    assert not res.ok and res.error.startswith("HTTP 429") and "full" in res.error


_CLOSE_DELIMITED = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
                    b": keep-alive\n\nevent: x\ndata:{\"choices\": [{\"index\": 0, \"text\": \"a\"}]}\n\n"
                    b'data: {"choices": [{"index": 0, "text": "b"}]}')  # the last event without its blank line


async def test_bench_serve_reads_a_body_that_ends_at_the_close() -> None:
    """A body that runs to the connection's close (llama.cpp's server, HTTP/1.0 style): comments
    and other fields skipped, `data:` without its space read, a last event without its blank line
    kept."""
    res, _ = await _serve_raw(_CLOSE_DELIMITED, byte_by_byte=False)
    assert res.ok and res.text == "ab" and len(res.itl) == 1


async def test_bench_serve_over_https_reads_a_body_that_ends_without_close_notify(tmp_path: Path,
                                                                                monkeypatch) -> None:
    """Over TLS a server may close without close_notify; the body still ends there, as HTTPS
    clients (httpx, browsers) accept, instead of failing every request."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ssl.load_cert_chain(cert, key)
    monkeypatch.setattr(bench_serve, "_ssl_context", lambda: ssl.create_default_context(cafile=str(cert)))
    res, _ = await _serve_raw(_CLOSE_DELIMITED, byte_by_byte=False, url="https://localhost:{port}/v1/completions",
                              server_ssl=server_ssl)
    assert res.ok and res.text == "ab", res.error


async def test_bench_serve_without_text_says_so() -> None:
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    res, _ = await _serve_raw(reply, byte_by_byte=False)
    assert not res.ok and res.error == "the stream carried no text"


def test_bench_serve_refuses_a_base_url_without_scheme_or_host() -> None:
    p = argparse.ArgumentParser()
    bench_serve.add_arguments(p)
    for bad in ("localhost:8000", "ftp://h/", "http:///v1"):
        with pytest.raises(SystemExit, match="--base-url"):
            trio.run(bench_serve.run, p.parse_args(["--base-url", bad, "--num-prompts", "1"]))


@pytest.mark.real_model
def test_random_prompts_encode_to_the_length_asked_for() -> None:
    tok = ModelSource.open(None).tokenizer  # the default model's (a real BPE vocabulary)
    prompts = bench_serve.make_prompts(tok, 32, 128, seed=3)
    assert [len(tok.encode(p, add_special_tokens=False)) for p in prompts] == [128] * 32
    assert len(set(prompts)) == 32
