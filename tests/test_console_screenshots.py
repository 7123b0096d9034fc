"""Every page of the console has its screenshot in the docs: each GET route of the console's router
(``langorch_gateway.ui``) is either a page, listed here with the screenshots the browser tests take of it
(tests/test_ui_browser.py, tests/test_ui_admin_browser.py, under fixed names), or a redirect or fragment named here
with the page it serves. Each screenshot's file is in docs/assets/console/ and docs/operations/console-screenshots.md
shows it. A new page fails this test until it has its screenshot and its place on that docs page."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute

from langorch_gateway.ui import router
from langorch_gateway.ui.routes import RUN_TABS

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "docs" / "assets" / "console"
PAGE = ROOT / "docs" / "operations" / "console-screenshots.md"

RUN_TAB_SHOTS = {"artifacts": "run-artifacts", "checkpoints": "run-checkpoints", "children": "run-child-runs",
                 "diagnostics": "run-diagnostics"}
PAGES: dict[str, tuple[str, ...]] = {
    "/ui/login": ("login",),
    "/ui/": ("dashboard",),
    "/ui/runs": ("runs",),
    "/ui/runs/cleanup": ("runs-cleanup",),
    "/ui/runs/{run_id}": ("run-waiting", "run-completed", "run-timeline-filtered"),
    "/ui/runs/{run_id}/{tab}": tuple(RUN_TAB_SHOTS.values()),
    "/ui/runs/{run_id}/checkpoints/{checkpoint_id}": ("run-checkpoint",),
    "/ui/runs/{run_id}/usage": ("run-llm-usage",),
    "/ui/runs/{run_id}/replay": ("run-replay",),
    "/ui/runs/{run_id}/rerun": ("run-rerun",),
    "/ui/procedures": ("procedures", "procedures-import-diagnostics"),
    "/ui/procedures/{procedure_id}": ("procedure",),
    "/ui/procedures/{procedure_id}/diff": ("diff",),
    "/ui/procedures/{procedure_id}/{version}": ("version", "version-start-errors"),
    "/ui/procedures/{procedure_id}/{version}/explain": ("version-explain",),
    "/ui/procedures/{procedure_id}/{version}/trigger": ("version-trigger", "version-trigger-errors"),
    "/ui/approvals": ("approvals",),
    "/ui/approvals/{approval_id}": ("approval", "approval-input-error"),
    "/ui/agents": ("agents",),
    "/ui/leases": ("leases",),
    "/ui/projects": ("projects",),
    "/ui/triggers": ("triggers-actions",),
    "/ui/audit": ("audit",),
    "/ui/settings": ("settings",),
    "/ui/settings/users": ("settings-users", "settings-users-errors"),
    "/ui/settings/api-keys": ("settings-api-keys", "settings-api-key-created"),
    "/ui/settings/api-keys/{key_id}/revoke": ("settings-api-key-revoke",),
}
NOT_PAGES = {
    "/": "redirects to /ui/",
    "/ui": "redirects to /ui/",
    "/ui/runs/{run_id}/header": "the run page's header, fetched again as the timeline grows",
    "/ui/runs/{run_id}/graph": "the run page's graph, fetched again as the timeline grows",
}


def console_pages() -> Iterator[str]:
    """The path template of every GET route of the console's router, in included routers too."""
    stack: list[Any] = list(router.routes)
    while stack:
        route = stack.pop()
        if hasattr(route, "original_router"):
            stack.extend(route.original_router.routes)
        elif isinstance(route, APIRoute) and "GET" in route.methods:
            yield route.path


def test_every_console_page_has_a_screenshot_listed() -> None:
    served = set(console_pages())
    assert served, "no route found in the console's router"
    unlisted = sorted(served - PAGES.keys() - NOT_PAGES.keys())
    assert not unlisted, f"console pages without a screenshot here (add them to PAGES, take them in a browser test " \
                         f"and show them on {PAGE.name}): {unlisted}"
    gone = sorted((PAGES.keys() | NOT_PAGES.keys()) - served)
    assert not gone, f"listed here, no longer served: {gone}"
    assert set(RUN_TAB_SHOTS) == set(RUN_TABS), "every tab of /ui/runs/{run_id}/{tab} needs its screenshot"


def test_every_screenshot_is_a_file_the_docs_page_shows() -> None:
    shown = set(re.findall(r"!\[[^\]]+\]\(\.\./assets/console/([a-z0-9-]+)\.png\)", PAGE.read_text()))
    for path, shots in PAGES.items():
        for shot in shots:
            assert (SHOTS / f"{shot}.png").is_file(), f"{path}: docs/assets/console/{shot}.png is missing"
            assert shot in shown, f"{path}: {PAGE.name} does not show {shot}.png"
    taken = {p.stem for p in SHOTS.glob("*.png")}
    assert shown <= taken, f"{PAGE.name} shows screenshots no test takes: {sorted(shown - taken)}"
