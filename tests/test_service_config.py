"""api.md §3, §13.1, §14: service presence in KV ``lo_presence``, ``GET /api/config`` (redacted, never a secret),
each service's ``/health``, ``/ready`` and ``/metrics`` on its metrics port, and the one combined ``/metrics`` of
``langorch up``'s composition."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ckp_core.subjects import PRESENCE_BUCKET, service_presence_key
from langorch.serving import SERVICES, serve_services
from langorch_approvals.service import host as approvals_host
from langorch_compiler.service import host as compiler_host
from langorch_infra.embedded import EmbeddedNats
from langorch_infra.hosting import ServiceHost
from langorch_infra.jetstream import connect, ensure_topology
from langorch_infra.presence import Presence, read_presence
from langorch_infra.settings import (
    ApprovalsSettings,
    CompilerSettings,
    GatewaySettings,
    RuntimeSettings,
    effective_settings,
    redact_url_password,
)
from langorch_runtime.service import host as runtime_host
from tests.helpers import eventually, example, follow_run, import_procedure, port_open
from tests.ports import free_port

SECRETS = {"auth": "auth-secret-9f3a1c77-2b4d6f8a0c1e3a5c7e9b", "llm": "sk-llm-key-7b2e0d15",
           "header": "hdr-value-41d8aa02", "db": "db-pass-5c6e93b4", "admin": "admin-pass-3e8c1b7f2d90"}
REDACTED = "***REDACTED***"


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user = parts.username or "postgres"
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port}"))


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# -- settings ---------------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_every_setting_is_described_and_the_metrics_port_is_common() -> None:
    for cls in (CompilerSettings, RuntimeSettings, ApprovalsSettings, GatewaySettings):
        undocumented = [name for name, f in cls.model_fields.items() if not f.description]
        assert undocumented == [], cls.__name__
        assert cls.model_fields["metrics_port"].default == 9464
        assert cls.model_fields["presence_ttl_s"].default == 30.0


@pytest.mark.unit
def test_effective_settings_redact_secrets_headers_and_url_passwords() -> None:
    settings = RuntimeSettings(
        nats_url="nats://lo:nats-pass-1@n1:4222,nats://nats-token-2@n2:4222",
        database_url="postgresql://app:pg-pass-3@db:5432/langorch?sslmode=require&password=pg-pass-4",
        auth_secret_key="auth-key-5", llm_api_key="llm-key-6",
        llm_extra_headers={"X-Api-Key": "header-7", "X-Team": "team-8"},
        llm_models={"m1": {"base_url": "https://u:model-pass-9@llm.internal/v1", "api_key_secret": "m1_key"}})
    out = effective_settings(settings)
    text = json.dumps(out)
    for secret in ("nats-pass-1", "nats-token-2", "pg-pass-3", "pg-pass-4", "auth-key-5", "llm-key-6", "header-7",
                   "team-8", "model-pass-9"):
        assert secret not in text
    assert out["nats_url"] == f"nats://lo:{REDACTED}@n1:4222,nats://{REDACTED}@n2:4222"
    assert out["database_url"] == f"postgresql://app:{REDACTED}@db:5432/langorch?sslmode=require&password={REDACTED}"
    assert out["auth_secret_key"] == {"set": True}
    assert out["llm_api_key"] == {"set": True}
    assert out["llm_extra_headers"] == {"X-Api-Key": REDACTED, "X-Team": REDACTED}
    assert out["llm_models"]["m1"]["base_url"] == f"https://u:{REDACTED}@llm.internal/v1"
    assert out["llm_models"]["m1"]["api_key_secret"] == "m1_key"  # a secret's name, not its value
    assert out["max_concurrent_runs"] == 16
    assert effective_settings(GatewaySettings())["metrics_token"] == {"set": False}
    assert effective_settings(RuntimeSettings())["llm_api_key"] == {"set": False}
    assert redact_url_password("postgresql://postgres@127.0.0.1:5432/x") == "postgresql://postgres@127.0.0.1:5432/x"
    assert redact_url_password("https://api.openai.com/v1") == "https://api.openai.com/v1"


# -- presence ---------------------------------------------------------------------------------------------------


@pytest.mark.integration
async def test_presence_expires_after_its_ttl_and_a_clean_stop_deletes_it(nats_url: str) -> None:
    nc = await connect(nats_url, "test-presence")
    try:
        js = nc.jetstream()
        await ensure_topology(js)
        crashed = Presence(js, "compiler", "replica-a", "1.2.3", CompilerSettings(), ttl_s=2)
        await crashed.start()
        [listed] = await read_presence(js)
        assert listed["service"] == "compiler"
        assert listed["instance_id"] == "replica-a"
        assert listed["version"] == "1.2.3"
        assert listed["leader_of"] == []
        assert listed["settings"]["metrics_port"] == 9464
        assert listed["started_at"] <= listed["last_seen_at"]
        await crashed.stop(delete=False)  # stops renewing without deleting: what a killed replica leaves
        assert [v["instance_id"] for v in await read_presence(js)] == ["replica-a"]
        started = asyncio.get_running_loop().time()

        async def gone() -> bool:
            return await read_presence(js) == []

        await eventually(gone, timeout=10, what="the presence key to expire", every=0.1)
        assert asyncio.get_running_loop().time() - started < 6

        held = ["approval_timer"]
        clean = Presence(js, "approvals", "replica-b", "1.2.3", ApprovalsSettings(), ttl_s=30,
                         leader_of=lambda: list(held))
        await clean.start()
        assert [v["leader_of"] for v in await read_presence(js)] == [["approval_timer"]]
        held.clear()  # the lock is lost: the key is re-put within a second, long before a third of its TTL

        async def follower() -> bool:
            return [v["leader_of"] for v in await read_presence(js)] == [[]]

        await eventually(follower, timeout=5, what="leader_of to be republished", every=0.1)
        await clean.stop()
        assert await read_presence(js) == []
    finally:
        await nc.close()


# -- per-service HTTP on the metrics port ---------------------------------------------------------------------


async def _serving(host: ServiceHost, port: int) -> asyncio.Task[None]:
    task = asyncio.create_task(host.serve())

    async def ready() -> bool:
        if task.done():
            task.result()
        async with httpx.AsyncClient(timeout=5) as c:
            try:
                return (await c.get(f"http://127.0.0.1:{port}/ready")).status_code == 200
            except httpx.TransportError:
                return False

    await eventually(ready, what=f"{host.service} to be ready", every=0.1)
    return task


@pytest.mark.integration
async def test_each_service_serves_health_ready_and_metrics_on_its_metrics_port(tmp_path: Path,
                                                                                 database_url: str) -> None:
    nats = EmbeddedNats(tmp_path / "nats").start()  # its own server: the test stops it
    env = {"nats_url": nats.url, "database_url": database_url}
    ports = {"compiler": free_port(), "runtime": free_port(), "approvals": free_port()}
    hosts = [compiler_host(CompilerSettings(**env, metrics_port=ports["compiler"])),
             runtime_host(RuntimeSettings(**env, metrics_port=ports["runtime"])),
             approvals_host(ApprovalsSettings(**env, metrics_port=ports["approvals"]))]
    tasks = [await _serving(h, ports[h.service]) for h in hosts]
    try:
        async with httpx.AsyncClient(timeout=10) as c:
            for h in hosts:
                base = f"http://127.0.0.1:{ports[h.service]}"
                r = await c.get(f"{base}/health")
                assert r.status_code == 200
                assert r.json() == {"status": "ok", "service": h.service, "version": "0.1.0"}
                r = await c.get(f"{base}/ready")
                assert r.status_code == 200
                expected = {"nats": "ok", "streams": "ok"} | ({"postgres": "ok"} if h.service == "runtime" else {})
                assert r.json() == {"status": "ready", "service": h.service, "checks": expected}
                r = await c.get(f"{base}/metrics")
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/plain")
                got = samples(r.text)
                assert got[("langorch_build_info", (("service", h.service), ("version", "0.1.0")))] == 1
                assert [s for (name, labels) in got for s in labels if name == "langorch_build_info"] == \
                    [("service", h.service), ("version", "0.1.0")]  # only its own registry
                assert (await c.get(f"{base}/nothing")).status_code == 404
                assert (await c.post(f"{base}/ready")).status_code == 405
            families = {f.name for f in text_string_to_metric_families(
                (await c.get(f"http://127.0.0.1:{ports['compiler']}/metrics")).text)}
            assert {"langorch_compile", "langorch_compile_duration_seconds"} <= families
            families = {f.name for f in text_string_to_metric_families(
                (await c.get(f"http://127.0.0.1:{ports['approvals']}/metrics")).text)}
            assert {"langorch_approval_requests", "langorch_approval_decisions",
                    "langorch_approval_decision_latency_seconds", "langorch_callback_timeout"} <= families
            families = {f.name for f in text_string_to_metric_families(
                (await c.get(f"http://127.0.0.1:{ports['runtime']}/metrics")).text)}
            assert "langorch_run_started" in families

            nats.stop()  # NATS goes away: every replica is alive (200) but not ready (503) while it reconnects
            for h in hosts:
                base = f"http://127.0.0.1:{ports[h.service]}"

                async def not_ready(base: str = base) -> dict[str, Any] | None:
                    r = await c.get(f"{base}/ready")
                    return r.json() if r.status_code == 503 else None

                body = await eventually(not_ready, timeout=10, what=f"{h.service} to report not_ready", every=0.1)
                assert body["status"] == "not_ready"
                assert body["checks"]["nats"] == "disconnected"
                assert body["checks"]["streams"] == "unknown: not connected"
                assert (await c.get(f"{base}/health")).status_code == 200
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with pytest.raises(asyncio.CancelledError):
                await t
        nats.stop()
    for port in ports.values():
        assert not port_open(port)  # a stopped replica closes its endpoint


@pytest.mark.integration
async def test_only_one_replica_lists_a_leader_lock_and_the_other_takes_it_over(nats_url: str,
                                                                               database_url: str) -> None:
    settings = ApprovalsSettings(nats_url=nats_url, database_url=database_url, leader_lock_ttl_s=1, metrics_port=0)
    first, second = approvals_host(settings), approvals_host(settings)
    assert first.instance_id != second.instance_id
    tasks = {first.instance_id: asyncio.create_task(first.serve()),
             second.instance_id: asyncio.create_task(second.serve())}
    nc = await connect(nats_url, "test-leaders")
    try:
        js = nc.jetstream()

        async def one_leader() -> list[dict[str, Any]] | None:
            replicas = [v for v in await read_presence(js) if v["service"] == "approvals"]
            leaders = [v for v in replicas if v["leader_of"] == ["approval_timer"]]
            return replicas if len(replicas) == 2 and len(leaders) == 1 else None

        replicas = await eventually(one_leader, what="two approvals replicas, one holding approval_timer", every=0.1)
        [leader] = [v["instance_id"] for v in replicas if v["leader_of"]]
        tasks[leader].cancel()  # a clean stop: lock released, presence deleted
        with pytest.raises(asyncio.CancelledError):
            await tasks[leader]
        survivor = next(i for i in tasks if i != leader)

        async def taken_over() -> bool:
            replicas = await read_presence(js)
            return [(v["instance_id"], v["leader_of"]) for v in replicas] == [(survivor, ["approval_timer"])]

        await eventually(taken_over, timeout=15, what="the survivor to list approval_timer")
    finally:
        for t in tasks.values():
            t.cancel()
        for t in tasks.values():
            with pytest.raises(asyncio.CancelledError):
                await t
        await nc.close()


# -- langorch up: GET /api/config and the combined /metrics -------------------------------------------------------


@pytest.mark.integration
async def test_up_lists_every_replica_without_secrets_and_serves_one_combined_registry(
        nats_url: str, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    metrics_port = free_port()
    monkeypatch.setenv("LANGORCH_AUTH_SECRET_KEY", SECRETS["auth"])
    monkeypatch.setenv("LANGORCH_BOOTSTRAP_ADMIN_PASSWORD", SECRETS["admin"])  # authentication is on (the default)
    monkeypatch.setenv("LANGORCH_LLM_API_KEY", SECRETS["llm"])
    monkeypatch.setenv("LANGORCH_LLM_EXTRA_HEADERS", json.dumps({"X-Tenant-Token": SECRETS["header"]}))
    monkeypatch.setenv("LANGORCH_METRICS_PORT", str(metrics_port))
    monkeypatch.setenv("LANGORCH_PRESENCE_TTL_S", "3")
    port = free_port()
    stop = asyncio.Event()
    up = asyncio.create_task(serve_services(SERVICES, nats_url, with_password(database_url, SECRETS["db"]),
                                             "127.0.0.1", port, stop=stop))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            async def logged_in() -> str | None:
                if up.done():
                    up.result()
                try:
                    r = await c.post("/api/auth/login", json={"username": "admin", "password": SECRETS["admin"]})
                except httpx.TransportError:
                    return None
                assert r.status_code == 200, r.text  # the bootstrap admin exists once the gateway serves
                return str(r.json()["access_token"])

            token = await eventually(logged_in, what="the bootstrap admin's login", every=0.2)
            c.headers["Authorization"] = f"Bearer {token}"

            async def listed() -> httpx.Response | None:
                if up.done():
                    up.result()
                try:
                    r = await c.get("/api/config")
                except httpx.TransportError:
                    return None
                if r.status_code != 200:
                    return None
                leaders = {s["service"]: s["leader_of"] for s in r.json()["services"]}
                every = leaders == {"gateway": [], "compiler": [], "approvals": ["approval_timer"],
                                    "runtime": ["agent_health", "callback_timer"], "triggers": ["scheduler"]}
                return r if every else None

            r = await eventually(listed, what="the five services in GET /api/config, leaders elected")
            for secret in SECRETS.values():
                assert secret.encode() not in r.content
            body = r.json()
            assert body["version"] == "0.1.0"
            assert body["auth_enabled"] is True
            assert body["public_url"] == f"http://127.0.0.1:{port}"
            by = {s["service"]: s for s in body["services"]}
            assert len(body["services"]) == 5
            for service, replica in by.items():
                assert set(replica) == {"service", "instance_id", "version", "started_at", "last_seen_at",
                                        "leader_of", "settings"}
                assert replica["settings"]["auth_secret_key"] == {"set": True}
                assert replica["settings"]["database_url"].startswith(f"postgresql://postgres:{REDACTED}@")
                assert replica["settings"]["metrics_port"] == metrics_port, service
            assert by["runtime"]["settings"]["llm_api_key"] == {"set": True}
            assert by["runtime"]["settings"]["llm_extra_headers"] == {"X-Tenant-Token": REDACTED}
            assert by["gateway"]["settings"]["metrics_token"] == {"set": False}
            assert by["gateway"]["settings"]["port"] == port

            nc = await connect(nats_url, "test-config-raw")
            try:
                kv = await nc.jetstream().key_value(PRESENCE_BUCKET)
                for replica in body["services"]:
                    key = service_presence_key(replica["service"], replica["instance_id"])
                    raw = (await kv.get(key)).value or b""
                    assert json.loads(raw)["instance_id"] == replica["instance_id"]
                    assert not any(s.encode() in raw for s in SECRETS.values())
            finally:
                await nc.close()

            await import_procedure(c, example("minimal_greeting.ckp.json"))
            doc = example("minimal_greeting.ckp.json")
            run = (await c.post("/api/runs", json={"procedure_id": doc["procedure_id"],
                                                   "procedure_version": doc["version"]})).json()
            _, end = await follow_run(c, run["run_id"])
            assert end == "completed"
            r = await c.get("/metrics")
            assert r.status_code == 200
            got = samples(r.text)  # the parser rejects a family exposed twice
            for service in ("gateway", "compiler", "runtime", "approvals"):
                assert got[("langorch_build_info", (("service", service), ("version", "0.1.0")))] == 1
            procedure = ("procedure_id", doc["procedure_id"])
            assert got[("langorch_run_started_total", (procedure, ("trigger_type", "api")))] == 1
            assert got[("langorch_run_completed_total", (procedure, ("status", "completed")))] == 1
            assert got[("langorch_compile_total", (("outcome", "success"),))] >= 1
            assert ("langorch_http_requests_total", (("method", "GET"), ("route", "/api/config"),
                                                     ("status", "200"))) in got
            assert not port_open(metrics_port)  # `up` serves one /metrics, on the gateway's port
    finally:
        stop.set()
        await asyncio.wait_for(up, 30)
    nc = await connect(nats_url, "test-config-after")
    try:
        assert await read_presence(nc.jetstream()) == []  # every replica deleted its key on the way out
    finally:
        await nc.close()


@pytest.mark.integration
async def test_a_replica_whose_metrics_port_is_taken_still_runs(nats_url: str, database_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        replica = compiler_host(CompilerSettings(nats_url=nats_url, database_url=database_url, metrics_port=port))
        task = asyncio.create_task(replica.serve())
        nc = await connect(nats_url, "test-port-taken")
        try:
            async def listed() -> bool:
                if task.done():
                    task.result()
                return [v["instance_id"] for v in await read_presence(nc.jetstream())] == [replica.instance_id]

            await eventually(listed, what="the compiler to run without its HTTP endpoint")
            assert replica.ops is not None
            assert await replica.ops.start() is False
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await nc.close()
