"""``template_warning.location.field`` is the template's JSON path inside its node (ckp.md §5.1): list members are
addressed by index (``/steps/1/message``), as in the document, not by their ids; terminate actions live under
``cleanup_actions`` and recovery steps under their handler."""

from __future__ import annotations

import pytest

from runtime_harness import doc, run_doc

pytestmark = pytest.mark.unit


async def test_locations_are_json_paths_inside_the_node() -> None:
    run = await run_doc(doc({
        "a": {"type": "sequence", "next_node": "v", "steps": [
            {"step_id": "first", "action": "log", "message": "fine"},
            {"step_id": "second", "action": "log", "message": "x {{nope_step}}"},
            {"step_id": "broken", "action": "parse_json", "source": "not json"}],
            "validations": [{"id": "ok", "condition": "1 == 1"},
                            {"id": "bad", "condition": "1 == 2", "message": "m {{nope_validation}}"}],
            "error_handlers": [
                {"error_type": "validation_failed", "action": "ignore"},
                {"error_type": "operation_failed", "action": "ignore", "recovery_steps": [
                    {"step_id": "undo", "action": "log", "message": "r {{nope_recovery}}"}]}]},
        "v": {"type": "verification", "next_node": "z", "checks": [
            {"id": "c0", "condition": "1 == 1"},
            {"id": "c1", "condition": "{{nope_check}} == 1", "on_fail": "warn"}]},
        "z": {"type": "terminate", "cleanup_actions": [{"action": "log", "message": "c {{nope_cleanup}}"}]}}))
    assert run.outcome is not None
    assert run.outcome["status"] == "completed", run.outcome
    fields = {w.variable: (w.location["node_id"], w.location["field"]) for w in run.of("template_warning")}
    assert fields == {
        "nope_step": ("a", "/steps/1/message"),
        "nope_recovery": ("a", "/error_handlers/1/recovery_steps/0/message"),
        "nope_validation": ("a", "/validations/1/message"),
        "nope_check": ("v", "/checks/1/condition"),
        "nope_cleanup": ("z", "/cleanup_actions/0/message"),
    }
