"""The gateway's projections of ``LO_EVT`` (and ``LO_AUDIT``): one module per projection, each a
:class:`~langorch_gateway.projections.base.Projection` whose handlers are keyed by the event class they take.

The projector (:mod:`langorch_gateway.projector`) decodes every event once (:func:`ckp_core.events.decode`,
upcasting old schema versions) and hands it to each projection of :data:`PROJECTIONS` in this order, inside its
batch transaction; every row derives from events only, so a rebuild by replay gives the same rows.

* :mod:`.procedures` — ``procedures``, ``procedure_deployments`` (api.md §4)
* :mod:`.projects` — ``projects`` (§9)
* :mod:`.agents` — ``agents`` (§7)
* :mod:`.approvals` — ``approvals`` (§6)
* :mod:`.run_events` — ``run_events``, the log of each run's events (§5.3)
* :mod:`.runs` — ``runs`` (§5.1), its status from the run aggregate's rule (:mod:`ckp_core.runs`)
* :mod:`.run_artifacts` — ``run_artifacts`` (§5.9)
* :mod:`.users` — ``users``, ``api_keys`` (§2.3)
* :mod:`.secrets` — ``secrets``, secret metadata records (§11)
* :mod:`.triggers` — ``triggers``, ``trigger_fires`` (§10)
* :mod:`.audit` — ``audit_log`` (§12), from ``LO_AUDIT``
"""

from langorch_gateway.projections import (
    agents,
    approvals,
    procedures,
    projects,
    run_artifacts,
    run_events,
    runs,
    secrets,
    triggers,
    users,
)
from langorch_gateway.projections.audit import apply_audit_entry
from langorch_gateway.projections.base import Projection, Recorded
from langorch_gateway.projections.procedures import search_text

PROJECTIONS: tuple[Projection, ...] = (
    procedures.PROJECTION, projects.PROJECTION, agents.PROJECTION, approvals.PROJECTION, run_events.PROJECTION,
    runs.PROJECTION, run_artifacts.PROJECTION, users.USERS, users.API_KEYS,
    secrets.PROJECTION, triggers.PROJECTION,
)
"""Every projection of ``LO_EVT``, in the order each event is applied to them."""

__all__ = ["PROJECTIONS", "Projection", "Recorded", "apply_audit_entry", "search_text"]
