"""``tree_copy``, the copy of a run's state each super-step starts from: equal to ``copy.deepcopy`` of it and
sharing nothing mutable with the original."""

from __future__ import annotations

import copy

import pytest

from langorch_runtime.frames import tree_copy

pytestmark = pytest.mark.unit


def test_a_state_copy_equals_deepcopy_and_shares_nothing_mutable() -> None:
    state = {"vars": {"n": 1, "f": 2.5, "ok": True, "none": None, "items": [1, {"k": ["v"]}], "pair": (1, [2])},
             "frames": {"main": {"id": "main", "pending": [], "node": {"data": {"seen": [1, 2]}}}},
             "order": ["main"], "saves": []}
    copied = tree_copy(state)
    assert copied == copy.deepcopy(state)
    copied["vars"]["items"][1]["k"].append("w")
    copied["frames"]["main"]["node"]["data"]["seen"].clear()
    copied["vars"]["pair"][1].append(3)  # anything else is copied by deepcopy
    copied["order"].append("x")
    assert state["vars"]["items"][1]["k"] == ["v"]
    assert state["frames"]["main"]["node"]["data"]["seen"] == [1, 2]
    assert state["vars"]["pair"] == (1, [2])
    assert state["order"] == ["main"]


def test_one_list_held_twice_is_copied_twice() -> None:
    shared = [1]
    copied = tree_copy({"a": shared, "b": shared})
    copied["a"].append(2)
    assert copied["b"] == [1]
    assert shared == [1]
