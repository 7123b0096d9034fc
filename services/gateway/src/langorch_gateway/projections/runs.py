"""The ``runs`` projection (api.md §5.1): one row per run.

Its ``status`` and ``waiting_on`` are the run aggregate's own rule, :func:`ckp_core.runs.effect` (the same effect
the runtime folds), so the projected status never disagrees with the writer's. Every event of the run after
``run_created`` updates the row in one ``UPDATE`` guarded by the row's ``seq`` (a redelivered or older event
changes nothing): the status and wait it leaves, plus the columns its class sets (:data:`COLUMNS`). An artifact
leaves the row alone, and ``run_deleted`` removes it.
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


class RunUpdate:
    """The ``SET`` clauses of one event's update of its run's row ($1 run id, $2 time, $3 seq, $4 position)."""

    def __init__(self, rec: Recorded) -> None:
        self.sets = ["updated_at = $2", "seq = $3", "position = $4"]
        self.args: list[Any] = [rec.aggregate_id, rec.at, rec.seq, rec.position]

    def put(self, column: str, value: Any, cast: str = "") -> None:
        """``column`` takes ``value`` (a parameter)."""
        self.args.append(value)
        self.sets.append(f"{column} = ${len(self.args)}{cast}")

    def add(self, column: str, value: Any) -> None:
        """``column`` grows by ``value`` (a parameter, so every event of the class shares one statement)."""
        self.args.append(value)
        self.sets.append(f"{column} = {column} + ${len(self.args)}")

    def clause(self, sql: str) -> None:
        """A ``SET`` clause as it is (``$2`` is the event's time)."""
        self.sets.append(sql)

    def status(self, change: runs.Effect) -> None:
        """The status and ``waiting_on`` an event leaves (a resume changes the status from some statuses only)."""
        if change.status is not None and change.only_from is None:
            self.put("status", change.status)
        elif change.status is not None and change.only_from is not None:
            self.args.extend([list(change.only_from), change.status])
            self.clause(f"status = CASE WHEN status = ANY(${len(self.args) - 1}::text[]) THEN ${len(self.args)}::text "
                        "ELSE status END")
        if change.waiting == "set":
            self.put("waiting_on", to_json(change.waiting_on), "::jsonb")
        elif change.waiting == "clear":
            self.clause("waiting_on = NULL")

    async def execute(self, conn: Conn) -> None:
        await conn.execute(f"UPDATE runs SET {', '.join(self.sets)} WHERE run_id = $1 AND seq < $3",  # noqa: S608
                           *self.args)


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
    update.clause("started_at = COALESCE(started_at, $2)")


@COLUMNS.register
def llm_usage(update: RunUpdate, event: LlmUsage) -> None:
    update.add("total_prompt_tokens", int(event.prompt_tokens))
    update.add("total_completion_tokens", int(event.completion_tokens))
    update.add("estimated_cost_usd", float(event.estimated_cost_usd or 0.0))


@COLUMNS.register
def cancel_requested(update: RunUpdate, event: RunCancelRequested) -> None:
    update.clause("cancel_requested_at = COALESCE(cancel_requested_at, $2)")


@COLUMNS.register
def canceled(update: RunUpdate, event: RunCanceled) -> None:
    update.clause("ended_at = $2")


@COLUMNS.register
def retry_requested(update: RunUpdate, event: RunRetryRequested) -> None:
    update.put("error", None)
    update.clause("ended_at = NULL")
    update.clause("retry_count = retry_count + 1")


@COLUMNS.register
def node_started(update: RunUpdate, event: NodeStarted) -> None:
    update.put("last_node_id", event.node_id)


@COLUMNS.register
def step_started(update: RunUpdate, event: StepStarted) -> None:
    update.put("last_step_id", event.step_id)


@COLUMNS.register
def completed(update: RunUpdate, event: RunCompleted) -> None:
    update.put("output_vars", to_json(event.outputs), "::jsonb")
    update.clause("ended_at = $2")


@COLUMNS.register
def failed(update: RunUpdate, event: RunFailed) -> None:
    update.put("output_vars", to_json(event.outputs), "::jsonb")
    update.put("error", to_json(event.error.model_dump(mode="json", exclude_unset=True)), "::jsonb")
    update.clause("ended_at = $2")
