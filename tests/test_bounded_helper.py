"""``tests.helpers.bounded``: a hung awaitable fails the test with its own stack, whatever it does when cancelled."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers import bounded

pytestmark = pytest.mark.unit


async def stuck_then_answers_the_cancellation() -> str:
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        return "answered"  # swallows the cancellation: asyncio.wait_for would return this
    return "never"


async def stuck_then_fails_on_cancellation() -> None:
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        raise ValueError("the error a test might be waiting for") from None


async def test_a_result_given_only_on_cancellation_is_a_hang() -> None:
    with pytest.raises(AssertionError, match=r"the wait did not end within 0\.2 s") as info:
        await bounded("the wait", stuck_then_answers_the_cancellation(), 0.2)
    assert "stuck_then_answers_the_cancellation" in str(info.value)  # its stack, taken before it was cancelled


async def test_an_error_raised_on_cancellation_is_a_hang() -> None:
    with pytest.raises(AssertionError, match="did not end"):
        await bounded("the wait", stuck_then_fails_on_cancellation(), 0.2)


async def test_a_prompt_outcome_is_handed_on() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 7

    async def refuse() -> None:
        raise LookupError("refused")

    assert await bounded("the answer", answer(), 5) == 7
    with pytest.raises(LookupError):
        await bounded("the refusal", refuse(), 5)
