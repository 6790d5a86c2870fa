"""Our GGUF header reader against gguf's own reader, on the default model's file, and the errors a
broken file gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from atomr_trio.model.config import ModelLoadError
from atomr_trio.model.gguf_file import GGUFFile
from atomr_trio.model.gguf_header import GGUFHeader
from atomr_trio.model_source import ModelSource, default_model_path


def test_header_matches_the_gguf_package() -> None:
    import gguf

    path = default_model_path()
    ours = GGUFHeader(path)
    theirs = gguf.GGUFReader(str(path))
    want = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert set(ours.fields) == set(want)
    for key, value in want.items():
        if isinstance(value, float):
            assert ours.fields[key] == pytest.approx(value), key
        else:
            assert ours.fields[key] == value, key
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.name, a.shape, a.ggml_type) == (b.name, tuple(int(x) for x in b.shape), int(b.tensor_type))
        assert np.array_equal(a.data, np.asarray(b.data).reshape(-1).view(np.uint8))


@pytest.mark.parametrize(
    "cut, message",
    [(0, "the file is empty"), (3, "past the end"), (20, "past the end"), (200_000, "past the end"),
     (-1000, "past the end of the file")],
)
def test_a_truncated_file_is_a_clear_load_error(tmp_path: Path, cut: int, message: str) -> None:
    data = default_model_path().read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(ModelLoadError, match=message):
        f = GGUFFile(bad)
        for _ in f.weights(f.config()):
            pass


def test_a_foreign_file_is_a_clear_load_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        ModelSource.open(str(bad))
