"""Retry delays (ckp.md §4.8): the strategies, the cap, and full jitter drawing from (0, delay] in whole
milliseconds — a jittered wait is never rounded down to no wait at all."""

from __future__ import annotations

import pytest

from ckp_core.ir import RetryPolicyIR
from langorch_runtime.machine import policies

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("strategy", "delays"), [
    ("fixed", [1000, 1000, 1000, 1000]), ("linear", [1000, 2000, 3000, 4000]),
    ("exponential_backoff", [1000, 2000, 4000, 8000]), ("fibonacci", [1000, 1000, 2000, 3000]),
])
def test_strategies(strategy: str, delays: list[int]) -> None:
    policy = RetryPolicyIR(strategy=strategy, retry_delay_ms=1000)  # type: ignore[arg-type]
    assert [policies.retry_delay(policy, n) for n in range(4)] == delays


def test_the_cap() -> None:
    assert policies.retry_delay(RetryPolicyIR(retry_delay_ms=1000, max_delay_ms=3000), 5) == 3000


@pytest.mark.parametrize(("draw", "expected"), [(0.0, 5000), (0.5, 2500), (0.9999, 1), (0.99999999, 1)])
def test_full_jitter_stays_within_one_to_the_delay(monkeypatch: pytest.MonkeyPatch, draw: float,
                                                   expected: int) -> None:
    monkeypatch.setattr(policies.random, "random", lambda: draw)
    assert policies.retry_delay(RetryPolicyIR(retry_delay_ms=5000, jitter=1.0), 0) == expected


def test_no_base_delay_stays_no_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policies.random, "random", lambda: 0.5)
    assert policies.retry_delay(RetryPolicyIR(retry_delay_ms=0, jitter=1.0), 0) == 0
