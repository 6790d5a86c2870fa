"""The benchmark commands run end to end against a tiny model and report consistent figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from serverproc import Server
from test_hf_dir import write_tiny_model

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
