"""Read-your-writes across gateway replicas (api.md, ``X-LangOrch-Min-Position``): a client writes through gateway A
and reads through gateway B — two gateway apps on the same NATS and PostgreSQL — with the position A returned."""

from __future__ import annotations

import httpx
import pytest

from langorch_gateway.app import create_app
from langorch_infra.settings import GatewaySettings
from tests.helpers import platform_of, serve_app
from tests.ports import free_port

pytestmark = pytest.mark.integration

RYW_TIMEOUT_MS = 3000

DOC = {"procedure_id": "ryw-two", "version": "1", "workflow_graph": {"start_node": "s", "nodes": {
    "s": {"type": "sequence", "next_node": "done", "steps": [
        {"step_id": "x", "action": "set_variable", "variable": "x", "value": 1}]},
    "done": {"type": "terminate", "outputs": {}}}}}


def consistent(r: httpx.Response) -> bool:
    return r.status_code == 200 and "X-LangOrch-Consistency" not in r.headers


async def test_a_write_through_one_gateway_is_read_through_another_with_its_position(
        nats_url: str, database_url: str) -> None:
    async with platform_of(nats_url, database_url) as p:
        a = p.client
        port = free_port()
        app_b = create_app(GatewaySettings(nats_url=nats_url, database_url=database_url, port=port,
                                           auth_enabled=False, ryw_timeout_ms=RYW_TIMEOUT_MS))
        async with serve_app(app_b, port, lifespan="on", what="gateway B") as base_b, \
                httpx.AsyncClient(base_url=base_b, timeout=30) as b:
            # both projectors running (either may apply the event first)
            r = await a.post("/api/procedures", json={"ckp_json": DOC})
            assert r.status_code == 201, r.text
            position = r.headers["X-LangOrch-Position"]
            read = await b.get("/api/procedures/ryw-two/1", headers={"X-LangOrch-Min-Position": position})
            assert consistent(read), (read.status_code, dict(read.headers), read.text)
            assert int(read.headers["X-LangOrch-Position"]) >= int(position)

            # B's projector stands still (behind, as a busy or restarting replica's is): A's projector wrote the
            # run to the shared tables, so B serves it, consistent, without waiting out its timeout
            await app_b.state.projector.stop()
            r = await a.post("/api/runs", json={"procedure_id": "ryw-two", "procedure_version": "1"})
            assert r.status_code in (201, 202), r.text
            run_id, position = r.json()["run_id"], r.headers["X-LangOrch-Position"]
            read = await b.get(f"/api/runs/{run_id}", headers={"X-LangOrch-Min-Position": position})
            assert consistent(read), (read.status_code, dict(read.headers), read.text)
            assert read.json()["run_id"] == run_id
            assert int(read.headers["X-LangOrch-Position"]) >= int(position)

            # a position no replica has projected: B waits its timeout, then answers from what it has, marked stale
            ahead = str(int(position) + 10_000)
            read = await b.get(f"/api/runs/{run_id}", headers={"X-LangOrch-Min-Position": ahead})
            assert read.status_code == 200, read.text
            assert read.headers["X-LangOrch-Consistency"] == "stale"
