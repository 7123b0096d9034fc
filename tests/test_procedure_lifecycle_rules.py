"""Pure rules of the procedure aggregate (api.md §4.4–4.5) and the compiler's re-compile checks, without servers."""

from __future__ import annotations

import pytest

from ckp_core.errors import CommandRefused
from ckp_core.events import ANONYMOUS, EventData, ProcedureImported, ProcedurePromoted, make_event
from ckp_core.procedure_lifecycle import (
    ProcedureState,
    VersionState,
    decide_promote,
    decide_rollback,
    decide_status,
    fold,
)
from langorch_compiler.service import CompilerService
from langorch_infra.settings import CompilerSettings
from tests.helpers import procedure_doc

pytestmark = pytest.mark.unit


def imported(version: str) -> ProcedureImported:
    return ProcedureImported(procedure_id="p", version=version, name="p", description=None, content_hash="h",
                             compiler_version="0", ir_key=f"p.{version}", ckp_json={}, variables_schema={})


def state_of(*payloads: EventData) -> ProcedureState:
    events = [(make_event(d, aggregate_id="p", seq=i, actor=ANONYMOUS), i) for i, d in enumerate(payloads, 1)]
    return fold("p", events)


def test_fold_tracks_status_channel_revision_and_displacement() -> None:
    state = state_of(imported("1"), imported("2"),
                     ProcedurePromoted(procedure_id="p", version="1", deployment_id="d1", from_channel="dev",
                                       from_status="draft", target_channel="qa"),
                     ProcedurePromoted(procedure_id="p", version="2", deployment_id="d2", from_channel="dev",
                                       from_status="draft", target_channel="qa", displaced_version="1"))
    v1, v2 = state.versions["1"], state.versions["2"]
    assert (v1.status, v1.release_channel, v1.revision) == ("deprecated", "qa", 3)
    assert (v2.status, v2.release_channel, v2.revision, v2.promoted_from_version) == ("active", "qa", 2, "1")
    assert (state.seq, state.position) == (4, 4)
    assert decide_rollback(state, "2", "qa", None).version == "1"
    assert decide_promote(state, "2", "qa") is None  # already active there
    with pytest.raises(CommandRefused) as refused:
        decide_promote(state, "2", "dev")
    assert refused.value.code == "invalid_promotion"


@pytest.mark.parametrize(("current", "target", "allowed"), [
    ("draft", "deprecated", ["active", "archived"]), ("active", "draft", ["deprecated", "archived"]),
    ("deprecated", "draft", ["active", "archived"]), ("archived", "active", []),
])
def test_refused_transitions_name_the_allowed_ones(current: str, target: str, allowed: list[str]) -> None:
    state = ProcedureState("p", {"1": VersionState("1", current, "dev", 1, {}, "h", "k")})
    with pytest.raises(CommandRefused) as refused:
        decide_status(state, "1", target)
    assert refused.value.code == "invalid_status_transition"
    assert refused.value.extra == {"current_status": current, "allowed": allowed}


def test_a_stored_document_that_no_longer_compiles_cannot_be_activated_or_promoted() -> None:
    broken = procedure_doc("p", "1")
    broken["workflow_graph"]["start_node"] = "missing"
    v = VersionState("1", "draft", "dev", 1, broken, "h", "k")
    service = CompilerService(CompilerSettings())
    with pytest.raises(CommandRefused) as refused:
        service._recompile(v, "compile_failed")
    assert refused.value.code == "compile_failed"
    assert any(d["severity"] == "error" for d in refused.value.extra["diagnostics"])


async def test_promotion_reports_every_failed_check_together() -> None:
    broken = procedure_doc("p", "1", effective_date="2026-02-30")
    broken["workflow_graph"]["start_node"] = "missing"
    v = VersionState("1", "draft", "dev", 1, broken, "h", "k")
    service = CompilerService(CompilerSettings())
    with pytest.raises(CommandRefused) as refused:
        await service._promotion_checks(ProcedureState("p", {"1": v}), v)
    assert refused.value.code == "promotion_validation_failed"
    codes = [d["code"] for d in refused.value.extra["diagnostics"]]
    assert "invalid_effective_date" in codes
    assert len([d for d in refused.value.extra["diagnostics"] if d["severity"] == "error"]) >= 2
