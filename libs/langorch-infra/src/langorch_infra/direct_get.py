"""Reading a bounded range of a stream in one request: JetStream's batch direct get (nats-server ≥ 2.11, streams with
``allow_direct``), which nats-py does not wrap.

A read of an aggregate's history through a consumer costs two JetStream API round trips (create, delete) and, on a
replicated stream, a proposal through the cluster's meta leader for each. A batch direct get is one request answered
by a stream of messages ending with a ``204 EOB`` status message, served by any replica of the stream. Since a
follower replica may lag behind the leader, :func:`read_range` is given the position the caller must reach (read
from the leader) and answers ``None`` when the replica that answered stopped short of it, or anything unexpected
happened, so that the caller reads through a consumer instead: never a shorter history.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import nats

from ckp_core.events import EventEnvelope
from ckp_core.eventstore import StoredEvent

log = logging.getLogger(__name__)

BATCH = 1_000
"""Messages asked for per request (the range is read in several requests when it holds more)."""
REPLY_TIMEOUT_S = 5.0
"""The longest wait for the next message of an answer before giving up (and reading through a consumer)."""


async def read_range(nc: Any, stream: str, subject_filter: str, after_position: int,
                     until_position: int) -> list[StoredEvent] | None:
    """The messages of ``stream`` on ``subject_filter`` after stream position ``after_position`` up to and including
    ``until_position``, decoded as events; ``None`` when the answer did not reach ``until_position`` (a lagging
    replica, a server without batch direct get, a timeout): the caller then reads another way."""
    out: list[StoredEvent] = []
    start = after_position + 1
    try:
        while start <= until_position:
            batch = await _batch(nc, stream, subject_filter, start)
            if not batch:
                break
            out.extend(e for e in batch if e.position <= until_position)
            start = batch[-1].position + 1
    except (nats.errors.Error, OSError, TimeoutError, ValueError, KeyError) as exc:
        log.debug("batch direct get on %s failed (%s): reading through a consumer", subject_filter, exc)
        return None
    if not out or out[-1].position != until_position:
        return None
    return out


async def _batch(nc: Any, stream: str, subject_filter: str, start: int) -> list[StoredEvent]:
    """One batch direct get from ``start``: its messages until the end-of-batch status (none when nothing is left);
    raises ``ValueError`` on any other status."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        request = {"seq": start, "next_by_subj": subject_filter, "batch": BATCH}
        await nc.publish(f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=inbox)
        out: list[StoredEvent] = []
        while True:
            msg = await sub.next_msg(timeout=REPLY_TIMEOUT_S)
            headers = msg.headers or {}
            status = headers.get("Status")
            if status == "204":  # end of this batch
                return out
            if status == "404":  # nothing (more) on the subject from ``start``
                return out
            if status is not None:
                raise ValueError(f"direct get answered {status} {headers.get('Description', '')}".strip())
            out.append(StoredEvent(EventEnvelope.model_validate_json(msg.data), int(headers["Nats-Sequence"])))
    finally:
        try:
            await sub.unsubscribe()
        except (nats.errors.Error, OSError):  # the connection may be closed or draining already
            log.debug("unsubscribe after a direct get failed", exc_info=True)
