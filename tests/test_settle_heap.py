"""A service process moves its start-up objects out of the garbage collector's reach once its services run
(langorch_infra.hosting.settle_heap): the collector's full passes then walk only what the process made since, instead
of pausing the event loop for 100-230 ms each (bench/load.py)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from langorch.serving import serve_services
from langorch_infra import hosting
from tests.helpers import wait_until
from tests.ports import free_port


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    thresholds = gc.get_threshold()
    gc.set_threshold(700, 10, 10)  # Python's defaults (an in-process test before may have settled this process)
    yield
    gc.unfreeze()  # the rest of this pytest worker's tests run as before
    gc.set_threshold(*thresholds)


@pytest.mark.unit
def test_settle_heap_freezes_what_is_alive(unfrozen: None) -> None:
    assert gc.get_freeze_count() == 0
    alive = [object() for _ in range(10)]
    hosting.settle_heap()
    assert gc.get_freeze_count() >= len(alive)
    assert gc.get_threshold() == (hosting.GC_YOUNG_THRESHOLD, 10, 10)
    assert hosting.GC_YOUNG_THRESHOLD > 700


@pytest.mark.integration
async def test_served_services_settle_their_heap_once_started(nats_url: str, database_url: str, unfrozen: None,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    settled: list[int] = []

    def settle() -> None:
        settled.append(gc.get_freeze_count())
        hosting.settle_heap.__wrapped__()  # type: ignore[attr-defined]

    settle.__wrapped__ = hosting.settle_heap  # type: ignore[attr-defined]
    monkeypatch.setattr(hosting, "settle_heap", settle)
    monkeypatch.setenv("LANGORCH_METRICS_PORT", "0")
    monkeypatch.setenv("LANGORCH_AUTH_ENABLED", "false")
    stop = asyncio.Event()
    served = asyncio.create_task(serve_services(("compiler", "gateway"), nats_url, database_url, "127.0.0.1",
                                                free_port(), stop=stop))
    try:
        await wait_until(lambda: settled or served.done(), timeout=60)
        assert not served.done(), served.exception()
        assert settled == [0]
        assert gc.get_freeze_count() > 0
        await asyncio.sleep(0.5)
        assert len(settled) == 1  # once
    finally:
        stop.set()
        await asyncio.wait_for(served, 60)
