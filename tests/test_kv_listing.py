"""Listing KV keys from the stream's subject index (``langorch_infra.kv.kv_keys``/``kv_live``) against a real NATS
JetStream: live keys are listed at once after their writes, and deleted, purged and TTL-expired keys are not
live. (nats-py's watcher-based listing can end before values that exist; presence, leases and step diagnostics
read through these functions instead.)"""

from __future__ import annotations

import asyncio

import pytest

from ckp_core.subjects import PRESENCE_BUCKET
from langorch_infra.jetstream import connect, ensure_topology
from langorch_infra.kv import kv_keys, kv_live, put_with_ttl

pytestmark = pytest.mark.integration


async def test_live_keys_skip_deleted_purged_and_expired_ones(nats_url: str) -> None:
    nc = await connect(nats_url, "test-kv-listing")
    try:
        js = nc.jetstream()
        await ensure_topology(js)
        assert await kv_keys(js, PRESENCE_BUCKET, "t.>") == []
        assert await kv_live(js, PRESENCE_BUCKET, "t.>") == []
        assert await kv_keys(js, "no_such_bucket") == []
        kv = await js.key_value(PRESENCE_BUCKET)
        await put_with_ttl(js, PRESENCE_BUCKET, "t.expiring", b'{"n": 0}', 1)
        for i in range(5):
            await kv.put(f"t.k{i}", f'{{"n": {i}}}'.encode())
            # listed as soon as the write is acknowledged, every time
            listed = [k for k, _, _ in await kv_live(js, PRESENCE_BUCKET, "t.>") if k.startswith("t.k")]
            assert listed == [f"t.k{j}" for j in range(i + 1)]
        await kv.delete("t.k1")
        await kv.purge("t.k2")
        await kv.put("other.x", b"{}")
        deadline = asyncio.get_running_loop().time() + 15
        while "t.expiring" in [k for k, _, _ in await kv_live(js, PRESENCE_BUCKET, "t.>")]:
            assert asyncio.get_running_loop().time() < deadline, "the TTL key never expired"
            await asyncio.sleep(0.2)
        live = await kv_live(js, PRESENCE_BUCKET, "t.>")
        assert [(k, v) for k, _, v in live] == [("t.k0", b'{"n": 0}'), ("t.k3", b'{"n": 3}'), ("t.k4", b'{"n": 4}')]
        assert all(revision > 0 for _, revision, _ in live)
        # the deleted and purged keys keep a marker: listed by kv_keys, not live
        assert {"t.k1", "t.k2"} <= set(await kv_keys(js, PRESENCE_BUCKET, "t.>"))
    finally:
        await nc.close()
