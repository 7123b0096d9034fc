"""The interpreter's policies as decisions: retry and backoff (ckp.md §4.8), error handlers and their budgets
(§3.3, §4.10), SLAs (§3.14), the run deadline (§7.11) and the state size limits (§2.3).

Pure functions over the IR, error objects and the persisted frame data; the step runner and the node lifecycle
apply what they decide (emit events, sleep, route the frame).
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

import orjson

from ckp_core.events import ErrorObject, SlaBreached
from ckp_core.ir import ErrorHandlerIR, NodeIR, RetryPolicyIR, SlaIR
from langorch_runtime.frames import Frame, NodeState, RunState, StepBudget

RECOVERY_GRACE_MS = 60_000  # LANGORCH_RECOVERY_GRACE_S
NEVER_RETRIED = frozenset({"canceled", "deadline_exceeded", "budget_exceeded"})
HANDLER_NAME_ALIASES = {
    "timeouterror": "step_timeout", "timeoutexception": "step_timeout", "noexecutorerror": "no_executor",
    "agentactionerror": "agent_error", "mcptoolerror": "mcp_tool_error", "ratelimiterror": "rate_limited",
}
MAX_VARIABLE_BYTES = 1024 * 1024
MAX_NAMESPACE_BYTES = 16 * 1024 * 1024


# -- retry and backoff (§4.8) --------------------------------------------------------------------------------------


def retry_allowed(policy: RetryPolicyIR, error: ErrorObject) -> bool:
    if error.code in NEVER_RETRIED:
        return False
    if policy.retry_on is not None:
        return any(c in (error.code, error.type, error.error_code) for c in policy.retry_on)
    return error.retryable


def retry_delay(policy: RetryPolicyIR, n: int) -> int:
    """Delay before retry ``n`` (0-based) in ms (§4.8)."""
    b = policy.retry_delay_ms
    if policy.strategy == "fixed":
        delay = float(b)
    elif policy.strategy == "linear":
        delay = float(b * (n + 1))
    elif policy.strategy == "exponential_backoff":
        delay = b * policy.backoff_multiplier ** n
    else:
        fib_a, fib_b = 1, 1
        for _ in range(n):
            fib_a, fib_b = fib_b, fib_a + fib_b
        delay = float(b * fib_a)
    delay = min(delay, policy.max_delay_ms)
    if policy.jitter:
        jittered = delay * (1 - policy.jitter * random.random())
        # full jitter draws from (0, delay]: whole milliseconds round down, but never to no wait at all
        return max(int(jittered), 1) if delay >= 1 else int(jittered)
    return int(delay)


def after_retry_after(delay: int, error: ErrorObject) -> int:
    """§4.8: a ``Retry-After`` from an agent or LLM (``details.retry_after_ms``) raises a retry delay to at least
    that value, at most 600 s. The rate limiter's own hint is not an agent's answer and is not applied."""
    after = error.details.get("retry_after_ms") if isinstance(error.details, dict) else None
    if error.code == "rate_limited" or isinstance(after, bool) or not isinstance(after, int | float) or after <= 0:
        return delay
    return max(delay, min(int(after), 600_000))


def step_budget(current: NodeState, identity: str, epoch: int) -> StepBudget:
    """The retry budget of one step instance: ``{"epoch", "policy": used, "handlers": {index: used}}``.

    It lives in the node's persisted data (``retry_budgets``): an async step pauses the run between attempts and
    must not get a fresh budget on every resume (§4.8, §4.10); an accepted run retry (a new ``epoch``) does."""
    books = current.setdefault("data", {}).setdefault("retry_budgets", {})
    budget = books.get(identity)
    if budget is None or budget.get("epoch") != epoch:
        budget = books[identity] = {"epoch": epoch, "policy": 0, "handlers": {}}
    return budget


# -- error handlers (§3.3, §4.10) ----------------------------------------------------------------------------------


def handler_matches(handler: ErrorHandlerIR, error: ErrorObject) -> bool:
    """§4.10 matching: ``error_type`` against code/type/error_code (with the class-name aliases), plus triggers."""
    wanted = handler.error_type.lower()
    if wanted not in ("", "*"):
        names = {n.lower() for n in (error.code, error.type, error.error_code) if n}
        alias = HANDLER_NAME_ALIASES.get(wanted)
        if wanted not in names and (alias is None or alias not in names):
            return False
    trigger = handler.trigger
    if trigger is None:
        return True
    if trigger.error_text_contains and not any(t.lower() in error.message.lower()
                                               for t in trigger.error_text_contains):
        return False
    if trigger.error_code and not any(c in (error.error_code, error.code) for c in trigger.error_code):
        return False
    return not (trigger.http_status_codes and error.http_status not in trigger.http_status_codes)


def handler_delay(handler: ErrorHandlerIR, n: int) -> int:
    """Delay before a handler's retry ``n`` (0-based) in ms: its ``retry_policy``, else its ``delay_ms``."""
    if handler.retry_policy is not None:
        return retry_delay(handler.retry_policy, n)
    return handler.delay_ms


def take_node_retry(frame: Frame, key: str, limit: int) -> int | None:
    """Use one node-scope retry (handler ``retry``/``retry_node``, validation ``retry_node``) of the budget
    ``key`` (``<node_id>#…``) in the frame: the retries used before this one, or None when the budget is spent."""
    retries = frame.setdefault("retries", {})
    used = retries.get(key, 0)
    if used < limit:
        retries[key] = used + 1
        return used
    return None


def forget_retries(frame: Frame, node_id: str) -> None:
    """A node left normally or through a fallback: node-level retry budgets (handler ``retry``/``retry_node``,
    validation ``retry_node``) count per entry of the node, so a later entry (a cycle) starts with a fresh budget."""
    retries = frame.get("retries")
    if retries:
        for key in [k for k in retries if k.startswith(f"{node_id}#")]:
            del retries[key]


# -- SLA (§3.14) ---------------------------------------------------------------------------------------------------


def elapsed_ms(current: NodeState) -> int:
    """Milliseconds since the node in progress was entered (its SLA counts from there)."""
    return int((time.time() - current["started"]) * 1000)


def sla_overrun(node: NodeIR, current: NodeState) -> int | None:
    """The node's elapsed ms once it completed past its SLA (not reported yet); None within it."""
    sla = node.sla
    if sla is None or current.get("sla_reported"):
        return None
    elapsed = elapsed_ms(current)
    if elapsed <= sla.max_duration_ms:
        return None
    return elapsed


def sla_breach(node: NodeIR, sla: SlaIR, fs: str, elapsed: int, canceled: bool) -> tuple[SlaBreached, ErrorObject]:
    """``sla_breached`` and the node's ``sla_breached`` error: the node was ``canceled`` at its limit (an enforced
    SLA), or it completed past it."""
    event = SlaBreached(node_id=node.id, frame=fs, limit_ms=sla.max_duration_ms, elapsed_ms=elapsed,
                        on_breach=sla.on_breach, escalation_handler=sla.escalation_handler,
                        enforced=True if canceled else sla.enforce)
    message = f"Node '{node.id}' was canceled at its SLA of {sla.max_duration_ms} ms" if canceled else \
        f"Node '{node.id}' took {elapsed} ms; its SLA is {sla.max_duration_ms} ms"
    error = ErrorObject(code="sla_breached", message=message, node_id=node.id, frame=fs,
                        details={"limit_ms": sla.max_duration_ms, "elapsed_ms": elapsed})
    return event, error


def sla_escalates(sla: SlaIR) -> bool:
    """``on_breach: escalate`` with an escalation handler: the node routes there (the breach as its ``error``)."""
    return sla.on_breach == "escalate" and sla.escalation_handler is not None


# -- the run deadline (§7.11) --------------------------------------------------------------------------------------


def remaining_s(timeout_ms: int | None, state: RunState, recovery_grace_ms: int) -> float | None:
    """Executing time left before the run deadline (§7.11); None without a deadline. The recovery path, started
    at the deadline, gets ``recovery_grace_ms`` past it."""
    if timeout_ms is None:
        return None
    limit = timeout_ms
    hit = state.get("deadline_hit")
    if state.get("recovery") is not None and hit is not None:
        limit = hit + recovery_grace_ms
    return (limit - state.get("executed_ms", 0)) / 1000


# -- state limits (§2.3) -------------------------------------------------------------------------------------------


def json_bytes(value: Any) -> int:
    """Bytes of ``value`` as compact UTF-8 JSON (key order does not change the size); orjson (a dependency of the
    LangGraph checkpointers) keeps the check of every node cheap, the standard library covers what it refuses."""
    try:
        return len(orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS))
    except TypeError:  # e.g. an integer beyond 64 bits
        return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8"))


def state_too_large(namespace: dict[str, Any]) -> ErrorObject | None:
    """§2.3: a variable over 1 MiB or a namespace over 16 MiB (canonical JSON) is ``state_too_large``. An oversized
    variable is dropped from the namespace, so it reaches neither the checkpoint nor a recovery path."""
    total = json_bytes(namespace)
    if total <= MAX_VARIABLE_BYTES:
        return None
    for name, value in list(namespace.items()):
        size = json_bytes(value)
        if size > MAX_VARIABLE_BYTES:
            del namespace[name]
            return ErrorObject(code="state_too_large", message=f"variable '{name}' is {size} bytes; the limit is "
                               f"{MAX_VARIABLE_BYTES}", details={"variable": name, "bytes": size,
                                                                 "limit_bytes": MAX_VARIABLE_BYTES})
    if total > MAX_NAMESPACE_BYTES:
        return ErrorObject(code="state_too_large", message=f"the variables take {total} bytes; the limit is "
                           f"{MAX_NAMESPACE_BYTES}", details={"bytes": total, "limit_bytes": MAX_NAMESPACE_BYTES})
    return None
