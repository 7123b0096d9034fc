"""The artifact object store (ckp.md §4.12) on real JetStream: content is stored with its owning run tree, and a
read for another run tree finds nothing (an LLM attachment cannot name another tree's artifact)."""

from __future__ import annotations

import base64

import nats
import pytest

from langorch_runtime.artifacts import ObjectStoreArtifacts
from langorch_runtime.errors import StepError

pytestmark = pytest.mark.integration


async def test_artifacts_belong_to_their_run_tree(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        store = await ObjectStoreArtifacts.open(nc.jetstream())
        spec = {"name": "page.png", "content_base64": base64.b64encode(b"\x89PNG...").decode()}
        uri, size = await store.put("art-1", spec, run_id="child-1", root_run_id="root-1")
        assert (uri, size) == ("lo-artifact://art-1", 7)
        assert await store.size("art-1", root_run_id="root-1") == 7  # any run of the tree: root, child
        assert await store.size("art-1", root_run_id="root-2") is None  # another tree: as if missing
        assert await store.size("art-1") == 7  # unscoped (operator paths)
        assert await store.size("missing", root_run_id="root-1") is None
        assert await store.read("art-1") == b"\x89PNG..."
        with pytest.raises(StepError) as info:
            await store.put("art-2", {"name": "x", "content_base64": "not base64!"}, run_id="r", root_run_id="r")
        assert info.value.error.code == "agent_protocol_error"
    finally:
        await nc.close()
