"""``trigger``: manual, scheduled (cron), webhook, event and file_watch; nested blocks read as their flat fields."""

from __future__ import annotations

from typing import Any

from ckp_core.compiler.binding import expression
from ckp_core.compiler.fields import Compilation, valid_timezone
from ckp_core.diagnostics import pointer
from ckp_core.expressions import json_type_name
from ckp_core.ir import TriggerIR
from ckp_core.schedules import ScheduleError, validate_cron

TRIGGER_TYPES = ("manual", "scheduled", "webhook", "event", "file_watch")
TRIGGER_FIELDS_BY_TYPE: dict[str, frozenset[str]] = {
    "manual": frozenset(),
    "scheduled": frozenset({"schedule", "timezone"}),
    "webhook": frozenset({"webhook_secret", "signature_scheme"}),
    "event": frozenset({"event_source", "event_filter"}),
    "file_watch": frozenset({"file_watch_path"}),
}
TRIGGER_COMMON = frozenset({"type", "input_vars", "dedupe_window_seconds", "max_concurrent_runs"})
TRIGGER_NESTED = ("webhook_config", "event_config", "event", "file_watch", "file_watch_config", "file")
TRIGGER_NESTED_MAP: dict[tuple[str, str], str] = {
    ("webhook_config", "secret"): "webhook_secret",
    ("event", "source"): "event_source",
    ("event_config", "event_source"): "event_source",
    ("event_config", "event_filter"): "event_filter",
    ("file_watch", "path"): "file_watch_path",
    ("file_watch_config", "path"): "file_watch_path",
    ("file", "path"): "file_watch_path",
}


def trigger(c: Compilation, doc: dict[str, Any]) -> TriggerIR | None:
    raw = doc.get("trigger")
    if raw is None:
        return None
    p = "/trigger"
    trig = c.obj(raw, p)
    if trig is None:
        return None
    ttype_raw = trig.get("type", "manual")
    if ttype_raw not in TRIGGER_TYPES:
        c.add("error", "invalid_trigger_type", f"trigger.type '{ttype_raw}' is invalid; expected one of "
              "[manual, scheduled, webhook, event, file_watch]", f"{p}/type")
        return None
    ttype: str = ttype_raw
    flat: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, value in trig.items():
        if key in TRIGGER_NESTED:
            continue
        flat[key] = value
        origin[key] = f"{p}/{pointer(key)[1:]}"
    for block in TRIGGER_NESTED:
        if block not in trig:
            continue
        nested = c.obj(trig[block], f"{p}/{block}")
        if nested is None:
            continue
        if block == "event" and "provider" in nested and "topic" in nested and "source" not in nested:
            nested["source"] = f"{nested.pop('provider')}://{nested.pop('topic')}"
        for key, value in nested.items():
            np_ = f"{p}/{block}/{pointer(key)[1:]}"
            canonical = TRIGGER_NESTED_MAP.get((block, key))
            if canonical is None:
                c.add("warning", "ignored_trigger_field", f"trigger.{block}.{key} is ignored for type "
                      f"'{ttype}'", np_)
                continue
            if canonical in flat:
                continue
            c.add("info", "alias_normalised", f"{np_}: '{block}.{key}' read as '{canonical}'", np_)
            flat[canonical] = value
            origin[canonical] = np_
    relevant = TRIGGER_COMMON | TRIGGER_FIELDS_BY_TYPE[ttype]
    all_trigger_fields = TRIGGER_COMMON.union(*TRIGGER_FIELDS_BY_TYPE.values())
    kw: dict[str, Any] = {"type": ttype}
    for key in list(flat):
        if key not in relevant:
            if key in all_trigger_fields:
                c.add("warning", "ignored_trigger_field", f"trigger.{key} is ignored for type '{ttype}'",
                      origin[key])
            else:
                c.add("warning", "unknown_field", f"{p}: unknown field '{key}' is ignored", origin[key])
            del flat[key]
    if "input_vars" in flat:
        iv = c.obj(trig["input_vars"], origin["input_vars"])
        if iv is not None:
            kw["input_vars"] = dict(trig["input_vars"])
    dedupe = c.integer(flat, "dedupe_window_seconds", p)
    if dedupe is not None:
        kw["dedupe_window_seconds"] = dedupe
    mcr = c.integer(flat, "max_concurrent_runs", p, minimum=1)
    if mcr is not None:
        kw["max_concurrent_runs"] = mcr
    if ttype == "scheduled":
        schedule = flat.get("schedule")
        if schedule is None:
            c.add("error", "missing_schedule", "trigger.type 'scheduled' requires a 'schedule' (cron "
                  "expression)", f"{p}/schedule")
        elif not _valid_cron(schedule):
            c.add("error", "invalid_cron", f"trigger.schedule '{schedule}' is not a valid 5-field cron "
                  "expression", origin["schedule"])
        else:
            kw["schedule"] = schedule
        tz = flat.get("timezone")
        if tz is not None:
            if isinstance(tz, str) and valid_timezone(tz):
                kw["timezone"] = tz
            else:
                c.add("error", "invalid_timezone", f"{origin['timezone']}: unknown time zone '{tz}'",
                      origin["timezone"])
    elif ttype == "webhook":
        secret = flat.get("webhook_secret")
        if secret is None:
            c.add("error", "missing_webhook_secret", "trigger.type 'webhook' requires 'webhook_secret' (name "
                  "of the signing secret)", f"{p}/webhook_secret")
        elif c.expect(secret, (str,), "string", origin["webhook_secret"]):
            kw["webhook_secret"] = secret
        scheme = c.enum(flat, "signature_scheme", p, ("timestamped", "body"))
        if scheme is not None:
            kw["signature_scheme"] = scheme
            if scheme == "body" and not dedupe:
                c.add("error", "body_signature_requires_dedupe", "trigger.signature_scheme 'body' requires "
                      "dedupe_window_seconds > 0", origin["signature_scheme"])
    elif ttype == "event":
        source = flat.get("event_source")
        if source is None:
            c.add("error", "missing_event_source", "trigger.type 'event' requires 'event_source'",
                  f"{p}/event_source")
        elif not (isinstance(source, str) and source.startswith("nats://lo.ext.")
                  and len(source) > len("nats://lo.ext.")):
            c.add("error", "unsupported_event_source", f"trigger.event_source '{source}' is not supported; "
                  "use nats://lo.ext.<subject>", origin["event_source"])
        else:
            kw["event_source"] = source
        if "event_filter" in flat:
            filt = flat["event_filter"]
            if not isinstance(filt, str):
                c.add("error", "invalid_type", f"{origin['event_filter']}: expected expression string, got "
                      f"{json_type_name(filt)}", origin["event_filter"])
            else:
                kw["event_filter"] = expression(c, filt, origin["event_filter"], check_roots=False)
    elif ttype == "file_watch":
        path = flat.get("file_watch_path")
        if path is None:
            c.add("error", "missing_file_watch_path", "trigger.type 'file_watch' requires 'file_watch_path'",
                  f"{p}/file_watch_path")
        elif c.expect(path, (str,), "string", origin["file_watch_path"]):
            kw["file_watch_path"] = path
    return TriggerIR(**kw)


def _valid_cron(expr: Any) -> bool:
    try:
        validate_cron(expr)
    except ScheduleError:
        return False
    return True
