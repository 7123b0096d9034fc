"""The wire contract of every event, held in ``tests/golden/event_schemas.json``: the JSON Schema of the envelope and
of each event type's payload with its ``schema_version``, as ``GET /api/schemas/events`` serves them.

Events are never rewritten, so a change to an event's shape must be deliberate: this test fails with a diff when a
schema differs from the committed file. After a deliberate change — with ``SCHEMA_VERSION`` raised and an upcaster
registered for the old version when old events no longer validate (``ckp_core.events.UPCASTERS``) — record the file
again and review its diff::

    LANGORCH_UPDATE_GOLDEN=1 python3 -m uv run pytest tests/test_event_schemas.py
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, get_args

import pytest

import ckp_core.events
from ckp_core.events import EVENT_TYPES, UPCASTERS, Aggregate, EventData, event_json_schemas
from tests.helpers import platform_of

GOLDEN = Path(__file__).resolve().parent / "golden" / "event_schemas.json"
UPDATE = os.environ.get("LANGORCH_UPDATE_GOLDEN") == "1"


def canonical(schemas: dict[str, Any]) -> str:
    return json.dumps(schemas, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def payload_classes() -> set[type[EventData]]:
    """Every concrete payload class defined in ``ckp_core.events`` (one that names its ``TYPE``)."""
    found: set[type[EventData]] = set()
    pending = list(EventData.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__.startswith(f"{ckp_core.events.__name__}.") and "TYPE" in vars(cls):
            found.add(cls)
    return found


@pytest.mark.unit
def test_every_event_schema_matches_the_committed_snapshot() -> None:
    now = canonical(event_json_schemas())
    if UPDATE:
        GOLDEN.write_text(now)
        return
    assert GOLDEN.exists(), f"{GOLDEN} is missing: record it with LANGORCH_UPDATE_GOLDEN=1"
    want = canonical(json.loads(GOLDEN.read_text()))
    if want == now:
        return
    golden, current = json.loads(want), json.loads(now)
    changed = (["envelope"] if golden["envelope"] != current["envelope"] else []) + sorted(
        name for name in golden["types"].keys() | current["types"].keys()
        if golden["types"].get(name) != current["types"].get(name))
    diff = "".join(difflib.unified_diff(want.splitlines(keepends=True), now.splitlines(keepends=True),
                                        f"golden/{GOLDEN.name}", "the code now", n=3))
    pytest.fail(f"the wire schema of {', '.join(changed)} changed (- committed, + now). Events are never rewritten: "
                "if old events no longer validate, raise the class's SCHEMA_VERSION and register an upcaster from "
                "the old version (ckp_core.events.UPCASTERS); then record the snapshot again with "
                f"LANGORCH_UPDATE_GOLDEN=1 and review it.\n{diff}", pytrace=False)


@pytest.mark.unit
def test_every_event_class_is_registered_once_with_a_schema_version_and_an_aggregate() -> None:
    classes = payload_classes()
    unregistered = sorted(cls.__name__ for cls in classes if EVENT_TYPES.get(cls.TYPE) is not cls)
    assert not unregistered, f"payload classes missing from EVENT_TYPES: {unregistered}"
    assert set(EVENT_TYPES.values()) == classes
    for name, cls in EVENT_TYPES.items():
        assert name == cls.TYPE
        version = cls.SCHEMA_VERSION
        assert isinstance(version, int), name
        assert version >= 1, name
        assert cls.AGGREGATE in get_args(Aggregate), name
        assert cls.model_config.get("extra") == "allow", f"{name}: readers must survive additive changes"


@pytest.mark.unit
def test_every_old_schema_version_has_an_upcaster_to_the_current_one() -> None:
    """A class at version n can read every event written at 1…n-1; no upcaster starts at or past its version."""
    for name, cls in EVENT_TYPES.items():
        for version in range(1, cls.SCHEMA_VERSION):
            assert (name, version) in UPCASTERS.registered, f"{name}: no upcaster from version {version}"
    for name, version in UPCASTERS.registered:
        assert name in EVENT_TYPES, f"an upcaster of unknown event type {name}"
        assert version < EVENT_TYPES[name].SCHEMA_VERSION, f"{name}: an upcaster from version {version}"


@pytest.mark.integration
async def test_the_gateway_serves_the_snapshot(nats_url: str, database_url: str) -> None:
    """``GET /api/schemas/events`` serves exactly the committed schemas."""
    async with platform_of(nats_url, database_url, runtime=False, agents=False, approvals=False) as p:
        r = await p.client.get("/api/schemas/events")
    assert r.status_code == 200
    assert canonical(r.json()) == canonical(json.loads(GOLDEN.read_text()))
