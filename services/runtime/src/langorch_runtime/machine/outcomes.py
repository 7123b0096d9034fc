"""What one execution of a node comes to (ckp.md §3.2), and how a node fails (§3.3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from ckp_core.events import ErrorObject
from langorch_runtime.frames import ErrorDict


class NodeFailure(Exception):
    """A node failed. ``bypass``: skip node-scope handlers (§3.3); ``step_level``: handlers already saw it."""

    def __init__(self, error: ErrorObject, bypass: bool = False, step_level: bool = False) -> None:
        super().__init__(error.message)
        self.error = error
        self.bypass = bypass
        self.step_level = step_level


@dataclass
class Next:
    target: str | None
    error: ErrorDict | None = None  # set the frame's built-in ``error`` (fallback routes)


@dataclass
class Pause:
    wait_id: str
    reason: str


@dataclass
class Spawn:
    """The node started child frames and waits for them."""


@dataclass
class Terminate:
    status: str
    outputs: dict[str, Any]


@dataclass
class Routed:
    """The frame's cursor was already moved (a handler's fallback route); nothing else to apply."""


@dataclass
class RetryNode:
    """Re-run the node as a new visit (handler ``retry``/``retry_node``, validation ``retry_node``)."""

    delay_ms: int = 0


Outcome = Next | Pause | Spawn | Terminate | RetryNode | Routed


def dump(error: ErrorObject) -> ErrorDict:
    """An error object as the JSON the state keeps (frame ``error``/``result``, the run's outcome)."""
    return cast(ErrorDict, error.model_dump(mode="json"))  # every field of the model, so ErrorDict's keys
