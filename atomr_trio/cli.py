"""The command line of `python -m atomr_trio`, generated from the settings models.

Invariant: a flag's type, choices, default and help come from one pydantic field (the engine
settings through `DeploymentSpec`, the server's through `ServerSettings`, the two of the command
line itself through `CommandLine`); this module only says which fields are flags and under which
name, and turns the parsed flags back into those models. A value the models refuse stops the
start with the flag named, before anything loads.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tomllib
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import trio
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from .engine.engine_config import EngineSettings, validation_message
from .executor import gc_heap
from .model.config import ModelLoadError
from .model_source import DEFAULT_MODEL_NAME
from .runtime.deployment_spec import DeploymentSpec
from .server.serve import ServerSettings, StartupFailed, serve

M = TypeVar("M", bound=BaseModel)


class CommandLine(BaseModel):
    """What only the command line sets."""

    model_config = ConfigDict(extra="forbid")
    config: str | None = Field(default=None, description="TOML file with [[deployment]] tables (several models); "
                                                         "replaces the model flags")
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="logging threshold")


@dataclass(frozen=True)
class Flag:
    """One field of `model` as a flag: `--field-name` unless `name` says otherwise; `note` is
    what the command line adds to the field's description."""

    model: type[BaseModel]
    field: str
    name: str | None = None
    note: str = ""

    @property
    def option(self) -> str:
        return self.name or "--" + self.field.replace("_", "-")


# One deployment from flags: its model, its name, every engine setting, its replicas.
MODEL_FLAGS = [
    Flag(DeploymentSpec, "model"),
    Flag(DeploymentSpec, "name", "--served-model-name", note="(default: the model's file or directory name)"),
    *(Flag(DeploymentSpec, name) for name in EngineSettings.model_fields),
    Flag(DeploymentSpec, "replicas", "--data-parallel-size"),
    Flag(DeploymentSpec, "enable_auto_tool_choice"),
    Flag(DeploymentSpec, "tool_call_parser"),
]
SERVER_FLAGS = [
    Flag(CommandLine, "config"),
    *(Flag(ServerSettings, name) for name in ("host", "port")),
    Flag(ServerSettings, "api_keys", "--api-key"),
    Flag(ServerSettings, "admin_keys", "--admin-key"),
    *(Flag(ServerSettings, name) for name in ("request_timeout", "shutdown_timeout", "metrics_prefix")),
    Flag(CommandLine, "log_level"),
]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m atomr_trio",
        description="Serve an OpenAI-compatible API (chat and text completions, streaming) with "
                    "continuous batching. With no --model, serves SmolLM2-135M-Instruct.",
    )
    for title, flags in (("model", MODEL_FLAGS), ("server", SERVER_FLAGS)):
        group = p.add_argument_group(title)
        for flag in flags:
            group.add_argument(flag.option, **_argument(flag))
    return p


def _argument(flag: Flag) -> dict[str, Any]:
    """argparse's keywords for one flag, read off its pydantic field."""
    info: FieldInfo = flag.model.model_fields[flag.field]
    kind = info.annotation
    if get_origin(kind) in (Union, types.UnionType):  # `X | None`: the flag is X, unset is None
        kind = next(a for a in get_args(kind) if a is not type(None))
    default = None if info.is_required() else info.get_default(call_default_factory=True)
    kw: dict[str, Any] = {"dest": flag.field, "default": default}
    if get_origin(kind) is Literal:
        kw["choices"] = list(get_args(kind))
        kw["type"] = type(kw["choices"][0])
    elif get_origin(kind) is list:
        kw["action"], kw["type"] = "append", get_args(kind)[0]
    elif kind is bool:
        kw["action"] = argparse.BooleanOptionalAction
    else:
        kw["type"] = kind
    if "type" in kw and "choices" not in kw:
        kw["metavar"] = flag.option.removeprefix("--").replace("-", "_").upper()
    shown = "" if default in (None, []) else f" (default: {default})"
    kw["help"] = " ".join(filter(None, [info.description or "", flag.note])).replace("%", "%%") + shown
    return kw


def bench_main(argv: list[str]) -> int:
    from .loadgen import offline
    from .loadgen import serving as bench_serve

    p = argparse.ArgumentParser(prog="python -m atomr_trio bench", description="benchmarks")
    sub = p.add_subparsers(dest="kind", required=True)
    bench_serve.add_arguments(sub.add_parser("serve", help="load an OpenAI-compatible server, vLLM's metrics"))
    offline.add_arguments(sub.add_parser("offline", help="LLM.generate throughput"))
    args = p.parse_args(argv)
    logging.basicConfig(level="WARNING")
    return bench_serve.main(args) if args.kind == "serve" else offline.main(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return bench_main(argv[1:])
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        trio.run(_serve_process, settings_from_flags(args))
    except (ValueError, ModelLoadError, OSError, tomllib.TOMLDecodeError) as e:
        print(f"atomr_trio: {e}", file=sys.stderr)
        return 2
    except BaseExceptionGroup as group:  # trio's nurseries wrap what the server raises
        failed = _sole(group)
        if not isinstance(failed, StartupFailed):
            raise
        print(f"atomr_trio: {failed}", file=sys.stderr)
        return 1
    return 0


async def _serve_process(settings: ServerSettings) -> None:
    """`serve` as the whole of this process's work: once it listens (its models built), before it
    carries load, the objects it started with leave the garbage collector's walks (executor/gc_heap.py)."""

    class Listening:  # serve reports its bound URLs through the task_status protocol
        def started(self, value: object = None) -> None:
            gc_heap.freeze()

    await serve(settings, task_status=Listening())


def settings_from_flags(args: argparse.Namespace) -> ServerSettings:
    """The server's settings from parsed flags (and the key variables of the environment);
    ValueError naming the flag for a value the models refuse."""
    values = {f.field: getattr(args, f.field) for f in SERVER_FLAGS if f.model is ServerSettings}
    values["api_keys"] = list(values["api_keys"]) + _env_keys("ATOMR_API_KEY")
    values["admin_keys"] = list(values["admin_keys"]) + _env_keys("ATOMR_ADMIN_KEY")
    values["deployments"] = load_config(args.config) if args.config else [spec_from_flags(args)]
    return _validated(ServerSettings, values, SERVER_FLAGS)


def spec_from_flags(args: argparse.Namespace) -> DeploymentSpec:
    values = {f.field: getattr(args, f.field) for f in MODEL_FLAGS}
    if not values["name"]:
        values["name"] = DEFAULT_MODEL_NAME
        if args.model:
            path = Path(args.model)
            values["name"] = path.stem if path.is_file() else path.name
    return _validated(DeploymentSpec, values, MODEL_FLAGS)


def _validated(model: type[M], values: dict[str, Any], flags: list[Flag]) -> M:
    try:
        return model.model_validate(values)
    except ValidationError as e:
        raise ValueError(validation_message(e, {f.field: f.option for f in flags})) from None


def load_config(path: str) -> list[DeploymentSpec]:
    """Deployments from a TOML project file: one [[deployment]] table each."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    tables = data.get("deployment")
    if not isinstance(tables, list) or not tables:
        raise ValueError(f"{path}: no [[deployment]] tables")
    try:
        specs = [DeploymentSpec.model_validate(t) for t in tables]
    except ValidationError as e:
        err = e.errors()[0]
        raise ValueError(f"{path}: deployment field {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: deployment names must be unique")
    return specs


def _sole(e: BaseException) -> BaseException:
    """The one exception inside nested single-member groups (or the group itself)."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e


def _env_keys(name: str) -> list[str]:
    """Keys from an environment variable; several are separated by commas."""
    return [k.strip() for k in os.environ.get(name, "").split(",") if k.strip()]
