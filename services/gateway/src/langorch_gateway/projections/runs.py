"""The ``runs`` projection (api.md §5.1): one row per run.

Its ``status`` and ``waiting_on`` are the run aggregate's own rule, :func:`ckp_core.runs.effect` (the same effect
the runtime folds), so the projected status never disagrees with the writer's. Every event of the run after
``run_created`` updates the row in one ``UPDATE`` guarded by the row's ``seq`` (a redelivered or older event
changes nothing): the status and wait it leaves, plus the columns its class sets (:data:`COLUMNS`). That
``UPDATE`` is one statement for every event (:data:`UPDATE`, parameters saying what changes), so the projector
sends a batch's run updates in one round trip. An artifact leaves the row alone, and ``run_deleted`` removes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ckp_core import runs
from ckp_core.events import (
    ArtifactCreated,
    ExecutionStarted,
    LlmUsage,
    NodeStarted,
    RunCanceled,
    RunCancelRequested,
    RunCompleted,
    RunCreated,
    RunDeleted,
    RunFailed,
    RunRetryRequested,
    StepStarted,
)
from langorch_gateway.projections.base import ByEventClass, Conn, Projection, Recorded, to_json

PROJECTION = Projection("runs", "run", ("runs",))


SET_COLUMNS = {"last_node_id": "text", "last_step_id": "text", "output_vars": "jsonb", "error": "jsonb"}
"""The columns an event may set to a value, and their types."""
TIME_COLUMNS = ("started_at", "cancel_requested_at", "ended_at")
"""The columns an event may set to its time (``at``), to its time when still empty (``first``), or clear."""
SUM_COLUMNS = {"retry_count": "integer", "total_prompt_tokens": "bigint", "total_completion_tokens": "bigint",
               "estimated_cost_usd": "double precision"}
"""The columns an event may add to, and their types."""


def _update() -> str:
    sets = ["updated_at = $2", "seq = $3", "position = $4",
            "status = CASE WHEN $5::text IS NULL THEN status WHEN $6::text[] IS NULL OR status = ANY($6::text[]) "
            "THEN $5::text ELSE status END",
            "waiting_on = CASE $7::text WHEN 'set' THEN $8::jsonb WHEN 'clear' THEN NULL ELSE waiting_on END"]
    n = 9  # $9: the SET_COLUMNS the event sets
    for column, type_ in SET_COLUMNS.items():
        n += 1
        sets.append(f"{column} = CASE WHEN '{column}' = ANY($9::text[]) THEN ${n}::{type_} ELSE {column} END")
    for column in TIME_COLUMNS:
        n += 1
        sets.append(f"{column} = CASE ${n}::text WHEN 'at' THEN $2 WHEN 'first' THEN COALESCE({column}, $2) "
                    f"WHEN 'clear' THEN NULL ELSE {column} END")
    for column, type_ in SUM_COLUMNS.items():
        n += 1
        sets.append(f"{column} = CASE WHEN ${n}::{type_} IS NULL THEN {column} ELSE {column} + ${n}::{type_} END")
    return f"UPDATE runs SET {', '.join(sets)} WHERE run_id = $1 AND seq < $3"  # noqa: S608


UPDATE = _update()
"""The one statement of every event's update of its run's row, whatever it changes (so a batch of the projector
sends its runs' updates together): $1 run id, $2 the event's time, $3 its seq, $4 its position, then what changes
(:meth:`RunUpdate.parameters`); a column the event does not change keeps its value."""


class RunUpdate:
    """What one event changes on its run's row: the parameters of :data:`UPDATE`."""

    def __init__(self, rec: Recorded) -> None:
        self.rec = rec
        self.status_to: str | None = None
        self.status_from: list[str] | None = None
        self.waiting: str | None = None
        self.waiting_on: str | None = None
        self.values: dict[str, Any] = {}
        self.times: dict[str, str] = {}
        self.sums: dict[str, int | float] = {}

    def put(self, column: str, value: Any) -> None:
        """``column`` (one of :data:`SET_COLUMNS`; a ``jsonb`` one takes JSON text) takes ``value``."""
        if column not in SET_COLUMNS:
            raise ValueError(f"runs.{column} is not set by events")
        self.values[column] = value

    def at(self, column: str, how: str = "at") -> None:
        """``column`` (one of :data:`TIME_COLUMNS`) takes the event's time (``first``: only when still empty)."""
        if column not in TIME_COLUMNS:
            raise ValueError(f"runs.{column} is not a time events set")
        self.times[column] = how

    def clear(self, column: str) -> None:
        """``column`` (one of :data:`TIME_COLUMNS`) becomes NULL."""
        self.at(column, "clear")

    def add(self, column: str, value: int | float) -> None:
        """``column`` (one of :data:`SUM_COLUMNS`) grows by ``value``."""
        if column not in SUM_COLUMNS:
            raise ValueError(f"runs.{column} is not a sum of events")
        self.sums[column] = value

    def status(self, change: runs.Effect) -> None:
        """The status and ``waiting_on`` an event leaves (a resume changes the status from some statuses only)."""
        self.status_to = change.status
        self.status_from = list(change.only_from) if change.only_from is not None else None
        if change.waiting == "set":
            self.waiting, self.waiting_on = "set", to_json(change.waiting_on)
        elif change.waiting == "clear":
            self.waiting = "clear"

    def parameters(self) -> tuple[Any, ...]:
        rec = self.rec
        return (rec.aggregate_id, rec.at, rec.seq, rec.position, self.status_to, self.status_from, self.waiting,
                self.waiting_on, list(self.values), *(self.values.get(c) for c in SET_COLUMNS),
                *(self.times.get(c) for c in TIME_COLUMNS), *(self.sums.get(c) for c in SUM_COLUMNS))

    async def execute(self, conn: Conn) -> None:
        await conn.execute(UPDATE, *self.parameters())


COLUMNS: ByEventClass[Callable[[RunUpdate, Any], None]] = ByEventClass()
"""What each event class sets on the run's row besides status and wait."""


@PROJECTION.handles
async def created(conn: Conn, event: RunCreated, rec: Recorded) -> None:
    await conn.execute(
        """INSERT INTO runs (run_id, procedure_id, procedure_version, release_channel, status, input_vars,
             trigger_type, triggered_by, created_by, project_id, parent_run_id, parent_node_id, root_run_id,
             rerun_of, created_at, updated_at, seq, position)
           VALUES ($1,$2,$3,$4,$17,$5::jsonb,$6,$7,$8,$9,$10,$11,$12,$13,$14,$14,$15,$16)
           ON CONFLICT (run_id) DO NOTHING""",
        rec.aggregate_id, event.procedure_id, event.procedure_version, event.release_channel,
        to_json(event.input_vars), event.trigger_type, event.triggered_by, rec.actor, event.project_id,
        event.parent_run_id, event.parent_node_id, event.root_run_id or rec.aggregate_id, event.rerun_of, rec.at,
        rec.seq, rec.position, runs.INITIAL_STATUS,
    )


@PROJECTION.handles
async def deleted(conn: Conn, event: RunDeleted, rec: Recorded) -> None:
    await conn.execute("DELETE FROM runs WHERE run_id = $1", rec.aggregate_id)


@PROJECTION.handles
async def artifact(conn: Conn, event: ArtifactCreated, rec: Recorded) -> None:
    """An artifact is its own projection's (``run_artifacts``); the run's row, ``seq`` included, stays."""


@PROJECTION.otherwise
async def changed(conn: Conn, event: Any, rec: Recorded) -> None:
    update = RunUpdate(rec)
    update.status(runs.effect(rec.envelope.type, rec.envelope.data))
    columns = COLUMNS.get(event)
    if columns is not None:
        columns(update, event)
    await update.execute(conn)


@COLUMNS.register
def started(update: RunUpdate, event: ExecutionStarted) -> None:
    update.at("started_at", "first")


@COLUMNS.register
def llm_usage(update: RunUpdate, event: LlmUsage) -> None:
    update.add("total_prompt_tokens", int(event.prompt_tokens))
    update.add("total_completion_tokens", int(event.completion_tokens))
    update.add("estimated_cost_usd", float(event.estimated_cost_usd or 0.0))


@COLUMNS.register
def cancel_requested(update: RunUpdate, event: RunCancelRequested) -> None:
    update.at("cancel_requested_at", "first")


@COLUMNS.register
def canceled(update: RunUpdate, event: RunCanceled) -> None:
    update.at("ended_at")


@COLUMNS.register
def retry_requested(update: RunUpdate, event: RunRetryRequested) -> None:
    update.put("error", None)
    update.clear("ended_at")
    update.add("retry_count", 1)


@COLUMNS.register
def node_started(update: RunUpdate, event: NodeStarted) -> None:
    update.put("last_node_id", event.node_id)


@COLUMNS.register
def step_started(update: RunUpdate, event: StepStarted) -> None:
    update.put("last_step_id", event.step_id)


@COLUMNS.register
def completed(update: RunUpdate, event: RunCompleted) -> None:
    update.put("output_vars", to_json(event.outputs))
    update.at("ended_at")


@COLUMNS.register
def failed(update: RunUpdate, event: RunFailed) -> None:
    update.put("output_vars", to_json(event.outputs))
    update.put("error", to_json(event.error.model_dump(mode="json", exclude_unset=True)))
    update.at("ended_at")
