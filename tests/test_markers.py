"""Every test says whether it needs servers: ``-m unit`` runs the pure ones, ``-m integration`` the others."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


def test_every_test_is_marked_unit_or_integration(request: pytest.FixtureRequest) -> None:
    unmarked = [item.nodeid for item in request.session.items
                if item.get_closest_marker("unit") is None and item.get_closest_marker("integration") is None]
    assert not unmarked, "tests without a `unit` or `integration` mark (set `pytestmark` in their file):\n  " + \
        "\n  ".join(unmarked)
