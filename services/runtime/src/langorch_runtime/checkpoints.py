"""Group commit of the runs' checkpoints: the writes of concurrent runs go to PostgreSQL together.

LangGraph's PostgreSQL saver writes each checkpoint (``aput``: its changed blobs and its row) and each task's writes
(``aput_writes``) in a pipeline of its own, one round trip and one commit each, so a replica executing many runs
at once sends two commits per super-step of every run. :class:`GroupCommitSaver` is that saver with its writes
handed to a :class:`GroupCommit` shared by the replica's savers instead: the writes that arrive while a group is
being written wait for it to end and then go together, in one transaction sent as one pipeline (one round trip,
one commit, however many runs are in it). A caller returns only once the transaction holding its writes is
committed, so a checkpoint is as durable as before when ``aput`` returns; writes keep their order (one group at a
time, each in arrival order). A group that fails is written again write by write, so only the failing call sees
the error. The saver's reads are the official saver's.

**Barriers.** A run's checkpoint must never be ahead of its events: it is committed only once the events the run
emitted before it are stored. The run used to wait for its events before LangGraph wrote the checkpoint, so the
appends and the checkpoint's writing came one after the other. A saver can instead be given the run's *barrier*
(:class:`GroupCommitSaver` ``barriers``: thread id → a function returning an awaitable that ends once everything the
run has emitted so far is stored, or raises if it never will be). The group then sends its statements to PostgreSQL
while the events are still being appended, waits for the barriers of its calls, and only then commits: the
appends and the checkpoint's writing overlap, and the commit still comes after the events. A barrier that fails
rolls the group back; that call gets the barrier's error and the others are written again without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, cast

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    get_serializable_checkpoint_metadata,
)
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.checkpoint.serde.types import _DeltaSnapshot
from psycopg import AsyncCursor
from psycopg.rows import DictRow
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

log = logging.getLogger(__name__)

MAX_GROUP = 256  # saver calls per transaction

Statement = tuple[str, Any, bool]  # (SQL, parameters, executemany)
Barrier = Callable[[], Awaitable[None]]  # a run's "everything emitted so far is stored"
Waiting = tuple[list[Statement], "asyncio.Future[None]", "asyncio.Future[None] | None"]


class BarrierFailed(Exception):
    """A group's barrier failed: the group is rolled back and written again without that call."""


class _Recorder:
    """Stands for the cursor of a saver's write block: keeps its statements for the group commit."""

    def __init__(self) -> None:
        self.statements: list[Statement] = []

    async def execute(self, query: str, params: Any = None) -> None:
        self.statements.append((query, params, False))

    async def executemany(self, query: str, params_seq: Iterable[Any]) -> None:
        self.statements.append((query, list(params_seq), True))


class GroupCommit:
    """Writes the statements of concurrent saver calls in shared transactions, one group at a time."""

    def __init__(self, pool: AsyncConnectionPool[Any], max_group: int = MAX_GROUP) -> None:
        self.pool = pool
        self.max_group = max_group
        self.waiting: list[Waiting] = []
        self.writer: asyncio.Task[None] | None = None
        self.groups = 0  # transactions committed (for tests and benchmarks)

    async def write(self, statements: list[Statement], barrier: Barrier | None = None) -> None:
        """Write ``statements`` in one transaction (shared with other calls'); returns once it is committed.

        ``barrier``: the transaction commits only once it has ended (it is awaited from now on, while the
        statements wait for their group and are sent); if it raises, these statements are not committed and the
        call raises its error."""
        if not statements:
            if barrier is not None:
                await barrier()
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        gate = asyncio.ensure_future(barrier()) if barrier is not None else None
        if gate is not None:  # its failure is handed to this caller; never left "never retrieved"
            gate.add_done_callback(_barrier_error)
        self.waiting.append((statements, done, gate))
        if self.writer is None or self.writer.done():
            self.writer = asyncio.create_task(self._write_groups(), name="checkpoint-group-commit")
        await done  # a caller canceled meanwhile: its statements are written with their group all the same

    async def _write_groups(self) -> None:
        group: list[Waiting] = []
        try:
            while self.waiting:
                group, self.waiting = self.waiting[:self.max_group], self.waiting[self.max_group:]
                await self._write_group(group)
        except BaseException:  # the writer itself was canceled (the event loop closes): no caller waits for ever
            stopped = RuntimeError("the checkpoint group writer stopped before this write was known committed")
            for _, done, _gate in [*group, *self.waiting]:
                _settle(done, stopped)
            self.waiting = []
            raise

    async def _write_group(self, group: list[Waiting]) -> None:
        try:
            await self._transaction([s for statements, _, _ in group for s in statements],
                                    [gate for _, _, gate in group if gate is not None])
        except Exception as exc:  # any failure of the shared transaction is retried call by call below
            if len(group) == 1:
                _settle(group[0][1], _barrier_error(group[0][2]) or exc)
                return
            log.debug("a checkpoint group of %d failed (%s); writing its calls one by one", len(group), exc)
            for statements, done, gate in group:
                refused = _barrier_error(gate)
                if refused is not None:  # its run's events were not all stored: its checkpoint is not written
                    _settle(done, refused)
                    continue
                try:
                    await self._transaction(statements, [gate] if gate is not None else [])
                except Exception as one:  # handed to that call's caller, who sees the saver's own error
                    _settle(done, _barrier_error(gate) or one)
                else:
                    _settle(done, None)
        else:
            for _, done, _gate in group:
                _settle(done, None)

    async def _transaction(self, statements: Sequence[Statement],
                           gates: Sequence[asyncio.Future[None]] = ()) -> None:
        async with self.pool.connection() as conn, conn.pipeline() as pipeline, conn.transaction(), \
                conn.cursor(binary=True) as cur:
            for query, params, many in statements:
                if many:
                    await cur.executemany(query, params)
                else:
                    await cur.execute(query, params)
            if any(not gate.done() for gate in gates):
                await pipeline.sync()  # the statements run while the events are still being appended
                await asyncio.wait(gates)
            if any(_barrier_error(gate) is not None for gate in gates):
                raise BarrierFailed("a run's events were not all stored: its checkpoint is not committed")
        self.groups += 1


def _barrier_error(gate: asyncio.Future[None] | None) -> BaseException | None:
    """The failure of a call's barrier, if it has failed."""
    if gate is None or not gate.done():
        return None
    if gate.cancelled():
        return RuntimeError("the barrier of this checkpoint write was canceled")
    return gate.exception()


def _settle(done: asyncio.Future[None], failure: BaseException | None) -> None:
    if done.done():
        return
    if failure is None:
        done.set_result(None)
    else:
        done.set_exception(failure)


class GroupCommitSaver(AsyncPostgresSaver):
    """LangGraph's PostgreSQL saver whose writes (``aput``, ``aput_writes``, ``adelete_thread``: its pipelined
    blocks) go through a :class:`GroupCommit`; it reads as the official saver does.

    ``barriers`` (thread id → :data:`Barrier`, kept up to date by the runtime for the runs it executes): a write
    of such a thread commits only once the barrier has ended."""

    def __init__(self, pool: AsyncConnectionPool[Any], group: GroupCommit,
                 barriers: Mapping[str, Barrier] | None = None) -> None:
        super().__init__(pool)
        self.group = group
        self.barriers: Mapping[str, Barrier] = barriers if barriers is not None else {}

    async def aput(self, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata,
                   new_versions: ChannelVersions) -> RunnableConfig:
        """The checkpoint's row and its changed blobs, as the official saver writes them, serialised on the event
        loop (the official saver hands the blobs' serialisation to a thread; see :meth:`aput_writes`)."""
        conf = config["configurable"]
        thread_id, namespace = conf["thread_id"], conf["checkpoint_ns"]
        inline: dict[str, Any] = dict(checkpoint["channel_values"])
        blobs: dict[str, Any] = {}
        for channel, value in checkpoint["channel_values"].items():
            if isinstance(value, _DeltaSnapshot):  # kept in a blob; the row marks the channel as such
                blobs[channel], inline[channel] = inline.pop(channel), True
            elif not (value is None or isinstance(value, (str, int, float, bool))):
                blobs[channel] = inline.pop(channel)
        statements: list[Statement] = []
        if versions := {channel: v for channel, v in new_versions.items() if channel in blobs}:
            statements.append((self.UPSERT_CHECKPOINT_BLOBS_SQL,
                               self._dump_blobs(thread_id, namespace, blobs, versions), True))
        row = {**checkpoint, "channel_values": inline}
        statements.append((self.UPSERT_CHECKPOINTS_SQL, (
            thread_id, namespace, checkpoint["id"], conf.get("checkpoint_id"), Jsonb(row),
            Jsonb(get_serializable_checkpoint_metadata(config, metadata))), False))
        await self.group.write(statements, self.barriers.get(str(thread_id)))
        return {"configurable": {"thread_id": thread_id, "checkpoint_ns": namespace,
                                 "checkpoint_id": checkpoint["id"]}}

    async def aput_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str,
                          task_path: str = "") -> None:
        """A task's writes, as the official saver stores them, serialised on the event loop: the official saver
        hands each serialisation to a thread, and a run's values are bounded payloads for which that hand-off
        (about 0.14 ms on an idle 2-core machine, up to the interpreter's switch interval on a busy event loop)
        costs more than the serialising itself."""
        conf = config["configurable"]
        special = all(channel in WRITES_IDX_MAP for channel, _ in writes)  # one row per channel: replaced
        query = self.UPSERT_CHECKPOINT_WRITES_SQL if special else self.INSERT_CHECKPOINT_WRITES_SQL
        rows = self._dump_writes(conf["thread_id"], conf["checkpoint_ns"], conf["checkpoint_id"], task_id,
                                 task_path, writes)
        await self.group.write([(query, rows, True)], self.barriers.get(str(conf["thread_id"])))

    @contextlib.asynccontextmanager
    async def _cursor(self, *, pipeline: bool = False) -> AsyncIterator[AsyncCursor[DictRow]]:
        if not pipeline:
            async with super()._cursor() as cur:
                yield cur
            return
        recorder = _Recorder()  # the saver's other write blocks (``adelete_thread``): no run's barrier
        yield cast(AsyncCursor[DictRow], recorder)
        await self.group.write(recorder.statements)
