"""The ``azure`` provider (azure-keyvault-secrets with an azure-identity credential): reference
``<vault url>/<secret name>`` (e.g. ``https://contoso.vault.azure.net/portal-password``), or just the secret name
when the procedure's ``secrets_config.vault_url`` names the vault.

The client speaks Key Vault REST API version 7.4 (``API_VERSION``), whatever the SDK's newest default is, so a
real vault and the tests' local one are addressed the same way. The credential is ``DefaultAzureCredential``
(environment, workload identity, managed identity, developer logins) or ``ManagedIdentityCredential``
(``azure_credential``); ``azure_client_id`` selects a user-assigned identity.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
)
from azure.identity import DefaultAzureCredential, ManagedIdentityCredential
from azure.keyvault.secrets import SecretClient

from langorch_infra.secret_providers.base import ProviderName, SecretError
from langorch_infra.secret_providers.refs import azure_ref as parse_ref
from langorch_infra.settings import CommonSettings

API_VERSION = "7.4"



class AzureProvider:
    name: ProviderName = "azure"

    def __init__(self, settings: CommonSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._credential: Any = None
        self._clients: dict[str, SecretClient] = {}

    def _client(self, vault_url: str) -> SecretClient:
        with self._lock:
            s = self.settings
            if self._credential is None:
                extra: dict[str, Any] = {"connection_verify": s.azure_ca_bundle} if s.azure_ca_bundle else {}
                if s.azure_credential == "managed_identity":
                    self._credential = ManagedIdentityCredential(client_id=s.azure_client_id, **extra)
                else:
                    self._credential = DefaultAzureCredential(managed_identity_client_id=s.azure_client_id,
                                                              **extra)
            client = self._clients.get(vault_url)
            if client is None:
                timeout = s.secret_provider_timeout_s
                options: dict[str, Any] = {"connection_verify": s.azure_ca_bundle} if s.azure_ca_bundle else {}
                client = self._clients[vault_url] = SecretClient(
                    vault_url, self._credential, api_version=API_VERSION, retry_total=1,
                    connection_timeout=timeout, read_timeout=timeout,
                    verify_challenge_resource=s.azure_verify_challenge_resource, **options)
            return client

    def _read(self, vault_url: str, secret: str) -> str:
        value = self._client(vault_url).get_secret(secret).value
        if value is None:
            raise ResourceNotFoundError("the secret has no value")
        return value

    async def fetch(self, name: str, ref: str, *, url: str | None = None) -> str:
        try:
            vault_url, secret = parse_ref(ref, url)
        except ValueError as exc:
            raise SecretError("secret_not_found", name=name, provider="azure", reason=str(exc)) from None
        try:
            return await asyncio.to_thread(self._read, vault_url, secret)
        except ResourceNotFoundError as exc:
            raise SecretError("secret_not_found", name=name, provider="azure",
                              reason=f"Key Vault has no secret {secret}: {_message(exc)}") from None
        except ClientAuthenticationError as exc:
            raise SecretError("secret_unavailable", name=name, provider="azure",
                              reason=f"no token for Key Vault: {_message(exc)}") from None
        except HttpResponseError as exc:
            raise SecretError("secret_unavailable", name=name, provider="azure",
                              reason=f"Key Vault answered {exc.status_code}: {_message(exc)}") from None
        except (AzureError, ValueError, OSError) as exc:
            raise SecretError("secret_unavailable", name=name, provider="azure",
                              reason=f"Key Vault unreachable: {type(exc).__name__}: {_message(exc)}") from None


def _message(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc)
    try:  # a Key Vault error body: {"error": {"code", "message"}}
        body = json.loads(text)
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return str(text).splitlines()[0] if text else type(exc).__name__
