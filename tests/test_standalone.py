"""The repository stands alone: no committed file names a directory of the machine it was written
on or points to a document outside the repository, and the benchmark report writer keeps it so."""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Built from pieces so that this file does not match itself.
FORBIDDEN = re.compile("|".join([
    r"(?<![\w.])/" + "root/", r"(?<![\w.])/" + "work/", r"(?<![\w.])/" + "home/", r"(?<![\w.])/" + "tmp/",
    r"\.\./" + "shared/", "DESIGN" + r"\.md",
]))


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_committed_file_names_a_machine_path_or_an_outside_document() -> None:
    hits = []
    for path in _tracked_files():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # binary, or deleted in the work tree
        for n, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not hits, "\n".join(hits)


def test_benchmark_reports_show_no_machine_path(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("compare", ROOT / "benchmarks" / "compare.py")
    assert spec is not None and spec.loader is not None
    compare = importlib.util.module_from_spec(spec)
    sys.modules["compare"] = compare  # its dataclasses look their module up
    try:
        spec.loader.exec_module(compare)
    finally:
        del sys.modules["compare"]
    args = argparse.Namespace(models=tmp_path / "peer-models", vllm_venv=tmp_path / "venv-vllm",
                              llama_venv=tmp_path / "venv-llama", llama_cpp_src=None)
    assert compare.shown(str(tmp_path / "peer-models" / "smollm2-135m-hf"), args) == "MODELS/smollm2-135m-hf"
    assert compare.shown(str(tmp_path / "venv-vllm" / "bin" / "vllm"), args) == "VLLM_VENV/bin/vllm"
    assert compare.shown(str(ROOT / "docs" / "benchmarks.md"), args) == "docs/benchmarks.md"
    assert compare.shown(str(tmp_path / "elsewhere" / "profile.md"), args) == "DIR/profile.md"
    assert compare.shown("--port", args) == "--port" and compare.shown("http://127.0.0.1:8000", args)[:4] == "http"
    raw = {"r": [{"tokenizer": str(tmp_path / "peer-models" / "hf"), "n": 3}]}
    assert compare.scrubbed(raw, args) == {"r": [{"tokenizer": "MODELS/hf", "n": 3}]}
