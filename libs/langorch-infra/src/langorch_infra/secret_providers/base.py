"""What every secret provider shares: the one error they raise, and the short-lived in-memory cache."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal, Protocol

from ckp_core.errors import CkpError

ProviderName = Literal["env", "vault", "aws", "azure"]
PROVIDERS: tuple[ProviderName, ...] = ("env", "vault", "aws", "azure")
MAX_REASON = 300


class SecretError(CkpError):
    """A secret could not be resolved. ``code`` is ``secret_not_found`` (the provider answered that it has no such
    value, or the reference is malformed) or ``secret_unavailable`` (the provider could not be reached, refused
    the login, or failed: retryable). ``reason`` is the provider's own explanation, never the value."""

    def __init__(self, code: Literal["secret_not_found", "secret_unavailable"], *, name: str, provider: str,
                 reason: str) -> None:
        reason = " ".join(reason.split())[:MAX_REASON]
        super().__init__(f"secret '{name}' ({provider}): {reason}", code=code,
                         retryable=code == "secret_unavailable",
                         details={"secret_name": name, "provider": provider, "reason": reason})
        self.name = name
        self.provider = provider
        self.reason = reason


class Provider(Protocol):
    """One provider: ``fetch`` returns the value the reference names, read now, or raises :class:`SecretError`."""

    name: ProviderName

    async def fetch(self, name: str, ref: str, *, url: str | None = None) -> str:
        """``name`` is the secret's name, ``ref`` the provider reference (the name when the record has none),
        ``url`` a procedure's ``secrets_config.vault_url``."""
        ...


class TtlCache:
    """Values by key for ``ttl_s`` seconds, in this process's memory only (never written anywhere)."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._items: dict[tuple[str, ...], tuple[float, str]] = {}

    def _now(self) -> float:
        return self._clock()

    def get(self, key: tuple[str, ...]) -> str | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= self._now():
            self._items.pop(key, None)
            return None
        return item[1]

    def put(self, key: tuple[str, ...], value: str) -> None:
        if self.ttl_s <= 0:
            return
        if len(self._items) > 10_000:  # bound: drop what expired, then everything
            now = self._now()
            self._items = {k: v for k, v in self._items.items() if v[0] > now}
            if len(self._items) > 10_000:
                self._items.clear()
        self._items[key] = (self._now() + self.ttl_s, value)

    def clear(self) -> None:
        self._items.clear()
