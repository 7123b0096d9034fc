"""Screen validations (ckp.md §4.11) and failure screenshots (§4.10) are external dispatches like a step's: they
honour ``test_data_overrides`` (§7.9) and consume the procedure's rate limits (§7.6)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ckp_core.events import ErrorObject
from runtime_harness import ScriptedDispatcher, doc, run_doc

pytestmark = pytest.mark.unit

END = {"type": "terminate"}


class CountingLimiter:
    """Records every admission (unit tests only; the KV limiter across replicas is tested in test_rate_limits)."""

    def __init__(self) -> None:
        self.admitted: list[dict[str, Any]] = []

    @contextlib.asynccontextmanager
    async def admit(self, procedure_id: str, limits: Any, emit: Any, position: dict[str, Any]) -> AsyncIterator[None]:
        self.admitted.append({"procedure_id": procedure_id, **position})
        yield


def checked(overrides: dict[str, Any] | None = None, **gc: Any) -> dict[str, Any]:
    return doc({"a": {"type": "sequence", "agent": "WEB", "next_node": "z",
                      "error_handlers": [{"action": "screenshot_and_fail"}],
                      "steps": [{"step_id": "open", "action": "open_page"}],
                      "validations": [{"id": "shown", "check": "screen_text_contains",
                                       "expected_values": ["Welcome", "Cart"], "on_failure": "fail_workflow"}]},
                "z": END},
               global_config={"rate_limiting": {"enabled": True, "max_requests_per_minute": 600},
                              "test_data_overrides": overrides or {}, **gc})


async def test_screen_validation_and_screenshot_dispatches_pass_the_rate_limiter() -> None:
    agent = ScriptedDispatcher({"open_page": [{"ok": True}],
                                "wait_for_text": [{}, ErrorObject(code="agent_error", message="no Cart")],
                                "screenshot": [{"screenshot": "file:///tmp/s.png"}]})
    limiter = CountingLimiter()
    run = await run_doc(checked(), dispatcher=agent, limiter=limiter)
    assert run.outcome is not None
    assert run.outcome["error"]["code"] == "validation_failed"
    assert [r.action for r in agent.requests] == ["open_page", "wait_for_text", "wait_for_text"]
    assert [a["step_id"] for a in limiter.admitted] == ["open", "validation/shown/0", "validation/shown/1"]
    assert {a["procedure_id"] for a in limiter.admitted} == {"p"}


async def test_a_failure_screenshot_passes_the_rate_limiter() -> None:
    agent = ScriptedDispatcher({"open_page": [ErrorObject(code="agent_error", message="down")],
                                "screenshot": [{"screenshot": "file:///tmp/s.png"}]})
    limiter = CountingLimiter()
    run = await run_doc(doc({"a": {"type": "sequence", "agent": "WEB", "next_node": "z",
                                   "error_handlers": [{"action": "screenshot_and_fail"}],
                                   "steps": [{"step_id": "open", "action": "open_page"}]}, "z": END},
                            global_config={"rate_limiting": {"enabled": True, "max_requests_per_minute": 600}}),
                        dispatcher=agent, limiter=limiter)
    assert run.outcome is not None
    assert run.outcome["error"]["code"] == "agent_error"
    assert [r.action for r in agent.requests] == ["open_page", "screenshot"]
    assert [a["step_id"] for a in limiter.admitted] == ["open", "open~screenshot"]
    assert len(run.of("artifact_created")) == 1


async def test_overrides_answer_screen_validations_without_a_dispatch() -> None:
    agent = ScriptedDispatcher({"wait_for_text": [ErrorObject(code="agent_error", message="never asked")]})
    limiter = CountingLimiter()
    run = await run_doc(checked({"open": {"ok": True}, "a.validation/shown/0": {"found": True},
                                 "validation/shown/1": "seen"}), dispatcher=agent, limiter=limiter)
    assert run.outcome is not None
    assert run.outcome["status"] == "completed"
    assert agent.requests == []
    assert limiter.admitted == []
    keys = [(e.step_id, e.override_key) for e in run.of("step_test_override_applied")]
    assert keys == [("open", "open"), ("validation/shown/0", "a.validation/shown/0"),
                    ("validation/shown/1", "validation/shown/1")]


async def test_an_override_of_false_fails_the_screen_validation() -> None:
    agent = ScriptedDispatcher({"screenshot": [{"screenshot": "file:///tmp/s.png"}]})
    run = await run_doc(checked({"open": {"ok": True}, "validation/shown/0": True, "validation/shown/1": False}),
                        dispatcher=agent)
    assert run.outcome is not None
    assert run.outcome["error"]["code"] == "validation_failed"
    assert [e.validation_id for e in run.of("validation_failed")] == ["shown"]
    assert agent.requests == []


async def test_an_override_answers_a_failure_screenshot() -> None:
    agent = ScriptedDispatcher({"open_page": [ErrorObject(code="agent_error", message="down")]})
    run = await run_doc(doc({"a": {"type": "sequence", "agent": "WEB", "next_node": "z",
                                   "error_handlers": [{"action": "screenshot_and_fail"}],
                                   "steps": [{"step_id": "open", "action": "open_page"}]}, "z": END},
                            global_config={"test_data_overrides": {"open~screenshot": {"screenshot": "x"}}}),
                        dispatcher=agent)
    assert run.outcome is not None
    assert run.outcome["error"]["code"] == "agent_error"
    assert [r.action for r in agent.requests] == ["open_page"]
    assert [e.override_key for e in run.of("step_test_override_applied")] == ["open~screenshot"]
    assert run.of("screenshot_requested") == []
