"""Run ownership: which runtime replica executes a run now, and how another one takes a dead replica's runs over.

A replica executing a run (a start, resume or retry command) owns it: KV ``lo_locks`` key ``run.<run_id>`` holds
the owner's id, written conditionally on the key's revision, and deleted (revision-checked) when the command is
settled. Each replica answers on ``lo.runtime.owner.<owner id>`` (core NATS) whether it holds a given run.

A replica that receives a command of a run owned by another replica asks that owner:

* it answers that it holds the run: the command is redelivered a moment later (the run is executed once);
* it answers that it does not (a key left behind by a delete lost in a NATS blip): the key is taken over;
* nobody answers (no responders: its connection is gone, which the server knows at once after a crash) twice, a
  grace apart (longer when this replica itself reconnected a moment ago, so that a replica reconnecting after a
  NATS restart is not taken for dead): the key is taken over, revision-checked, so only one taker wins;
* the question times out (the owner is alive but slow): the run is left to it.

The run consumer's short ack wait (``LANGORCH_ACK_WAIT_S``, the owner signals progress every third of it) is what
brings a dead replica's command to a live one; the answer of its presence on NATS is what lets the live one take
it at once instead of waiting for a lease to expire.

An owner that was taken for dead although alive (cut off from NATS for longer than the grace) finds out before its
next side effect: :meth:`RunOwnership.fence`, called before a step's ``started`` record, reads the key again after
every reconnection and raises :class:`OwnershipLost` when it changed hands. Its appends are fenced by the event
store's expected positions anyway: the new owner's ``execution_recovered`` makes its next append a conflict.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from functools import partial

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from ckp_core.errors import ConcurrencyError
from ckp_core.events import format_time, utc_now
from ckp_core.subjects import LOCKS_BUCKET
from langorch_infra.jetstream import reconnects, through_blips

log = logging.getLogger(__name__)

OWNER_SUBJECT = "lo.runtime.owner"
ASK_TIMEOUT_S = 1.0  # an owner that does not answer within this is alive but slow: the run stays its
GRACE_S = 1.0  # between the two unanswered questions before an owner is taken for dead
RECONNECT_GRACE_S = 3.0  # the same, while this replica's own connection was re-established less than this ago
HELD_HERE_DELAY_S = 0.25  # redelivery delay of a command whose run this replica executes already
HELD_ELSEWHERE_DELAY_S = 0.5  # redelivery delay of a command whose run another live replica executes
ALIVE_CACHE_S = 2.0  # how long an owner that answered is taken for alive without asking again
PATIENCE_S = 60.0  # the fence's read of the key is tried again for this long while NATS is unavailable


def owner_key(run_id: str) -> str:
    return f"run.{run_id}"


class RunHeld(Exception):
    """The run is executed by another command now (on this replica or a live other one): redeliver later."""

    def __init__(self, run_id: str, owner: str, delay_s: float) -> None:
        super().__init__(f"run {run_id} is executed by {owner}")
        self.delay_s = delay_s


class OwnershipLost(ConcurrencyError):
    """Another replica took the run over: this one stops executing it."""


class RunOwnership:
    """The runs one replica owns (see the module)."""

    def __init__(self, nc: NATS, js: JetStreamContext, instance: str) -> None:
        self.nc = nc
        self.js = js
        self.owner_id = f"{instance}-{uuid.uuid4().hex[:8]}"  # unique per start: a restarted replica is another
        self.held: dict[str, int] = {}  # run id → revision of its key written by this replica
        self.checked: dict[str, int] = {}  # run id → reconnection count when its key was last read
        self.kv: KeyValue | None = None
        self.reconnected_at = -RECONNECT_GRACE_S
        self.gone_owners: set[str] = set()  # owner ids found gone from NATS (an id is never used again)
        self.alive_owners: dict[str, float] = {}  # owner id → when it last answered (loop time)
        self._reconnects = 0

    async def start(self) -> None:
        self.kv = await self.js.key_value(LOCKS_BUCKET)
        self._reconnects = reconnects(self.js)
        await self.nc.subscribe(f"{OWNER_SUBJECT}.{self.owner_id}", cb=self._answer)

    async def _answer(self, msg: Msg) -> None:
        try:
            await msg.respond(b"1" if msg.data.decode() in self.held else b"0")
        except (NatsError, OSError):  # the asker's question times out: it leaves the run to this replica
            log.debug("answering an ownership question failed", exc_info=True)

    def _since_reconnect(self) -> float:
        now = asyncio.get_running_loop().time()
        count = reconnects(self.js)
        if count != self._reconnects:
            self._reconnects, self.reconnected_at = count, now
        return now - self.reconnected_at

    async def acquire(self, run_id: str) -> None:
        """Own ``run_id`` or raise :class:`RunHeld`."""
        if run_id in self.held:
            raise RunHeld(run_id, self.owner_id, HELD_HERE_DELAY_S)
        assert self.kv is not None, "RunOwnership.start() first"
        key = owner_key(run_id)
        owner: str | None = None
        try:
            entry = await self.kv.get(key)
            revision = int(entry.revision or 0)
            owner = str(json.loads(entry.value or b"{}").get("owner") or "") or None
        except (KeyNotFoundError, KeyDeletedError) as missing:  # never owned, or released: over its marker
            revision = int(getattr(getattr(missing, "entry", None), "revision", 0) or 0)
        if owner is not None and owner != self.owner_id and await self._holds(owner, run_id):
            raise RunHeld(run_id, owner, HELD_ELSEWHERE_DELAY_S)
        if run_id in self.held:  # another command of the run took it here while the owner was asked
            raise RunHeld(run_id, self.owner_id, HELD_HERE_DELAY_S)
        value = json.dumps({"owner": self.owner_id, "since": format_time(utc_now())}).encode()
        try:
            written = await self.kv.update(key, value, last=revision)
        except KeyWrongLastSequenceError:  # another replica took it meanwhile
            raise RunHeld(run_id, "another replica", HELD_ELSEWHERE_DELAY_S) from None
        if owner is not None and owner != self.owner_id:
            log.info("run %s taken over from %s", run_id, owner)
        self.held[run_id] = written
        self.checked[run_id] = reconnects(self.js)

    async def _holds(self, owner: str, run_id: str) -> bool:
        """Whether the replica ``owner`` says it executes ``run_id`` (see the module for an owner that is silent)."""
        for ask in (1, 2):
            try:
                reply = await self.nc.request(f"{OWNER_SUBJECT}.{owner}", run_id.encode(), timeout=ASK_TIMEOUT_S)
            except NoRespondersError:
                if ask == 2:
                    self.gone_owners.add(owner)
                    return False
                await asyncio.sleep(GRACE_S if self._since_reconnect() >= RECONNECT_GRACE_S else RECONNECT_GRACE_S)
                continue
            except (NatsTimeoutError, TimeoutError):
                return True
            return reply.data == b"1"
        raise AssertionError("unreachable")  # pragma: no cover

    async def gone(self, owner: str) -> bool:
        """Whether the replica ``owner`` is gone from NATS (asked as for a run; a gone owner id never comes back,
        and a live answer is trusted for ``ALIVE_CACHE_S``). For what a dead replica held besides its runs: the
        agent lease slots of its calls in flight, which would otherwise stay taken until their TTL."""
        if owner == self.owner_id:
            return False
        if owner in self.gone_owners:
            return True
        now = asyncio.get_running_loop().time()
        if now - self.alive_owners.get(owner, -ALIVE_CACHE_S) < ALIVE_CACHE_S:
            return False
        await self._holds(owner, "")
        if owner in self.gone_owners:
            return True
        self.alive_owners[owner] = now
        return False

    async def release(self, run_id: str) -> None:
        """Stop owning ``run_id``; a delete lost with the connection leaves the key, which the next owner takes
        over after this replica answers that it no longer holds the run."""
        revision = self.held.pop(run_id, None)
        self.checked.pop(run_id, None)
        if revision is None or self.kv is None:
            return
        try:
            await self.kv.delete(owner_key(run_id), last=revision)
        except (NatsError, OSError):  # changed hands, or NATS unavailable: the next owner takes the key over
            log.debug("releasing run %s failed", run_id, exc_info=True)

    async def fence(self, run_id: str) -> None:
        """Raise :class:`OwnershipLost` when another replica took ``run_id`` over. Costs nothing until this
        replica's connection was re-established since the key was last read (only then can it have been taken
        for dead)."""
        revision = self.held.get(run_id)
        count = reconnects(self.js)
        if revision is None or self.kv is None or self.checked.get(run_id) == count:
            return
        try:
            entry = await through_blips(f"owner of run {run_id}", partial(self.kv.get, owner_key(run_id)), PATIENCE_S)
            current = int(entry.revision or 0)
        except KeyNotFoundError:
            current = 0
        if current != revision:
            self.held.pop(run_id, None)
            raise OwnershipLost(f"run {run_id} was taken over by another replica", details={"run_id": run_id})
        self.checked[run_id] = count
