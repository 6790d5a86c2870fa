"""The command line is generated from the settings models, and the settings are validated once:
every engine setting is a flag with the model's default, choices and help; a value the models
refuse stops the start naming the flag (or, in the library, the setting); float16 is refused
everywhere; an unknown library setting is a TypeError."""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import get_args

import pytest
from pydantic import ValidationError

import atomr_trio
import atomr_trio.cli
from atomr_trio import LLM, open_engine
from atomr_trio.async_llm import engine_config
from atomr_trio.cli import main, parser, settings_from_flags, spec_from_flags
from atomr_trio.engine.engine_config import Dtype, EngineConfig, EngineOptions, EngineSettings
from atomr_trio.executor import gc_heap
from atomr_trio.model_source import DEFAULT_MODEL_NAME
from atomr_trio.runtime.deployment_spec import DeploymentSpec
from atomr_trio.server.serve import ServerSettings

ROOT = Path(__file__).resolve().parent.parent


def actions() -> dict[str, argparse.Action]:
    return {a.option_strings[0]: a for a in parser()._actions if a.option_strings}


def parse(*argv: str) -> argparse.Namespace:
    return parser().parse_args(list(argv))


@pytest.fixture(autouse=True)
def no_env_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATOMR_API_KEY", raising=False)
    monkeypatch.delenv("ATOMR_ADMIN_KEY", raising=False)


def test_the_flags_tests_and_docs_use_are_all_there() -> None:
    used = {"--model", "--served-model-name", "--host", "--port", "--dtype", "--max-model-len", "--max-num-seqs",
            "--max-num-batched-tokens", "--kv-cache-memory-bytes", "--block-size", "--data-parallel-size",
            "--config", "--api-key", "--admin-key", "--request-timeout", "--shutdown-timeout",
            "--metrics-prefix", "--log-level"}
    assert used <= set(actions())


def test_every_engine_setting_is_a_flag_with_the_models_default_and_help() -> None:
    flags = actions()
    for name, field in EngineSettings.model_fields.items():
        action = flags["--" + name.replace("_", "-")]
        assert action.dest == name and action.default == field.default, name
        assert field.description and field.description in (action.help or ""), name
    assert flags["--dtype"].choices == list(get_args(Dtype)) == ["auto", "float32", "bfloat16"]
    assert flags["--metrics-prefix"].choices == ["atomr", "vllm"]
    assert flags["--data-parallel-size"].default == DeploymentSpec.model_fields["replicas"].default
    assert flags["--shutdown-timeout"].default == ServerSettings().shutdown_timeout


def test_no_flags_give_the_models_defaults() -> None:
    settings = settings_from_flags(parse())
    assert settings.deployments == [DeploymentSpec(name=DEFAULT_MODEL_NAME)]
    assert settings.model_dump(exclude={"deployments"}) == ServerSettings().model_dump(exclude={"deployments"})
    assert EngineConfig() == engine_config() and EngineConfig().max_num_seqs == EngineSettings().max_num_seqs


def test_flags_reach_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATOMR_API_KEY", " k3 ,k4")
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    s = settings_from_flags(parse(
        "--model", str(model_dir), "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "8",
        "--max-num-batched-tokens", "64", "--kv-cache-memory-bytes", "4096", "--block-size", "32",
        "--data-parallel-size", "2", "--host", "0.0.0.0", "--port", "0", "--api-key", "k1", "--api-key", "k2",
        "--admin-key", "a", "--request-timeout", "9.5", "--shutdown-timeout", "2", "--metrics-prefix", "vllm"))
    spec = s.deployments[0]
    assert (spec.name, spec.model, spec.dtype, spec.max_model_len, spec.max_num_seqs, spec.max_num_batched_tokens,
            spec.kv_cache_memory_bytes, spec.block_size, spec.replicas) == (
        "my-model", str(model_dir), "float32", 512, 8, 64, 4096, 32, 2)
    assert (s.host, s.port, s.api_keys, s.admin_keys, s.request_timeout, s.shutdown_timeout, s.metrics_prefix) == (
        "0.0.0.0", 0, ["k1", "k2", "k3", "k4"], ["a"], 9.5, 2.0, "vllm")
    gguf = tmp_path / "smol.Q8_0.gguf"
    gguf.write_bytes(b"")
    assert spec_from_flags(parse("--model", str(gguf))).name == "smol.Q8_0"
    assert spec_from_flags(parse("--model", str(gguf), "--served-model-name", "m")).name == "m"


def test_config_replaces_the_model_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "project.toml"
    cfg.write_text('[[deployment]]\nname = "a"\nmax_num_seqs = 3\n\n[[deployment]]\nname = "b"\nreplicas = 2\n')
    s = settings_from_flags(parse("--config", str(cfg), "--max-num-seqs", "99"))
    assert [(d.name, d.max_num_seqs, d.replicas) for d in s.deployments] == [("a", 3, 1), ("b", 256, 2)]
    cfg.write_text('[[deployment]]\nname = "a"\ndtype = "float16"\n')
    with pytest.raises(ValueError, match="deployment field dtype: .*float16 is not supported"):
        settings_from_flags(parse("--config", str(cfg)))
    cfg.write_text('[[deployment]]\nname = "a"\n[[deployment]]\nname = "a"\n')
    with pytest.raises(ValueError, match="unique"):
        settings_from_flags(parse("--config", str(cfg)))


@pytest.mark.parametrize("argv,flag", [(["--max-num-seqs", "0"], "--max-num-seqs"),
                                       (["--max-model-len", "1"], "--max-model-len"),
                                       (["--data-parallel-size", "65"], "--data-parallel-size"),
                                       (["--port", "70000"], "--port"),
                                       (["--request-timeout", "0"], "--request-timeout")])
def test_a_refused_value_stops_the_start_naming_its_flag(
        argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2  # before anything loads: validation comes first
    err = capsys.readouterr().err
    assert err.startswith(f"atomr_trio: {flag}: "), err


def test_the_server_process_freezes_its_heap_once_it_listens(monkeypatch: pytest.MonkeyPatch) -> None:
    # python -m atomr_trio owns its process: once the server listens (models built), the objects
    # of its start-up leave the garbage collector's walks (executor/gc_heap.py); not before
    frozen_when: list[tuple[str, bool, bool]] = []

    async def listening_server(settings: ServerSettings, *, task_status: object) -> None:
        frozen_when.append(("starting", gc_heap.frozen(), gc.get_freeze_count() > 0))
        task_status.started(["http://127.0.0.1:8000"])  # type: ignore[attr-defined]
        frozen_when.append(("listening", gc_heap.frozen(), gc.get_freeze_count() > 0))

    assert not gc_heap.frozen() and gc.get_freeze_count() == 0
    monkeypatch.setattr(atomr_trio.cli, "serve", listening_server)
    try:
        assert main([]) == 0
    finally:
        gc_heap.thaw()
    assert frozen_when == [("starting", False, False), ("listening", True, True)]
    assert gc.get_freeze_count() == 0


def test_argparse_refuses_what_the_types_refuse(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--dtype", "float16"], ["--metrics-prefix", "x"], ["--max-num-seqs", "many"]):
        with pytest.raises(SystemExit) as e:
            parse(*argv)
        assert e.value.code == 2
    assert "invalid choice: 'float16'" in capsys.readouterr().err


def test_float16_is_refused_everywhere() -> None:
    with pytest.raises(ValidationError, match="float16 is not supported"):
        DeploymentSpec(name="x", dtype="float16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype: .*float16 is not supported.*use bfloat16 or float32"):
        engine_config(dtype="float16")
    with pytest.raises(ValueError, match="float16 is not supported"):
        EngineConfig(dtype="float16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="float16 is not supported"):
        LLM(dtype="float16")


def test_library_settings_validate_through_the_same_model() -> None:
    # EngineConfig adds only what `resolve` sets
    assert set(EngineConfig.model_fields) - {"kv_from_gpu_memory"} == set(EngineOptions.model_fields)
    assert set(EngineOptions.model_fields) > set(EngineSettings.model_fields)
    with pytest.raises(TypeError, match="unknown engine setting.*kv_from_gpu_memory"):
        LLM(kv_from_gpu_memory=True)
    with pytest.raises(TypeError, match="unknown engine setting.*bogus"):
        LLM(bogus=1)
    with pytest.raises(TypeError, match="unknown engine setting.*replicas"):
        engine_config(replicas=2)  # a deployment key, not an engine setting
    with pytest.raises(ValueError, match="max_num_seqs: Input should be greater than or equal to 1 .got 0."):
        LLM(max_num_seqs=0)
    with pytest.raises(ValueError, match="block_size"):
        engine_config(block_size=4096)
    base = engine_config(dtype="float32", num_kv_blocks=64)
    assert engine_config(base, max_num_seqs=4) == EngineConfig(dtype="float32", num_kv_blocks=64, max_num_seqs=4)


async def test_open_engine_refuses_an_unknown_setting_before_loading() -> None:
    with pytest.raises(TypeError, match="unknown engine setting.*bogus"):
        async with open_engine("/nonexistent", bogus=1):
            pass  # pragma: no cover


def test_a_deployments_engine_config_carries_its_engine_settings() -> None:
    spec = DeploymentSpec(name="m", dtype="float32", max_model_len=300, max_num_seqs=3, max_num_batched_tokens=40,
                          kv_cache_memory_bytes=1 << 20, block_size=8, replicas=2)
    cfg = spec.engine_config(torch_threads=2, replica=1)
    assert cfg.model_dump(include=set(EngineSettings.model_fields)) == spec.model_dump(
        include=set(EngineSettings.model_fields))
    assert (cfg.torch_threads, cfg.seed) == (2, 1)
    assert cfg.model_dump(exclude=set(EngineSettings.model_fields) | {"torch_threads", "seed"}) == \
        EngineConfig().model_dump(exclude=set(EngineSettings.model_fields) | {"torch_threads", "seed"})


def test_python_m_atomr_trio_help() -> None:
    done = subprocess.run([sys.executable, "-m", "atomr_trio", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    words = " ".join(done.stdout.split())
    assert "--data-parallel-size" in words and "tokens per KV block, the unit of cache allocation and prefix " \
        "reuse (default: 64 on CPU" in words


def test_the_model_contract_forbids_every_other_part_of_the_package() -> None:
    """`lint-imports` keeps model/ a leaf only if its contract names every sibling of model/:
    a new top-level module or package must be added there."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    contract = next(c for c in config["contracts"] if c["source_modules"] == ["atomr_trio.model"])
    package = Path(atomr_trio.__file__).parent
    parts = {p.stem for p in package.glob("*.py")} | {p.name for p in package.iterdir() if (p / "__init__.py").exists()}
    siblings = {f"atomr_trio.{p}" for p in parts - {"__init__", "__main__", "model"}}
    assert siblings <= set(contract["forbidden_modules"])
