"""The ``env`` provider: ``LANGORCH_SECRET_<NAME>``, then the environment variable the reference names."""

from __future__ import annotations

import os
import re

from langorch_infra.secret_providers.base import ProviderName, SecretError


def env_secret(name: str, ref: str | None = None) -> str | None:
    """``LANGORCH_SECRET_<NAME>`` (the name upper-cased, other characters as ``_``), then the variable ``ref``
    (default: the name itself)."""
    normalised = re.sub(r"[^A-Za-z0-9]", "_", name).upper()
    value = os.environ.get(f"LANGORCH_SECRET_{normalised}")
    return value if value is not None else os.environ.get(ref or name)


class EnvProvider:
    name: ProviderName = "env"

    async def fetch(self, name: str, ref: str, *, url: str | None = None) -> str:
        value = env_secret(name, ref)
        if value is None:
            normalised = re.sub(r"[^A-Za-z0-9]", "_", name).upper()
            raise SecretError("secret_not_found", name=name, provider="env",
                              reason=f"neither LANGORCH_SECRET_{normalised} nor {ref} is set")
        return value
