"""Two more views of a run (api.md §17): a checkpoint's state, and the run's LLM usage.

* **Checkpoint state** (``/ui/runs/{id}/checkpoints/{checkpoint_id}``, operators, as the API): ``GET
  /api/runs/{id}/checkpoints/{checkpoint_id}`` shown as the API returns it — redacted by the API, values above the
  size bound replaced by its truncation marker — with the run's variables and its frames (where each path of the
  run stands: the node it is at, the node in progress, the nodes visited) read out of the LangGraph channels, and
  every other channel as JSON. Each read is audited by the API (``checkpoint_viewed``).
* **LLM usage** (``/ui/runs/{id}/usage``): the run's ``llm_usage`` events (``GET /api/runs/{id}/events`` filtered
  by type) — one row per completed call with model, tokens in and out, cost and latency — summed per step, and
  the run's own totals (``RunOut``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from langorch_gateway.ui import routes
from langorch_gateway.ui.console import Console, page, path_id

router = APIRouter(include_in_schema=False)

LARGEST_VALUE = 1_048_576  # the API's largest max_value_bytes
KNOWN_CHANNELS = ("vars", "frames")  # shown apart; every other channel as JSON


@router.get("/ui/runs/{run_id}/checkpoints/{checkpoint_id}")
async def checkpoint_page(request: Request, run_id: str, checkpoint_id: str) -> Response:
    """One checkpoint's state (``?checkpoint_ns=`` for a subgraph's, ``?max_value_bytes=`` for larger values)."""
    query = request.query_params

    async def build(ui: Console) -> Response:
        view = await routes._run_view(ui, run_id)  # the run's summary, as on its other tabs
        params = {"checkpoint_ns": query.get("checkpoint_ns", ""), "max_value_bytes": query.get("max_value_bytes")}
        detail = await ui.get(f"/api/runs/{path_id(run_id)}/checkpoints/{path_id(checkpoint_id)}", params)
        values = detail.get("channel_values") or {}
        frames = values.get("frames")
        return ui.render("checkpoint.html", **view, tab="checkpoints", cp=detail, variables=values.get("vars"),
                         frames=frames if isinstance(frames, dict) else None, largest=LARGEST_VALUE,
                         others={k: v for k, v in values.items() if k not in KNOWN_CHANNELS},
                         title=f"Run {run_id}: checkpoint {checkpoint_id}")

    return await page(request, build, needs="operator")


@dataclass
class StepUsage:
    """The LLM calls of one step (node and step id)."""

    node_id: str
    step_id: str
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    unpriced: int = 0  # calls of a model without prices: their cost is unknown, not zero
    models: tuple[str, ...] = ()

    def add(self, usage: dict[str, Any]) -> None:
        self.calls += 1
        self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        self.completion_tokens += int(usage.get("completion_tokens") or 0)
        cost = usage.get("estimated_cost_usd")
        if cost is None:
            self.unpriced += 1
        else:
            self.cost_usd += float(cost)
        model = str(usage.get("model") or "")
        if model and model not in self.models:
            self.models = (*self.models, model)


def per_step(events: list[dict[str, Any]]) -> list[StepUsage]:
    """``llm_usage`` events summed per step, in the order the steps first called a model."""
    steps: dict[tuple[str, str], StepUsage] = {}
    for e in events:
        key = (e.get("node_id") or "", e.get("step_id") or "")
        steps.setdefault(key, StepUsage(*key)).add(e.get("payload") or {})
    return list(steps.values())


@router.get("/ui/runs/{run_id}/usage")
async def usage_page(request: Request, run_id: str) -> Response:
    """The run's LLM calls, per step and one by one."""

    async def build(ui: Console) -> Response:
        view = await routes._run_view(ui, run_id)  # the run's summary, as on its other tabs
        calls = await routes._run_events(ui, run_id, event_type="llm_usage")
        return ui.render("usage.html", **view, tab="usage", calls=calls, steps=per_step(calls),
                         title=f"Run {run_id}: LLM usage")

    return await page(request, build)
