"""The agent-liveness rule (api.md §7.3), pure: one definition used by the runtime (dispatch, health poller) and
the gateway (the ``circuit_state`` it shows).

An agent's word on itself comes from three sources: the agent aggregate (``status``, circuit opened/closed
events), its heartbeat (KV presence, fresh while its TTL lasts) and the elected replica's last health probe.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

CircuitState = Literal["closed", "open", "half_open"]


def circuit_state(is_open: bool, opened_at: datetime | None, now: datetime, half_open_after_s: float) -> CircuitState:
    """``closed`` unless the aggregate opened the circuit; an open circuit reads ``half_open`` once
    ``half_open_after_s`` have passed since it opened (dispatch may try the agent again)."""
    if not is_open:
        return "closed"
    if opened_at is not None and now - opened_at >= timedelta(seconds=half_open_after_s):
        return "half_open"
    return "open"


def probe_failing(probe_ok: bool | None, consecutive_failures: int, circuit_failures: int) -> bool:
    """The last probe failed and the failures reached the threshold that opens the circuit (the circuit event may
    not have been applied yet); no probe at all is not failing."""
    return probe_ok is False and consecutive_failures >= circuit_failures


def current_status(registered: str, heartbeat_status: str | None) -> str:
    """The agent's status now: a fresh heartbeat's ``status`` is the most current word, else the aggregate's."""
    return heartbeat_status if heartbeat_status is not None else registered


def accepts_work(status: str, circuit: CircuitState, failing: bool) -> bool:
    """Whether dispatch may send the agent a step: ``online``, no failing probe, and a circuit that is not open
    (closed, or half-open after its wait)."""
    return status == "online" and not failing and circuit != "open"


def status_after_probe(status: str, probe_ok: bool, consecutive_failures: int, circuit_failures: int,
                       heartbeat_fresh: bool) -> str | None:
    """The status a health probe decides (``None``: no change): ``online`` while the probe succeeds or the
    heartbeat is fresh, else ``offline`` — but only once the failures reached ``circuit_failures``. ``draining`` is
    an operator's choice that health never overrides."""
    if status == "draining":
        return None
    wanted = "online" if probe_ok or heartbeat_fresh else "offline"
    if wanted == status:
        return None
    if probe_ok or heartbeat_fresh or consecutive_failures >= circuit_failures:
        return wanted
    return None
