"""The server's notification and alert webhooks (ckp.md §4.3 ``notify``, §4.10 ``notify_on_error``).

``notify`` POSTs its ``notification_requested`` payload to ``LANGORCH_NOTIFY_WEBHOOK_URL``; an error handler with
``notify_on_error`` POSTs its ``step_error_notification`` to ``LANGORCH_ALERT_WEBHOOK_URL``. Both are best effort
and never affect a run: the POST is scheduled and the run goes on at once; a failed POST (transport error, timeout,
408, 429 or 5xx) is tried once more after a second, then dropped with a warning; other answers are final. At most
:data:`MAX_PENDING` POSTs are in flight per replica, later ones are dropped (logged) rather than queued without
bound. Payloads are redacted like the run's events before they leave.

Headers: ``Content-Type: application/json``, ``X-LangOrch-Event`` (the event type), ``X-LangOrch-Run-Id``,
``X-LangOrch-Procedure-Id`` and ``LANGORCH_NOTIFY_WEBHOOK_HEADERS`` (values may be ``{{secrets.<name>}}``
references, resolved per POST; a missing secret drops the POST).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import httpx

from ckp_core.redaction import Redactor, bound_payload
from langorch_infra.settings import RuntimeSettings

log = logging.getLogger(__name__)

Kind = Literal["notify", "alert"]
SecretLookup = Callable[[str], Awaitable[str | None]]

MAX_PENDING = 256
RETRY_DELAY_S = 1.0
_SECRET_REF = re.compile(r"\{\{\s*secrets\.([A-Za-z0-9_.\-/]+)\s*\}\}")
_EVENTS: dict[Kind, str] = {"notify": "notification_requested", "alert": "step_error_notification"}


class Webhooks:
    """Best-effort POSTs to the notification and alert webhooks (one instance per runtime replica)."""

    def __init__(self, settings: RuntimeSettings, *, secrets: SecretLookup,
                 http: httpx.AsyncClient | None = None, retry_delay_s: float = RETRY_DELAY_S) -> None:
        self.urls: dict[Kind, str | None] = {
            "notify": settings.notify_webhook_url.get_secret_value() if settings.notify_webhook_url else None,
            "alert": settings.alert_webhook_url.get_secret_value() if settings.alert_webhook_url else None}
        self.headers = dict(settings.notify_webhook_headers)
        self.retry_delay_s = retry_delay_s
        self._secrets = secrets
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(timeout=httpx.Timeout(settings.webhook_timeout_s),
                                               follow_redirects=False)
        self._pending: set[asyncio.Task[None]] = set()

    def for_run(self, run_id: str, procedure_id: str, redactor: Redactor) -> RunWebhooks:
        return RunWebhooks(self, {"X-LangOrch-Run-Id": run_id, "X-LangOrch-Procedure-Id": procedure_id}, redactor)

    def post(self, kind: Kind, payload: dict[str, Any], context: dict[str, str]) -> None:
        """Schedule one POST of ``payload`` to the ``kind`` webhook (nothing when it is not configured)."""
        url = self.urls[kind]
        if url is None:
            return
        if len(self._pending) >= MAX_PENDING:
            log.warning("%s webhook: %d POSTs in flight, one dropped", kind, len(self._pending))
            return
        task = asyncio.create_task(self._deliver(kind, url, payload, context), name=f"{kind}-webhook")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _deliver(self, kind: Kind, url: str, payload: dict[str, Any], context: dict[str, str]) -> None:
        try:
            headers = {**{k: await self._resolve(v) for k, v in self.headers.items()}, **context,
                       "X-LangOrch-Event": _EVENTS[kind]}
        except LookupError as exc:
            log.warning("%s webhook: POST dropped, %s", kind, exc)
            return
        for attempt in (1, 2):
            try:
                r = await self._http.post(url, json=payload, headers=headers)
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}"
            else:
                if r.status_code < 500 and r.status_code not in (408, 429):
                    if r.is_error:
                        log.warning("%s webhook answered %d; not retried", kind, r.status_code)
                    return
                problem = f"HTTP {r.status_code}"
            if attempt == 1:
                log.info("%s webhook POST failed (%s); trying once more", kind, problem)
                await asyncio.sleep(self.retry_delay_s)
            else:
                log.warning("%s webhook POST failed twice (%s); dropped", kind, problem)

    async def _resolve(self, value: str) -> str:
        out: list[str] = []
        pos = 0
        for m in _SECRET_REF.finditer(value):
            secret = await self._secrets(m.group(1))
            if secret is None:
                raise LookupError(f"secret '{m.group(1)}' of a webhook header was not found")
            out.extend((value[pos:m.start()], secret))
            pos = m.end()
        out.append(value[pos:])
        return "".join(out)

    async def aclose(self, grace_s: float = 2.0) -> None:
        """Give the POSTs in flight ``grace_s`` to finish, then cancel them and close the client."""
        if self._pending:
            _, late = await asyncio.wait(set(self._pending), timeout=grace_s)
            for task in late:
                task.cancel()
        if self._owns_http:
            await self._http.aclose()


class RunWebhooks:
    """The webhooks as one run uses them: its payloads redacted like its events, its ids as headers."""

    def __init__(self, hooks: Webhooks, context: dict[str, str], redactor: Redactor) -> None:
        self.hooks = hooks
        self.context = context
        self.redactor = redactor

    def post(self, kind: Kind, payload: dict[str, Any]) -> None:
        self.hooks.post(kind, bound_payload(self.redactor.redact(payload)), self.context)
