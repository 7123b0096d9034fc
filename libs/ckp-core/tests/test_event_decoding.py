"""Reading events back (``ckp_core.events.decode``): an envelope's data becomes an instance of its event class,
old schema versions are upcast on read by registered upcasters, an unknown type decodes to ``UnknownEvent``, and
damaged data or a version gap no upcaster bridges is an error, never a silently wrong object."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from ckp_core.events import (
    ANONYMOUS,
    EVENT_TYPES,
    ApprovalRequested,
    ErrorObject,
    EventData,
    EventEnvelope,
    EventVersionError,
    RunCompleted,
    RunFailed,
    SubflowStarted,
    UnknownEvent,
    Upcasters,
    decode,
    decode_as,
    make_event,
    upcast,
)

pytestmark = pytest.mark.unit


class Greeted(EventData):
    """Version 3 of a test event: v1 had ``name``; v2 split it into ``first``/``last``; v3 added ``lang``."""

    TYPE = "test_greeted"
    AGGREGATE = "run"
    SCHEMA_VERSION = 3

    first: str
    last: str
    lang: str


TYPES: dict[str, type[EventData]] = {**EVENT_TYPES, Greeted.TYPE: Greeted}


def greeting_upcasters() -> Upcasters:
    upcasters = Upcasters()

    @upcasters.register("test_greeted", from_version=1)
    def split_name(data: dict[str, Any]) -> dict[str, Any]:
        first, _, last = data.pop("name").partition(" ")
        return {**data, "first": first, "last": last}

    @upcasters.register("test_greeted", from_version=2)
    def add_lang(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "lang": "en"}

    return upcasters


def envelope(event_type: str, data: dict[str, Any], schema_version: int = 1) -> EventEnvelope:
    return EventEnvelope(type=event_type, aggregate="run", aggregate_id="r1", seq=1, actor=ANONYMOUS,
                         schema_version=schema_version, data=data)


def test_every_registered_event_round_trips_through_make_event_and_decode() -> None:
    """What a writer wraps with ``make_event`` decodes to an equal instance of the same class."""
    written = RunFailed(error=ErrorObject(code="boom", message="it broke"), outputs={"x": 1})
    decoded = decode(make_event(written, aggregate_id="r1", seq=3, actor=ANONYMOUS))
    assert type(decoded) is RunFailed
    assert decoded == written
    assert decoded.error.code == "boom"


def test_the_class_comes_from_the_type_not_the_aggregate() -> None:
    """``approval_requested`` is written on the run and on the approval aggregate: both decode to one class."""
    data = ApprovalRequested(approval_id="a1", decision_type="approve_reject", run_id="r1")
    on_approval = make_event(data, aggregate_id="a1", seq=1, actor=ANONYMOUS, aggregate="approval")
    assert decode(on_approval) == data


def test_an_old_version_is_upcast_step_by_step_to_the_classes_version() -> None:
    upcasters = greeting_upcasters()
    old = envelope("test_greeted", {"name": "Ada Lovelace", "note": "kept"}, schema_version=1)
    decoded = decode(old, types=TYPES, upcasters=upcasters)
    assert isinstance(decoded, Greeted)
    assert (decoded.first, decoded.last, decoded.lang) == ("Ada", "Lovelace", "en")
    assert decoded.model_extra == {"note": "kept"}  # unknown fields survive the upcast
    assert old.data == {"name": "Ada Lovelace", "note": "kept"}  # the stored event is never rewritten

    middle = envelope("test_greeted", {"first": "Grace", "last": "Hopper"}, schema_version=2)
    assert decode(middle, types=TYPES, upcasters=upcasters) == Greeted(first="Grace", last="Hopper", lang="en")

    current = envelope("test_greeted", {"first": "Alan", "last": "Kay", "lang": "fr"}, schema_version=3)
    assert decode(current, types=TYPES, upcasters=upcasters) == Greeted(first="Alan", last="Kay", lang="fr")


def test_upcast_gives_the_envelope_in_the_newest_shape_and_leaves_current_ones_alone() -> None:
    upcasters = greeting_upcasters()
    old = envelope("test_greeted", {"name": "Ada Lovelace"}, schema_version=1)
    new = upcast(old, upcasters=upcasters)
    assert (new.schema_version, new.data) == (3, {"first": "Ada", "last": "Lovelace", "lang": "en"})
    assert (new.event_id, new.seq, new.type) == (old.event_id, old.seq, old.type)
    current = envelope("run_completed", {"outputs": {}})
    assert upcast(current, upcasters=upcasters) is current


def test_an_upcaster_cannot_mutate_the_envelope_it_reads() -> None:
    upcasters = Upcasters()

    @upcasters.register("test_greeted", from_version=2)
    def add_lang_in_place(data: dict[str, Any]) -> dict[str, Any]:
        data["tags"].append("upcast")
        data["lang"] = "en"
        return data

    old = envelope("test_greeted", {"first": "A", "last": "B", "tags": ["v2"]}, schema_version=2)
    decoded = decode(old, types=TYPES, upcasters=upcasters)
    assert decoded.model_extra == {"tags": ["v2", "upcast"]}
    assert old.data == {"first": "A", "last": "B", "tags": ["v2"]}


def test_a_version_gap_without_an_upcaster_is_an_error() -> None:
    upcasters = Upcasters()
    upcasters.register("test_greeted", from_version=2)(lambda data: {**data, "lang": "en"})
    old = envelope("test_greeted", {"name": "Ada Lovelace"}, schema_version=1)
    with pytest.raises(EventVersionError) as caught:
        decode(old, types=TYPES, upcasters=upcasters)
    assert caught.value.details == {"type": "test_greeted", "schema_version": 1, "current_version": 3}


def test_an_upcaster_is_registered_once_per_type_and_version() -> None:
    upcasters = greeting_upcasters()
    with pytest.raises(ValueError, match="already registered"):
        upcasters.register("test_greeted", from_version=1)(lambda data: data)


def test_a_newer_version_than_the_class_is_read_with_the_current_class() -> None:
    """A newer writer's additive change: the extra field is kept, the known ones are read."""
    newer = envelope("run_completed", {"outputs": {"a": 1}, "summary": "new in v2"}, schema_version=2)
    decoded = decode(newer)
    assert isinstance(decoded, RunCompleted)
    assert decoded.outputs == {"a": 1}
    assert decoded.model_extra == {"summary": "new in v2"}


def test_an_unknown_type_decodes_to_unknown_event() -> None:
    decoded = decode(envelope("from_a_newer_release", {"x": 1}, schema_version=4))
    assert decoded == UnknownEvent(type="from_a_newer_release", schema_version=4, data={"x": 1})


def test_a_known_type_with_damaged_data_is_a_validation_error() -> None:
    with pytest.raises(ValidationError, match="procedure_id"):
        decode(envelope("run_created", {"input_vars": {}}))


def test_decode_as_picks_one_type_out_of_a_stream() -> None:
    events = [envelope("run_completed", {"outputs": {}}),
              envelope("subflow_started", {"child_run_id": "c1", "procedure_id": "p", "version": "1"}),
              envelope("run_created", {"damaged": True})]  # not a subflow_started: never validated
    children = [s.child_run_id for e in events if (s := decode_as(e, SubflowStarted)) is not None]
    assert children == ["c1"]
    assert decode_as(events[1], RunCompleted) is None
