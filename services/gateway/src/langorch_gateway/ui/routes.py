"""The console's pages under ``/ui`` (api.md §17): sign-in, dashboard, runs (with bulk cancel and delete, and the
admins' history cleanup), run (with its graph, timeline, replay and other views; rerun with edited inputs),
procedures (with import), procedure, version (start-run form, graph, lifecycle, a draft's source), version
comparison, approvals inbox and approval, and the lists of :mod:`.catalogue` with their row actions. A version's
trigger and explain tabs are :mod:`.trigger_tab` and :mod:`.version_tabs`.

Pages are server-rendered; every read and every action goes through the public API (:mod:`.console`). A list's
filters and paging live in the URL query, so a filtered list is a link one can share. Actions post plain forms
back to the console, which sends them on to the API and answers with a redirect (success) or the page again with
the API's problem (refusal) — the pages work without JavaScript; htmx only keeps the run page and the inbox live.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl, quote_plus, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from ckp_core import runs
from langorch_gateway.ui import catalogue, forms, graph, replay, textdiff, timeline
from langorch_gateway.ui.console import (
    ApiFailure,
    Console,
    api_client,
    cross_site,
    form_errors,
    page,
    path_id,
    problem_of,
    render,
    safe_next,
)

router = APIRouter(include_in_schema=False)

RUN_STATUSES = runs.STATUSES
TRIGGER_TYPES = ("api", "manual", "scheduled", "webhook", "event", "file_watch", "subflow")
PAGE_SIZES = (25, 50, 100, 200)
RUNS_PAGE = 50
EVENTS_PAGE = 500  # the API's largest page: the timeline reads a long run in few requests
APPROVAL_STATUSES = ("pending", "approved", "rejected", "decided", "timed_out", "escalated", "canceled")
MAX_IMPORT_BYTES = 10 * 1024 * 1024  # as the API's import limit
MAX_BULK = 200  # runs one bulk action handles: a page of the largest size


def _see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


async def _form(request: Request) -> dict[str, str]:
    """The text fields of a posted form (a file field is read separately)."""
    return {k: v for k, v in (await request.form()).multi_items() if isinstance(v, str)}


# -- entry points and sign-in -------------------------------------------------------------------------------------


@router.get("/")
async def root() -> RedirectResponse:
    """The gateway's root opens the console."""
    return _see_other("/ui/")


@router.get("/ui")
async def ui_root() -> RedirectResponse:
    """The dashboard lives at /ui/ (api.md §17); /ui leads there."""
    return _see_other("/ui/")


@router.get("/ui/login")
async def login_page(request: Request, next: str | None = None) -> Response:
    """The sign-in form; a caller who is already signed in goes straight on."""
    async with api_client(request) as api:
        me = await api.get("/api/auth/me")
    if me.status_code == 200 and me.json().get("auth_enabled"):
        return _see_other(safe_next(next))
    return render(request, "login.html", next=safe_next(next),
                  auth_disabled=me.status_code == 200 and not me.json().get("auth_enabled"))


@router.post("/ui/login")
async def login(request: Request) -> Response:
    """Sign in through ``POST /api/auth/login`` with ``session: true`` and keep the cookies it sets."""
    form = await _form(request)
    target = safe_next(form.get("next"))
    if cross_site(request):
        return render(request, "login.html", 403, next=target, error="Sign in from this site's own page.")
    async with api_client(request) as api:
        answer = await api.post("/api/auth/login", json={"username": form.get("username", ""),
                                                         "password": form.get("password", ""), "session": True})
    if answer.status_code != 200:
        problem = problem_of(answer)
        message = {"invalid_credentials": "Wrong username or password.",
                   "too_many_login_attempts": f"Too many failed sign-ins. {problem.get('detail', '')}",
                   }.get(problem.get("code", ""), problem.get("detail") or "Sign-in failed.")
        return render(request, "login.html", answer.status_code, next=target, error=message,
                      username=form.get("username", ""))
    response = _see_other(target)
    for cookie in answer.headers.get_list("set-cookie"):
        response.headers.append("set-cookie", cookie)
    return response


@router.post("/ui/logout")
async def logout(request: Request) -> Response:
    """Sign out through ``POST /api/auth/logout`` (its cookie deletions are passed on)."""
    form = await _form(request)
    async with api_client(request) as api:
        answer = await api.post("/api/auth/logout", headers={"X-CSRF-Token": form.get("csrf_token", "")})
    if answer.status_code not in (204, 401):
        return render(request, "error.html", answer.status_code, problem=problem_of(answer))
    response = _see_other("/ui/login")
    for cookie in answer.headers.get_list("set-cookie"):
        response.headers.append("set-cookie", cookie)
    return response


# -- dashboard ----------------------------------------------------------------------------------------------------


@router.get("/ui/")
async def dashboard(request: Request) -> Response:
    """Runs by status, recent runs and pending approvals: where to look first."""

    async def build(ui: Console) -> Response:
        counts = {}
        for status in RUN_STATUSES:
            counts[status] = (await ui.get("/api/runs", {"status": status, "limit": 1}))["total"]
        recent = await ui.get("/api/runs", {"limit": 10, "top_level": "true"})
        pending = await ui.get("/api/approvals", {"status": "pending", "limit": 10, "sort": "created_at",
                                                  "order": "asc"})
        return ui.render("dashboard.html", counts=counts, recent=recent, pending=pending, title="Dashboard")

    return await page(request, build)


# -- runs ---------------------------------------------------------------------------------------------------------

RUN_FILTERS = ("procedure_id", "procedure_version", "project_id", "created_from", "created_to")


def _date_bound(value: str) -> str:
    """A date filter (``YYYY-MM-DD`` from a date input) as the RFC 3339 time the API wants; anything else as typed,
    so the API reports it."""
    return f"{value}T00:00:00Z" if len(value) == 10 and value[4] == "-" and value[7] == "-" else value


@router.get("/ui/runs")
async def runs_page(request: Request) -> Response:
    """The run list, filtered and paged by the server; the URL holds the whole view."""

    async def build(ui: Console) -> Response:
        return await _runs(ui)

    return await page(request, build)


async def _runs(ui: Console, **done: Any) -> Response:
    query = ui.request.query_params
    statuses = [s for s in query.getlist("status") if s]
    triggers = [t for t in query.getlist("trigger_type") if t]
    filters = {name: query.get(name, "").strip() for name in RUN_FILTERS}
    limit = _int(query.get("limit"), RUNS_PAGE)
    offset = _int(query.get("offset"), 0)
    params: dict[str, Any] = {name: value for name, value in filters.items() if value}
    for bound in ("created_from", "created_to"):
        if bound in params:
            params[bound] = _date_bound(params[bound])
    params |= {"status": ",".join(statuses) or None, "trigger_type": ",".join(triggers) or None,
               "limit": limit, "offset": offset}
    answer = await ui.api.get("/api/runs", params={k: v for k, v in params.items() if v not in (None, "")})
    if answer.status_code not in (200, 422):
        return ui.render("error.html", answer.status_code, problem=problem_of(answer))
    listing, errors = (answer.json(), {}) if answer.status_code == 200 else (None, form_errors(problem_of(answer)))
    return ui.render("runs.html", answer.status_code, listing=listing, errors=errors, statuses=statuses,
                     triggers=triggers, filters=filters, limit=limit, offset=offset, all_statuses=RUN_STATUSES,
                     all_triggers=TRIGGER_TYPES, page_sizes=PAGE_SIZES, pages=_pager(ui.request, listing),
                     title="Runs", **done)


@router.post("/ui/runs")
async def bulk_runs(request: Request) -> Response:
    """Cancel or delete the selected runs, one API call each; the list comes back (same filters, from the form's
    address) with what happened to each."""
    form = await request.form()
    chosen = [str(v) for v in form.getlist("run_id")][:MAX_BULK]
    action = str(form.get("action") or "")
    csrf = str(form.get("csrf_token") or "")

    async def build(ui: Console) -> Response:
        if action not in ("cancel", "delete"):
            return ui.render("error.html", 422, problem={"status": 422, "title": "Unknown action",
                                                         "detail": "choose cancel or delete"})
        outcomes = []
        for run_id in chosen:
            path = f"/api/runs/{path_id(run_id)}"
            answer = await (ui.send("DELETE", path, csrf=csrf) if action == "delete"
                            else ui.send("POST", f"{path}/cancel", {}, csrf=csrf))
            pending = answer.status_code == 202 and answer.json().get("status") == "pending"  # no outcome yet
            outcomes.append({"run_id": run_id, "ok": answer.status_code < 400, "pending": pending,
                             "detail": None if answer.status_code < 400 else problem_of(answer).get("detail")})
        return await _runs(ui, bulk_action=action, outcomes=outcomes)

    return await page(request, build, needs="operator")


def _int(raw: str | None, default: int) -> int:
    """A paging number from the URL (a wrong one falls back to the default; the API checks the range)."""
    return int(raw) if raw is not None and raw.isdigit() and len(raw) < 10 else default


def _pager(request: Request, listing: dict[str, Any] | None) -> dict[str, str | None]:
    """Links to the previous and next page, keeping every other query parameter."""
    if not listing:
        return {"previous": None, "next": None}
    limit, offset, total = listing["limit"], listing["offset"], listing["total"]

    def at(new_offset: int) -> str:
        items = [(k, v) for k, v in request.query_params.multi_items() if k != "offset"]
        items.append(("offset", str(new_offset)))
        return request.url.path + "?" + "&".join(f"{k}={quote_plus(v)}" for k, v in items)

    return {"previous": at(max(offset - limit, 0)) if offset > 0 else None,
            "next": at(offset + limit) if offset + limit < total else None}


async def _run_graph(ui: Console, run_id: str) -> dict[str, Any]:
    """The run's graph with its node statuses (``GET /api/runs/{id}/graph``), for ``_graph.html``."""
    view = await ui.get(f"/api/runs/{path_id(run_id)}/graph")
    return {"drawing": graph.drawing(view["graph"] or {}, view["node_status"]), "graph_id": "run-graph",
            "graph_label": f"Graph of {view['procedure_id']} {view['procedure_version']} with this run's node statuses",
            "graph_unavailable": view.get("graph_unavailable_reason"), "node_status": view["node_status"],
            "graph_node_href": f"/ui/runs/{path_id(run_id)}?node="}  # a node links to its events


async def _run_view(ui: Console, run_id: str) -> dict[str, Any]:
    run = await ui.get(f"/api/runs/{path_id(run_id)}")
    return {"run": run, "terminal": run["status"] in runs.TERMINAL_STATUSES,
            "retryable": run["status"] in runs.RETRYABLE_STATUSES}


@router.get("/ui/runs/cleanup")
async def cleanup_page(request: Request) -> Response:
    """History cleanup (admin): which terminal runs to delete, previewed before anything is deleted."""

    async def build(ui: Console) -> Response:
        return ui.render("cleanup.html", values={"statuses": list(runs.TERMINAL_STATUSES)},
                         terminal=runs.TERMINAL_STATUSES, title="Runs: history cleanup")

    return await page(request, build, needs="admin")


@router.post("/ui/runs/cleanup")
async def cleanup(request: Request) -> Response:
    """Preview (``dry_run``) or delete the terminal runs the form selects (``POST /api/runs/cleanup``); the API's
    per-field errors are shown at their fields."""
    submitted = await request.form()
    form = {k: v for k, v in submitted.multi_items() if isinstance(v, str)}
    statuses = [str(v) for v in submitted.getlist("statuses")]

    async def build(ui: Console) -> Response:
        body: dict[str, Any] = {"before": _date_bound(form.get("before", "").strip()), "statuses": statuses,
                                "dry_run": form.get("action") != "delete"}
        for name in ("procedure_id", "project_id"):
            if form.get(name, "").strip():
                body[name] = form[name].strip()
        if form.get("limit", "").strip():
            body["limit"] = _int(form["limit"].strip(), 0) or form["limit"]
        answer = await ui.send("POST", "/api/runs/cleanup", body, csrf=form.get("csrf_token"))
        values = form | {"statuses": statuses}
        if answer.status_code >= 400:
            problem = problem_of(answer)
            return ui.render("cleanup.html", answer.status_code, values=values, terminal=runs.TERMINAL_STATUSES,
                             problem=problem, errors=form_errors(problem), title="Runs: history cleanup")
        return ui.render("cleanup.html", values=values, terminal=runs.TERMINAL_STATUSES, outcome=answer.json(),
                         title="Runs: history cleanup")

    return await page(request, build, needs="admin")


async def _run_events(ui: Console, run_id: str, **filters: Any) -> list[dict[str, Any]]:
    """All the run's events so far (or those the events API's ``filters`` select), in order (``GET
    /api/runs/{id}/events``, page by page)."""
    events: list[dict[str, Any]] = []
    while True:
        chunk = await ui.get(f"/api/runs/{path_id(run_id)}/events",
                             {"limit": EVENTS_PAGE, "offset": len(events), **filters})
        events.extend(chunk["items"])
        if not chunk["items"] or len(events) >= chunk["total"]:
            return events


@router.get("/ui/runs/{run_id}")
async def run_page(request: Request, run_id: str) -> Response:
    """A run: header, actions by role, and its timeline (events read so far, then live over SSE), filtered by
    the URL's ``group`` and ``node`` (:mod:`.timeline`)."""

    async def build(ui: Console) -> Response:
        view = await _run_view(ui, run_id)
        shown = timeline.from_query(request.query_params)
        whole = await timeline.last_event(ui, run_id) if shown.active else None  # read before the history
        events = await _run_events(ui, run_id, **shown.api_params())
        last_seq, after = timeline.last_position(events, whole)
        return ui.render("run.html", **view, **await _run_graph(ui, run_id), events=events, after=after,
                         last_seq=last_seq, shown=shown, groups=timeline.GROUPS, title=f"Run {run_id}")

    return await page(request, build)


@router.get("/ui/runs/{run_id}/header")
async def run_header(request: Request, run_id: str) -> Response:
    """The run page's header alone: htmx refreshes it as the run's events arrive."""

    async def build(ui: Console) -> Response:
        return ui.render("run_header.html", **await _run_view(ui, run_id))

    return await page(request, build)


@router.get("/ui/runs/{run_id}/graph")
async def run_graph(request: Request, run_id: str) -> Response:
    """The run page's graph alone: htmx refreshes it as the run's events arrive."""

    async def build(ui: Console) -> Response:
        return ui.render("_graph.html", **await _run_graph(ui, run_id))

    return await page(request, build)


@router.get("/ui/runs/{run_id}/replay")
async def run_replay(request: Request, run_id: str) -> Response:
    """The run after its first ``at`` events (all of them by default): node statuses on the graph and the
    variables, rebuilt here from the events (:mod:`.replay`); a slider moves through them."""

    async def build(ui: Console) -> Response:
        view = await _run_view(ui, run_id)
        events = await _run_events(ui, run_id)
        at = min(_int(request.query_params.get("at"), len(events)), len(events))
        laid_out = await ui.get(f"/api/runs/{path_id(run_id)}/graph")
        shape = laid_out["graph"] or {}
        statuses = replay.node_statuses(events[:at], [n["id"] for n in shape.get("nodes") or []])
        return ui.render("run_replay.html", **view, tab="replay", at=at, total=len(events),
                         event=events[at - 1] if at else None, variables=replay.variables(events[:at]),
                         drawing=graph.drawing(shape, statuses), graph_id="replay-graph",
                         graph_label=f"Graph of {view['run']['procedure_id']} after event {at} of {len(events)}",
                         graph_unavailable=laid_out.get("graph_unavailable_reason"), title=f"Run {run_id}: replay")

    return await page(request, build)


@router.get("/ui/runs/{run_id}/rerun")
async def rerun_page(request: Request, run_id: str) -> Response:
    """A new run of the same version with the inputs edited: the start form, filled with this run's inputs."""

    async def build(ui: Console) -> Response:
        return await _rerun_form(ui, run_id)

    return await page(request, build, needs="operator")


async def _rerun_form(ui: Console, run_id: str, status_code: int = 200, **shown: Any) -> Response:
    view = await _run_view(ui, run_id)
    run = view["run"]
    detail = await ui.get(f"/api/procedures/{path_id(run['procedure_id'])}/{path_id(run['procedure_version'])}")
    fields = forms.fields_of(detail.get("variables_schema"))
    shown.setdefault("submitted", forms.form_values(fields, run["input_vars"] or {}))
    return ui.render("rerun.html", status_code, **view, fields=fields, title=f"Run {run_id}: rerun", **shown)


async def _rerun(ui: Console, run_id: str, form: dict[str, str]) -> Response:
    """``POST /api/runs/{id}/rerun`` with the edited inputs; the new run's page, or the form with the API's
    per-field errors."""
    run = (await _run_view(ui, run_id))["run"]
    detail = await ui.get(f"/api/procedures/{path_id(run['procedure_id'])}/{path_id(run['procedure_version'])}")
    values, errors = forms.input_vars(forms.fields_of(detail.get("variables_schema")), form)
    if errors:
        return await _rerun_form(ui, run_id, 422, errors=errors, submitted=form)
    answer = await ui.send("POST", f"/api/runs/{path_id(run_id)}/rerun", {"input_vars": values},
                           csrf=form.get("csrf_token"))
    if answer.status_code == 201:
        return _see_other(f"/ui/runs/{path_id(answer.json()['run_id'])}")
    problem = problem_of(answer)
    return await _rerun_form(ui, run_id, answer.status_code, problem=problem, errors=form_errors(problem),
                             submitted=form)


RUN_TABS = ("artifacts", "checkpoints", "children", "diagnostics")


@router.get("/ui/runs/{run_id}/{tab}")
async def run_tab(request: Request, run_id: str, tab: str) -> Response:
    """A run's artifacts, checkpoints, child runs or diagnostics, under the run's summary (each a stable link)."""

    async def build(ui: Console) -> Response:
        if tab not in RUN_TABS:
            return ui.render("error.html", 404, problem={"status": 404, "code": "not_found", "title": "Not found",
                                                         "detail": f"a run page has no tab '{tab}'"})
        view = await _run_view(ui, run_id)
        path = f"/api/runs/{path_id(run_id)}/{tab}"
        data = await ui.get(path) if tab == "diagnostics" else await ui.get(path, {"limit": 200})
        return ui.render("run_tab.html", **view, tab=tab, data=data, title=f"Run {run_id}: {tab}")

    return await page(request, build)


@router.post("/ui/runs/{run_id}/{action}")
async def run_action(request: Request, run_id: str, action: str) -> Response:
    """Cancel, retry, delete or rerun a run (the API decides whether the caller may and whether the run's status
    allows it)."""
    form = await _form(request)

    async def build(ui: Console) -> Response:
        path = f"/api/runs/{path_id(run_id)}"
        if action == "rerun":
            return await _rerun(ui, run_id, form)
        if action == "delete":
            answer = await ui.send("DELETE", path, csrf=form.get("csrf_token"))
        elif action in ("cancel", "retry"):
            body = {"reason": form["reason"]} if action == "cancel" and form.get("reason") else {}
            answer = await ui.send("POST", f"{path}/{action}", body, csrf=form.get("csrf_token"))
        else:
            return ui.render("error.html", 404, problem={"status": 404, "title": "Not found",
                                                         "detail": f"no run action '{action}'"})
        if answer.status_code >= 400:
            return ui.render("error.html", answer.status_code, problem=problem_of(answer))
        return _see_other("/ui/runs" if action == "delete" else f"/ui/runs/{path_id(run_id)}")

    return await page(request, build, needs="operator")


# -- procedures ---------------------------------------------------------------------------------------------------


@router.get("/ui/procedures")
async def procedures_page(request: Request) -> Response:
    """The catalogue (search, status, channel; paged), and the import form."""

    async def build(ui: Console) -> Response:
        return await _procedures(ui)

    return await page(request, build)


async def _procedures(ui: Console, status_code: int = 200, **imported: Any) -> Response:
    query = ui.request.query_params
    filters = {name: query.get(name, "").strip() for name in ("search", "status", "release_channel")}
    limit, offset = _int(query.get("limit"), RUNS_PAGE), _int(query.get("offset"), 0)
    listing = await ui.get("/api/procedures", filters | {"limit": limit, "offset": offset})
    return ui.render("procedures.html", status_code, listing=listing, filters=filters,
                     pages=_pager(ui.request, listing), title="Procedures", **imported)


@router.post("/ui/procedures")
async def import_procedure(request: Request) -> Response:
    """Import a CKP document (pasted JSON or an uploaded file) through ``POST /api/procedures``; compile
    diagnostics come back with their JSON paths."""
    submitted = await request.form()
    upload = submitted.get("ckp_file")
    text = str(submitted.get("ckp_text") or "")
    if upload is not None and not isinstance(upload, str) and upload.filename:
        raw = await upload.read(MAX_IMPORT_BYTES + 1)
        text = raw.decode("utf-8", errors="replace")
    csrf = str(submitted.get("csrf_token") or "")
    project = str(submitted.get("project_id") or "").strip() or None

    async def build(ui: Console) -> Response:
        kept = {"ckp_text": text, "project_id": project or ""}
        try:
            document = json.loads(text)
        except ValueError as exc:
            return await _procedures(ui, 422, import_errors={"ckp_json": [f"Not valid JSON: {exc}"]}, kept=kept)
        if not isinstance(document, dict):
            return await _procedures(ui, 422, import_errors={"ckp_json": ["Must be a JSON object"]}, kept=kept)
        body: dict[str, Any] = {"ckp_json": document} | ({"project_id": project} if project else {})
        answer = await ui.send("POST", "/api/procedures", body, csrf=csrf)
        if answer.status_code == 201:
            made = answer.json()
            return _see_other(f"/ui/procedures/{path_id(made['procedure_id'])}/{path_id(made['version'])}")
        if answer.status_code == 202:
            return await _procedures(ui, 202, notice="Import accepted; the compiler has not answered yet. "
                                     "Reload this page in a moment.")
        problem = problem_of(answer)
        return await _procedures(ui, answer.status_code, import_problem=problem,
                                 import_errors=form_errors(problem), diagnostics=problem.get("diagnostics") or [],
                                 kept=kept)

    return await page(request, build, needs="operator")


@router.get("/ui/procedures/{procedure_id}")
async def procedure_page(request: Request, procedure_id: str) -> Response:
    """A procedure: its versions with channels and statuses."""

    async def build(ui: Console) -> Response:
        pid = path_id(procedure_id)
        summary = await ui.get(f"/api/procedures/{pid}")
        versions = await ui.get(f"/api/procedures/{pid}/versions", {"limit": 100})
        return ui.render("procedure.html", summary=summary, versions=versions, title=procedure_id)

    return await page(request, build)


async def _version_page(ui: Console, procedure_id: str, version: str, status_code: int = 200,
                        **started: Any) -> Response:
    detail = await ui.get(f"/api/procedures/{path_id(procedure_id)}/{path_id(version)}")
    fields = forms.fields_of(detail.get("variables_schema"))
    runnable = detail["status"] in ("draft", "active")
    laid_out = await ui.api.get(f"/api/procedures/{path_id(procedure_id)}/{path_id(version)}/graph")
    unavailable = None if laid_out.status_code == 200 else problem_of(laid_out).get("detail")
    drawing = graph.drawing(laid_out.json() if laid_out.status_code == 200 else {})
    versions = await ui.get(f"/api/procedures/{path_id(procedure_id)}/versions", {"limit": 100})
    deployments = await ui.get(f"/api/procedures/{path_id(procedure_id)}/deployments", {"limit": 20})
    return ui.render("version.html", status_code, detail=detail, fields=fields, runnable=runnable,
                     versions=versions["items"], deployments=deployments, statuses=LIFECYCLE_STATUSES,
                     channels=CHANNELS, drawing=drawing, graph_id="version-graph", graph_unavailable=unavailable,
                     graph_label=f"Graph of {procedure_id} {version}",
                     source=json.dumps(detail.get("ckp_json"), indent=2, ensure_ascii=False),
                     title=f"{procedure_id} {version}", **started)


@router.get("/ui/procedures/{procedure_id}/diff")
async def diff_page(request: Request, procedure_id: str) -> Response:
    """Two versions compared (``?from=&to=``, a shareable link): the API's structural summary and changes, and
    the two documents side by side."""
    query = request.query_params

    async def build(ui: Console) -> Response:
        pid = path_id(procedure_id)
        versions = await ui.get(f"/api/procedures/{pid}/versions", {"limit": 100})
        names = [v["version"] for v in versions["items"]]
        before = query.get("from") or (names[1] if len(names) > 1 else "")
        after = query.get("to") or (names[0] if names else "")
        diff = rows = None
        if before and after:
            diff = await ui.get(f"/api/procedures/{pid}/diff", {"from": before, "to": after})
            documents = [await ui.get(f"/api/procedures/{pid}/{path_id(v)}") for v in (before, after)]
            texts = [json.dumps(d["ckp_json"], indent=2, ensure_ascii=False) for d in documents]
            rows = textdiff.side_by_side(*texts)
        return ui.render("diff.html", procedure_id=procedure_id, names=names, before=before, after=after,
                         diff=diff, rows=rows, title=f"{procedure_id}: compare versions")

    return await page(request, build)


@router.get("/ui/procedures/{procedure_id}/{version}")
async def version_page(request: Request, procedure_id: str, version: str) -> Response:
    """A version: overview, diagnostics, the start-run form and the source."""

    async def build(ui: Console) -> Response:
        return await _version_page(ui, procedure_id, version)

    return await page(request, build)


@router.post("/ui/procedures/{procedure_id}/{version}/runs")
async def start_run(request: Request, procedure_id: str, version: str) -> Response:
    """Start a run of this version from the generated form (``POST /api/runs``); the API's per-field errors are
    shown beside their fields."""
    form = await _form(request)

    async def build(ui: Console) -> Response:
        detail = await ui.get(f"/api/procedures/{path_id(procedure_id)}/{path_id(version)}")
        fields = forms.fields_of(detail.get("variables_schema"))
        values, errors = forms.input_vars(fields, form)
        if errors:
            return await _version_page(ui, procedure_id, version, 422, run_errors=errors, submitted=form)
        answer = await ui.send("POST", "/api/runs", {"procedure_id": procedure_id, "procedure_version": version,
                                                     "input_vars": values}, csrf=form.get("csrf_token"))
        if answer.status_code == 201:
            return _see_other(f"/ui/runs/{path_id(answer.json()['run_id'])}")
        if answer.status_code == 202:
            return await _version_page(ui, procedure_id, version, 202, notice="Run accepted; the runtime has "
                                       "not answered yet. It will appear in the run list.")
        problem = problem_of(answer)
        return await _version_page(ui, procedure_id, version, answer.status_code, run_errors=form_errors(problem),
                                   run_problem=problem, submitted=form)

    return await page(request, build, needs="operator")


LIFECYCLE_STATUSES = ("draft", "active", "deprecated", "archived")
CHANNELS = ("dev", "qa", "prod")
LIFECYCLE = ("status", "promote", "rollback", "delete")


@router.post("/ui/procedures/{procedure_id}/{version}/lifecycle/{action}")
async def lifecycle(request: Request, procedure_id: str, version: str, action: str) -> Response:
    """Set the version's status, promote it to a channel, roll its channel back or delete it (the API's
    ``PATCH …/status``, ``POST …/promote``, ``POST …/rollback``, ``DELETE``); a refusal comes back on the version
    page with the API's problem — the transitions allowed, or the promotion's validation diagnostics."""
    form = await _form(request)

    async def build(ui: Console) -> Response:
        if action not in LIFECYCLE:
            return ui.render("error.html", 404, problem={"status": 404, "code": "not_found", "title": "Not found",
                                                         "detail": f"no lifecycle action '{action}'"})
        path = f"/api/procedures/{path_id(procedure_id)}/{path_id(version)}"
        if action == "delete":  # a version that is not active and that no unfinished run uses
            answer = await ui.send("DELETE", path, csrf=form.get("csrf_token"))
            if answer.status_code < 400:  # to the procedure's page, unless that was its last version
                left = await ui.api.get(f"/api/procedures/{path_id(procedure_id)}")
                return _see_other(f"/ui/procedures/{path_id(procedure_id)}?deleted={path_id(version)}"
                                  if left.status_code == 200 else "/ui/procedures")
            return await _version_page(ui, procedure_id, version, answer.status_code,
                                       lifecycle_problem=problem_of(answer), lifecycle_action=action)
        body = {"status": form.get("status", "")} if action == "status" else {
            "target_channel": form.get("target_channel", "")}
        if action == "rollback" and form.get("rollback_to_version"):
            body["rollback_to_version"] = form["rollback_to_version"]
        if form.get("reason", "").strip():
            body["reason"] = form["reason"].strip()
        answer = await ui.send("PATCH" if action == "status" else "POST",
                               f"{path}/status" if action == "status" else f"{path}/{action}", body,
                               csrf=form.get("csrf_token"))
        if answer.status_code < 400:
            return _see_other(f"/ui/procedures/{path_id(procedure_id)}/{path_id(version)}?done={action}")
        return await _version_page(ui, procedure_id, version, answer.status_code,
                                   lifecycle_problem=problem_of(answer), lifecycle_action=action)

    return await page(request, build, needs="operator")


@router.post("/ui/procedures/{procedure_id}/{version}/source")
async def replace_source(request: Request, procedure_id: str, version: str) -> Response:
    """Replace a draft's document (``PUT /api/procedures/{id}/{version}``, the revision the page was read at as
    ``If-Match``); the compile diagnostics with their JSON paths, or the refusal (not a draft, changed meanwhile),
    come back on the version page with the edited text kept."""
    form = await _form(request)

    async def build(ui: Console) -> Response:
        text = form.get("ckp_text", "")
        try:
            document = json.loads(text)
        except ValueError as exc:
            document, problem = None, {"ckp_json": [f"Not valid JSON: {exc}"]}
        else:
            problem = {} if isinstance(document, dict) else {"ckp_json": ["Must be a JSON object"]}
        if problem:
            return await _version_page(ui, procedure_id, version, 422, source_text=text, source_errors=problem)
        headers = {"X-CSRF-Token": form.get("csrf_token", "")}
        if form.get("revision", "").isdigit():
            headers["If-Match"] = f'"{form["revision"]}"'
        answer = await ui.api.put(f"/api/procedures/{path_id(procedure_id)}/{path_id(version)}",
                                  json={"ckp_json": document}, headers=headers)
        if answer.status_code in (200, 202):
            return _see_other(f"/ui/procedures/{path_id(procedure_id)}/{path_id(version)}?done=source")
        refused = problem_of(answer)
        return await _version_page(ui, procedure_id, version, answer.status_code, source_text=text,
                                   source_problem=refused, source_errors=form_errors(refused))

    return await page(request, build, needs="operator")


# -- lists with row actions (agents, leases, projects, triggers, audit) -------------------------------------------


async def _list(ui: Console, listing: catalogue.Listing, status_code: int = 200, **shown: Any) -> Response:
    query = ui.request.query_params
    values = {f.name: query.get(f.name, "").strip() for f in listing.filters}
    limit, offset = _int(query.get("limit"), RUNS_PAGE), _int(query.get("offset"), 0)
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    for f in listing.filters:
        if values[f.name]:
            params[f.name] = _date_bound(values[f.name]) if f.date else values[f.name]
    answer = await ui.api.get(listing.api, params=params)
    if answer.status_code not in (200, 422):
        raise ApiFailure(answer)
    found = answer.json() if answer.status_code == 200 else None
    actions = [a for a in listing.actions if ui.can(a.role)]
    creates = listing.create is not None and ui.can(listing.create.role)
    whole = [a for a in listing.page_actions if ui.can(a.role)]
    return ui.render("listing.html", status_code if found else answer.status_code, listing=listing, found=found,
                     values=values, errors={} if found else form_errors(problem_of(answer)),
                     pages=_pager(ui.request, found), actions=actions, creates=creates, page_actions=whole,
                     title=listing.title, **shown)


def _listing_route(listing: catalogue.Listing) -> None:
    async def list_page(request: Request) -> Response:
        async def build(ui: Console) -> Response:
            return await _list(ui, listing)

        return await page(request, build)

    async def row_action(request: Request) -> Response:
        form = await _form(request)
        action = listing.action(form.get("action", ""))

        async def build(ui: Console) -> Response:
            if listing.create and form.get("action") == "create":
                new = {name: form[name].strip() for name, _ in listing.create.fields if form.get(name, "").strip()}
                answer = await ui.send("POST", listing.api, new, csrf=form.get("csrf_token"))
                if answer.status_code >= 400:
                    refused = problem_of(answer)
                    return await _list(ui, listing, answer.status_code, create_problem=refused, typed=form,
                                       create_errors=form_errors(refused))
                if listing.create.reveal and answer.status_code == 201:  # a new agent's token: shown once
                    created = answer.json()
                    return await _list(ui, listing, revealed={"label": "Token", "key": created.get("name"),
                                                              "value": created.get(listing.create.reveal)})
                return _see_other(f"{listing.path}?{urlencode([('done', listing.create.label)])}")
            whole = next((a for a in listing.page_actions if a.name == form.get("page_action")), None)
            if whole is not None:
                answer = await ui.send("POST", whole.api, csrf=form.get("csrf_token"))
                if answer.status_code >= 400:
                    return await _list(ui, listing, answer.status_code, action_problem=problem_of(answer))
                return await _list(ui, listing, page_outcome={"label": whole.label, "answer": answer.json()})
            if action is None or any(not form.get(key) for key in action.keys):
                return ui.render("error.html", 404, problem={"status": 404, "code": "not_found", "title": "Not found",
                                                             "detail": "no such action on this list"})
            path = action.api.format(**{key: path_id(form[key]) for key in action.keys})
            body: dict[str, Any] | None = dict(action.body) if action.body or action.method != "DELETE" else None
            typed = form.get("field", "").strip()
            if action.field and typed and action.method == "DELETE":
                path += f"?{action.field}={quote_plus(typed)}"
            elif action.field and body is not None:
                body[action.field] = typed
            answer = await ui.send(action.method, path, body, csrf=form.get("csrf_token"))
            if answer.status_code >= 400:
                return await _list(ui, listing, answer.status_code, action_problem=problem_of(answer))
            made = answer.json() if answer.content and "json" in answer.headers.get("content-type", "") else {}
            if action.reveal:  # shown on this answer only: never in a URL, never stored
                return await _list(ui, listing, revealed={"label": action.label, "key": form[action.keys[0]],
                                                          "value": made.get(action.reveal)})
            kept = [(k, v) for k, v in parse_qsl(form.get("back", "")) if k not in ("done", "run")]  # the filters
            back = f"{listing.path}?{urlencode([*kept, ('done', action.label)])}"
            if made.get("run_id"):
                back += f"&run={quote_plus(made['run_id'])}"
            return _see_other(back)

        return await page(request, build, needs="operator")

    list_page.__doc__ = f"{listing.title}: ``GET {listing.api}`` as a table, filtered and paged from the URL."
    row_action.__doc__ = f"A row action of {listing.title.lower()}: one API call, the list again (or its refusal)."
    router.add_api_route(listing.path, list_page, methods=["GET"], name=listing.path)
    if listing.actions or listing.create or listing.page_actions:
        router.add_api_route(f"{listing.path}/actions", row_action, methods=["POST"], name=f"{listing.path}/actions")


for _listing in catalogue.LISTINGS:
    _listing_route(_listing)


# -- settings -----------------------------------------------------------------------------------------------------


@router.get("/ui/settings")
async def settings_page(request: Request) -> Response:
    """Secret metadata for everyone (never a value); for admins also the effective configuration of every service
    replica (secret settings only as set or unset), users and API keys."""

    async def build(ui: Console) -> Response:
        secrets = await ui.get("/api/secrets", {"limit": 200})
        admin: dict[str, Any] = {}
        if ui.can("admin"):
            admin = {"config": await ui.get("/api/config"), "users": await ui.get("/api/users", {"limit": 200}),
                     "keys": await ui.get("/api/auth/api-keys", {"limit": 200, "revoked": "false"})}
        return ui.render("settings.html", secrets=secrets, **admin, title="Settings")

    return await page(request, build)


# -- approvals ----------------------------------------------------------------------------------------------------


@router.get("/ui/approvals")
async def approvals_page(request: Request) -> Response:
    """The inbox: pending approvals first (oldest first), or any other status through the filter."""

    async def build(ui: Console) -> Response:
        return await _approvals(ui)

    return await page(request, build)


async def _approvals(ui: Console, status_code: int = 200, **decided: Any) -> Response:
    query = ui.request.query_params
    status = query.get("status", "pending")
    limit, offset = _int(query.get("limit"), RUNS_PAGE), _int(query.get("offset"), 0)
    params = {"status": status or None, "limit": limit, "offset": offset, "sort": "created_at",
              "order": "asc" if status == "pending" else "desc"}
    answer = await ui.api.get("/api/approvals", params={k: v for k, v in params.items() if v is not None})
    if answer.status_code != 200:
        raise ApiFailure(answer)
    listing = answer.json()
    # the live inbox follows the approvals stream from the position this list was read at: nothing missed between
    return ui.render("approvals.html", status_code, listing=listing, status=status, statuses=APPROVAL_STATUSES,
                     pages=_pager(ui.request, listing), position=answer.headers.get("X-LangOrch-Position", ""),
                     title="Approvals", **decided)


@router.get("/ui/approvals/{approval_id}")
async def approval_page(request: Request, approval_id: str) -> Response:
    """One approval: prompt, context, who decided what and when, and the decision form (with input data for a
    ``provide_input`` approval)."""

    async def build(ui: Console) -> Response:
        return await _approval(ui, approval_id)

    return await page(request, build)


async def _approval(ui: Console, approval_id: str, status_code: int = 200, **decided: Any) -> Response:
    approval = await ui.get(f"/api/approvals/{path_id(approval_id)}")
    return ui.render("approval.html", status_code, a=approval, title="Approval", **decided)


@router.post("/ui/approvals/{approval_id}/decision")
async def decide(request: Request, approval_id: str) -> Response:
    """Approve, reject, pick an option or provide input (``POST /api/approvals/{id}/decision``), with a comment.
    From the approval's own page (``from=detail``) the answer is that page again; else the inbox."""
    form = await _form(request)
    detail = form.get("from") == "detail"

    async def build(ui: Console) -> Response:
        body: dict[str, Any] = {"decision": form.get("decision", "")}
        if form.get("comment"):
            body["comment"] = form["comment"]
        if form.get("payload", "").strip():
            try:
                body["payload"] = json.loads(form["payload"])
            except ValueError as exc:
                return await _approval(ui, approval_id, 422, errors={"payload": [f"Must be valid JSON ({exc})"]},
                                       kept=form)
        answer = await ui.send("POST", f"/api/approvals/{path_id(approval_id)}/decision", body,
                               csrf=form.get("csrf_token"))
        if answer.status_code == 200:
            return _see_other(f"/ui/approvals/{path_id(approval_id)}" if detail
                              else f"/ui/approvals?decided={path_id(approval_id)}")
        problem = problem_of(answer)
        if detail:
            return await _approval(ui, approval_id, answer.status_code, decision_problem=problem,
                                   errors=form_errors(problem), kept=form)
        return await _approvals(ui, answer.status_code, decision_problem=problem)

    return await page(request, build, needs="approver")
