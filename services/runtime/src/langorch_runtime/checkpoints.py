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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, cast

from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from psycopg import AsyncCursor
from psycopg.rows import DictRow
from psycopg_pool import AsyncConnectionPool

log = logging.getLogger(__name__)

MAX_GROUP = 256  # saver calls per transaction

Statement = tuple[str, Any, bool]  # (SQL, parameters, executemany)


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
        self.waiting: list[tuple[list[Statement], asyncio.Future[None]]] = []
        self.writer: asyncio.Task[None] | None = None
        self.groups = 0  # transactions committed (for tests and benchmarks)

    async def write(self, statements: list[Statement]) -> None:
        """Write ``statements`` in one transaction (shared with other calls'); returns once it is committed."""
        if not statements:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append((statements, done))
        if self.writer is None or self.writer.done():
            self.writer = asyncio.create_task(self._write_groups(), name="checkpoint-group-commit")
        await done  # a caller canceled meanwhile: its statements are written with their group all the same

    async def _write_groups(self) -> None:
        group: list[tuple[list[Statement], asyncio.Future[None]]] = []
        try:
            while self.waiting:
                group, self.waiting = self.waiting[:self.max_group], self.waiting[self.max_group:]
                await self._write_group(group)
        except BaseException:  # the writer itself was canceled (the event loop closes): no caller waits for ever
            stopped = RuntimeError("the checkpoint group writer stopped before this write was known committed")
            for _, done in [*group, *self.waiting]:
                _settle(done, stopped)
            self.waiting = []
            raise

    async def _write_group(self, group: list[tuple[list[Statement], asyncio.Future[None]]]) -> None:
        try:
            await self._transaction([s for statements, _ in group for s in statements])
        except Exception as exc:  # any failure of the shared transaction is retried call by call below
            if len(group) == 1:
                _settle(group[0][1], exc)
                return
            log.debug("a checkpoint group of %d failed (%s); writing its calls one by one", len(group), exc)
            for statements, done in group:
                try:
                    await self._transaction(statements)
                except Exception as one:  # handed to that call's caller, who sees the saver's own error
                    _settle(done, one)
                else:
                    _settle(done, None)
        else:
            for _, done in group:
                _settle(done, None)

    async def _transaction(self, statements: Sequence[Statement]) -> None:
        async with self.pool.connection() as conn, conn.pipeline(), conn.transaction(), \
                conn.cursor(binary=True) as cur:
            for query, params, many in statements:
                if many:
                    await cur.executemany(query, params)
                else:
                    await cur.execute(query, params)
        self.groups += 1


def _settle(done: asyncio.Future[None], failure: BaseException | None) -> None:
    if done.done():
        return
    if failure is None:
        done.set_result(None)
    else:
        done.set_exception(failure)


class GroupCommitSaver(AsyncPostgresSaver):
    """LangGraph's PostgreSQL saver whose writes (``aput``, ``aput_writes``, ``adelete_thread``: its pipelined
    blocks) go through a :class:`GroupCommit`; it reads as the official saver does."""

    def __init__(self, pool: AsyncConnectionPool[Any], group: GroupCommit) -> None:
        super().__init__(pool)
        self.group = group

    @contextlib.asynccontextmanager
    async def _cursor(self, *, pipeline: bool = False) -> AsyncIterator[AsyncCursor[DictRow]]:
        if not pipeline:
            async with super()._cursor() as cur:
                yield cur
            return
        recorder = _Recorder()
        yield cast(AsyncCursor[DictRow], recorder)
        await self.group.write(recorder.statements)
