"""LANGORCH_AGENT_URL_ALLOWLIST (api.md §7.3) is read as a comma-separated list of hosts/CIDRs or a JSON list."""

from __future__ import annotations

import pytest

from langorch_infra.settings import GatewaySettings

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("raw", "expected"), [
    ("10.0.0.0/8, agents.internal", ["10.0.0.0/8", "agents.internal"]),
    ('["127.0.0.0/8"]', ["127.0.0.0/8"]),
    ("", []),
])
def test_allowlist_from_env(monkeypatch: pytest.MonkeyPatch, raw: str, expected: list[str]) -> None:
    monkeypatch.setenv("LANGORCH_AGENT_URL_ALLOWLIST", raw)
    assert GatewaySettings().agent_url_allowlist == expected
