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

A dead replica's runs are taken over without waiting for their commands' ack wait: each replica publishes, on
``lo.runtime.held.<owner id>`` (core NATS, at most every ``HELD_PUBLISH_S`` when it changes and every
``SNAPSHOT_S`` anyway), the runs it holds with their keys' revisions and their commands' ack subjects, and the ack
subjects of the commands whose run it is taking (sent back only: no key is theirs yet). Every
replica keeps the others' lists and asks each owner that holds runs whether it is there, every ``WATCH_S``. An owner
that has had no responders for ``GONE_AFTER_S`` (two questions at the least) is gone: its keys are deleted,
revision-checked (one replica wins each), and the winner sends the command a negative acknowledgement on its ack
subject, so JetStream hands it to a replica with a free slot at once, which takes the released key. Right after this
replica's own reconnection (``QUIET_AFTER_RECONNECT_S``) nothing is taken this way: the others may be reconnecting
too.

The run consumer's short ack wait (``LANGORCH_ACK_WAIT_S``, the owner signals progress every third of it) remains
the way back for what the lists miss (a run taken a moment before the crash, a replica started after the dead one
last published); the answer of its presence on NATS is then what lets the live one take it at once instead of
waiting for a lease to expire.

An owner that was taken for dead although alive (cut off from NATS for longer than the grace) finds out before its
next side effect: :meth:`RunOwnership.fence`, called before a step's ``started`` record, reads the key again after
every reconnection and raises :class:`OwnershipLost` when it changed hands. Its appends are fenced by the event
store's expected positions anyway: the new owner's ``execution_recovered`` makes its next append a conflict.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Iterator
from functools import partial
from typing import Any

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
from langorch_infra.cancel import cancel_and_wait, stop_if_cancelled
from langorch_infra.jetstream import reconnects, through_blips

log = logging.getLogger(__name__)

OWNER_SUBJECT = "lo.runtime.owner"
HELD_SUBJECT = "lo.runtime.held"  # .<owner id>: the runs an owner holds (see the module)
ASK_TIMEOUT_S = 1.0  # an owner that does not answer within this is alive but slow: the run stays its
GRACE_S = 1.0  # between the two unanswered questions before an owner is taken for dead
RECONNECT_GRACE_S = 3.0  # the same, while this replica's own connection was re-established less than this ago
HELD_HERE_DELAY_S = 0.25  # redelivery delay of a command whose run this replica executes already
HELD_ELSEWHERE_DELAY_S = 0.5  # redelivery delay of a command whose run another live replica executes
ALIVE_CACHE_S = 2.0  # how long an owner that answered is taken for alive without asking again
PATIENCE_S = 60.0  # the fence's read of the key is tried again for this long while NATS is unavailable
HELD_PUBLISH_S = 0.05  # the held runs are published at most this often when they change
SNAPSHOT_S = 5.0  # and this often anyway (for a replica that started since)
WATCH_S = 0.5  # how often the owners of runs listed by others are asked whether they are there
GONE_AFTER_S = 1.0  # an owner with no responders for this long (asked twice at the least) is gone
QUIET_AFTER_RECONNECT_S = 5.0  # no runs are taken from silent owners this long after this replica reconnected


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
        self.acks: dict[str, str] = {}  # run id → the ack subject of the command executing it here
        self.acquiring: set[str] = set()  # ack subjects of the commands whose run this replica is taking now
        self.peers: dict[str, dict[str, tuple[int, str]]] = {}  # other owner → run id → (revision, ack subject)
        self.peer_acquiring: dict[str, list[str]] = {}  # other owner → ack subjects of the commands it is taking
        self.silent_since: dict[str, float] = {}  # other owner → when it first had no responders (loop time)
        self.taken_over = 0  # runs whose commands this replica sent back for a gone owner
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._subs: list[Any] = []
        self._reconnects = 0

    async def start(self) -> None:
        self.kv = await self.js.key_value(LOCKS_BUCKET)
        self._reconnects = reconnects(self.js)
        self._subs = [await self.nc.subscribe(f"{OWNER_SUBJECT}.{self.owner_id}", cb=self._answer),
                      await self.nc.subscribe(f"{HELD_SUBJECT}.*", cb=self._listed)]
        self._tasks = [asyncio.create_task(self._publish_held(), name="runtime-held-runs"),
                       asyncio.create_task(self._watch_owners(), name="runtime-owner-watch")]

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        for sub in self._subs:
            with contextlib.suppress(NatsError, OSError):  # the connection may be closed already
                await sub.unsubscribe()
        self._tasks, self._subs = [], []

    async def _listed(self, msg: Msg) -> None:
        """Another owner's list of the runs it holds (replaces what was known of it)."""
        owner = msg.subject[len(HELD_SUBJECT) + 1:]
        if owner == self.owner_id or owner in self.gone_owners:
            return
        try:
            listed = json.loads(msg.data)
            held = {str(run): (int(rev), str(ack)) for run, (rev, ack) in listed["held"].items()}
            acquiring = [str(ack) for ack in listed["acquiring"]]
        except (ValueError, TypeError, KeyError, AttributeError):
            log.debug("an unreadable list of held runs from %s", owner, exc_info=True)
            return
        self.peers[owner], self.peer_acquiring[owner] = held, acquiring
        if not held and not acquiring:
            self.peers.pop(owner, None)
            self.peer_acquiring.pop(owner, None)
            self.silent_since.pop(owner, None)

    async def _publish_held(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), SNAPSHOT_S)
            stop_if_cancelled()  # wait_for drops a cancellation that meets a change (CI: a runtime's stop hung)
            self._changed.clear()
            held = {run: [revision, self.acks.get(run, "")] for run, revision in self.held.items()}
            listed = {"held": held, "acquiring": sorted(self.acquiring)}
            with contextlib.suppress(NatsError, OSError):  # the next change or snapshot publishes it again
                await self.nc.publish(f"{HELD_SUBJECT}.{self.owner_id}", json.dumps(listed).encode())
            await asyncio.sleep(HELD_PUBLISH_S)

    async def _watch_owners(self) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            stop_if_cancelled()
            try:
                await self.check_owners()
            except asyncio.CancelledError:
                raise
            except Exception:  # the watch must outlive any failure: the ack wait brings the commands back anyway
                log.warning("watching the owners of runs failed", exc_info=True)

    async def check_owners(self) -> None:
        """Ask every other owner that holds runs whether it is there; take the runs of one gone for
        ``GONE_AFTER_S`` (see the module)."""
        quiet = self._since_reconnect() < QUIET_AFTER_RECONNECT_S
        owners = [owner for owner in self.peers if self.peers[owner] or self.peer_acquiring.get(owner)]
        if not owners or not self.nc.is_connected:
            return
        answers = await asyncio.gather(*(self._ping(owner) for owner in owners))
        now = asyncio.get_running_loop().time()
        for owner, there in zip(owners, answers, strict=True):
            if there is None:  # no answer either way (this replica's connection)
                continue
            if there:
                self.silent_since.pop(owner, None)
                continue
            since = self.silent_since.setdefault(owner, now)
            if now - since >= GONE_AFTER_S and not quiet:
                await self._take_from(owner)

    async def _ping(self, owner: str) -> bool | None:
        """True: the owner answered or is slow; False: no responders (gone from NATS); None: not known."""
        try:
            await self.nc.request(f"{OWNER_SUBJECT}.{owner}", b"", timeout=ASK_TIMEOUT_S)
        except NoRespondersError:
            return False
        except (NatsTimeoutError, TimeoutError):
            return True
        except (NatsError, OSError):
            return None
        return True

    async def _take_from(self, owner: str) -> None:
        """``owner`` is gone: release each of its keys (revision-checked) and send its command back at once."""
        assert self.kv is not None
        self.gone_owners.add(owner)
        self.silent_since.pop(owner, None)
        held = self.peers.pop(owner, {})
        acquiring = self.peer_acquiring.pop(owner, [])
        log.info("runtime %s is gone from NATS; taking over the %d runs it held", owner, len(held))
        for ack in acquiring:  # commands it was taking a run for: no key of its own yet, so only sent back
            with contextlib.suppress(NatsError, OSError):  # the ack wait brings it back anyway
                await self.nc.publish(ack, b"-NAK")
        for run_id, (revision, ack) in sorted(held.items()):
            try:
                await self.kv.delete(owner_key(run_id), last=revision)
            except (NatsError, OSError):  # released, taken by another replica, or NATS unavailable: not this one's
                log.debug("run %s: its key changed hands", run_id, exc_info=True)
                continue
            if ack:
                with contextlib.suppress(NatsError, OSError):  # the ack wait brings it back anyway
                    await self.nc.publish(ack, b"-NAK")
            self.taken_over += 1
            log.info("run %s: its owner %s is gone, its command is delivered again now", run_id, owner)

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

    async def acquire(self, run_id: str, ack: str | None = None) -> None:
        """Own ``run_id`` or raise :class:`RunHeld`; ``ack``: the ack subject of the command (see the module)."""
        if run_id in self.held:
            raise RunHeld(run_id, self.owner_id, HELD_HERE_DELAY_S)
        with self.taking(ack):  # listed while the run is taken (asking its owner may take a second or two)
            await self._acquire(run_id, ack)

    @contextlib.contextmanager
    def taking(self, ack: str | None) -> Iterator[None]:
        """List ``ack`` (a command's ack subject) among the commands this replica is working on without a key of
        theirs, for the block: should the replica be lost meanwhile, another one sends the command back at once.
        For the run creation too, whose commands hold no key."""
        if not ack:
            yield
            return
        self.acquiring.add(ack)
        self._changed.set()
        try:
            yield
        finally:
            self.acquiring.discard(ack)
            self._changed.set()

    async def _acquire(self, run_id: str, ack: str | None) -> None:
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
        if ack:
            self.acks[run_id] = ack

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
        self.acks.pop(run_id, None)
        self._changed.set()
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
