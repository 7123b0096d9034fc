"""Cluster-ready topology on one server: ``LANGORCH_NATS_REPLICAS`` reaches every stream, KV bucket and the
artifact object store (R1 on a single server stays R1), and a comma-separated NATS URL is a list of seed servers
every connection takes, failing over past a dead first one. The R3 side runs on a cluster in test_cluster_nats."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext

from ckp_core.subjects import ARTIFACTS_BUCKET
from langorch.cli import redact
from langorch_infra import messaging
from langorch_infra.embedded import EmbeddedNats, nats_users
from langorch_infra.jetstream import BUCKETS, STREAMS, connect, ensure_topology
from langorch_infra.nats_auth import nats_servers
from langorch_infra.settings import CommonSettings
from tests.helpers import langorch_command
from tests.ports import free_port

pytestmark = pytest.mark.integration

ALL_STREAMS = ([s.name or "" for s in STREAMS] + [f"KV_{b}" for b in BUCKETS] + [f"OBJ_{ARTIFACTS_BUCKET}"])


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_url)
    yield nc.jetstream()
    await nc.close()


async def replicas_of(js: JetStreamContext) -> dict[str, int]:
    return {name: (await js.stream_info(name)).config.num_replicas or 1 for name in ALL_STREAMS}


async def test_single_server_topology_is_created_and_stays_at_one_replica(js: JetStreamContext) -> None:
    settings = CommonSettings()
    assert settings.nats_replicas == 1
    await ensure_topology(js, replicas=settings.nats_replicas)
    assert await replicas_of(js) == dict.fromkeys(ALL_STREAMS, 1)
    await ensure_topology(js, audit_retention_days=30, replicas=1)  # a second start reconciles to the same
    await ensure_topology(js)  # a caller without the setting changes no count
    assert await replicas_of(js) == dict.fromkeys(ALL_STREAMS, 1)
    await js.object_store(ARTIFACTS_BUCKET)  # the artifact store exists from the start on


def dead_url(live: str) -> str:
    """A URL on a port nothing listens on, with the live URL's credentials."""
    scheme, rest = live.split("://", 1)
    userinfo = rest.rpartition("@")[0]
    return f"{scheme}://{userinfo + '@' if userinfo else ''}127.0.0.1:{free_port()}"


async def test_a_seed_list_whose_first_server_is_dead_connects_to_the_next(nats_url: str) -> None:
    dead = dead_url(nats_url)
    seeds = f"{dead}, {nats_url}"
    assert nats_servers(seeds) == [dead, nats_url]
    nc = await connect(seeds, "lo-test-seeds")
    try:
        assert nc.is_connected
        assert nc.connected_url is not None
        assert nc.connected_url.port == int(nats_url.rsplit(":", 1)[1])
        await nc.jetstream().account_info()
    finally:
        await nc.close()
    broker = messaging.broker(seeds, "lo-test-seeds-broker", None)
    client = await messaging.connect(broker)
    try:
        await client.jetstream().account_info()
    finally:
        await messaging.close(broker, client)


async def test_credentials_in_each_seed_url_keep_working(tmp_path: Path, database_url: str) -> None:
    """The embedded server's service user, its password in each URL of the list; the CLI too, never printing it."""
    users = nats_users(tmp_path / "nats-users.json")
    server = EmbeddedNats(tmp_path / "nats", users=users.all).start()
    try:
        seeds = f"{users.service.url(free_port())},{users.service.url(server.port)}"
        nc = await connect(seeds, "lo-test-seeds-credentials")
        try:
            await ensure_topology(nc.jetstream(), replicas=1)
        finally:
            await nc.close()
        clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("LANGORCH_")}
        proc = await asyncio.to_thread(
            subprocess.run, langorch_command("projections", "rebuild"), capture_output=True, text=True,
            timeout=120, check=False, env={**clean, "LANGORCH_NATS_URL": seeds, "LANGORCH_DATABASE_URL": database_url})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "projections rebuilt" in proc.stdout
        assert users.service.password not in proc.stdout + proc.stderr
    finally:
        server.stop()


@pytest.mark.unit
def test_each_seed_url_is_redacted() -> None:
    shown = redact("nats://svc:s3cret@a:4222,nats://svc:s3cret@b:4222")
    assert shown == "nats://svc@a:4222,nats://svc@b:4222"
    assert redact("postgresql://u:pw@h1,h2/db") == "postgresql://u@h1,h2/db"  # one URL of several hosts stays one
