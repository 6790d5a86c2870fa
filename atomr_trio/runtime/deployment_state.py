"""A deployment's state machine and the snapshot it publishes.

Invariants:
- `next_state` is the one place that says which moves are legal:
  pending -> loading -> serving -> draining -> stopped, any live state -> failed (with a
  reason); a deployment that is cancelled with the runtime goes to stopped from wherever it
  is; nothing leaves failed or stopped. Every other move raises IllegalTransition.
- A `DeploymentSnapshot` is frozen: views and the gateway read it, never the actor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..engine.engine_config import EngineConfig
from ..engine.engine_core import EngineSnapshot
from ..model_source import ModelSource
from .dp_coordinator import CoordinatorSnapshot

if TYPE_CHECKING:
    from .deployment_spec import DeploymentSpec

State = Literal["pending", "loading", "serving", "draining", "stopped", "failed"]

LEGAL: Mapping[State, frozenset[State]] = {
    "pending": frozenset({"loading", "draining", "failed", "stopped"}),
    "loading": frozenset({"serving", "draining", "failed", "stopped"}),
    "serving": frozenset({"draining", "failed", "stopped"}),
    "draining": frozenset({"failed", "stopped"}),
    "failed": frozenset(),
    "stopped": frozenset(),
}


class IllegalTransition(RuntimeError):
    def __init__(self, deployment: str, current: State, wanted: State) -> None:
        super().__init__(f"deployment '{deployment}': {current} -> {wanted} is not a legal move")
        self.current, self.wanted = current, wanted


def next_state(deployment: str, current: State, wanted: State, reason: str | None) -> State:
    """`wanted`, if the move is legal; raises IllegalTransition otherwise. Failing needs a reason."""
    if wanted not in LEGAL[current]:
        raise IllegalTransition(deployment, current, wanted)
    if wanted == "failed" and not reason:
        raise ValueError(f"deployment '{deployment}': failing needs a reason")
    return wanted


@dataclass(frozen=True)
class DeploymentSnapshot:
    """A deployment as its actor last published it (replicas and coordinator: as they last
    published themselves; `inbox_depth`: when read)."""

    name: str
    state: State
    reason: str | None
    spec: DeploymentSpec
    source: ModelSource | None  # once loaded: the tokenizer and model config, immutable
    engine_config: EngineConfig | None  # the replicas' resolved settings (max_model_len ...), once serving
    admitted: int  # tickets out
    inbox_depth: int
    replicas: tuple[EngineSnapshot, ...]
    coordinator: CoordinatorSnapshot
    unsupported: bool = False  # failed because the model asks for what is not implemented
    refused: bool = False  # failed because placement found no room for its replicas

    @property
    def model(self) -> str:
        return self.spec.model or "default"

    @property
    def max_model_len(self) -> int | None:
        return self.engine_config.max_model_len if self.engine_config is not None else None

    @property
    def routed(self) -> Mapping[str, int]:
        return self.coordinator.routed

    def describe(self) -> dict[str, Any]:
        """The admin API's view."""
        return {"name": self.name, "state": self.state, "reason": self.reason, "model": self.model,
                "replicas": [r.as_dict() for r in self.replicas], "spec": self.spec.model_dump()}
