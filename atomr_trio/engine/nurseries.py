"""A nursery that is its owner's own business: one failure inside it leaves as itself.

Trio wraps whatever a nursery's tasks raise in an ExceptionGroup. Where the nursery is an
implementation detail of its owner (the EngineCore's around its Worker, a DeviceThread's around
its mailbox), callers should see the single failure they would have seen without it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def unwrapped() -> Iterator[None]:
    """Raise a group holding one exception as that exception, its own cause and context kept (not
    the group as its context); any other group as it is."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        exc = group.exceptions[0]
        context, suppress = exc.__context__, exc.__suppress_context__
        try:
            raise exc
        finally:
            exc.__context__, exc.__suppress_context__ = context, suppress
