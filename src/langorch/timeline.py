"""The ``langorch run`` client: import over the REST API, start a run, print the live SSE timeline.

An answer that is not what the API promises (an error status, or a body that is not the JSON expected) raises
:class:`ApiError`, which ``langorch``'s error handler prints (``cli.py``); transport errors (``httpx.ConnectError``,
``httpx.TimeoutException``) propagate to the same handler.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import TYPE_CHECKING, Any

import httpx
from httpx_sse import aconnect_sse
from rich.console import Console

if TYPE_CHECKING:
    from langorch.access import Credential

STATUS_COLORS = {"completed": "green", "failed": "red", "canceled": "yellow"}
# what to do about a problem, by its ``code``, when the problem's detail does not say
HINTS = {
    "procedure_version_exists": "the file differs from the version already imported; change its \"version\"",
}


def _problem(response: httpx.Response) -> dict[str, Any] | None:
    """The JSON object of ``response``, or None when its body is not a JSON object."""
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


class ApiError(Exception):
    """The LangOrch API answered ``action`` with an error status, or with a body that is not the JSON expected.

    ``problem`` is the answer's JSON object (an RFC 9457 problem for an error status), None when the body is not
    a JSON object; ``document`` is the CKP file's bytes when the request was its import, so that compile
    diagnostics can be shown on the source lines. ``credential`` is what the request sent (None: nothing), so that
    a 401 or 403 says which credential was refused and what to do.
    """

    def __init__(self, action: str, response: httpx.Response, *, document: bytes | None = None,
                 credential: Credential | None = None) -> None:
        self.action = action
        self.method = response.request.method
        self.url = str(response.request.url)
        self.status = response.status_code
        self.content_type = response.headers.get("content-type", "").split(";")[0].strip()
        self.problem = _problem(response)
        self.body = response.text
        self.document = document
        self.credential = credential
        super().__init__(self.headline())

    @property
    def is_problem(self) -> bool:
        return self.problem is not None and self.status >= 400 and bool(
            self.problem.get("title") or self.problem.get("detail"))

    def headline(self) -> str:
        """One line: what failed, the request, and what the server said."""
        where = f"{self.method} {self.url}"
        if self.is_problem:
            assert self.problem is not None
            title = str(self.problem.get("title") or "").strip()
            detail = str(self.problem.get("detail") or "").strip()
            said = ": ".join(part for part in (title, detail) if part)
            hint = HINTS.get(str(self.problem.get("code")))
            from langorch.access import auth_hint

            advice = auth_hint(self.status, self.problem, self.credential)
            return (f"{self.action} failed: {where} answered {self.status} {said}" + (f" ({hint})" if hint else "")
                    + (f"; {advice}" if advice else ""))
        if self.problem is None:
            kind = self.content_type or "no content type"
            snippet = " ".join(self.body.split())[:80]
            return (f"{self.action} failed: unexpected response from {where}: {self.status} {kind}, not the "
                    f"LangOrch API's JSON" + (f" ({snippet!r})" if snippet else "")
                    + "; do --api / LANGORCH_API_URL point at the LangOrch API?")
        snippet = json.dumps(self.problem, ensure_ascii=False)[:200]
        return (f"{self.action} failed: {where} answered {self.status} {snippet}"
                + ("; do --api / LANGORCH_API_URL point at the LangOrch API?" if self.status < 400 else ""))

    def field_errors(self) -> list[tuple[str, str]]:
        """``(path, message)`` of each field error the problem lists (``errors``: an object of path → messages,
        or a list of ``{pointer|path|field, detail|message}``)."""
        errors = (self.problem or {}).get("errors")
        out: list[tuple[str, str]] = []
        if isinstance(errors, dict):
            for path, messages in errors.items():
                if isinstance(messages, list):
                    out.append((str(path), "; ".join(str(m) for m in messages)))
                else:
                    out.append((str(path), str(messages)))
        elif isinstance(errors, list):
            for item in errors:
                if isinstance(item, dict):
                    path = item.get("pointer") or item.get("path") or item.get("field") or "/"
                    out.append((str(path), str(item.get("detail") or item.get("message") or item)))
                else:
                    out.append(("/", str(item)))
        return out

    def diagnostics(self) -> list[dict[str, Any]]:
        """The compile diagnostics of the problem (``compile_failed``, ``validation_failed`` of an import)."""
        found = (self.problem or {}).get("diagnostics")
        return [d for d in found if isinstance(d, dict)] if isinstance(found, list) else []


def _json_object(action: str, response: httpx.Response) -> dict[str, Any]:
    body = _problem(response)
    if body is None:
        raise ApiError(action, response)
    return body


def describe(event: dict[str, Any]) -> str:
    """One line for a run event."""
    p = event.get("payload", {})
    parts = [f"{event['seq']:>3} {event['event_type']:<20}"]
    if event.get("node_id"):
        parts.append(str(event["node_id"]))
    if event.get("step_id"):
        parts.append(f"/ {event['step_id']}")
    for key in ("level", "message", "next_node", "outputs", "error"):
        if key in p and p[key] is not None:
            parts.append(f"{key}={json.dumps(p[key], ensure_ascii=False)}")
    return " ".join(parts)


RETRY_FOR_S = 60.0
"""How long ``langorch run`` keeps trying a request the API refuses for now (429 or 503 with ``Retry-After``)."""
LONGEST_WAIT_S = 30.0
"""The longest pause between two tries, whatever ``Retry-After`` says."""


def retry_after(response: httpx.Response) -> float | None:
    """The seconds a retryable refusal (429, 503) asks the client to wait (its ``Retry-After`` in seconds, at most
    :data:`LONGEST_WAIT_S`); None for any other answer, or without a usable ``Retry-After``."""
    raw = response.headers.get("retry-after", "")
    if response.status_code not in (429, 503) or not raw.isdigit():
        return None
    return min(float(raw), LONGEST_WAIT_S)


async def post_patiently(client: httpx.AsyncClient, path: str, body: dict[str, Any], console: Console,
                         retry_for_s: float) -> httpx.Response:
    """POST ``body``, and again after ``Retry-After`` while the API refuses it for now (overloaded: 429; NATS or
    PostgreSQL unreachable: 503), for up to ``retry_for_s`` seconds; the last answer. Every try carries the same
    ``Idempotency-Key``, so a try whose answer was lost is not acted on twice."""
    headers = {"Idempotency-Key": f"langorch-cli-{uuid.uuid4()}"}
    deadline = time.monotonic() + retry_for_s
    while True:
        r = await client.post(path, json=body, headers=headers)
        wait = retry_after(r)
        if wait is None or time.monotonic() + wait > deadline:
            return r
        code = (_problem(r) or {}).get("code", r.status_code)
        console.print(f"[dim]{path}: {r.status_code} {code}; trying again in {wait:g} s (Retry-After)[/]",
                      highlight=False)
        await asyncio.sleep(wait)


async def import_and_run(api: str, ckp: Any, inputs: dict[str, Any], follow: bool, console: Console, *,
                         document: bytes | None = None, credential: Credential | None = None,
                         retry_for_s: float = RETRY_FOR_S) -> int:
    """Return the process exit code: 0 when the run completed (or was started without --follow), 1 when it ended
    otherwise. An error answer raises :class:`ApiError` (``document``, the file's bytes, goes with the import's).
    ``credential`` is sent with every request. The import and the start are tried again after ``Retry-After``
    while the API refuses them for now, for up to ``retry_for_s`` seconds each."""
    headers = credential.headers() if credential is not None else {}
    async with httpx.AsyncClient(base_url=api, timeout=30, headers=headers) as client:
        action = "importing the procedure"
        r = await post_patiently(client, "/api/procedures", {"ckp_json": ckp}, console, retry_for_s)
        if r.status_code == 202:
            pending = _json_object(action, r)
            console.print(f"[dim]import accepted, still pending (command {pending.get('command_id')})[/]",
                          highlight=False)
        elif r.status_code == 409 and (_problem(r) or {}).get("identical"):
            console.print(f"[dim]{ckp.get('procedure_id')}@{ckp.get('version')} already imported[/]",
                          highlight=False)
        elif r.status_code != 201:
            raise ApiError(action, r, document=document, credential=credential)
        else:
            _json_object(action, r)
        action = "starting the run"
        r = await post_patiently(client, "/api/runs", {"procedure_id": ckp["procedure_id"],
                                                       "procedure_version": ckp["version"], "input_vars": inputs},
                                 console, retry_for_s)
        if r.status_code == 202:
            pending = _json_object(action, r)
            console.print(f"[yellow]run start accepted but still pending[/] (command {pending.get('command_id')}; "
                          f"see GET {api.rstrip('/')}{pending.get('location', '/api/commands')})", highlight=False)
            return 1
        if r.status_code != 201:
            raise ApiError(action, r, credential=credential)
        run = _json_object(action, r)
        if not isinstance(run.get("run_id"), str):
            raise ApiError(action, r)
        console.print(f"run [bold]{run['run_id']}[/] created")
        if not follow:
            return 0
        status = "unknown"
        async with aconnect_sse(client, "GET", f"/api/runs/{run['run_id']}/stream",
                                timeout=httpx.Timeout(30, read=None)) as source:
            response = source.response
            if response.status_code != 200 or not response.headers.get("content-type", "").startswith(
                    "text/event-stream"):
                await response.aread()
                raise ApiError("following the run", response, credential=credential)
            async for sse in source.aiter_sse():
                if sse.event == "run_event":
                    console.print(describe(json.loads(sse.data)), highlight=False)
                elif sse.event == "end":
                    status = json.loads(sse.data)["status"]
                    break
        if status == "unknown":
            console.print("[red]the event stream closed before the run ended[/]")
        console.print(f"run ended: [{STATUS_COLORS.get(status, 'white')}]{status}[/]")
        return 0 if status == "completed" else 1
