"""Reading request bodies: JSON objects, validated into the protocol's pydantic models.

Invariant: a body the server cannot use is a 400 naming what is wrong (every invalid field, the
first as `param`), never a 500, and a body refused before its route runs is still read, so it
cannot stall the next request on a kept-alive connection.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from quart import request

from ..sampling_params import MAX_LISTED
from .protocol import APIError

ModelT = TypeVar("ModelT", bound=BaseModel)


async def json_object() -> dict[str, Any]:
    try:
        data = json.loads(await request.get_data())
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    return data


async def validated(model: type[ModelT]) -> ModelT:
    """The request body as `model`, or a 400 naming every invalid field (`param`: the first)."""
    return validate(model, await json_object())


def validate(model: type[ModelT], data: Any) -> ModelT:
    """`data` as `model`, or a 400 naming every invalid field (`param`: the first)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = [(".".join(str(x) for x in err["loc"]), err["msg"]) for err in e.errors()]
        message = "; ".join(f"{loc}: {msg}" if loc else msg for loc, msg in errors[:MAX_LISTED])
        if len(errors) > MAX_LISTED:
            message += f" (and {len(errors) - MAX_LISTED} more)"
        raise APIError(400, message, param=errors[0][0] or None) from None


async def consume_body() -> None:
    """Read (bounded by MAX_CONTENT_LENGTH) a body we refuse before its route runs: left unread,
    it would stall the next request on a kept-alive connection."""
    await request.get_data()
