"""Inline artifact content (ckp.md §4.12) in the JetStream object store ``lo_artifacts`` (≤ 50 MiB each)."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import ObjectStoreConfig, StorageType
from nats.js.errors import BadObjectMetaError, BadRequestError, NotFoundError, ObjectDeletedError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from ckp_core.events import ErrorObject
from langorch_runtime.errors import StepError

BUCKET = "lo_artifacts"
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

    async def put(self, artifact_id: str, spec: dict[str, Any]) -> tuple[str, int]:
        try:
            data = base64.b64decode(str(spec.get("content_base64") or ""), validate=True)
        except (binascii.Error, ValueError):
            raise StepError(ErrorObject(code="agent_protocol_error", message="artifact content_base64 is not "
                                        "valid base64", details={"name": spec.get("name")})) from None
        if len(data) > MAX_BYTES:
            raise StepError(ErrorObject(code="agent_protocol_error", message=f"artifact of {len(data)} bytes is "
                                        f"larger than {MAX_BYTES}", details={"name": spec.get("name")}))
        await self.store.put(artifact_id, data)
        return f"lo-artifact://{artifact_id}", len(data)

    async def size(self, artifact_id: str) -> int | None:
        """The stored size of an artifact; None when there is none of that id (or it was deleted)."""
        try:
            info = await self.store.get_info(artifact_id)
        except (NotFoundError, ObjectNotFoundError, ObjectDeletedError, BadObjectMetaError):
            return None
        return int(info.size or 0)

    async def read(self, artifact_id: str) -> bytes:
        result = await self.store.get(artifact_id)
        return bytes(result.data or b"")
