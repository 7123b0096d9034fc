"""U+0000 cannot be stored by PostgreSQL: every request carrying it is 422 at the exact field, and nothing is
appended (an event with it could never be projected)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from langorch_infra.jetstream import connect, stream_last_position
from tests.helpers import Platform, platform_of, procedure_doc

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url, runtime=False) as p:
        yield p


@pytest.mark.parametrize(("method", "path", "kwargs", "field"), [
    ("POST", "/api/projects", {"json": {"name": "a\u0000b"}}, "name"),
    ("POST", "/api/procedures", {"json": {"ckp_json": procedure_doc("nul", description="x\u0000")}},
     "ckp_json.description"),
    ("POST", "/api/agents", {"json": {"name": "n", "channel": "c", "base_url": "http://127.0.0.1:9",
                                      "capabilities": ["a"], "labels": {"zone": ["\u0000"]}}}, "labels.zone.0"),
    ("PATCH", "/api/procedures/p/1/status", {"json": {"status": "active", "reason": "\u0000"}}, "reason"),
    ("GET", "/api/procedures", {"params": {"search": "a\u0000"}}, "query.search"),
    ("GET", "/api/projects/a%00b", {}, "path"),
])
async def test_nul_is_refused_at_its_field(platform: Platform, method: str, path: str, kwargs: dict[str, Any],
                                           field: str) -> None:
    nc = await connect(platform.nats_url, "test-nul")
    try:
        head = await stream_last_position(nc.jetstream())
        r = await platform.client.request(method, path, **kwargs)
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["code"] == "validation_failed"
        assert body["errors"] == {field: ["Must not contain the NUL character (U+0000)"]}
        assert await stream_last_position(nc.jetstream()) == head
    finally:
        await nc.close()
    # the gateway keeps serving, and a backslash-u text that is not U+0000 passes
    r = await platform.client.post("/api/projects", json={"name": f"literal \\u0000 {field}"})
    assert r.status_code == 201, r.text
