"""The admin API (a Quart Blueprint): the actor tree, and deployments listed, applied, shown and
removed at run time. Who may call it is `auth.refusal`'s decision, made before these run.

Invariant: an apply answers with the deployment's state as it is — 200 serving, 202 still
loading, 400 a model that asks for what is not implemented (an architecture, a rope type, ...:
the reason names it and what is supported) or a deployment placement has no room for (too many
replicas for the cores, or too little GPU memory: the reason names the numbers), 422 another
failure to load (with the reason), 503 otherwise — and never leaves a failed model serving.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint

from ..runtime.deployment_spec import DeploymentSpec
from .bodies import validated
from .protocol import APIError
from .state import gateway_state

admin_routes = Blueprint("admin", __name__)


@admin_routes.get("/admin/tree")
async def admin_tree() -> Any:
    return gateway_state().tree()


@admin_routes.get("/admin/deployments")
async def list_deployments() -> Any:
    return {"deployments": gateway_state().manager.describe()}


@admin_routes.post("/admin/deployments")
async def apply_deployment() -> Any:
    spec = await validated(DeploymentSpec)
    dep = await gateway_state().manager.apply(spec)
    if dep.state == "failed" and dep.unsupported:  # an architecture, rope type, ... not implemented
        raise APIError(400, f"deployment '{dep.name}': {dep.reason}", param="model", code="model_not_supported")
    if dep.state == "failed" and dep.refused:  # no device has room for its replicas
        raise APIError(400, f"deployment '{dep.name}': {dep.reason}", param="replicas", code="placement_refused")
    if dep.state == "failed":  # the model could not load: the admin sees why
        raise APIError(422, f"deployment '{dep.name}' failed to load: {dep.reason}", param="model",
                       code="deployment_failed")
    if dep.state in ("pending", "loading"):  # the same spec is still loading from an earlier apply
        return dep.describe(), 202
    if dep.state != "serving":
        raise APIError(503, f"deployment '{dep.name}' is {dep.state}", "service_unavailable")
    return dep.describe(), 200


@admin_routes.get("/admin/deployments/<path:name>")
async def get_deployment(name: str) -> Any:
    return gateway_state().deployment(name).snapshot().describe()


@admin_routes.delete("/admin/deployments/<path:name>")
async def delete_deployment(name: str) -> Any:
    dep = await gateway_state().manager.remove(name)
    if dep is None:
        raise APIError(404, f"no deployment named '{name}'", "NotFoundError")
    return dep.describe(), 202
