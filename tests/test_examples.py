"""Every runnable example in examples/ runs as a user would run it, and says what it should."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from serverproc import Server

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(*cmd: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_quickstart() -> None:
    out = _run(sys.executable, str(EXAMPLES / "quickstart.py"))
    assert "chat: The capital of France is Paris. (stop)" in out
    assert "sample 0:" in out and "sample 1:" in out


def test_structured_output() -> None:
    out = _run(sys.executable, str(EXAMPLES / "structured_output.py"))
    events = [line for line in out.splitlines() if line.startswith("event: Event(")]
    assert len(events) == 3 and "kind='conference'" in events[1]
    assert "tool call: book_table({'people': 4, 'time': '19:30'})" in out


def test_trio_app() -> None:
    out = _run(sys.executable, str(EXAMPLES / "trio_app.py"))
    assert out.count(" -> ") == 3 and "HTTP:" in out
    assert "'multi_seq_steps'" in out


def test_multi_model_config_with_the_openai_client_and_curl() -> None:
    server = Server("--config", str(EXAMPLES / "multi_model.toml"))
    try:
        models = {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]}
        assert models == {"smol", "smol-short"}
        out = _run(sys.executable, str(EXAMPLES / "openai_client.py"),
                   env={"ATOMR_BASE_URL": server.url + "/v1", "ATOMR_MODEL": "smol"})
        assert "The capital of France is Paris." in out and "completion tokens]" in out
        out = _run("bash", str(EXAMPLES / "curl.sh"), env={"BASE": server.url, "MODEL": "smol-short"})
        assert "The capital of France is Paris." in out and "data: [DONE]" in out and '"tokens"' in out
    finally:
        assert server.stop() == 0


def test_notebook_runs_top_to_bottom_in_a_real_kernel() -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(EXAMPLES / "notebook.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plot cell drew a figure
    streamed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "Generating" in streamed  # the progress bar
