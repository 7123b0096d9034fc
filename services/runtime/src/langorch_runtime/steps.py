"""The step store: KV ``lo_steps`` records of step identities (ckp.md §7.4)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field

from langorch_infra.jetstream import through_blips

BLIP_PATIENCE_S = 60.0
"""How long a record's read or write is tried again while NATS is unavailable: a step whose call was in flight
when NATS blinked is recorded when it is back, instead of the attempt being abandoned and sent again."""


class StepRecord(BaseModel):
    status: Literal["started", "completed", "failed"]
    attempt: int
    idempotency_key: str
    node_id: str
    step_id: str
    frame: str
    result: Any = None
    writes: dict[str, Any] = Field(default_factory=dict)
    updated_at: str


def natural_identity(node_id: str, step_id: str, frame: str) -> str:
    return f"{node_id}:{step_id}:{frame}"


def idempotency_key(run_id: str, node_id: str, step_id: str, frame: str, attempt: int) -> str:
    """``lo1:<run_id>:<node_id>:<step_id>:<F>:<attempt>``, hashed when longer than 255 characters."""
    key = f"lo1:{run_id}:{node_id}:{step_id}:{frame}:{attempt}"
    if len(key) > 255:
        key = "lo1:sha256:" + hashlib.sha256(key.encode()).hexdigest()
    return key


def custom_idempotency_key(base: str, attempt: int) -> str:
    """``lo1:<rendered custom key>:<attempt>`` (``base`` is ``lo1:<rendered>``), hashed when too long."""
    key = f"{base}:{attempt}"
    if len(key) > 255:
        key = "lo1:sha256:" + hashlib.sha256(key.encode()).hexdigest()
    return key


class StepStore:
    """Claims and records step identities so a completed step is never executed twice.

    A run's records are written only by the replica executing it. When that execution began with no record (a
    run's first start: nothing of it ran before, see :meth:`start_empty`), the records it writes are also kept
    in memory and reads are answered from there, without a KV round trip."""

    def __init__(self, kv: KeyValue, run_id: str, *, patience_s: float = BLIP_PATIENCE_S,
                 fence: Callable[[], Awaitable[None]] | None = None) -> None:
        self.kv = kv
        self.run_id = run_id
        self.patience_s = patience_s
        self.fence = fence  # raises when this replica no longer owns the run (langorch_runtime.ownership)
        self.written: dict[str, StepRecord] = {}  # written by this execution, newest per identity
        self.all_written = False  # no record of the run exists but those in ``written`` (start_empty)
        self.writing: dict[str, asyncio.Task[Any]] = {}  # identity → its put_soon write, until stored

    def start_empty(self) -> None:
        """The run has no record yet (its first execution): from now on this store knows every record of it."""
        self.all_written = True

    def key(self, identity: str) -> str:
        return f"{self.run_id}.{hashlib.sha256(identity.encode()).hexdigest()[:32]}"

    async def get(self, identity: str) -> StepRecord | None:
        if identity in self.written or self.all_written:
            return self.written.get(identity)
        try:
            entry = await through_blips(f"step record of {self.run_id}", partial(self.kv.get, self.key(identity)),
                                        self.patience_s)
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return StepRecord.model_validate_json(entry.value)

    async def put(self, identity: str, record: StepRecord) -> None:
        if self.fence is not None and record.status == "started":  # the claim before a side effect
            await self.fence()
        await self._write(identity, record.model_dump_json().encode(), self.writing.get(identity))
        self.written[identity] = record

    def put_soon(self, identity: str, record: StepRecord) -> None:
        """Write a record without waiting for it: reads see it at once, and the run's writer appends no event
        emitted after this call before the write is stored (:meth:`pending`)."""
        self.written[identity] = record
        task = asyncio.create_task(self._write(identity, record.model_dump_json().encode(),
                                               self.writing.get(identity)))
        self.writing[identity] = task
        task.add_done_callback(lambda done: self.writing.pop(identity, None) if self.writing.get(identity) is done
                               else None)

    async def _write(self, identity: str, body: bytes, earlier: asyncio.Task[Any] | None) -> None:
        if earlier is not None:  # writes of one identity land in the order they were made
            await asyncio.shield(earlier)
        await through_blips(f"step record of {self.run_id}", partial(self.kv.put, self.key(identity), body),
                            self.patience_s)

    def pending(self) -> list[asyncio.Task[Any]]:
        """The writes of :meth:`put_soon` not stored yet."""
        return [t for t in self.writing.values() if not t.done()]


class MemoryStepStore(StepStore):
    """An in-process step store for unit tests of the interpreter (no NATS)."""

    def __init__(self, run_id: str = "run") -> None:
        self.run_id = run_id
        self.records: dict[str, StepRecord] = {}

    async def get(self, identity: str) -> StepRecord | None:
        return self.records.get(identity)

    async def put(self, identity: str, record: StepRecord) -> None:
        self.records[identity] = record

    def put_soon(self, identity: str, record: StepRecord) -> None:
        self.records[identity] = record


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
