"""External effects of steps (ckp.md §4.5, §4.6, §4.10–§4.12, §7.6, §7.9, §7.14): executor resolution (test
overrides → dry-run skip → mock → dispatch under the rate limits), async-callback credentials, screen validations
and screenshots, artifacts named by results, and the secrets of a step's parameters.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from ckp_core.events import (
    ArtifactCreated,
    DryRunStepSkipped,
    ErrorObject,
    ScreenshotRequested,
    StepMockApplied,
    StepStarted,
    StepTestOverrideApplied,
    format_time,
)
from ckp_core.ids import new_id
from ckp_core.ir import NodeIR, StepIR
from ckp_core.redaction import REDACTED
from langorch_infra.callbacks import GRACE_S, make_token
from langorch_runtime.errors import StepError
from langorch_runtime.machine.context import RunContext
from langorch_runtime.machine.ports import CallbackInfo, ContentArtifacts, DispatchRequest, Emit
from langorch_runtime.steps import idempotency_key


class Announcement:
    """``step_started`` of one attempt, emitted once: with the agent chosen for a dispatched step (ckp.md §8),
    or without one when the step fails or completes before any agent is chosen."""

    def __init__(self, emit: Emit, event: StepStarted, settle: Callable[[], Awaitable[None]] | None = None,
                 claim: asyncio.Future[None] | None = None) -> None:
        self.emit = emit
        self.settle = settle  # a dispatched step's announcement is stored before the agent is called
        self.event: StepStarted | None = event
        self.binding_kind = event.binding_kind  # ``channel`` until an agent is chosen (ckp.md §8)
        # the attempt's ``started`` record (ckp.md §7.4), written while the agent is chosen and its lease taken:
        # stored before ``step_started`` is emitted, so before the agent is called, as when it was awaited first
        self.claim = claim

    async def claimed(self) -> None:
        """Wait until the attempt's ``started`` record is stored (raises its write's failure)."""
        claim, self.claim = self.claim, None
        if claim is not None:
            await claim

    def abandon(self) -> None:
        """The attempt ended without announcing (canceled, or a failure that is not a step's): the claim's write
        goes on, and its failure is not reported as never retrieved."""
        claim, self.claim = self.claim, None
        if claim is not None:
            claim.add_done_callback(lambda done: done.cancelled() or done.exception())

    async def __call__(self, agent_id: str | None, binding_kind: str | None = None) -> None:
        await self.claimed()
        event, self.event = self.event, None
        if event is not None:
            if binding_kind:
                self.binding_kind = binding_kind
            await self.emit(event.model_copy(update={"agent_id": agent_id, "binding_kind": self.binding_kind}))
            if self.settle is not None:
                await self.settle()


class Dispatching(RunContext):
    """The run context with its external effects."""

    async def rehearsed(self, node: NodeIR, override_id: str, step_id: str, fs: str, attempt: int, action: str,
                        channel: str | None) -> tuple[bool, Any]:
        """Executor resolution before a real dispatch (§4.5, §7.9): ``test_data_overrides`` (under
        ``<node_id>.<override_id>``, else ``<override_id>``) → dry-run skip → mock. Returns ``(True, answer)`` when
        one of them answered, else ``(False, None)``."""
        gc = self.ir.global_config
        for override_key in (f"{node.id}.{override_id}", override_id):
            if override_key in gc.test_data_overrides:
                await self.emit(StepTestOverrideApplied(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt,
                                                        override_key=override_key))
                return True, copy.deepcopy(gc.test_data_overrides[override_key])
        if self.dry_run():
            await self.emit(DryRunStepSkipped(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt,
                                              action=action, binding_kind="channel", channel=channel))
            return True, {"dry_run": True, "skipped_action": action, "channel": channel}
        if gc.mock_external_calls:
            await self.emit(StepMockApplied(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt,
                                            action=action, binding_kind="channel", channel=channel))
            return True, {"mocked": True, "action": action, "channel": channel}
        return False, None

    def admitted(self, node_id: str, step_id: str, fs: str, attempt: int) -> contextlib.AbstractAsyncContextManager[
            None]:
        """The procedure's rate limits (§7.6) around one external dispatch attempt (a no-op when disabled)."""
        limits = self.ir.global_config.rate_limiting
        if self.limiter is None or not limits.enabled:
            return contextlib.nullcontext()
        position = {"node_id": node_id, "step_id": step_id, "frame": fs, "attempt": attempt}
        return self.limiter.admit(self.ir.procedure_id, limits, self.emit, position)

    async def side_dispatch(self, node: NodeIR, step_id: str, fs: str, attempt: int, action: str,
                            params: dict[str, Any]) -> tuple[Any, bool]:
        """A screen validation or failure screenshot dispatch (§4.10, §4.11) resolved like a step's: override →
        dry-run skip → mock → real dispatch under the rate limits. Returns ``(result, dispatched)``; a failed
        dispatch raises :class:`StepError`."""
        answered, answer = await self.rehearsed(node, step_id, step_id, fs, attempt, action, node.channel)
        if answered:
            return answer, False
        request = DispatchRequest(node=node, step_id=step_id, action=action, channel=node.channel, params=params,
                                  attempt=attempt, idempotency_key=idempotency_key(self.run.run_id, node.id, step_id,
                                                                                   fs, attempt),
                                  frame=fs, timeout_ms=None, dispatch_mode="sync", run_id=self.run.run_id,
                                  procedure_id=self.ir.procedure_id, emit=self.emit)
        async with self.admitted(node.id, step_id, fs, attempt):
            await self.settle()
            return await self.dispatcher.dispatch(request), True

    # -- a step's dispatch (§4.5, §4.6) --------------------------------------------------------------------------
    def callback_for(self, node: NodeIR, step_id: str, delegation_id: str) -> CallbackInfo | None:
        """The callback URL and token an async workflow dispatch hands the agent (api.md §15.2)."""
        if self.callbacks is None:
            return None
        expires = datetime.now(UTC) + timedelta(seconds=self.callbacks.timeout_s)
        expires_unix = int(expires.timestamp()) + GRACE_S
        token = make_token(self.callbacks.key, self.run.run_id, node.id, step_id, delegation_id, expires_unix)
        return CallbackInfo(delegation_id=delegation_id, token=token, expires_at=format_time(expires),
                            url=f"{self.callbacks.public_url.rstrip('/')}/api/runs/{self.run.run_id}/callback")

    async def external(self, node: NodeIR, step: StepIR, step_id: str, fs: str, params: dict[str, Any],
                       attempt: int, key: str, callback: CallbackInfo | None = None,
                       announce: Announcement | None = None) -> Any:
        """Executor resolution of a dispatched step (§4.5): override → dry run → mock → dispatch. ``step_started``
        (``announce``) is emitted once the agent is chosen, or at once when no agent will be."""
        gc = self.ir.global_config
        if announce is not None and (self.dry_run() or gc.mock_external_calls or any(
                k in gc.test_data_overrides for k in (f"{node.id}.{step.step_id}", step.step_id))):
            await announce(None)
        answered, answer = await self.rehearsed(node, step.step_id, step_id, fs, attempt, step.action,
                                                step.binding.channel)
        if answered:
            return answer
        async with self.admitted(node.id, step_id, fs, attempt):
            return await self.dispatch_step(node, step, step_id, fs, params, attempt, key, callback, announce)

    async def dispatch_step(self, node: NodeIR, step: StepIR, step_id: str, fs: str, params: dict[str, Any],
                            attempt: int, key: str, callback: CallbackInfo | None,
                            announce: Announcement | None = None) -> Any:
        channel = step.binding.channel or ""
        request = DispatchRequest(node=node, step_id=step_id, action=step.action, channel=step.binding.channel,
                                  params=params, attempt=attempt, idempotency_key=key, frame=fs,
                                  timeout_ms=step.timeout_ms, dispatch_mode=step.dispatch_mode,
                                  run_id=self.run.run_id, procedure_id=self.ir.procedure_id, emit=self.emit,
                                  callback=callback, affinity=self.affinity.get(channel), on_selected=announce)
        try:
            return await self._dispatch(request, step)
        finally:
            if request.agent_id:
                self.affinity[channel] = request.agent_id

    async def _dispatch(self, request: DispatchRequest, step: StepIR) -> Any:
        if request.on_selected is None or not self.dispatcher.announces_agent:
            await self.settle()
        # else the announcement settles once the agent is chosen, before the call: the events before it are
        # appended while the agent is chosen and its lease taken, as the step's claim is written
        if step.timeout_ms is None or getattr(self.dispatcher, "enforces_step_timeout", False):
            return await self.dispatcher.dispatch(request)
        try:
            return await asyncio.wait_for(self.dispatcher.dispatch(request), step.timeout_ms / 1000)
        except TimeoutError:
            raise StepError(ErrorObject(code="step_timeout", retryable=True,
                                        message=f"step '{request.step_id}' timed out after {step.timeout_ms} ms")) \
                from None

    # -- screenshots and artifacts (§4.10, §4.12) ------------------------------------------------------------------
    async def screenshot(self, node: NodeIR, step_id: str | None, fs: str, attempt: int | None, reason: str,
                         error: ErrorObject | None) -> None:
        """A failure or completion screenshot (§4.10): dispatched as ``screenshot`` to the node's channel (identity
        ``<step_id>~screenshot``, artifacts harvested, failures ignored), else ``screenshot_requested``."""
        shot_id = f"{step_id or node.id}~screenshot"
        if not node.orchestrator:
            try:
                result, dispatched = await self.side_dispatch(node, shot_id, fs, attempt or 1, "screenshot",
                                                              {"reason": reason})
            except StepError as exc:
                if exc.error.code != "no_executor":
                    return  # the screenshot's own failure is ignored
            else:
                if dispatched:
                    await self.harvest(node, shot_id, fs, attempt or 1, result)
                return
        await self.emit(ScreenshotRequested(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt,
                                            reason=reason, error=error))

    async def harvest(self, node: NodeIR, step_id: str, fs: str, attempt: int, result: Any) -> Any:
        """Record the artifacts a step result names (§4.12): screenshots, artifact links and inline content
        (stored through ``artifacts.put`` and replaced by ``{artifact_id, uri}`` in the result)."""
        if isinstance(result, ContentArtifacts):
            return await self.harvest_content(node, step_id, fs, attempt, result)
        if not isinstance(result, dict):
            return result
        found: list[tuple[str | None, dict[str, Any]]] = []  # (key to replace, spec)
        if isinstance(result.get("screenshot"), str):
            found.append((None, {"kind": "screenshot", "uri": result["screenshot"]}))
        if isinstance(result.get("artifact"), dict):
            found.append(("artifact", result["artifact"]))
        for item in result.get("artifacts") or [] if isinstance(result.get("artifacts"), list) else []:
            if isinstance(item, dict):
                found.append((None, item))
        if isinstance(result.get("artifact_uri"), str) and isinstance(result.get("artifact_kind"), str):
            found.append((None, {"kind": result["artifact_kind"], "uri": result["artifact_uri"]}))
        if not found:
            return result
        out = dict(result)
        for replace, spec in found:
            artifact_id = new_id()
            uri = spec.get("uri")
            stored = False
            size = None
            content = spec.get("content_base64")
            if isinstance(content, str) and self.artifacts is not None:
                uri, size = await self.artifacts.put(artifact_id, spec, run_id=self.run.run_id,
                                                     root_run_id=self.root_run_id)
                stored = True
            elif isinstance(content, str):
                continue  # no artifact store in this runtime: the content stays in the result
            await self.emit(ArtifactCreated(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt,
                                            artifact_id=artifact_id, kind=str(spec.get("kind") or "file"),
                                            name=spec.get("name"), uri=uri, mime_type=spec.get("mime_type"),
                                            size_bytes=size, stored=stored))
            if replace is not None and stored:
                out[replace] = {"artifact_id": artifact_id, "uri": uri}
        return out

    async def harvest_content(self, node: NodeIR, step_id: str, fs: str, attempt: int,
                              result: ContentArtifacts) -> Any:
        """Record the content artifacts of an MCP result; the output links them where they were."""
        value = await self.harvest(node, step_id, fs, attempt, copy.deepcopy(result.value))
        for spec in result.artifacts:
            artifact_id = new_id()
            uri, size, stored = spec.get("uri"), None, False
            if isinstance(spec.get("content_base64"), str):
                if self.artifacts is None:
                    continue  # no artifact store in this runtime: the content stays in the output
                uri, size = await self.artifacts.put(artifact_id, spec, run_id=self.run.run_id,
                                                     root_run_id=self.root_run_id)
                stored = True
            await self.emit(ArtifactCreated(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt,
                                            artifact_id=artifact_id, kind=str(spec.get("kind") or "file"),
                                            name=spec.get("name"), uri=uri, mime_type=spec.get("mime_type"),
                                            size_bytes=size, stored=stored))
            at = spec.get("at")
            if isinstance(at, int) and isinstance(value, list) and 0 <= at < len(value):
                value[at] = {"type": spec.get("type"), "artifact_id": artifact_id, "uri": uri,
                             "name": spec.get("name"), "mime_type": spec.get("mime_type")}
        return value

    # -- secrets (§7.14) -----------------------------------------------------------------------------------------
    async def secret_layer(self, node: NodeIR, step: StepIR, step_id: str, internal: bool) -> dict[str, Any]:
        """The ``secrets`` local of a step's parameters: values (internal keys) or grants (agents), masked."""
        layer: dict[str, Any] = {}
        handed: set[str] = set()
        config = self.ir.global_config.secrets_config
        for ref in step.secrets:
            declared = self.ir.secrets.get(ref.alias)
            name = declared.key if declared else ref.alias
            fld = ref.field or (declared.field if declared else None)
            # the reference's provider, else the procedure's; none (or langorch): the name's record decides
            provider = (declared.provider if declared else None) or config.provider
            if self.secrets is None:
                raise StepError(ErrorObject(code="secret_not_found", message=f"secret '{ref.alias}' ({name}) "
                                            "has no value: no secret provider is configured here"))
            # resolved now in both cases: a provider failure fails the step here (secret_not_found or the retryable
            # secret_unavailable), and the value is masked in the run's events even when an agent's grant or an MCP
            # tool's argument (redeemed in memory at dispatch) brings it back in a result
            resolved = await self.secrets.resolve(name, provider=provider, url=config.vault_url, field=fld)
            handed.add(resolved)
            value: Any = resolved
            if not internal:
                value = self.secrets.grant(run_id=self.run.run_id, secret_name=name, node_id=node.id,
                                           step_id=step_id, field=fld, provider=provider, url=config.vault_url)
            handed.add(str(value))
            if ref.field is not None:
                entry = layer.setdefault(ref.alias, {})
                if isinstance(entry, dict):
                    entry[ref.field] = value
            else:
                layer[ref.alias] = value
        self._secrets_handed.update(h for h in handed if len(h) >= 4)
        if self.on_sensitive is not None:
            self.on_sensitive(set(), handed)
        return {"secrets": layer}

    def mask_secrets(self, value: Any) -> Any:
        """``value`` with every secret value or grant handed out by this execution replaced by ``***REDACTED***``
        (ckp.md §7.14: an agent's or MCP tool's answer that echoes one keeps it out of variables, step records and
        checkpoints, not only out of events)."""
        if not self._secrets_handed:
            return value
        return mask_values(value, sorted(self._secrets_handed, key=len, reverse=True))


def mask_values(value: Any, secrets: list[str]) -> Any:
    """A copy of a JSON value with each of ``secrets`` (longest first) masked inside its strings and keys."""
    if isinstance(value, str):
        for secret in secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {mask_values(k, secrets): mask_values(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_values(v, secrets) for v in value]
    return value
