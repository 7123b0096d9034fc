"""The run page's timeline filters (ui/timeline.py): the groups cover every run event type, a filter read from the
URL keeps only known groups and goes back into the same URL, and the live stream takes over from the later of the
run's last event and the filtered history's."""

from __future__ import annotations

import pytest
from starlette.datastructures import QueryParams

from ckp_core.events.run import EVENTS
from langorch_gateway.ui import timeline

pytestmark = pytest.mark.unit


def test_every_run_event_type_is_in_a_group() -> None:
    grouped = {t for types in timeline.GROUPS.values() for t in types}
    assert {e.TYPE for e in EVENTS} - grouped == set()
    assert grouped - {e.TYPE for e in EVENTS} == set()  # no name that is not an event type
    assert {"node_error", "step_failed", "run_failed"} <= set(timeline.ERRORS)  # the API's error events


def test_a_filter_from_the_url_and_back() -> None:
    shown = timeline.from_query(QueryParams("group=errors&group=bogus&group=approvals&node=fetch"))
    assert shown.groups == ("approvals", "errors")  # in the form's order, unknown ones left out
    assert shown.active
    assert shown.query() == "group=approvals&group=errors&node=fetch"
    assert shown.api_params() == {"event_type": ",".join(sorted({*timeline.APPROVALS, *timeline.ERRORS})),
                                  "node_id": "fetch"}
    nothing = timeline.from_query(QueryParams(""))
    assert (nothing.active, nothing.types, nothing.query()) == (False, [], "")
    assert nothing.api_params() == {"event_type": None, "node_id": None}
    only_node = timeline.from_query(QueryParams("node=+n1+"))
    assert (only_node.active, only_node.types, only_node.node) == (True, [], "n1")


def test_the_live_stream_takes_over_from_the_later_event() -> None:
    history = [{"seq": 3, "stream_seq": 30}, {"seq": 5, "stream_seq": 52}]
    assert timeline.last_position(history, {"seq": 4, "stream_seq": 41}) == (5, 52)  # read later than the whole
    assert timeline.last_position(history, {"seq": 9, "stream_seq": 95}) == (9, 95)  # the rest is filtered out
    assert timeline.last_position([], {"seq": 2, "stream_seq": 20}) == (2, 20)
    assert timeline.last_position([], None) == (0, 0)
