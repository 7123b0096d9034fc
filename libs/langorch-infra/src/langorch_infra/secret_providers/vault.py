"""The ``vault`` provider (hvac): KV version 2, reference ``<mount>/<path>#<field>``.

Login by token (``vault_token`` or the file ``vault_token_path``, checked with a token lookup), AppRole
(``vault_role`` is the role_id, the secret_id is read from ``vault_secret_id_path``) or Kubernetes
(``vault_role`` is the role name, the service-account JWT is read from ``vault_jwt_path``). A token that Vault
stops accepting (expired lease) is replaced by logging in again once.

Without ``#<field>`` the value is the secret's data as a JSON object, or the field itself when the data has only
one field; ``{{secrets.<alias>.<field>}}`` selects a field of the JSON object.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import hvac
import requests
from hvac import exceptions as vault_errors

from langorch_infra.secret_providers.base import ProviderName, SecretError
from langorch_infra.secret_providers.refs import vault_ref as parse_ref
from langorch_infra.settings import CommonSettings


class _Session:
    """One Vault address: its hvac client and login (calls serialised: hvac clients are not thread-safe)."""

    def __init__(self, settings: CommonSettings, address: str) -> None:
        self.settings = settings
        self.address = address
        self.lock = threading.Lock()
        self.client: hvac.Client | None = None

    def _login(self) -> hvac.Client:
        s = self.settings
        verify: Any = s.vault_ca_bundle or True
        client = hvac.Client(url=self.address, verify=verify, timeout=s.secret_provider_timeout_s,
                             namespace=s.vault_namespace)
        if s.vault_auth_method == "token":
            token = s.vault_token.get_secret_value() if s.vault_token is not None else None
            if token is None and s.vault_token_path:
                token = Path(s.vault_token_path).read_text(encoding="utf-8").strip()
            if not token:
                raise LookupError("auth method token needs LANGORCH_VAULT_TOKEN or LANGORCH_VAULT_TOKEN_PATH")
            client.token = token
            client.auth.token.lookup_self()  # a token Vault refuses fails here, not at the first read
        elif s.vault_auth_method == "approle":
            if not s.vault_role or not s.vault_secret_id_path:
                raise LookupError("auth method approle needs LANGORCH_VAULT_ROLE (role_id) and "
                                  "LANGORCH_VAULT_SECRET_ID_PATH")
            secret_id = Path(s.vault_secret_id_path).read_text(encoding="utf-8").strip()
            client.auth.approle.login(role_id=s.vault_role, secret_id=secret_id,
                                      mount_point=s.vault_auth_mount or "approle")
        else:
            if not s.vault_role:
                raise LookupError("auth method kubernetes needs LANGORCH_VAULT_ROLE (the role name)")
            jwt = Path(s.vault_jwt_path).read_text(encoding="utf-8").strip()
            client.auth.kubernetes.login(role=s.vault_role, jwt=jwt, mount_point=s.vault_auth_mount or "kubernetes")
        return client

    def read(self, mount: str, path: str) -> dict[str, Any]:
        with self.lock:
            for fresh in (False, True):
                if self.client is None or fresh:
                    self.client = None
                    self.client = self._login()
                try:
                    response = self.client.secrets.kv.v2.read_secret_version(
                        path=path, mount_point=mount, raise_on_deleted_version=True)
                except (vault_errors.Forbidden, vault_errors.Unauthorized):
                    if fresh:
                        raise
                    continue  # the token expired or was revoked: log in again once
                data = response.get("data", {}).get("data") if isinstance(response, dict) else None
                if not isinstance(data, dict):
                    raise vault_errors.InvalidPath("the response holds no KV v2 data")
                return data
        raise AssertionError("unreachable")

    def check_login(self) -> None:
        with self.lock:
            self.client = self._login()


class VaultProvider:
    name: ProviderName = "vault"

    def __init__(self, settings: CommonSettings) -> None:
        self.settings = settings
        self._sessions: dict[str, _Session] = {}

    def _session(self, url: str | None) -> _Session:
        address = (url or self.settings.vault_addr or "").rstrip("/")
        if not address:
            raise LookupError("no Vault address: set LANGORCH_VAULT_ADDR or the procedure's secrets_config.vault_url")
        session = self._sessions.get(address)
        if session is None:
            session = self._sessions[address] = _Session(self.settings, address)
        return session

    async def fetch(self, name: str, ref: str, *, url: str | None = None) -> str:
        try:
            mount, path, field = parse_ref(ref)
        except ValueError as exc:
            raise SecretError("secret_not_found", name=name, provider="vault", reason=str(exc)) from None
        try:
            session = self._session(url)
            data = await asyncio.to_thread(session.read, mount, path)
        except vault_errors.InvalidPath:
            raise SecretError("secret_not_found", name=name, provider="vault",
                              reason=f"no secret at {mount}/{path} (KV v2)") from None
        except vault_errors.VaultError as exc:
            raise SecretError("secret_unavailable", name=name, provider="vault",
                              reason=f"Vault refused or failed: {type(exc).__name__} "
                                     f"{'; '.join(map(str, exc.errors or [])) if exc.errors else ''}") from None
        except requests.RequestException as exc:
            raise SecretError("secret_unavailable", name=name, provider="vault",
                              reason=f"Vault unreachable: {type(exc).__name__}") from None
        except (LookupError, OSError) as exc:
            raise SecretError("secret_unavailable", name=name, provider="vault", reason=str(exc)) from None
        if field is not None:
            if field not in data:
                raise SecretError("secret_not_found", name=name, provider="vault",
                                  reason=f"the secret at {mount}/{path} has no field '{field}'")
            value = data[field]
            return value if isinstance(value, str) else json.dumps(value)
        if len(data) == 1:
            [value] = data.values()
            return value if isinstance(value, str) else json.dumps(value)
        return json.dumps(data)
