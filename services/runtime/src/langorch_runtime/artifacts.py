"""Inline artifact content (ckp.md §4.12) in the JetStream object store ``lo_artifacts`` (≤ 50 MiB each).

Each object records the run that stored it and that run's root in its description; a run reads artifacts of its
own run tree only (an LLM image attachment naming another tree's artifact id is refused as if it did not exist).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import ObjectMeta, ObjectStoreConfig, StorageType
from nats.js.errors import BadObjectMetaError, BadRequestError, NotFoundError, ObjectDeletedError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from ckp_core.events import ErrorObject
from ckp_core.subjects import ARTIFACTS_BUCKET
from langorch_runtime.errors import StepError

BUCKET = ARTIFACTS_BUCKET
MAX_BYTES = 50 * 1024 * 1024


class ObjectStoreArtifacts:
    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    @classmethod
    async def open(cls, js: JetStreamContext) -> ObjectStoreArtifacts:
        try:
            store = await js.object_store(BUCKET)
        except NotFoundError:
            try:
                store = await js.create_object_store(BUCKET, ObjectStoreConfig(storage=StorageType.FILE))
            except BadRequestError:  # created concurrently
                store = await js.object_store(BUCKET)
        return cls(store)

    async def put(self, artifact_id: str, spec: dict[str, Any], *, run_id: str, root_run_id: str
                  ) -> tuple[str, int]:
        try:
            data = base64.b64decode(str(spec.get("content_base64") or ""), validate=True)
        except (binascii.Error, ValueError):
            raise StepError(ErrorObject(code="agent_protocol_error", message="artifact content_base64 is not "
                                        "valid base64", details={"name": spec.get("name")})) from None
        if len(data) > MAX_BYTES:
            raise StepError(ErrorObject(code="agent_protocol_error", message=f"artifact of {len(data)} bytes is "
                                        f"larger than {MAX_BYTES}", details={"name": spec.get("name")}))
        owner = json.dumps({"run_id": run_id, "root_run_id": root_run_id})
        await self.store.put(artifact_id, data, meta=ObjectMeta(name=artifact_id, description=owner))
        return f"lo-artifact://{artifact_id}", len(data)

    async def size(self, artifact_id: str, *, root_run_id: str | None = None) -> int | None:
        """The stored size of an artifact; None when there is none of that id (or it was deleted), or when
        ``root_run_id`` is given and the artifact belongs to another run tree."""
        try:
            info = await self.store.get_info(artifact_id)
        except (NotFoundError, ObjectNotFoundError, ObjectDeletedError, BadObjectMetaError):
            return None
        if root_run_id is not None and owner_of(info.description).get("root_run_id") != root_run_id:
            return None
        return int(info.size or 0)

    async def read(self, artifact_id: str) -> bytes:
        result = await self.store.get(artifact_id)
        return bytes(result.data or b"")


def owner_of(description: str | None) -> dict[str, Any]:
    """The ``{run_id, root_run_id}`` an artifact was stored with (empty for an object without one)."""
    try:
        value = json.loads(description or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
