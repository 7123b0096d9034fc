"""LLM calls of ``llm_action`` nodes (ckp.md §3.12, §7.13, §9.3; api.md §15.5).

* :func:`build_messages` turns the rendered prompt, system prompt and attachments into the chat messages
  (§3.12 steps 1–2); :func:`json_mode_of` tells whether JSON mode applies (forced in orchestration mode).
* :class:`LlmClient` (one per runtime replica, one shared ``httpx.AsyncClient``) makes one attempt of the node:
  the requested model, then its ``fallbacks`` from ``LANGORCH_LLM_MODELS``, with per-(base URL, model) circuit
  breakers, the run budget check before each call and one ``llm_usage`` event per completed call. The node's
  ``retry`` policy is the caller's: each retry calls :meth:`LlmClient.complete` again, which restarts from the
  requested model.

Choices where the spec is silent (kept deliberately simple and documented here):

* A model without ``quality`` is never "below ``min_llm_quality``", and a model without prices never "exceeds
  ``max_cost_per_llm_call_usd``": unknown values do not filter.
* Without ``max_tokens`` the completion term of a projected cost is 0 (nothing bounds it).
* The model-wide API key (``LANGORCH_LLM_API_KEY``) is only sent to ``LANGORCH_LLM_BASE_URL``; a model with its own
  ``base_url`` authenticates with its ``api_key_secret`` or not at all (the key never leaks to another host).
* ``Idempotency-Key`` is the step key on the requested model; fallback models get ``<key>:<model>`` so a provider
  that keys on it neither replays another model's answer nor rejects the different body.
* Only retryable failures (408, 429, 5xx, timeout, transport) count towards a circuit; a success closes it; other
  4xx leave it unchanged. After the open window one probe call is let through (half-open); while it runs the
  circuit still counts as open for other callers.
* A 2xx answer without ``choices[0].message`` is ``llm_error`` (``details.reason: invalid_response``), not
  retryable; a ``null`` content is the empty text.
* ``llm_usage.model`` is the model that was called (the key prices and fallbacks are looked up by); the model
  name the provider reported is in the extra field ``provider_model``. ``fallback_attempt`` is the position of
  the called model in the chain (0 = requested model).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import httpx

from ckp_core.events import BudgetExceeded, ErrorObject, EventData, LlmUsage
from ckp_core.ir import AttachmentIR, GlobalConfigIR, LlmActionPayload
from langorch_infra import tracing
from langorch_infra.secrets import env_secret
from langorch_infra.settings import LlmModelConfig, RuntimeSettings
from langorch_runtime.errors import StepError
from langorch_runtime.metrics import RuntimeMetrics

__all__ = [
    "CHARS_PER_TOKEN",
    "CIRCUIT_FAILURES",
    "CIRCUIT_OPEN_S",
    "MAX_IMAGE_BYTES",
    "LlmClient",
    "LlmRequest",
    "LlmResult",
    "LlmUsageCounts",
    "build_messages",
    "estimate_tokens",
    "json_mode_of",
    "orchestration_instruction",
    "prompt_text",
    "request_for",
    "resolve_image_artifacts",
]

CIRCUIT_FAILURES = 5
CIRCUIT_OPEN_S = 60.0
CHARS_PER_TOKEN = 4
MAX_RETRY_AFTER_S = 600.0
_ERROR_BODY_CHARS = 500
_SECRET_REF = re.compile(r"\{\{\s*secrets\.([A-Za-z0-9_.\-/]+)\s*\}\}")

Emit = Callable[[EventData], Awaitable[None]]
SecretLookup = Callable[[str], Awaitable[str | None]]


# --- messages (§3.12 steps 1-2) -----------------------------------------------------------------------------


def orchestration_instruction(branches: Sequence[str]) -> str:
    """The sentence appended to the system message in orchestration mode (§3.12 step 2)."""
    return f'Respond with a JSON object that includes the key "_next_node" set to one of: {", ".join(branches)}.'


def json_mode_of(payload: LlmActionPayload) -> bool:
    """JSON mode of the call: the node's ``json_mode``, forced in orchestration mode."""
    return payload.json_mode or payload.orchestration_mode


def _invalid_attachment(index: int, attachment: AttachmentIR, why: str) -> StepError:
    return StepError(ErrorObject(
        code="llm_error", retryable=False, message=f"attachment {index} ({attachment.type}): {why}",
        details={"reason": "invalid_attachment", "index": index, "type": attachment.type, "problem": why}))


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def _attachment_part(index: int, attachment: AttachmentIR, source: Any) -> dict[str, Any]:
    label = f"Attachment: {attachment.description or attachment.type}"
    if attachment.type in ("text", "markdown", "csv"):
        content = source if isinstance(source, str) else _json_text(source)
        return {"type": "text", "text": f"{label}\n{content}"}
    if attachment.type == "json":
        if isinstance(source, str):
            try:
                json.loads(source)
                content = source  # already JSON text
            except ValueError:
                content = _json_text(source)
        else:
            content = _json_text(source)
        return {"type": "text", "text": f"{label}\n{content}"}
    if attachment.type == "image":
        if isinstance(source, str):
            scheme = source.split(":", 1)[0].lower() if ":" in source else ""
            if scheme in ("http", "https", "data"):
                return {"type": "image_url", "image_url": {"url": source}}
            raise _invalid_attachment(index, attachment, "an image source must be an http(s) or data: URL")
        if _artifact_ref(source) is not None:  # resolved by resolve_image_artifacts when there is a store
            raise _invalid_attachment(index, attachment, "this runtime has no artifact store to read the image from")
        raise _invalid_attachment(index, attachment, "an image source must be an http(s) or data: URL")
    raise _invalid_attachment(index, attachment, "unknown attachment type")  # pragma: no cover - IR forbids it


MAX_IMAGE_BYTES = 20 * 1024 * 1024
_ARTIFACT_URI = "lo-artifact://"
_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
                (b"GIF89a", "image/gif"))


class ArtifactReader(Protocol):
    """Reads stored artifact content (the runtime's ``lo_artifacts`` object store)."""

    async def size(self, artifact_id: str, *, root_run_id: str | None = None) -> int | None: ...
    # None: no such artifact, or (``root_run_id`` given) one of another run tree

    async def read(self, artifact_id: str) -> bytes: ...


def _artifact_ref(source: Any) -> str | None:
    """The artifact an image source object names (``artifact_id``, ``uri`` or ``screenshot``), as a stored
    artifact id or, for a ``uri``/``screenshot`` that is not an ``lo-artifact://`` URI, that URI itself."""
    if not isinstance(source, dict):
        return None
    for key in ("artifact_id", "uri", "screenshot"):
        value = source.get(key)
        if isinstance(value, str) and value:
            return value[len(_ARTIFACT_URI):] if value.startswith(_ARTIFACT_URI) else value
    return None


def _image_type(attachment: AttachmentIR, source: dict[str, Any], data: bytes) -> str | None:
    """The image's media type: the attachment's ``mime_type``, else the source's, else sniffed from its bytes."""
    for declared in (attachment.mime_type, source.get("mime_type")):
        if isinstance(declared, str) and declared:
            return declared.split(";")[0].strip().lower()
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((kind for magic, kind in _IMAGE_MAGIC if data.startswith(magic)), None)


async def resolve_image_artifacts(attachments: Sequence[tuple[AttachmentIR, Any]], store: ArtifactReader,
                                  root_run_id: str | None = None) -> list[tuple[AttachmentIR, Any]]:
    """Image attachments whose source names a stored artifact get a ``data:`` URL of its content (§3.12 step 1,
    ≤ 20 MiB); a missing artifact, one of another run tree than ``root_run_id``, a larger one or one that is not
    an image is ``invalid_attachment``. A
    ``uri``/``screenshot`` that is an http(s) or ``data:`` URL is used as the image URL as it is."""
    out: list[tuple[AttachmentIR, Any]] = []
    for index, (attachment, source) in enumerate(attachments):
        ref = _artifact_ref(source) if attachment.type == "image" else None
        if ref is None:
            out.append((attachment, source))
            continue
        if ref.split(":", 1)[0].lower() in ("http", "https", "data") and ":" in ref:
            out.append((attachment, ref))
            continue
        size = await store.size(ref, root_run_id=root_run_id)
        if size is None:
            raise _invalid_attachment(index, attachment, f"no stored artifact '{ref}' of this run")
        if size > MAX_IMAGE_BYTES:
            raise _invalid_attachment(index, attachment, f"artifact '{ref}' has {size} bytes, more than the "
                                      f"{MAX_IMAGE_BYTES} allowed for an image")
        data = await store.read(ref)
        kind = _image_type(attachment, source, data)
        if kind is None or not kind.startswith("image/"):
            raise _invalid_attachment(index, attachment, f"artifact '{ref}' is not an image"
                                      + (f" ({kind})" if kind else ""))
        out.append((attachment, f"data:{kind};base64,{base64.b64encode(data).decode()}"))
    return out


def build_messages(payload: LlmActionPayload, system: str | None, prompt: str,
                   attachments: Sequence[tuple[AttachmentIR, Any]],
                   orchestration_branches: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The chat messages of an ``llm_action`` call from its rendered parts (§3.12 steps 1–2, §9.3).

    ``attachments`` pairs each attachment with its rendered ``source``. ``orchestration_branches`` defaults to
    ``payload.branches``; the orchestration instruction is appended only when ``payload.orchestration_mode``.
    Raises :class:`StepError` ``llm_error`` (``details.reason: invalid_attachment``) for an unusable attachment.
    """
    text_prompt = prompt if isinstance(prompt, str) else _json_text(prompt)
    system_text = system if system else None
    if payload.orchestration_mode:
        branches = list(orchestration_branches if orchestration_branches is not None else payload.branches)
        instruction = orchestration_instruction(branches)
        system_text = f"{system_text}\n\n{instruction}" if system_text else instruction
    messages: list[dict[str, Any]] = []
    if system_text is not None:
        messages.append({"role": "system", "content": system_text})
    if attachments:
        parts: list[dict[str, Any]] = [{"type": "text", "text": text_prompt}]
        parts.extend(_attachment_part(i, a, src) for i, (a, src) in enumerate(attachments))
        messages.append({"role": "user", "content": parts})
    else:
        messages.append({"role": "user", "content": text_prompt})
    return messages


def prompt_text(messages: Sequence[dict[str, Any]]) -> str:
    """The text of the messages (string contents and text parts; images are not counted)."""
    chunks: list[str] = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            chunks.append(content)
        elif isinstance(content, list):
            chunks.extend(p["text"] for p in content
                          if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
    return "\n".join(chunks)


def estimate_tokens(text: str) -> int:
    """Tokens estimated from text length: 4 characters per token, rounded up (§7.13)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


# --- request / result ---------------------------------------------------------------------------------------


@dataclass
class LlmRequest:
    """One attempt of an ``llm_action`` call. ``model`` None means ``LANGORCH_LLM_DEFAULT_MODEL``."""

    messages: list[dict[str, Any]]
    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    json_mode: bool = False
    timeout_ms: int | None = None
    idempotency_key: str | None = None
    request_id: str | None = None  # X-Request-ID; default the idempotency key, else a fresh UUID
    traceparent: str | None = None  # W3C trace context; default a child of the current span (else a new trace)
    # run budget (global_config.max_cost_usd and what the run has spent so far)
    max_cost_usd: float | None = None
    spent_usd: float = 0.0
    # fallback-chain filters of the node (or the global values)
    max_cost_per_llm_call_usd: float | None = None
    min_llm_quality: float | None = None
    # events: llm_usage and budget_exceeded, carrying these position fields
    emit: Emit | None = None
    node_id: str | None = None
    step_id: str | None = "llm"
    frame: str | None = None
    attempt: int | None = None


@dataclass(frozen=True)
class LlmUsageCounts:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    usage_reported: bool


@dataclass(frozen=True)
class LlmResult:
    text: str
    model: str  # the model called (chain entry)
    requested_model: str
    provider_model: str | None  # ``model`` of the provider's answer
    usage: LlmUsageCounts
    estimated_cost_usd: float | None  # None when the model has no prices
    fallback_attempt: int  # position of ``model`` in the chain, 0 = requested model
    latency_ms: int
    failures: list[dict[str, Any]] = field(default_factory=list)  # models tried or skipped before, with reasons


def request_for(payload: LlmActionPayload, global_config: GlobalConfigIR, messages: list[dict[str, Any]], *,
                spent_usd: float = 0.0, **fields: Any) -> LlmRequest:
    """The request of an ``llm_action`` node: its model, sampling, JSON mode (forced in orchestration mode),
    timeout, filters (node values, else ``global_config``'s) and the run budget; ``fields`` sets the rest
    (``idempotency_key``, ``emit``, ``node_id``, ``frame``, ``attempt``, ...)."""
    return LlmRequest(
        messages=messages, model=payload.model, temperature=payload.temperature, max_tokens=payload.max_tokens,
        json_mode=json_mode_of(payload), timeout_ms=payload.timeout_ms, max_cost_usd=global_config.max_cost_usd,
        spent_usd=spent_usd,
        max_cost_per_llm_call_usd=(payload.max_cost_per_llm_call_usd if payload.max_cost_per_llm_call_usd is not None
                                   else global_config.max_cost_per_llm_call_usd),
        min_llm_quality=(payload.min_llm_quality if payload.min_llm_quality is not None
                         else global_config.min_llm_quality),
        **fields)


# --- circuit breakers ---------------------------------------------------------------------------------------


@dataclass
class _Circuit:
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False


CircuitState = Literal["closed", "open", "half_open"]


@dataclass(frozen=True)
class _Target:
    model: str
    position: int
    base_url: str
    config: LlmModelConfig | None

    @property
    def key(self) -> tuple[str, str]:
        return (self.base_url, self.model)


class _Retryable(Exception):
    """A retryable failure of one model (moves down the chain)."""

    def __init__(self, info: dict[str, Any], retry_after_s: float | None = None) -> None:
        super().__init__(info.get("reason"))
        self.info = info
        self.retry_after_s = retry_after_s


def _retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date), capped at 600; None when absent/invalid."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _host(base_url: str) -> str | None:
    return urlsplit(base_url).netloc or None


def _round_usd(value: float) -> float:
    return round(value, 10)


def _call_cost(config: LlmModelConfig | None, prompt_tokens: float, completion_tokens: float) -> float | None:
    if config is None or not config.priced:
        return None
    return _round_usd((prompt_tokens * (config.prompt_usd_per_1k or 0.0)
                       + completion_tokens * (config.completion_usd_per_1k or 0.0)) / 1000)


def _error_excerpt(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return text[:_ERROR_BODY_CHARS] or None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])[:_ERROR_BODY_CHARS]
        if isinstance(err, str):
            return err[:_ERROR_BODY_CHARS]
    return json.dumps(body)[:_ERROR_BODY_CHARS]


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


# --- client -------------------------------------------------------------------------------------------------


class LlmClient:
    """OpenAI-compatible chat completions with fallback chains, circuit breakers, usage and budget (§7.13).

    One instance per runtime replica; it owns (or borrows, when ``http`` is given) one ``httpx.AsyncClient``.
    ``secrets`` resolves ``api_key_secret`` and ``{{secrets.<name>}}`` in ``LANGORCH_LLM_EXTRA_HEADERS`` (default:
    the ``env`` provider). Secret values live only inside one call and are never logged or put in events.
    """

    def __init__(self, settings: RuntimeSettings, *, secrets: SecretLookup | None = None,
                 http: httpx.AsyncClient | None = None, circuit_failures: int = CIRCUIT_FAILURES,
                 circuit_open_s: float = CIRCUIT_OPEN_S, clock: Callable[[], float] = time.monotonic,
                 metrics: RuntimeMetrics | None = None) -> None:
        self.base_url = settings.llm_base_url.rstrip("/")
        self._api_key = settings.llm_api_key
        self.default_model = settings.llm_default_model
        self.timeout_s = settings.llm_timeout_s
        self._extra_headers = dict(settings.llm_extra_headers)
        self.models: dict[str, LlmModelConfig] = dict(settings.llm_models)
        self._secrets = secrets or self._env_secret
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s),
                                               limits=httpx.Limits(max_connections=200,
                                                                   max_keepalive_connections=50))
        self.circuit_failures = circuit_failures
        self.circuit_open_s = circuit_open_s
        self._clock = clock
        self._circuits: dict[tuple[str, str], _Circuit] = {}
        self.metrics = metrics
        if metrics is not None:
            metrics.configure_models([self.default_model, *self.models])
            metrics.state.circuits.append(self.open_circuits)

    @staticmethod
    async def _env_secret(name: str) -> str | None:
        return env_secret(name)

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> LlmClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- circuits --

    def circuit_state(self, model: str, base_url: str | None = None) -> CircuitState:
        """State of the circuit of ``model`` at ``base_url`` (default: the model's configured base URL)."""
        url = (base_url or self._base_url_of(self.models.get(model))).rstrip("/")
        c = self._circuits.get((url, model))
        if c is None or c.opened_at is None:
            return "closed"
        return "open" if self._clock() - c.opened_at < self.circuit_open_s else "half_open"

    def circuits(self) -> dict[tuple[str, str], CircuitState]:
        """Every (base URL, model) this client has called, with its circuit state (for metrics and health)."""
        return {key: self.circuit_state(key[1], key[0]) for key in self._circuits}

    def open_circuits(self) -> list[tuple[str, str]]:
        """(``llm``, model label) of every model whose circuit is open now (for the gauge)."""
        label = self.metrics.model_label if self.metrics is not None else (lambda name: name)
        return [("llm", label(model)) for (url, model), state in self.circuits().items() if state == "open"]

    def _admit(self, key: tuple[str, str]) -> Literal["call", "probe"] | None:
        """Whether a call may go to this circuit now (None: open); half-open lets one probe through."""
        c = self._circuits.setdefault(key, _Circuit())
        if c.opened_at is None:
            return "call"
        if self._clock() - c.opened_at < self.circuit_open_s or c.probing:
            return None
        c.probing = True
        return "probe"

    def _record(self, key: tuple[str, str], ok: bool, probe: bool) -> None:
        """The outcome of a call: ``ok`` True for a success, False for a retryable failure."""
        c = self._circuits.setdefault(key, _Circuit())
        if probe:
            c.probing = False
        if ok:
            c.failures, c.opened_at = 0, None
            return
        c.failures += 1
        if probe or c.failures >= self.circuit_failures:
            c.opened_at = self._clock()

    # -- chain --

    def _base_url_of(self, config: LlmModelConfig | None) -> str:
        return (config.base_url if config is not None and config.base_url else self.base_url).rstrip("/")

    def chain(self, model: str | None) -> list[str]:
        """The requested model (default model when None) followed by its configured fallbacks, without repeats."""
        first = model or self.default_model
        names = [first]
        config = self.models.get(first)
        for name in config.fallbacks if config is not None else []:
            if name not in names:
                names.append(name)
        return names

    async def complete(self, request: LlmRequest) -> LlmResult:
        """One attempt of the call over the fallback chain; raises :class:`StepError` (``llm_error``,
        ``budget_exceeded``, ``secret_not_found``) when it cannot produce a completion."""
        requested = request.model or self.default_model
        estimated_prompt = estimate_tokens(prompt_text(request.messages))
        completion_bound = request.max_tokens or 0
        failures: list[dict[str, Any]] = []
        retry_after: float | None = None
        last_status: int | None = None
        tried = False
        for position, name in enumerate(self.chain(requested)):
            config = self.models.get(name)
            target = _Target(name, position, self._base_url_of(config), config)
            if (request.min_llm_quality is not None and config is not None and config.quality is not None
                    and config.quality < request.min_llm_quality):
                failures.append({"model": name, "reason": "below_min_quality", "quality": config.quality})
                continue
            projected_call = _call_cost(config, estimated_prompt, completion_bound)
            if (request.max_cost_per_llm_call_usd is not None and projected_call is not None
                    and projected_call > request.max_cost_per_llm_call_usd):
                failures.append({"model": name, "reason": "above_max_call_cost", "projected_usd": projected_call})
                continue
            admission = self._admit(target.key)
            if admission is None:
                tried = True
                failures.append({"model": name, "reason": "circuit_open"})
                continue
            try:
                await self._check_budget(request, projected_call)
                result = await self._measured(request, target, requested, failures, admission == "probe")
                if target.position > 0 and self.metrics is not None:
                    self.metrics.llm_fallbacks.labels(self.metrics.model_label(requested),
                                                      self.metrics.model_label(target.model)).inc()
                return result
            except _Retryable as exc:
                tried = True
                failures.append(exc.info)
                last_status = exc.info.get("http_status", last_status)
                if exc.retry_after_s is not None:
                    retry_after = max(retry_after or 0.0, exc.retry_after_s)
            finally:
                # a probe that ended without a verdict (other 4xx, budget, secret, cancellation) frees the slot
                if admission == "probe":
                    self._circuits[target.key].probing = False
        if not tried:
            raise StepError(ErrorObject(
                code="llm_error", retryable=False, message=f"no model of the chain of '{requested}' is eligible "
                "(min_llm_quality / max_cost_per_llm_call_usd)",
                details={"reason": "no_eligible_model", "requested_model": requested, "attempts": failures}))
        details: dict[str, Any] = {"reason": "chain_exhausted", "requested_model": requested, "attempts": failures}
        if retry_after is not None:
            details["retry_after_s"] = retry_after
            details["retry_after_ms"] = int(retry_after * 1000)
        summary = ", ".join(f"{f['model']}: {f['reason']}" for f in failures)
        raise StepError(ErrorObject(code="llm_error", retryable=True, http_status=last_status, details=details,
                                    message=f"every model of the chain of '{requested}' failed ({summary})"))

    async def _check_budget(self, request: LlmRequest, projected_call: float | None) -> None:
        if request.max_cost_usd is None:
            return
        spent = request.spent_usd or 0.0
        projected = _round_usd(spent + (projected_call or 0.0))
        if projected <= request.max_cost_usd:
            return
        if request.emit is not None:
            await request.emit(BudgetExceeded(node_id=request.node_id, step_id=request.step_id, frame=request.frame,
                                              attempt=request.attempt, max_cost_usd=request.max_cost_usd,
                                              spent_usd=spent, projected_usd=projected))
        raise StepError(ErrorObject(
            code="budget_exceeded", retryable=False,
            message=f"projected cost {projected} USD exceeds the run budget of {request.max_cost_usd} USD",
            details={"max_cost_usd": request.max_cost_usd, "spent_usd": spent, "projected_usd": projected}))

    async def _headers(self, request: LlmRequest, target: _Target) -> httpx.Headers:
        headers = httpx.Headers()
        for name, value in self._extra_headers.items():
            headers[name] = await self._resolve_refs(value)
        key: str | None = None
        if target.config is not None and target.config.api_key_secret:
            key = await self._secret(target.config.api_key_secret)
        elif self._api_key is not None and target.base_url == self.base_url:
            key = self._api_key.get_secret_value()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if request.idempotency_key:
            headers["Idempotency-Key"] = (request.idempotency_key if target.position == 0
                                          else f"{request.idempotency_key}:{target.model}")
        headers["X-Request-ID"] = request.request_id or request.idempotency_key or str(uuid.uuid4())
        if request.traceparent:
            headers["traceparent"] = request.traceparent
        else:  # the trace of the command the run executes under (api.md §1.3): this call's span (_measured)
            tracing.inject(headers)
        return headers

    async def _secret(self, name: str) -> str:
        value = await self._secrets(name)
        if value is None:
            raise StepError(ErrorObject(code="secret_not_found", retryable=False,
                                        message=f"secret '{name}' of the LLM configuration was not found",
                                        details={"secret_name": name}))
        return value

    async def _resolve_refs(self, value: str) -> str:
        out, pos = [], 0
        for m in _SECRET_REF.finditer(value):
            out.append(value[pos:m.start()])
            out.append(await self._secret(m.group(1)))
            pos = m.end()
        out.append(value[pos:])
        return "".join(out)

    def _body(self, request: LlmRequest, model: str) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "messages": request.messages}
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.json_mode:
            body["response_format"] = {"type": "json_object"}
        body["stream"] = False
        return body

    async def _measured(self, request: LlmRequest, target: _Target, requested: str,
                        failures: list[dict[str, Any]], probe: bool) -> LlmResult:
        """:meth:`_call` in a GenAI client span, counted in ``langorch_llm_requests_total`` and timed (api.md
        §13.1)."""
        with tracing.client_span(f"chat {target.model}", {
                "gen_ai.operation.name": "chat", "gen_ai.system": "openai", "gen_ai.request.model": target.model,
                "server.address": _host(target.base_url) or target.base_url}) as span:
            result = await self._counted(request, target, requested, failures, probe)
            span.set_attributes({"gen_ai.response.model": result.provider_model or result.model,
                                 "gen_ai.usage.input_tokens": result.usage.prompt_tokens,
                                 "gen_ai.usage.output_tokens": result.usage.completion_tokens})
            return result

    async def _counted(self, request: LlmRequest, target: _Target, requested: str,
                       failures: list[dict[str, Any]], probe: bool) -> LlmResult:
        metrics = self.metrics
        if metrics is None:
            return await self._call(request, target, requested, failures, probe)
        model = metrics.model_label(target.model)
        started = time.monotonic()
        outcome = "error"
        try:
            result = await self._call(request, target, requested, failures, probe)
            outcome = "success"
            return result
        except _Retryable as exc:
            reason = exc.info.get("reason")
            outcome = {"timeout": "timeout", "transport": "transport_error"}.get(str(reason), "error")
            raise
        except StepError as exc:
            outcome = "protocol_error" if exc.error.details.get("reason") == "invalid_response" else "error"
            raise
        finally:
            metrics.llm_requests.labels(model, outcome).inc()
            metrics.llm_duration.labels(model).observe(time.monotonic() - started)

    async def _call(self, request: LlmRequest, target: _Target, requested: str, failures: list[dict[str, Any]],
                    probe: bool) -> LlmResult:
        headers = await self._headers(request, target)
        body = self._body(request, target.model)
        timeout_s = request.timeout_ms / 1000 if request.timeout_ms is not None else self.timeout_s
        where: dict[str, Any] = {"model": target.model}
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout_s):
                response = await self._http.post(f"{target.base_url}/chat/completions", json=body, headers=headers,
                                                 timeout=httpx.Timeout(timeout_s))
        except (TimeoutError, httpx.TimeoutException) as exc:
            self._record(target.key, False, probe)
            raise _Retryable(where | {"reason": "timeout", "timeout_ms": int(timeout_s * 1000)}) from exc
        except httpx.TransportError as exc:
            self._record(target.key, False, probe)
            raise _Retryable(where | {"reason": "transport", "error": type(exc).__name__}) from exc
        latency_ms = int((time.monotonic() - started) * 1000)
        status = response.status_code
        if status == 408 or status == 429 or status >= 500:
            self._record(target.key, False, probe)
            raise _Retryable(where | {"reason": "http_error", "http_status": status,
                                      "provider_message": _error_excerpt(response)},
                             _retry_after_s(response.headers.get("retry-after")))
        if status >= 300:
            raise StepError(ErrorObject(
                code="llm_error", retryable=False, http_status=status,
                message=f"model '{target.model}' answered HTTP {status}",
                details=where | {"reason": "http_error", "requested_model": requested,
                                 "provider_message": _error_excerpt(response), "attempts": failures}))
        self._record(target.key, True, probe)
        text, provider_model, usage_raw = self._parse(response, target, requested)
        usage = self._usage(usage_raw, request.messages, text)
        cost = _call_cost(target.config, usage.prompt_tokens, usage.completion_tokens)
        if request.emit is not None:
            event = LlmUsage(node_id=request.node_id, step_id=request.step_id, frame=request.frame,
                             attempt=request.attempt, model=target.model, requested_model=requested,
                             provider_host=_host(target.base_url), prompt_tokens=usage.prompt_tokens,
                             completion_tokens=usage.completion_tokens, total_tokens=usage.total_tokens,
                             estimated_cost_usd=cost, usage_reported=usage.usage_reported, latency_ms=latency_ms,
                             fallback_attempt=target.position, provider_model=provider_model)
            await request.emit(event)
        return LlmResult(text=text, model=target.model, requested_model=requested, provider_model=provider_model,
                         usage=usage, estimated_cost_usd=cost, fallback_attempt=target.position,
                         latency_ms=latency_ms, failures=list(failures))

    @staticmethod
    def _parse(response: httpx.Response, target: _Target, requested: str) -> tuple[str, str | None, Any]:
        def invalid(why: str) -> StepError:
            return StepError(ErrorObject(
                code="llm_error", retryable=False, http_status=response.status_code,
                message=f"model '{target.model}' sent an unusable answer: {why}",
                details={"reason": "invalid_response", "model": target.model, "requested_model": requested,
                         "problem": why}))

        try:
            data = response.json()
        except ValueError as exc:
            raise invalid("the body is not JSON") from exc
        if not isinstance(data, dict):
            raise invalid("the body is not a JSON object")
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise invalid("no choices")
        message = choices[0].get("message")
        if not isinstance(message, dict):
            raise invalid("choices[0].message is missing")
        content = message.get("content")
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        else:
            raise invalid("choices[0].message.content is not a string")
        model = data.get("model")
        return text, model if isinstance(model, str) and model else None, data.get("usage")

    @staticmethod
    def _usage(raw: Any, messages: Sequence[dict[str, Any]], text: str) -> LlmUsageCounts:
        if isinstance(raw, dict):
            prompt, completion = _int(raw.get("prompt_tokens")), _int(raw.get("completion_tokens"))
            if prompt is not None and completion is not None:
                total = _int(raw.get("total_tokens"))
                return LlmUsageCounts(prompt, completion, total if total is not None else prompt + completion, True)
        prompt = estimate_tokens(prompt_text(messages))
        completion = estimate_tokens(text)
        return LlmUsageCounts(prompt, completion, prompt + completion, False)
