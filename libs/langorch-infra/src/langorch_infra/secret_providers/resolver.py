"""Which provider a secret name resolves through, and the resolution itself (ckp.md §7.14, api.md §11).

* A name with a metadata record resolves through the record: its provider, and its ``provider_ref`` (default:
  the name), whatever the procedure says (ckp.md §7.14: "a name with a LangOrch secret record uses that
  record's provider").
* Otherwise a provider the procedure names (``env``, ``vault``, ``aws``, ``azure``) is asked, the name being the
  provider reference; ``langorch`` (records only) is ``secret_not_found``.
* Otherwise ``secret_providers`` are tried in order: the first provider with a value wins; when none has one the
  error is ``secret_unavailable`` if any provider failed, else ``secret_not_found``.

Values from vault, aws and azure are kept in memory for ``secret_cache_ttl_s``; ``env`` is read at every use.
Metadata records come from :class:`RecordLookup` — the runtime and the gateway both fold the ``secret``
aggregate from ``LO_EVT`` (:class:`EventStoreRecords`), kept for the same TTL.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from ckp_core.events import EventEnvelope
from langorch_infra.secret_providers.base import PROVIDERS, Provider, ProviderName, SecretError, TtlCache
from langorch_infra.secret_providers.env import EnvProvider
from langorch_infra.settings import CommonSettings

SECRET_EVENTS = ("secret_created", "secret_updated")


@dataclass(frozen=True)
class SecretRecord:
    """A secret's metadata record: where its value lives (never the value)."""

    name: str
    provider: str
    provider_ref: str | None = None
    description: str | None = None
    tags: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return self.provider_ref or self.name


def fold_record(events: Iterable[EventEnvelope]) -> SecretRecord | None:
    """The record after the ``secret`` aggregate's events (``None`` when never created or deleted)."""
    record: SecretRecord | None = None
    for event in events:
        d = event.data
        if event.type in SECRET_EVENTS:
            record = SecretRecord(name=str(d["name"]), provider=str(d["provider"]),
                                  provider_ref=d.get("provider_ref"), description=d.get("description"),
                                  tags=list(d.get("tags") or []))
        elif event.type == "secret_deleted":
            record = None
    return record


class RecordLookup(Protocol):
    async def __call__(self, name: str) -> SecretRecord | None: ...


class EventReader(Protocol):
    async def read(self, aggregate: str, aggregate_id: str, after_position: int = 0) -> list[Any]: ...


class EventStoreRecords:
    """Metadata records folded from the event store's ``secret`` aggregate, kept ``ttl_s`` seconds per name (a
    record changed through the API is seen by every process within that time)."""

    def __init__(self, store: EventReader, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self._clock = clock
        self._known: dict[str, tuple[float, SecretRecord | None]] = {}

    async def __call__(self, name: str) -> SecretRecord | None:
        known = self._known.get(name)
        now = self._clock()
        if known is not None and known[0] > now:
            return known[1]
        stored = await self.store.read("secret", name)
        record = fold_record(s.envelope for s in stored)
        if self.ttl_s > 0:
            if len(self._known) > 10_000:
                self._known.clear()
            self._known[name] = (now + self.ttl_s, record)
        return record

    def forget(self, name: str) -> None:
        self._known.pop(name, None)


@dataclass(frozen=True)
class Resolution:
    """Where one use of a secret resolves: a provider and its reference."""

    name: str
    provider: str
    ref: str
    url: str | None = None


class LazyProvider:
    """A provider whose module (and SDK: hvac, boto3, azure-identity) is imported at its first use, not when a
    process starts: importing the three SDKs cost about a second of every start of the gateway and the workers,
    most of which never resolve a secret through them."""

    MODULES: ClassVar[dict[str, str]] = {"vault": "VaultProvider", "aws": "AwsProvider", "azure": "AzureProvider"}

    def __init__(self, name: ProviderName, settings: CommonSettings) -> None:
        self.name = name
        self.settings = settings
        self._provider: Provider | None = None

    def provider(self) -> Provider:
        if self._provider is None:
            import importlib

            module = importlib.import_module(f"langorch_infra.secret_providers.{self.name}")
            self._provider = getattr(module, self.MODULES[self.name])(self.settings)
        return self._provider

    async def fetch(self, name: str, ref: str, *, url: str | None = None) -> str:
        return await self.provider().fetch(name, ref, url=url)


class SecretResolver:
    """Secrets at the moment of use through the configured providers."""

    def __init__(self, settings: CommonSettings, records: RecordLookup | None = None,
                 providers: dict[str, Provider] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.records = records
        self.providers: dict[str, Provider] = providers if providers is not None else {
            "env": EnvProvider(), "vault": LazyProvider("vault", settings), "aws": LazyProvider("aws", settings),
            "azure": LazyProvider("azure", settings)}
        self.cache = TtlCache(settings.secret_cache_ttl_s, clock)

    def forget(self, name: str) -> None:
        """Drop what this process keeps about ``name`` (its record changed here): the record and every cached
        value (a value is cached by provider reference, which the old record named)."""
        forget = getattr(self.records, "forget", None)
        if callable(forget):
            forget(name)
        self.cache.clear()

    async def plan(self, name: str, *, provider: str | None = None, ref: str | None = None,
                   url: str | None = None) -> list[Resolution]:
        """The resolutions to try for ``name``, in order (one unless the default providers apply)."""
        record = await self.records(name) if self.records is not None else None
        if record is not None:  # the operator's record wins over what the procedure says (the url is its own)
            return [Resolution(name, record.provider, record.ref)]
        if provider == "langorch":
            raise SecretError("secret_not_found", name=name, provider="langorch",
                              reason="no LangOrch secret record has this name")
        if provider is not None:
            return [Resolution(name, provider, ref or name, url)]
        return [Resolution(name, p, ref or name, url) for p in self.settings.secret_providers]

    async def fetch(self, resolution: Resolution, *, cached: bool = True) -> str:
        """One provider's value, from the cache while fresh (``env`` is never cached)."""
        r = resolution
        impl = self.providers.get(r.provider)
        if impl is None or r.provider not in PROVIDERS:
            raise SecretError("secret_unavailable", name=r.name, provider=r.provider,
                              reason=f"unknown secret provider '{r.provider}'")
        key = (r.provider, r.ref, r.url or "")
        if cached and r.provider != "env":
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        value = await impl.fetch(r.name, r.ref, url=r.url)
        if r.provider != "env":
            self.cache.put(key, value)
        return value

    async def resolve(self, name: str, *, provider: str | None = None, ref: str | None = None,
                      url: str | None = None, field: str | None = None) -> str:
        """The value of ``name`` (its JSON ``field`` when given); raises :class:`SecretError`."""
        failures: list[SecretError] = []
        for resolution in await self.plan(name, provider=provider, ref=ref, url=url):
            try:
                value = await self.fetch(resolution)
            except SecretError as exc:
                failures.append(exc)
                continue
            return select_field(name, resolution.provider, value, field)
        unavailable = [f for f in failures if f.code == "secret_unavailable"]
        if len(failures) == 1:
            raise failures[0]
        reason = "; ".join(f"{f.provider}: {f.reason}" for f in failures) or "no secret provider is configured"
        raise SecretError("secret_unavailable" if unavailable else "secret_not_found", name=name,
                          provider=",".join(f.provider for f in failures) or "none", reason=reason)

    async def value(self, name: str) -> str | None:
        """``resolve`` by name, ``None`` when no provider has it (an unavailable provider still raises)."""
        try:
            return await self.resolve(name)
        except SecretError as exc:
            if exc.code == "secret_not_found":
                return None
            raise

    async def check(self, record: SecretRecord) -> None:
        """Resolve a record's value now, past the cache; raises :class:`SecretError`. The value is dropped."""
        value = await self.fetch(Resolution(record.name, record.provider, record.ref), cached=False)
        del value


def select_field(name: str, provider: str, value: str, field: str | None) -> str:
    """A field of a JSON-valued secret (``{{secrets.<alias>.<field>}}``)."""
    if field is None:
        return value
    try:
        selected = json.loads(value)[field]
    except (ValueError, KeyError, TypeError):
        raise SecretError("secret_not_found", name=name, provider=provider,
                          reason=f"the value is not a JSON object with field '{field}'") from None
    return selected if isinstance(selected, str) else json.dumps(selected)


SecretLookup = Callable[[str], Awaitable[str | None]]
