"""LangOrch's NATS interface on FastStream (api.md §16): the durable command consumers, the events services publish,
the ``lo.ext.>`` intake, and the AsyncAPI document generated from those declarations.

A :class:`Consumer` describes one durable JetStream pull consumer: its name, stream, filter subjects, ack wait and
the message model of each subject it takes. :class:`Subscription` declares it on a FastStream :class:`NatsBroker`
(a pull subscriber bound to that durable; created with the same configuration when missing, so an existing
state directory keeps working) with one handler per subject, typed by the subject's pydantic model; a message of
any other subject is terminated. A service attaches its functions with
:meth:`Subscription.handle`; :func:`interface_broker` declares the same consumers (and the event publishers) on a
broker that never connects, for the AsyncAPI document the gateway serves.

Messages are handled one at a time, in order (one message per fetch), as before. Every message goes through
:class:`BusSettlement`, which keeps the bus metrics and trace context of :mod:`langorch_infra.bus`: a handler
that returns acks the message (``ack_sync``: the server confirms it before the next fetch); FastStream's
``NackMessage(delay=…)`` naks it, ``RejectMessage()`` terminates it; any other exception is logged and naks it
after 2 s. FastStream's own acknowledgement is off (``AckPolicy.MANUAL``): it acks without waiting for the
server, which a crash right after a handled command must not lose. The fetch loop is FastStream's; it survives
``TimeoutError``, ``ConnectionClosedError`` and ``ServiceUnavailableError`` of a fetch (a server failover), and
its task supervisor restarts it after any other error (and after nats-py's own fetch deadline, which it does not
recognise: :class:`_FetchDeadlineRestart` keeps that restart out of the error log).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, cast

from faststream import BaseMiddleware
from faststream.exceptions import AckMessage, NackMessage, RejectMessage, SubscriberNotFound
from faststream.message import StreamMessage
from faststream.middlewares import AckPolicy
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.nats.subscriber.usecases import LogicSubscriber
from faststream.specification import AsyncAPI
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy as ConsumerAckPolicy
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import BaseModel, Field, create_model

from ckp_core import commands, runs
from ckp_core.errors import ConcurrencyError
from ckp_core.events import EVENT_TYPES, EventData, EventEnvelope
from ckp_core.events import approval as approval_events
from ckp_core.events import run as run_events
from ckp_core.subjects import COMMAND_STREAM, EVENT_STREAM, EXTERNAL_STREAM, command_subject, subject_matches
from langorch_infra import tracing
from langorch_infra.bus import ACK, TERM, BusMetrics, Settle, nak, settle, subject_template
from langorch_infra.nats_auth import broker_security, nats_servers

if TYPE_CHECKING:
    from langorch_infra.settings import CommonSettings

log = logging.getLogger(__name__)
faststream_log = logging.getLogger("langorch.faststream")
nats_log = logging.getLogger("nats.aio.client")
"""FastStream's own log: its per-message lines at DEBUG; its INFO lines (a task callback per subscriber at every
stop) say nothing an operator needs, so only its warnings and errors (a consume task restarted) are kept."""
faststream_log.setLevel(logging.WARNING)


class _FetchDeadlineRestart(logging.Filter):
    """Drops FastStream's "raised an exception, retrying" error when the exception is nats-py's fetch deadline.

    FastStream's fetch loop suppresses ``nats.errors.TimeoutError``, but nats-py's ``_fetch_n`` raises the builtin
    ``TimeoutError`` when the server's "no messages" answer to its first pull request arrives at the fetch's
    deadline — on an idle consumer, about once in a while at the end of a ``FETCH_TIMEOUT_S`` wait. The loop's task
    then ends, and FastStream's supervisor starts it again at once: what suppressing it would have done. Only its
    ERROR line, with a traceback, would remain, telling an operator about a failure that is none."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if type(exc) is not TimeoutError or "raised an exception, retrying" not in record.getMessage():
            return True
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        return tb is None or tb.tb_frame.f_code.co_name != "_fetch_n"


faststream_log.addFilter(_FetchDeadlineRestart())


class _HandlerStopped(logging.Filter):
    """Drops FastStream's error record of a handler that ended with ``CancelledError``: its consumer was stopped
    (a service stopping cancels the handlers in progress). Its message was not acknowledged and comes back after the
    ack wait, here or on another replica, so nothing failed; FastStream logged each such handler at ERROR with a
    traceback, one per handler cut off by every stop under load."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, asyncio.CancelledError)


faststream_log.addFilter(_HandlerStopped())

FETCH_TIMEOUT_S = 5.0
Handler = Callable[[Any], Awaitable[None]]


# -- settling and metrics ----------------------------------------------------------------------------------------


class BusSettlement:
    """The broker middleware of every LangOrch consumer: a consumer span whose parent is the trace context of the
    message headers (api.md §1.3), the message settled by the handler's outcome, and the bus metrics of api.md
    §13.1 (``langorch_bus_messages_total``, ``langorch_bus_handler_duration_seconds``)."""

    def __init__(self, metrics: BusMetrics | None) -> None:
        self.metrics = metrics

    def __call__(self, msg: Any, /, *, context: Any) -> _Settling:
        return _Settling(msg, context=context, metrics=self.metrics)


class _Settling(BaseMiddleware):
    def __init__(self, msg: Any, /, *, context: Any, metrics: BusMetrics | None) -> None:
        super().__init__(msg, context=context)
        self.metrics = metrics

    async def consume_scope(self, call_next: Callable[[Any], Awaitable[Any]], msg: StreamMessage[Any]) -> Any:
        raw = cast(Msg, msg.raw_message)
        started = time.monotonic()
        try:
            how = await self._outcome(call_next, msg, raw)
        except asyncio.CancelledError:
            raise
        except Exception:  # the handler boundary: any failure is logged and redelivered, never ends the consumer
            log.exception("handling %s failed; it will be redelivered", raw.subject)
            how = nak(2.0)
        try:
            await settle(raw, how)
        except asyncio.CancelledError:
            raise
        except Exception:  # a settle lost with the connection: JetStream redelivers after the ack wait
            log.warning("settling %s (%s) failed; it will be redelivered", raw.subject, how.outcome, exc_info=True)
        if self.metrics is not None:
            self.metrics.observe(raw.subject, how.outcome, time.monotonic() - started)
        return None

    async def after_processed(self, exc_type: type[BaseException] | None = None,
                              exc_val: BaseException | None = None, exc_tb: TracebackType | None = None) -> bool:
        """A message of a subject no handler takes (FastStream's ``SubscriberNotFound``) is terminated."""
        if not isinstance(exc_val, SubscriberNotFound):
            return False
        raw = cast(Msg, self.msg)
        log.error("unknown message %s dropped", raw.subject)
        try:
            await settle(raw, TERM)
        except Exception:  # as above: the message is redelivered
            log.warning("terminating %s failed; it will be redelivered", raw.subject, exc_info=True)
        if self.metrics is not None:
            self.metrics.observe(raw.subject, "term", 0.0)
        return True

    @staticmethod
    async def _outcome(call_next: Callable[[Any], Awaitable[Any]], msg: StreamMessage[Any], raw: Msg) -> Settle:
        with tracing.consumer_span(subject_template(raw.subject), raw.headers):
            try:
                await call_next(msg)
            except AckMessage:
                return ACK
            except NackMessage as outcome:
                return nak(outcome.extra_options.get("delay"))
            except RejectMessage:
                return TERM
        return ACK


def broker(url: str, name: str, metrics: BusMetrics | None, settings: CommonSettings | None = None) -> NatsBroker:
    """A broker on ``url`` (one or several comma-separated seed servers) whose connection (``await
    broker.connect()``) is also the service's nats-py client for event appends, KV and ordered replay; reconnects
    for ever, like :func:`langorch_infra.jetstream.connect`, and authenticates as ``settings``' NATS credential
    and TLS settings say."""
    return NatsBroker(nats_servers(url), name=name, security=broker_security(settings), connect_timeout=5,
                      max_reconnect_attempts=-1, reconnect_time_wait=cast(int, 0.5), ack_policy=AckPolicy.MANUAL,
                      error_cb=_connection_error,
                      middlewares=(BusSettlement(metrics),), logger=faststream_log,
                      log_level=logging.DEBUG, graceful_timeout=None, specification_url=url,
                      description="LangOrch's NATS interface")


async def _connection_error(err: Exception) -> None:
    """Every connection error on the logger nats-py itself uses, as its own default callback does: FastStream's
    wrapper logs nothing until the first connection, so a service waiting for NATS would print nothing (the CLI
    turns these records into one line naming the server)."""
    nats_log.error("nats: encountered error", exc_info=err)


async def connect(b: NatsBroker) -> NATS:
    """Connect ``b`` (once) and return its nats-py client."""
    return await b.connect()


# -- consumers ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Consumer:
    """One durable JetStream pull consumer and the message model of each subject it takes."""

    durable: str
    stream: str
    filter_subjects: tuple[str, ...]
    messages: Mapping[str, type[BaseModel]]
    description: str
    ack_wait_s: float = 30
    deliver_all: bool = False
    max_ack_pending: int | None = None
    """1: one message in flight across every replica, so the stream's order holds (None: the server's default)."""
    batch_size: int = 1
    """Messages one replica fetches at once and handles concurrently (FastStream decides a fetched batch in a task
    group). 1 keeps one replica's messages in order; more lets independent aggregates' commands overlap."""
    owner: str = ""
    documented_only: bool = field(default=False, compare=False)
    """Declared for the AsyncAPI document only: its service consumes it with nats-py (the runtime's)."""

    def config(self, ack_wait_s: float | None = None) -> ConsumerConfig:
        """The consumer's configuration. A single filter is the subscriber's subject, which nats-py sets as
        ``filter_subject`` when it creates the consumer (as the services always created it)."""
        return ConsumerConfig(
            durable_name=self.durable, ack_policy=ConsumerAckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_s if ack_wait_s is None else ack_wait_s,
            deliver_policy=DeliverPolicy.ALL if self.deliver_all else None, max_ack_pending=self.max_ack_pending,
            filter_subjects=list(self.filter_subjects) if len(self.filter_subjects) > 1 else None)

    @property
    def subject(self) -> str:
        """The subscriber's subject: the single filter, or none when the consumer has several filters."""
        return self.filter_subjects[0] if len(self.filter_subjects) == 1 else ""


def command_subject_of(command: type[commands.Command]) -> str:
    """``lo.cmd.<aggregate>.<verb>`` of a command type."""
    return command_subject(command.AGGREGATE, command.VERB)


def _commands(*types: type[commands.Command]) -> dict[str, type[BaseModel]]:
    return {command_subject_of(t): t for t in types}


PROCEDURE_COMMANDS = Consumer(
    "compiler", COMMAND_STREAM, ("lo.cmd.procedure.>",),
    _commands(commands.ImportProcedure, commands.ReplaceProcedure, commands.DeleteProcedureVersion,
              commands.SetProcedureStatus, commands.PromoteProcedure, commands.RollbackProcedure),
    "Procedure commands, decided by the compiler (owner of the procedure aggregate): each ends in one "
    "procedure_* event or command_rejected on lo.evt.procedure.<procedure_id>.", owner="compiler")
APPROVAL_COMMANDS = Consumer(
    "approvals", COMMAND_STREAM, ("lo.cmd.approval.>",),
    _commands(commands.RequestApproval, commands.DecideApproval),
    "Approval commands, decided by the approvals service: approval_requested, approval_decided (then "
    "lo.cmd.run.resume) or command_rejected on lo.evt.approval.<approval_id>.", owner="approvals")
TRIGGER_COMMANDS = Consumer(
    "triggers", COMMAND_STREAM, ("lo.cmd.trigger.>",),
    _commands(commands.UpsertTrigger, commands.DeleteTrigger, commands.EnableTrigger, commands.DisableTrigger,
              commands.FireTrigger),
    "Trigger commands, decided by the triggers service (owner of the trigger aggregate): trigger_registered, "
    "trigger_updated, trigger_deleted, trigger_enabled, trigger_disabled, trigger_fired (after the run's "
    "lo.cmd.run.create) or trigger_fire_skipped, or command_rejected, on lo.evt.trigger.<trigger_id>.",
    batch_size=16, owner="triggers")  # the fires of one cron slot (or a burst of webhooks) are decided together
AGENT_COMMANDS = Consumer(
    "runtime-agents", COMMAND_STREAM, ("lo.cmd.agent.>", "lo.cmd.lease.>"),
    _commands(commands.RegisterAgent, commands.UpdateAgent, commands.RemoveAgent, commands.ReleaseLease),
    "Agent and lease commands, decided by the runtime: agent_* events, lease_force_released or "
    "command_rejected on lo.evt.agent.<agent_id> / lo.evt.lease.<lease_id>.", owner="runtime")
RUN_COMMANDS = Consumer(
    "runtime", COMMAND_STREAM,
    tuple(command_subject_of(t) for t in (commands.StartRun, commands.ResumeRun, commands.RetryRun,
                                          commands.CancelRun, commands.DeleteRun)),
    _commands(commands.StartRun, commands.ResumeRun, commands.RetryRun, commands.CancelRun, commands.DeleteRun),
    "Run commands, executed by the runtime: a start, resume or retry is acknowledged only when the run ends or "
    "suspends (progress signals keep it while it runs); run events on lo.evt.run.<run_id>.", owner="runtime",
    documented_only=True)
RUN_CREATIONS = Consumer(
    "runtime-create", COMMAND_STREAM, (command_subject_of(commands.CreateRun),), _commands(commands.CreateRun),
    "Run creations, decided by the runtime (the run's single writer): run_created then lo.cmd.run.start, or "
    "command_rejected, on lo.evt.run.<run_id>.", owner="runtime", documented_only=True)


def _event_envelope(data: type[EventData]) -> type[BaseModel]:
    """The wire form of one event type: the event envelope whose ``type`` and ``data`` are that type's."""
    name = f"{data.__name__}Event"
    model = create_model(name, __base__=EventEnvelope, __doc__=f"``{data.TYPE}`` in its envelope.",
                         type=(Literal[data.TYPE], Field(...)), data=(data, Field(...)))  # type: ignore[arg-type]
    return cast(type[BaseModel], model)


RUN_ENDS = Consumer(
    "approvals_run_ends", EVENT_STREAM, tuple(f"lo.evt.run.*.{t}" for t in runs.END_EVENTS),
    {f"lo.evt.run.*.{t}": _event_envelope(EVENT_TYPES[t]) for t in runs.END_EVENTS},
    "Run ends, read by the approvals service: the pending approvals of a run that ended are canceled "
    "(approval_canceled).", deliver_all=True, owner="approvals")
RUN_SLOT_EVENTS = ("run_created", "run_retry_requested", *runs.END_EVENTS)
RUN_SLOTS = Consumer(
    "triggers_run_slots", EVENT_STREAM, tuple(f"lo.evt.run.*.{t}" for t in RUN_SLOT_EVENTS),
    {f"lo.evt.run.*.{t}": _event_envelope(EVENT_TYPES[t]) for t in RUN_SLOT_EVENTS},
    "Run starts and ends, read by the triggers service: the concurrency slots of each procedure hold its runs "
    "that have not ended (a creation or a retry takes one, an end releases it), in stream order.",
    deliver_all=True, max_ack_pending=1, owner="triggers")
ACTIVATION_EVENTS = ("procedure_status_changed", "procedure_promoted", "procedure_rolled_back")
PROCEDURE_ACTIVATIONS = Consumer(
    "triggers_sync", EVENT_STREAM, tuple(f"lo.evt.procedure.*.{t}" for t in ACTIVATION_EVENTS),
    {f"lo.evt.procedure.*.{t}": _event_envelope(EVENT_TYPES[t]) for t in ACTIVATION_EVENTS},
    "Procedure lifecycle events that change which versions are active, read by the triggers service: a version "
    "that became active gets the source:ckp registration its document's trigger block asks for "
    "(trigger_registered, trigger_updated or trigger_deleted).", deliver_all=True, owner="triggers")


class ExternalEvent(BaseModel):
    """Any JSON object an external system publishes under ``lo.ext.>``, ideally with a ``Nats-Msg-Id`` header for
    dedupe; an ``event`` trigger whose ``event_source`` names the subject starts a run with it (a payload that is
    not a JSON object is taken too: api.md §10.4)."""

    model_config = {"extra": "allow"}


EXTERNAL_EVENTS = Consumer(
    "triggers_events", EXTERNAL_STREAM, ("lo.ext.>",), {"lo.ext.>": ExternalEvent},
    "The intake of external events (stream LO_EXT, kept 7 days), read by the triggers service: each message "
    "fires every enabled event trigger of an active version whose event_source matches its subject "
    "(trigger_fired after the run's lo.cmd.run.create, or trigger_fire_skipped), and is acked once every fire is "
    "decided; at a trigger's max_concurrent_runs it is redelivered later.", owner="triggers",
    documented_only=True)
CONSUMERS = (PROCEDURE_COMMANDS, APPROVAL_COMMANDS, AGENT_COMMANDS, RUN_COMMANDS, RUN_CREATIONS, RUN_ENDS,
             TRIGGER_COMMANDS, RUN_SLOTS, PROCEDURE_ACTIVATIONS, EXTERNAL_EVENTS)


class Subscription:
    """A :class:`Consumer` declared on a broker: one typed handler per subject, dispatched by subject."""

    def __init__(self, b: NatsBroker, consumer: Consumer, *, ack_wait_s: float | None = None,
                 conflicts_nak: bool = True) -> None:
        """``conflicts_nak``: a ``ConcurrencyError`` of a function naks its message without delay (another writer
        of the aggregate landed first: the redelivery decides again); otherwise it is an error like any other."""
        self.consumer = consumer
        self.conflicts_nak = conflicts_nak
        self.functions: dict[str, Handler] = {}
        self.subscriber: LogicSubscriber[Any] = b.subscriber(
            consumer.subject, stream=JStream(consumer.stream, declare=False), durable=consumer.durable,
            config=consumer.config(ack_wait_s),
            pull_sub=PullSub(batch_size=consumer.batch_size, timeout=FETCH_TIMEOUT_S),
            title=consumer.durable, description=consumer.description)
        for subject, model in consumer.messages.items():
            self.subscriber(filter=self._is(subject))(self._typed(subject, model))

    @staticmethod
    def _is(subject: str) -> Callable[[StreamMessage[Any]], Awaitable[bool]]:
        async def matches(msg: StreamMessage[Any]) -> bool:
            return subject_matches(subject, cast(Msg, msg.raw_message).subject)
        return matches

    def _typed(self, subject: str, model: type[BaseModel]) -> Callable[..., Awaitable[None]]:
        async def handle(body: Any) -> None:
            function = self.functions.get(subject)
            if function is None:
                log.error("no handler for %s in this process; the message is left to another replica", subject)
                raise NackMessage(delay=5.0)
            try:
                await function(body)
            except ConcurrencyError:
                if not self.conflicts_nak:
                    raise
                # another writer of the aggregate landed first: decide again on redelivery
                raise NackMessage(delay=None) from None

        handle.__annotations__ = {"body": model, "return": None}
        handle.__name__ = f"on_{subject.rsplit('.', 1)[-1]}"
        handle.__doc__ = model.__doc__
        return handle

    def handle(self, functions: Mapping[str, Handler]) -> Subscription:
        """Attach the service's function of each subject (every subject of the consumer, and no other)."""
        if set(functions) != set(self.consumer.messages):
            raise ValueError(f"{self.consumer.durable} takes {sorted(self.consumer.messages)}, "
                             f"not {sorted(functions)}")
        self.functions = dict(functions)
        return self

    @property
    def pull(self) -> Any:
        """The nats-py pull subscription once the broker started (``consumer_info()``)."""
        return getattr(self.subscriber, "subscription", None)


async def start_consuming(b: NatsBroker) -> None:
    """Start ``b``'s subscribers (its connection is already open), on durable consumers as declared
    (:func:`declare_consumers`).

    A cancellation of the calling task while FastStream starts the subscribers can be swallowed on the way (the
    start then returns as if nothing happened, and a service went on to wait for its inner tasks for ever, its
    stop hanging): a cancellation requested meanwhile is raised here."""
    await declare_consumers(b)
    await b.start()
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


DRIFT_FIELDS = ("ack_policy", "ack_wait", "deliver_policy", "filter_subject", "filter_subjects", "max_ack_pending")


async def declare_consumers(b: NatsBroker) -> None:
    """Bring every durable consumer of ``b``'s subscribers that exists with another configuration to the declared
    one. nats-py's pull subscribe (FastStream's) creates a missing durable but binds to an existing one as it is,
    so a changed ack wait or filter (a new release, a hand edit) would never apply and nothing would say so; a
    difference the server cannot update fails the start."""
    js = (await b.connect()).jetstream()
    declared = {c.durable: c for c in CONSUMERS}
    for sub in b.subscribers:
        config = getattr(sub, "config", None)
        consumer = declared.get(getattr(config, "durable_name", None) or "")
        if consumer is None or not isinstance(config, ConsumerConfig):
            continue
        want = replace(config, filter_subject=consumer.subject or None)
        try:
            have = (await js.consumer_info(consumer.stream, consumer.durable)).config
        except NotFoundError:
            continue  # the subscriber creates it as declared
        drift = {f: (getattr(have, f), getattr(want, f)) for f in DRIFT_FIELDS
                 if getattr(want, f) is not None and getattr(have, f) != getattr(want, f)}
        if drift:
            log.warning("consumer %s on %s differs from its declaration (field: (found, declared)) %s; updating it",
                        consumer.durable, consumer.stream, drift)
            await js.add_consumer(consumer.stream, want)


async def stop_consuming(b: NatsBroker) -> None:
    """Stop ``b``'s subscribers and leave its connection open (a service still releases locks through it)."""
    for sub in list(b.subscribers):
        try:
            await sub.stop()
        except asyncio.CancelledError:
            raise
        except Exception:  # stopping: one subscriber's failure must not keep the others running
            log.warning("stopping a subscriber failed", exc_info=True)


async def close(b: NatsBroker, nc: NATS | None) -> None:
    """Stop ``b``'s subscribers and close its connection ``nc`` at once. Not ``b.stop()``: it drains the
    connection, which waits for every subscription (an ordered replay, a pending fetch) up to 30 s, and a
    stopping replica must leave within its stop budget."""
    await stop_consuming(b)
    if nc is not None:
        await nc.close()


# -- the AsyncAPI document ------------------------------------------------------------------------------------------


PUBLISHED_EVENTS: Mapping[str, tuple[type[EventData], ...]] = {
    "run": run_events.EVENTS,
    # the approvals service opens an approval aggregate with the payload the runtime records on the run
    "approval": (run_events.ApprovalRequested, *approval_events.EVENTS),
}
"""The events documented as published, by aggregate (``lo.evt.<aggregate>.<id>.<type>``)."""


def _declare_events(b: NatsBroker) -> None:
    for aggregate, types in PUBLISHED_EVENTS.items():
        for data in sorted(types, key=lambda t: t.TYPE):
            b.publisher(f"lo.evt.{aggregate}.*.{data.TYPE}", stream=JStream(EVENT_STREAM, declare=False),
                        schema=_event_envelope(data), title=f"{aggregate}.{data.TYPE}",
                        description=(data.__doc__ or data.TYPE).strip())


def interface_broker(url: str = "nats://localhost:4222") -> NatsBroker:
    """LangOrch's NATS interface as one broker that is never connected: every command consumer, the run and
    approval events, the ``lo.ext.>`` intake."""
    b = broker(url, "langorch-interface", None)
    for consumer in CONSUMERS:
        Subscription(b, consumer)
    _declare_events(b)
    return b


def asyncapi_document(version: str, url: str = "nats://localhost:4222") -> dict[str, Any]:
    """The AsyncAPI 3.0 document of LangOrch's NATS interface, generated by FastStream from the declarations
    above (``url`` is the server it names)."""
    spec = AsyncAPI(interface_broker(url), title="LangOrch NATS interface", version=version,
                    description="Commands (lo.cmd.*; internal: only LangOrch services publish them), run and "
                    "approval events (lo.evt.<aggregate>.<id>.<type>, each in the event envelope; the id token is "
                    "the aggregate id, encoded to be token-safe) and the lo.ext.> intake of external events.",
                    schema_version="3.0.0")
    return cast(dict[str, Any], spec.to_specification().to_jsonable())
