"""The agent-liveness rule (api.md §7.3) in ``ckp_core.agents``: the one definition of the half-open circuit,
a failing probe, the status a heartbeat corrects, whether dispatch may use the agent, and what a probe decides."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ckp_core.agents import accepts_work, circuit_state, current_status, probe_failing, status_after_probe

pytestmark = pytest.mark.unit

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("is_open", "opened_s_ago", "expected"), [
    (False, None, "closed"),
    (False, 600, "closed"),
    (True, 59.9, "open"),
    (True, 60, "half_open"),
    (True, 3600, "half_open"),
    (True, None, "open"),  # opened, but when is unknown: stays open
])
def test_an_open_circuit_reads_half_open_after_its_wait(is_open: bool, opened_s_ago: float | None,
                                                        expected: str) -> None:
    opened = NOW - timedelta(seconds=opened_s_ago) if opened_s_ago is not None else None
    assert circuit_state(is_open, opened, NOW, 60) == expected


def test_a_probe_fails_once_the_threshold_is_reached() -> None:
    assert not probe_failing(None, 0, 3)
    assert not probe_failing(True, 5, 3)
    assert not probe_failing(False, 2, 3)
    assert probe_failing(False, 3, 3)


def test_a_fresh_heartbeat_is_the_most_current_status() -> None:
    assert current_status("offline", "online") == "online"
    assert current_status("online", "draining") == "draining"
    assert current_status("online", None) == "online"


@pytest.mark.parametrize(("status", "circuit", "failing", "expected"), [
    ("online", "closed", False, True),
    ("online", "half_open", False, True),
    ("online", "open", False, False),
    ("online", "half_open", True, False),
    ("online", "closed", True, False),
    ("offline", "closed", False, False),
    ("draining", "closed", False, False),
])
def test_dispatch_uses_online_agents_whose_circuit_is_not_open(status: str, circuit: str, failing: bool,
                                                              expected: bool) -> None:
    assert accepts_work(status, circuit, failing) is expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("status", "ok", "failures", "heartbeat", "expected"), [
    ("offline", True, 0, False, "online"),  # a successful probe brings it back
    ("offline", False, 5, True, "online"),  # so does a fresh heartbeat
    ("online", False, 1, False, None),  # one failure is not yet offline
    ("online", False, 3, False, "offline"),  # the threshold is
    ("online", False, 3, True, None),  # a fresh heartbeat keeps it online
    ("online", True, 0, False, None),  # no change
    ("draining", False, 9, False, None),  # an operator's choice
    ("draining", True, 0, True, None),
])
def test_what_a_probe_decides(status: str, ok: bool, failures: int, heartbeat: bool, expected: str | None) -> None:
    assert status_after_probe(status, ok, failures, 3, heartbeat) == expected
