"""A projection batch whose connection the pool has taken back (PostgreSQL restarted under it): the batch fails
with its own error, the one that says why, not with the error of the rollback attempted after it
(``StreamProjector._transaction``). The consumer then starts again from the stored position, as after any
connection failure."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from langorch_gateway.projector import StreamProjector, _connection_trouble

pytestmark = pytest.mark.unit


class Item:
    position = 5


class Projector(StreamProjector[Any]):
    NAME = "probe"
    STREAM = "LO_EVT"
    SUBJECT = "lo.evt.>"

    def decode(self, msg: Any) -> Any:
        return Item()

    async def apply(self, conn: Any, item: Any) -> None:
        raise AssertionError("nothing is applied on a connection that is gone")


class TakenBack:
    """What asyncpg's pooled connection answers once the pool has released it: every call is refused."""

    async def execute(self, query: str) -> None:
        raise asyncpg.InterfaceError("cannot call Connection.execute(): connection has been released back to the pool")

    def is_in_transaction(self) -> bool:
        raise asyncpg.InterfaceError(
            "cannot call Connection.is_in_transaction(): connection has been released back to the pool")


async def test_the_batch_fails_with_its_own_error() -> None:
    projector = Projector(pool=None, js=None)  # type: ignore[arg-type]
    with pytest.raises(asyncpg.InterfaceError, match=r"Connection\.execute\(\)") as failed:
        await projector._transaction(TakenBack(), [Item()], 0)
    assert failed.value.__context__ is None  # not raised while handling another error
    assert _connection_trouble(failed.value)  # retried from the stored position, never dead-lettered
