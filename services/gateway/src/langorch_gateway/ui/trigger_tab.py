"""A version's **Trigger** tab (api.md §17, §10): the registration, its create-or-replace form with the API's
per-field errors, enable and disable, delete, a manual fire with the inputs form of the start-run form, the fires
history and, for a webhook, the intake URL with a signing example.

Like every page, it reads and writes only through the public API (``/api/triggers/{procedure_id}/{version}``…).
The form holds text; numbers and the static inputs are read here only as far as a text box needs (an integer, a
JSON object), and the API validates the rest per trigger type and names the failing field.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from langorch_gateway.ui import forms
from langorch_gateway.ui.console import Console, form_errors, page, path_id, problem_of

router = APIRouter(include_in_schema=False)

TRIGGER_TYPES = ("webhook", "scheduled", "event", "file_watch")
TEXT_FIELDS = ("schedule", "timezone", "webhook_secret", "signature_scheme", "event_source")
NUMBER_FIELDS = ("dedupe_window_seconds", "max_concurrent_runs")
ACTIONS = ("enable", "disable", "fire", "delete")
FIRES_PAGE = 20


def registration_body(form: dict[str, str]) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The API's ``TriggerIn`` from the submitted form, and the fields a text box could not hold (not an integer,
    not a JSON object). Empty fields are left out: the API's defaults apply, or it names a missing field."""
    body: dict[str, Any] = {"trigger_type": form.get("trigger_type", ""), "enabled": form.get("enabled") == "on"}
    errors: dict[str, list[str]] = {}
    for name in TEXT_FIELDS:
        if form.get(name, "").strip():
            body[name] = form[name].strip()
    for name in NUMBER_FIELDS:
        raw = form.get(name, "").strip()
        if not raw:
            continue
        try:
            body[name] = int(raw)
        except ValueError:
            errors[name] = ["Must be a whole number"]
    raw_inputs = form.get("input_vars", "").strip()
    if raw_inputs:
        try:
            inputs = json.loads(raw_inputs)
        except ValueError as exc:
            errors["input_vars"] = [f"Must be valid JSON ({exc.args[0]})"]
        else:
            if isinstance(inputs, dict):
                body["input_vars"] = inputs
            else:
                errors["input_vars"] = ["Must be a JSON object (variable names to values)"]
    return body, errors


def form_of(trigger: dict[str, Any] | None) -> dict[str, str]:
    """The form's values for an existing registration (a new one: a webhook, enabled)."""
    if trigger is None:
        return {"trigger_type": "webhook", "enabled": "on"}
    values = {name: "" if trigger.get(name) is None else str(trigger[name]) for name in (*TEXT_FIELDS, *NUMBER_FIELDS)}
    values["trigger_type"] = trigger["trigger_type"]
    values["enabled"] = "on" if trigger["enabled"] else ""
    values["input_vars"] = json.dumps(trigger["input_vars"], indent=2) if trigger.get("input_vars") else ""
    values["revision"] = str(trigger["revision"])
    return values


def _base(procedure_id: str, version: str) -> str:
    return f"/ui/procedures/{path_id(procedure_id)}/{path_id(version)}/trigger"


async def _tab(ui: Console, procedure_id: str, version: str, status_code: int = 200, **shown: Any) -> Response:
    pid, ver = path_id(procedure_id), path_id(version)
    detail = await ui.get(f"/api/procedures/{pid}/{ver}")
    answer = await ui.api.get(f"/api/triggers/{pid}/{ver}")
    trigger = answer.json() if answer.status_code == 200 else None
    if answer.status_code not in (200, 404):
        return ui.render("error.html", answer.status_code, problem=problem_of(answer))
    fires = await ui.get(f"/api/triggers/{pid}/{ver}/fires", {"limit": FIRES_PAGE}) if trigger else None
    shown.setdefault("values", form_of(trigger))
    return ui.render("trigger.html", status_code, detail=detail, trigger=trigger, fires=fires,
                     fields=forms.fields_of(detail.get("variables_schema")), trigger_types=TRIGGER_TYPES,
                     tab="trigger", title=f"{procedure_id} {version}: trigger", **shown)


@router.get("/ui/procedures/{procedure_id}/{version}/trigger")
async def trigger_tab(request: Request, procedure_id: str, version: str) -> Response:
    """The version's trigger registration and what can be done with it."""

    async def build(ui: Console) -> Response:
        return await _tab(ui, procedure_id, version)

    return await page(request, build)


@router.post("/ui/procedures/{procedure_id}/{version}/trigger")
async def save_trigger(request: Request, procedure_id: str, version: str) -> Response:
    """Create or replace the registration (``POST /api/triggers/{id}/{version}``); a replace carries the revision
    the form was read at as ``If-Match``, so a change made meanwhile is refused (412) rather than overwritten."""
    form = {k: v for k, v in (await request.form()).multi_items() if isinstance(v, str)}

    async def build(ui: Console) -> Response:
        body, errors = registration_body(form)
        if errors:
            return await _tab(ui, procedure_id, version, 422, values=form, errors=errors)
        headers = {"X-CSRF-Token": form.get("csrf_token", "")}
        if form.get("revision", "").isdigit():
            headers["If-Match"] = f'"{form["revision"]}"'
        answer = await ui.api.post(f"/api/triggers/{path_id(procedure_id)}/{path_id(version)}", json=body,
                                   headers=headers)
        if answer.status_code in (200, 201):
            return RedirectResponse(f"{_base(procedure_id, version)}?saved=1", status_code=303)
        problem = problem_of(answer)
        return await _tab(ui, procedure_id, version, answer.status_code, values=form, save_problem=problem,
                          errors=form_errors(problem))

    return await page(request, build, needs="operator")


@router.post("/ui/procedures/{procedure_id}/{version}/trigger/{action}")
async def trigger_action(request: Request, procedure_id: str, version: str, action: str) -> Response:
    """Enable, disable, delete, or fire the registration once with the inputs of the form (a manual fire: the run
    is created when the API answers, and the page leads to it)."""
    form = {k: v for k, v in (await request.form()).multi_items() if isinstance(v, str)}

    async def build(ui: Console) -> Response:
        if action not in ACTIONS:
            return ui.render("error.html", 404, problem={"status": 404, "code": "not_found", "title": "Not found",
                                                         "detail": f"no trigger action '{action}'"})
        path = f"/api/triggers/{path_id(procedure_id)}/{path_id(version)}"
        csrf = form.get("csrf_token")
        if action == "delete":
            answer = await ui.send("DELETE", path, csrf=csrf)
        elif action == "fire":
            detail = await ui.get(f"/api/procedures/{path_id(procedure_id)}/{path_id(version)}")
            inputs, errors = forms.input_vars(forms.fields_of(detail.get("variables_schema")), form)
            if errors:
                return await _tab(ui, procedure_id, version, 422, fire_errors=errors, submitted=form)
            answer = await ui.send("POST", f"{path}/fire", {"input_vars": inputs}, csrf=csrf)
        else:
            answer = await ui.send("POST", f"{path}/{action}", csrf=csrf)
        if answer.status_code >= 400:
            problem = problem_of(answer)
            if action == "fire":
                return await _tab(ui, procedure_id, version, answer.status_code, fire_problem=problem,
                                  fire_errors=form_errors(problem), submitted=form)
            return await _tab(ui, procedure_id, version, answer.status_code, action_problem=problem)
        if action == "fire" and answer.status_code == 202 and answer.json().get("run_id"):
            return RedirectResponse(f"{_base(procedure_id, version)}?fired={path_id(answer.json()['run_id'])}",
                                    status_code=303)
        return RedirectResponse(f"{_base(procedure_id, version)}?done={action}", status_code=303)

    return await page(request, build, needs="operator")
