"""``global_config``: retry defaults, limits, checkpointing, rate limiting, audit settings, and secrets_config
(the declared secret aliases)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ckp_core.compiler.fields import MISSING, Compilation, strip_object
from ckp_core.compiler.operations import LOG_LEVELS
from ckp_core.compiler.retry import retry_keys
from ckp_core.diagnostics import pointer
from ckp_core.expressions import json_type_name
from ckp_core.ir import GlobalConfigIR, RateLimitingIR, RetryPolicyIR, SecretReferenceIR, SecretsConfigIR

GLOBAL_CONFIG_FIELDS = frozenset({
    "max_retries", "retry_delay_ms", "backoff_multiplier", "retry_policy", "timeout_ms",
    "default_step_timeout_ms", "max_hops", "on_failure", "screenshot_on_fail", "logging_level",
    "telemetry_enabled", "checkpoint_strategy", "checkpoint_storage", "checkpoint_retention_days",
    "resume_on_failure", "execution_mode", "mock_external_calls", "test_data_overrides", "rate_limiting",
    "secrets_config", "audit_config", "workflow_dispatch_mode", "max_cost_usd", "max_cost_per_llm_call_usd",
    "min_llm_quality",
})
SECRET_PROVIDERS = {
    "env": "env", "env_vars": "env", "environment": "env", "vault": "vault", "hashicorp_vault": "vault",
    "aws": "aws", "aws_secrets_manager": "aws", "aws_secrets": "aws", "azure": "azure",
    "azure_key_vault": "azure", "azure_keyvault": "azure", "langorch": "langorch", "database": "langorch",
    "catalog": "langorch", "platform": "langorch",
}


def global_config(c: Compilation, doc: dict[str, Any]) -> tuple[GlobalConfigIR, str | None]:
    """The global configuration, and its on_failure node (an edge from the start node)."""
    raw = doc.get("global_config")
    if raw is None:
        return GlobalConfigIR(), None
    p = "/global_config"
    gc = c.obj(raw, p, GLOBAL_CONFIG_FIELDS)
    if gc is None:
        return GlobalConfigIR(), None
    kw: dict[str, Any] = {}
    for key in ("max_retries", "retry_delay_ms", "timeout_ms", "default_step_timeout_ms"):
        v = c.integer(gc, key, p)
        if v is not None:
            kw[key] = v
    hops = c.integer(gc, "max_hops", p, minimum=1)
    if hops is not None:
        kw["max_hops"] = hops
    mult = c.number(gc, "backoff_multiplier", p, minimum=1)
    if mult is not None:
        kw["backoff_multiplier"] = mult
    policy_keys: dict[str, Any] = {}
    if "retry_policy" in gc:
        policy_keys = retry_keys(c, gc["retry_policy"], f"{p}/retry_policy")
    flat = {"max_retries": kw.get("max_retries"), "retry_delay_ms": kw.get("retry_delay_ms"),
            "backoff_multiplier": kw.get("backoff_multiplier")}
    base = {k: v for k, v in flat.items() if v is not None}
    kw["retry_policy"] = RetryPolicyIR(**{**base, **policy_keys})
    on_failure = c.node_ref(gc, "on_failure", p)
    if on_failure is not None:
        kw["on_failure"] = on_failure
    for key in ("screenshot_on_fail", "telemetry_enabled", "resume_on_failure", "mock_external_calls"):
        if key in gc:
            kw[key] = c.boolean(gc, key, p, default=key == "telemetry_enabled")
    level = c.enum({k: v.upper() if isinstance(v, str) else v for k, v in gc.items()
                    if k == "logging_level"}, "logging_level", p, LOG_LEVELS)
    if level is not None:
        kw["logging_level"] = level
    strategy = c.enum(gc, "checkpoint_strategy", p, ("every_node", "critical_nodes_only", "disabled"),
                      aliases={"none": "disabled"})
    if strategy is not None:
        kw["checkpoint_strategy"] = strategy
    for key in ("checkpoint_storage", "checkpoint_retention_days"):
        if key in gc:
            c.add("info", "field_has_no_effect", f"{p}/{key}: '{key}' has no effect in LangOrch", f"{p}/{key}")
    mode = c.enum(gc, "execution_mode", p, ("production", "dry_run", "validation_only"))
    if mode is not None:
        kw["execution_mode"] = mode
    if "test_data_overrides" in gc:
        overrides = c.obj(gc["test_data_overrides"], f"{p}/test_data_overrides")
        if overrides is not None:
            kw["test_data_overrides"] = dict(gc["test_data_overrides"])
    if "rate_limiting" in gc:
        kw["rate_limiting"] = rate_limiting(c, gc["rate_limiting"], f"{p}/rate_limiting")
    if "secrets_config" in gc:
        kw["secrets_config"] = secrets_config(c, gc["secrets_config"], f"{p}/secrets_config")
    if "audit_config" in gc:
        audit = c.obj(gc["audit_config"], f"{p}/audit_config",
                      ("enabled", "redacted_fields", "audit_level", "storage_location", "retention_days",
                       "include_sensitive_data"))
        if audit is not None:
            kw["audit_enabled"] = c.boolean(audit, "enabled", f"{p}/audit_config", default=True)
            fields_ = audit.get("redacted_fields", [])
            if c.expect(fields_, (list,), "array", f"{p}/audit_config/redacted_fields"):
                names = []
                for i, f in enumerate(fields_):
                    if c.expect(f, (str,), "string", f"{p}/audit_config/redacted_fields/{i}"):
                        names.append(f)
                kw["redacted_fields"] = names
    dispatch = c.enum({k: v.lower() if isinstance(v, str) else v for k, v in gc.items()
                       if k == "workflow_dispatch_mode"}, "workflow_dispatch_mode", p, ("async", "sync"))
    if dispatch is not None:
        kw["workflow_dispatch_mode"] = dispatch
    for key in ("max_cost_usd", "max_cost_per_llm_call_usd"):
        cost = c.number(gc, key, p, minimum=0, exclusive=True)
        if cost is not None:
            kw[key] = cost
    quality = c.number(gc, "min_llm_quality", p)
    if quality is not None:
        kw["min_llm_quality"] = quality
    return GlobalConfigIR(**kw), on_failure


def rate_limiting(c: Compilation, raw: Any, p: str) -> RateLimitingIR:
    rl = c.obj(raw, p, ("enabled", "max_requests_per_minute", "max_concurrent_operations", "max_wait_ms"))
    if rl is None:
        return RateLimitingIR()
    kw: dict[str, Any] = {"enabled": c.boolean(rl, "enabled", p)}
    for key in ("max_requests_per_minute", "max_concurrent_operations"):
        v = c.integer(rl, key, p, minimum=1)
        if v is not None:
            kw[key] = v
    wait = c.integer(rl, "max_wait_ms", p)
    if wait is not None:
        kw["max_wait_ms"] = wait
    return RateLimitingIR(**kw)


def secrets_config(c: Compilation, raw: Any, p: str) -> SecretsConfigIR:
    sc = c.obj(raw, p, ("provider", "type", "vault_url", "secret_references"))
    if sc is None:
        return SecretsConfigIR()
    if "type" in sc and "provider" not in sc:
        c.add("info", "alias_normalised", f"{p}/type: 'type' read as 'provider'", f"{p}/type")
        sc["provider"] = sc.pop("type")
    default_provider = provider(c, sc, "provider", p)
    vault_url = c.string(sc, "vault_url", p)
    refs = sc.get("secret_references", {})
    if c.expect(refs, (dict,), "object", f"{p}/secret_references"):
        for alias, ref in strip_object(refs).items():
            rp = f"{p}/secret_references/{pointer(alias)[1:]}"
            c.secret_aliases.add(alias)
            if isinstance(ref, str):
                c.secrets[alias] = SecretReferenceIR(key=ref)
            elif isinstance(ref, dict):
                r = c.obj(ref, rp, ("key", "provider", "field"))
                if r is None:
                    continue
                key = c.string(r, "key", rp, required=True)
                prov = provider(c, r, "provider", rp)
                fld = c.string(r, "field", rp)
                if key is not None:
                    c.secrets[alias] = SecretReferenceIR(key=key, provider=prov, field=fld)
            else:
                c.add("error", "invalid_type", f"{rp}: expected string or object, got {json_type_name(ref)}",
                      rp)
    return SecretsConfigIR(provider=default_provider, vault_url=vault_url)


def provider(c: Compilation, obj: Mapping[str, Any], key: str, p: str) -> str | None:
    v = obj.get(key, MISSING)
    if v is MISSING:
        return None
    if not c.expect(v, (str,), "string", f"{p}/{key}"):
        return None
    canonical = SECRET_PROVIDERS.get(v.lower())
    if canonical is None:
        c.add("error", "invalid_value", f"{p}/{key}: '{v}' is not valid; expected one of env, vault, aws, "
              "azure, langorch", f"{p}/{key}")
        return None
    if canonical != v:
        c.add("info", "alias_normalised", f"{p}/{key}: '{v}' read as '{canonical}'", f"{p}/{key}")
    return canonical
