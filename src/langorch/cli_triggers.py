"""``langorch triggers …``: trigger registrations through the API (api.md §10) — list, show, fire, enable, disable
and sync. The commands send the credential :mod:`langorch.access` picks, as every API command does; an answer the
API refuses is one ``error:`` line naming the problem (exit 1)."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.table import Table

from langorch.accounts import ApiKey, ApiUrl, AsJson, _cell, _client, _print_json, _table, console
from langorch.errors import DEFAULT_API, EXIT_CODES_HELP, CLIError, ExitCode

triggers_app = typer.Typer(help="Trigger registrations: list, show, fire, enable, disable, and sync them with the "
                           "active versions' trigger blocks.", no_args_is_help=True, epilog=EXIT_CODES_HELP)

ProcedureId = Annotated[str, typer.Argument(help="The procedure's id.", show_default=False)]
Version = Annotated[str, typer.Argument(help="The procedure version the registration belongs to.",
                                        show_default=False)]
LIST_COLUMNS = ("procedure_id", "version", "trigger_type", "fires on", "source", "enabled", "dormant",
                "last_fired_at")  # --json: every field


class TriggerType(StrEnum):
    scheduled = "scheduled"
    webhook = "webhook"
    event = "event"
    file_watch = "file_watch"


class Source(StrEnum):
    api = "api"
    ckp = "ckp"


def _path(procedure_id: str, version: str, action: str = "") -> str:
    return f"/api/triggers/{quote(procedure_id, safe='')}/{quote(version, safe='')}{action}"


def fires_on(trigger: dict[str, Any]) -> str:
    """What starts the registration's runs, in one cell: the schedule and zone, the webhook URL, the subject or
    the watched path."""
    kind = trigger.get("trigger_type")
    if kind == "scheduled":
        return f"{trigger.get('schedule')} ({trigger.get('timezone') or 'UTC'})"
    if kind == "webhook":
        return f"{trigger.get('webhook_url')} (secret {trigger.get('webhook_secret')})"
    return str(trigger.get("event_source") or "-")


@triggers_app.command("list")
def triggers_list(
    procedure: Annotated[str | None, typer.Option("--procedure", help="Only this procedure's registrations.",
                                                  show_default=False)] = None,
    trigger_type: Annotated[TriggerType | None, typer.Option("--type", help="Only registrations of this type.",
                                                             show_default=False)] = None,
    enabled: Annotated[bool | None, typer.Option("--enabled/--disabled", help="Only enabled, or only disabled, "
                                                 "registrations (default: both).", show_default=False)] = None,
    source: Annotated[Source | None, typer.Option("--source", help="Only registrations made through the API (api) "
                                                  "or from documents' trigger blocks (ckp).",
                                                  show_default=False)] = None,
    api: ApiUrl = DEFAULT_API, api_key: ApiKey = None, as_json: AsJson = False,
) -> None:
    """List the trigger registrations, by procedure and version. A dormant one belongs to a version that is not
    active, so it does not fire by itself."""
    params: dict[str, Any] = {}
    for name, value in (("procedure_id", procedure), ("trigger_type", trigger_type), ("source", source)):
        if value is not None:
            params[name] = str(value)
    if enabled is not None:
        params["enabled"] = "true" if enabled else "false"
    with _client(api, api_key) as client:
        triggers = client.pages("listing triggers", "/api/triggers", params)
    if as_json:
        _print_json(triggers)
        return
    rows = [{**t, "fires on": fires_on(t)} for t in triggers]
    _table(f"{len(rows)} trigger{'s' if len(rows) != 1 else ''}", LIST_COLUMNS, rows)


@triggers_app.command("show")
def triggers_show(procedure_id: ProcedureId, version: Version, api: ApiUrl = DEFAULT_API, api_key: ApiKey = None,
                  as_json: AsJson = False) -> None:
    """Show one registration: every field, and its last fire."""
    with _client(api, api_key) as client:
        trigger = client.json(f"reading the trigger of {procedure_id}@{version}", "GET", _path(procedure_id, version))
    if as_json:
        _print_json(trigger)
        return
    table = Table(title=f"trigger of {procedure_id}@{version}", title_justify="left", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for name, value in trigger.items():
        if value is not None and value != {}:
            table.add_row(name, json.dumps(value) if isinstance(value, dict) else _cell(value))
    console.print(table)


def _inputs(items: list[str] | None, inputs_json: str | None) -> dict[str, Any]:
    """The fire's inputs: ``--inputs-json`` (an object) with the ``--input k=v`` values over it."""
    from langorch.cli import _parse_vars

    inputs: dict[str, Any] = {}
    if inputs_json is not None:
        try:
            parsed = json.loads(inputs_json)
        except ValueError as exc:
            raise CLIError(f"--inputs-json: not JSON ({exc})", ExitCode.USAGE) from exc
        if not isinstance(parsed, dict):
            raise CLIError("--inputs-json: expected a JSON object such as '{\"name\": \"Ada\"}'", ExitCode.USAGE)
        inputs.update(parsed)
    inputs.update(_parse_vars(items, option="--input"))
    return inputs


@triggers_app.command("fire")
def triggers_fire(
    procedure_id: ProcedureId, version: Version,
    input_: Annotated[list[str] | None, typer.Option("--input", help="Input variable k=v (JSON values parsed); "
                                                     "repeat for several.", show_default=False)] = None,
    inputs_json: Annotated[str | None, typer.Option("--inputs-json", help="The inputs as one JSON object (--input "
                                                    "values go over it).", show_default=False)] = None,
    api: ApiUrl = DEFAULT_API, api_key: ApiKey = None, as_json: AsJson = False,
) -> None:
    """Fire a registration once by hand (a draft or active version): the registration's input_vars with these
    over them, through its dedupe window and concurrency limit. Prints the run it created. Needs an operator
    credential."""
    body = {"input_vars": _inputs(input_, inputs_json)}
    with _client(api, api_key) as client:
        fired = client.json(f"firing the trigger of {procedure_id}@{version}", "POST",
                            _path(procedure_id, version, "/fire"), json=body, expect=(202,))
    if as_json:
        _print_json(fired)
        return
    if fired.get("run_id") is None:
        console.print(f"the fire of {procedure_id}@{version} was accepted and is still being decided (command "
                      f"{fired.get('command_id')})", highlight=False)
        return
    console.print(f"fired {procedure_id}@{version}: run {fired['run_id']} created", highlight=False)


def _switch(procedure_id: str, version: str, enable: bool, api: str, api_key: str | None, as_json: bool) -> None:
    verb = "enable" if enable else "disable"
    with _client(api, api_key) as client:
        trigger = client.json(f"{verb[:-1]}ing the trigger of {procedure_id}@{version}", "POST",
                              _path(procedure_id, version, f"/{verb}"), expect=(200, 202))
    if as_json:
        _print_json(trigger)
        return
    if "enabled" not in trigger:
        console.print(f"{procedure_id}@{version}: {verb} accepted, still being decided", highlight=False)
        return
    state = "enabled" if trigger["enabled"] else "disabled"
    dormant = " (dormant: the version is not active)" if trigger.get("dormant") else ""
    console.print(f"{procedure_id}@{version}: {state}{dormant}", highlight=False)


@triggers_app.command("enable")
def triggers_enable(procedure_id: ProcedureId, version: Version, api: ApiUrl = DEFAULT_API, api_key: ApiKey = None,
                    as_json: AsJson = False) -> None:
    """Enable a registration (it fires again while its version is active). Needs an operator credential."""
    _switch(procedure_id, version, True, api, api_key, as_json)


@triggers_app.command("disable")
def triggers_disable(procedure_id: ProcedureId, version: Version, api: ApiUrl = DEFAULT_API,
                     api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """Disable a registration: it keeps its configuration and fires no more until enabled. Needs an operator
    credential."""
    _switch(procedure_id, version, False, api, api_key, as_json)


@triggers_app.command("sync")
def triggers_sync(api: ApiUrl = DEFAULT_API, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """Reconcile the registrations with the trigger blocks of every active version now (the triggers service
    does it by itself at each activation; this repairs and reports). Registrations made through the API are never
    touched. Exit 1 when a block could not be registered (each one is listed with its diagnostics). Needs an
    operator credential."""
    with _client(api, api_key) as client:
        result = client.json("syncing triggers", "POST", "/api/triggers/sync")
    errors = [e for e in result.get("errors") or [] if isinstance(e, dict)]
    if as_json:
        _print_json(result)
    else:
        console.print(f"{result.get('synced')} active versions checked: "
                      f"{result.get('registered')} registered, {result.get('updated')} updated, "
                      f"{result.get('removed')} removed, {len(errors)} not registered", highlight=False)
        for error in errors:
            for d in error.get("diagnostics") or []:
                where = f" at {d['path']}" if d.get("path") else ""
                console.print(f"  {error.get('procedure_id')}@{error.get('version')}: {d.get('code')}{where}: "
                              f"{d.get('message')}", highlight=False, soft_wrap=True)
    if errors:
        raise typer.Exit(ExitCode.FAILED)


def register(app: typer.Typer) -> None:
    """Add ``langorch triggers`` to ``langorch``."""
    app.add_typer(triggers_app, name="triggers")
    for info in triggers_app.registered_commands:
        if not info.epilog:
            info.epilog = EXIT_CODES_HELP
