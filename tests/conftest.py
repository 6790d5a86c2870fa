"""Shared fixtures: real-model engines reused across tests, the transformers reference, and the
after-every-test check that no engine leaks a KV block."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from atomr_trio import LLM
from atomr_trio.engine import engine_core
from atomr_trio.executor.worker import Worker
from atomr_trio.model import cpu_kernels
from atomr_trio.model_source import ModelSource

# Every EngineCore (and Worker) built during the run, so the leak check below can see it.
_ENGINES: weakref.WeakSet[engine_core.EngineCore] = weakref.WeakSet()
_orig_init = engine_core.EngineCore.__init__


def _tracking_init(self: engine_core.EngineCore, *args: Any, **kwargs: Any) -> None:
    _orig_init(self, *args, **kwargs)
    _ENGINES.add(self)


engine_core.EngineCore.__init__ = _tracking_init  # type: ignore[method-assign]

_WORKERS: weakref.WeakSet[Worker] = weakref.WeakSet()
_orig_worker_init = Worker.__init__


def _tracking_worker_init(self: Worker, *args: Any, **kwargs: Any) -> None:
    _orig_worker_init(self, *args, **kwargs)
    _WORKERS.add(self)


Worker.__init__ = _tracking_worker_init  # type: ignore[method-assign]


def core_of(engine: Any) -> engine_core.EngineCore:
    """The EngineCore behind an AsyncLLM, an LLM or an EngineHandle, for tests that look inside
    the engine they drive (the package itself only ever holds the handle)."""
    handle = getattr(engine, "engine", engine)  # LLM -> AsyncLLM -> EngineHandle
    handle = getattr(handle, "engine", handle)
    for core in list(_ENGINES):
        if core.handle is handle:
            return core
    raise LookupError(f"no live EngineCore behind {engine!r}")


def worker_of(engine: Any) -> Worker:
    """The Worker behind an engine (anything `core_of` takes), for tests that look at its
    Context (the EngineCore itself only holds the Worker's handle)."""
    handle = core_of(engine).worker
    for worker in list(_WORKERS):
        if worker.handle is handle:
            return worker
    raise LookupError(f"no live Worker behind {engine!r}")


@pytest.fixture(autouse=True)
def no_block_leaks() -> Iterator[None]:
    """After every test: each engine's free blocks == total blocks (cached-but-free count as
    free), nothing is queued and its request table is empty. Aborts are messages, so allow the
    engine a moment to take them."""
    yield
    deadline = time.monotonic() + 5.0
    for core in list(_ENGINES):
        bm = core.block_manager
        while (bm.num_free_blocks != bm.num_blocks or core.scheduler.has_work()
               or core.snapshot().num_requests):
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{core.name} leaked: {bm.num_free_blocks} free KV blocks of {bm.num_blocks}, "
                    f"{core.num_running} running, {core.num_waiting} waiting, "
                    f"{core.snapshot().num_requests} requests in its table"
                )
            time.sleep(0.01)


# ---- CPU kernel paths: each test that takes `kernel_path` runs once per path this machine has ----
KERNEL_PATHS = ("native", "onednn", "torch")
_path_runs: dict[str, list[str]] = {}  # path -> outcomes, for the summary at the end


def kernel_path_unavailable(path: str, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """Why this machine cannot run `path` for a part that has it (the missing CPU feature, or
    what the path's probe saw); None when it can."""
    for part in cpu_kernels.PATHS:
        if path in cpu_kernels.paths(part, dtype):
            why = cpu_kernels.unavailable(part, path, dtype)
            if why:
                return f"{part} {path}: {why}"
    return None


@pytest.fixture(params=KERNEL_PATHS)
def kernel_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Force one CPU kernel path (ATOMR_TRIO_CPU_KERNELS) for the test, or skip it naming why
    this machine lacks the path."""
    path: str = request.param
    why = kernel_path_unavailable(path)
    if why:
        _path_runs.setdefault(path, []).append(f"skipped ({why})")
        pytest.skip(f"{path} kernel path unavailable here: {why}")
    _path_runs.setdefault(path, []).append("ran")
    monkeypatch.setenv(cpu_kernels.ENV, path)
    return path


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _path_runs:
        return
    terminalreporter.write_sep("-", "CPU kernel paths")
    for path in KERNEL_PATHS:
        outcomes = _path_runs.get(path, [])
        ran = outcomes.count("ran")
        skipped = [o for o in outcomes if o != "ran"]
        why = f"; skipped {len(skipped)}: {skipped[0].removeprefix('skipped ')}" if skipped else ""
        terminalreporter.write_line(f"{path}: ran {ran} test(s){why}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2 (2 layers, hidden 64, 258 tokens; test_hf_dir.write_tiny_model) for
    fast engine, runner and gateway tests: it loads in well under a second."""
    from test_hf_dir import write_tiny_model

    path = tmp_path_factory.mktemp("tiny-model")
    write_tiny_model(path, "qwen2", seed=7)
    return path


@pytest.fixture(scope="session")
def tiny_source(tiny_model_dir: Path) -> ModelSource:
    return ModelSource.open(str(tiny_model_dir))


@pytest.fixture(scope="session")
def default_source() -> ModelSource:
    return ModelSource.open(None)


@pytest.fixture(scope="session")
def _llm_cache() -> Iterator[dict[tuple, LLM]]:
    cache: dict[tuple, LLM] = {}
    yield cache
    for llm in cache.values():
        llm.close()


@pytest.fixture
def make_llm(_llm_cache: dict[tuple, LLM]) -> Callable[..., LLM]:
    """An LLM on the default model with these settings, shared by every test that asks for the
    same settings (loading costs seconds)."""

    def make(**settings: Any) -> LLM:
        key = tuple(sorted(settings.items()))
        if key not in _llm_cache:
            _llm_cache[key] = LLM(**settings)
        return _llm_cache[key]

    return make


@pytest.fixture
def llm32(make_llm: Callable[..., LLM]) -> LLM:
    """The default model in float32 (token parity with transformers holds in float32)."""
    return make_llm(dtype="float32", max_model_len=2048, num_kv_blocks=256, block_size=64)


class Reference:
    """transformers' greedy decoding of the same GGUF, float32, with its raw logprobs, and its
    scoring of a whole prompt."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._cache: dict[tuple, tuple[list[int], list[torch.Tensor]]] = {}

    @torch.no_grad()
    def greedy(self, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
        key = (tuple(ids), n)
        if key not in self._cache:
            out = self.model(torch.tensor([ids]), use_cache=True)
            tokens: list[int] = []
            logprobs: list[torch.Tensor] = []
            for _ in range(n):
                logits = out.logits[0, -1].float()
                tok = int(logits.argmax())
                tokens.append(tok)
                logprobs.append(torch.log_softmax(logits, dim=-1))
                out = self.model(torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
            self._cache[key] = (tokens, logprobs)
        return self._cache[key]

    @torch.no_grad()
    def prompt_logprobs(self, ids: list[int]) -> torch.Tensor:
        """log_softmax of every position's logits from one forward over the whole prompt:
        row i scores the token at position i + 1."""
        return torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), dim=-1)


@pytest.fixture(scope="session")
def reference(default_source: ModelSource) -> Reference:
    from transformers import AutoModelForCausalLM

    path = default_source.path
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    return Reference(model)


@pytest.fixture(scope="session")
def hf_tokenizer(default_source: ModelSource) -> Any:
    from transformers import AutoTokenizer

    path = default_source.path
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
