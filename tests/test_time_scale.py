"""``LANGORCH_TIME_SCALE`` (tests only): the runtime sleeps that fraction of a document's own pauses; anything outside
(0, 1] is refused, and 1 is real time."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from langorch_infra.settings import RuntimeSettings
from langorch_runtime.service import scaled_sleep

pytestmark = pytest.mark.unit


def test_the_default_is_real_time() -> None:
    assert RuntimeSettings().time_scale == 1
    assert scaled_sleep(1) is asyncio.sleep


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5", "nan"])
def test_values_outside_zero_to_one_are_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("LANGORCH_TIME_SCALE", value)
    with pytest.raises(ValidationError, match="time_scale"):
        RuntimeSettings()


async def test_a_scaled_sleep_sleeps_that_fraction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANGORCH_TIME_SCALE", "0.05")
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    await scaled_sleep(RuntimeSettings().time_scale)(20)
    assert slept == [pytest.approx(1.0)]
