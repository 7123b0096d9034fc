"""The console's list pages (agents, leases, projects, triggers, audit): each is one API list shown as a table, its
filters and page in the URL, with the row actions the API offers (shown by role; the API decides). Described here
as data, rendered by one template (``listing.html``)."""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Column:
    label: str
    key: str
    kind: str = "text"  # text, code, when, status, yes_no, run (a link to the run page)


@dataclass(frozen=True)
class Filter:
    name: str  # the query parameter, the same in the console's URL and the API's
    label: str
    choices: tuple[str, ...] = ()  # a select with these values; else a text box
    date: bool = False  # a date box, sent to the API as midnight UTC


@dataclass(frozen=True)
class RowAction:
    """A button on each row: one API call, its path filled from the row (``{field}`` placeholders)."""

    name: str
    label: str
    method: str
    api: str
    role: str = "operator"
    body: tuple[tuple[str, Any], ...] = ()  # a fixed JSON body
    when: tuple[str, Any] | None = None  # shown only on rows whose field has this value
    unless: tuple[str, Any] | None = None  # shown only on rows whose field has another value
    field: str | None = None  # a text box on the row: its value goes to the body (or, for DELETE, the query)
    field_label: str = ""
    danger: bool = False
    reveal: str | None = None  # a member of the answer shown once (a new token): never stored, never in a URL

    @property
    def keys(self) -> list[str]:
        """The row's fields the API path needs."""
        return [name for _, name, _, _ in string.Formatter().parse(self.api) if name]

    def shown_on(self, item: dict[str, Any]) -> bool:
        if self.when is not None and item.get(self.when[0]) != self.when[1]:
            return False
        return self.unless is None or item.get(self.unless[0]) != self.unless[1]


@dataclass(frozen=True)
class CreateForm:
    """A form above the table that creates one item (``POST`` to the list's API with the typed fields)."""

    label: str
    fields: tuple[tuple[str, str], ...]  # (body member, label); empty ones are left out
    role: str = "operator"
    reveal: str | None = None  # a member of the answer shown once (a new agent's token)


@dataclass(frozen=True)
class PageAction:
    """A button above the table: one ``POST`` without a body; its JSON answer is shown on the list."""

    name: str
    label: str
    api: str
    role: str = "operator"


@dataclass(frozen=True)
class Listing:
    path: str
    api: str
    title: str
    columns: tuple[Column, ...]
    filters: tuple[Filter, ...]
    empty: str
    intro: str = ""
    actions: tuple[RowAction, ...] = ()
    create: CreateForm | None = None
    page_actions: tuple[PageAction, ...] = ()

    def action(self, name: str) -> RowAction | None:
        return next((a for a in self.actions if a.name == name), None)


LISTINGS = (
    Listing("/ui/agents", "/api/agents", "Agents", (
        Column("Agent", "agent_id", "code"), Column("Name", "name"), Column("Channel", "channel"),
        Column("Protocol", "protocol"), Column("Status", "status", "status"), Column("Pool", "pool_id"),
        Column("Slots", "concurrency_limit"), Column("In use", "active_leases"),
        Column("Circuit", "circuit_state", "status"), Column("Last heartbeat", "last_heartbeat_at", "when")),
        (Filter("channel", "Channel"), Filter("status", "Status", ("online", "offline", "draining")),
         Filter("pool_id", "Pool"), Filter("capability", "Capability")),
        "No agent matches.", "Agents registered with LangOrch, with their live load and circuit state.", (
            RowAction("drain", "Drain", "PATCH", "/api/agents/{agent_id}", body=(("status", "draining"),),
                      unless=("status", "draining")),
            RowAction("online", "Back online", "PATCH", "/api/agents/{agent_id}", body=(("status", "online"),),
                      when=("status", "draining")),
            RowAction("sync", "Re-sync capabilities", "POST", "/api/agents/{agent_id}/sync-capabilities"),
            RowAction("token", "Rotate token", "POST", "/api/agents/{agent_id}/token", reveal="agent_token"),
            RowAction("remove", "Remove", "DELETE", "/api/agents/{agent_id}", danger=True)),
        CreateForm("Register agent", (("name", "Name"), ("channel", "Channel"), ("base_url", "Base URL"),
                                      ("pool_id", "Pool (optional)")), reveal="agent_token")),
    Listing("/ui/leases", "/api/leases", "Leases", (
        Column("Lease", "lease_id", "code"), Column("Resource", "resource_key"), Column("Slot", "slot"),
        Column("Agent", "agent_id"), Column("Run", "run_id", "run"), Column("Node", "node_id"),
        Column("Step", "step_id"), Column("Acquired", "acquired_at", "when"), Column("Expires", "expires_at", "when")),
        (Filter("resource_key", "Resource"), Filter("agent_id", "Agent"), Filter("run_id", "Run id")),
        "No lease is held.", "Concurrency slots held right now by steps of running runs.", (
            RowAction("release", "Force-release", "DELETE", "/api/leases/{lease_id}", field="reason",
                      field_label="Reason", danger=True),)),
    Listing("/ui/projects", "/api/projects", "Projects", (
        Column("Project", "project_id", "code"), Column("Name", "name"), Column("Description", "description"),
        Column("Procedures", "procedure_count"), Column("Active runs", "active_run_count"),
        Column("Created", "created_at", "when")),
        (Filter("search", "Search"),),
        "No project matches.", "", (
            RowAction("rename", "Rename", "PATCH", "/api/projects/{project_id}", field="name",
                      field_label="New name"),
            RowAction("delete", "Delete", "DELETE", "/api/projects/{project_id}", role="admin", danger=True)),
        CreateForm("Create project", (("name", "Name"), ("description", "Description")))),
    Listing("/ui/triggers", "/api/triggers", "Triggers", (
        Column("Procedure", "procedure_id", "code"), Column("Version", "version"),
        Column("Type", "trigger_type"), Column("Schedule", "schedule", "code"), Column("Source", "event_source"),
        Column("Enabled", "enabled", "yes_no"), Column("Dormant", "dormant", "yes_no"),
        Column("Next fire", "next_fire_at", "when"), Column("Last fired", "last_fired_at", "when"),
        Column("Last run", "last_run_id", "run")),
        (Filter("procedure_id", "Procedure id"),
         Filter("trigger_type", "Type", ("scheduled", "webhook", "event", "file_watch")),
         Filter("enabled", "Enabled", ("true", "false")), Filter("source", "Registered from", ("api", "ckp"))),
        "No trigger registration matches.",
        "Registrations that start runs by schedule, webhook, NATS event or file change. A dormant one belongs to a "
        "version that is not active, so it does not fire by itself.", (
            RowAction("disable", "Disable", "POST", "/api/triggers/{procedure_id}/{version}/disable",
                      when=("enabled", True)),
            RowAction("enable", "Enable", "POST", "/api/triggers/{procedure_id}/{version}/enable",
                      when=("enabled", False)),
            RowAction("fire", "Fire now", "POST", "/api/triggers/{procedure_id}/{version}/fire"),
            RowAction("delete", "Delete", "DELETE", "/api/triggers/{procedure_id}/{version}", danger=True)),
        page_actions=(PageAction("sync", "Sync from procedures", "/api/triggers/sync"),)),
    Listing("/ui/audit", "/api/audit", "Audit log", (
        Column("Time", "ts", "when"), Column("Category", "category"), Column("Action", "action"),
        Column("Outcome", "outcome", "status"), Column("Actor", "actor"), Column("Resource", "resource_type"),
        Column("Resource id", "resource_id", "code"), Column("Description", "description")),
        (Filter("category", "Category"), Filter("action", "Action"), Filter("actor", "Actor"),
         Filter("outcome", "Outcome", ("accepted", "rejected")), Filter("resource_type", "Resource type"),
         Filter("resource_id", "Resource id"), Filter("search", "Description contains"),
         Filter("since", "From", date=True), Filter("until", "Before", date=True)),
        "No audit record matches.", "Every command, accepted or rejected, and every sign-in, newest first."),
)
