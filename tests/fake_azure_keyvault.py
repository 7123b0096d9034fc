"""A local Azure Key Vault and managed-identity endpoint, speaking what the ``azure`` provider's clients call:

* Key Vault REST API 7.4 ``GET /secrets/{name}/?api-version=7.4`` (``SecretBundle``: ``value``, ``id``,
  ``attributes``). A request without a valid bearer token gets 401 with the ``WWW-Authenticate: Bearer
  authorization=…, resource=…`` challenge that the SDK's challenge policy answers by asking its credential for a
  token, then repeating the request. Errors: ``{"error": {"code", "message"}}`` (404 ``SecretNotFound``).
* The App Service managed-identity token endpoint (API version 2019-08-01) that ``ManagedIdentityCredential``
  calls when ``IDENTITY_ENDPOINT`` and ``IDENTITY_HEADER`` are set: ``GET ?api-version=2019-08-01&resource=…``
  with header ``X-IDENTITY-HEADER`` → ``{access_token, expires_on, resource, token_type}``. Served over plain
  HTTP on 127.0.0.1, as App Service serves it on the loopback interface.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Self

from tests.fake_tls import Answer, Call, LocalServer, ServerCertificates

RESOURCE = "https://vault.azure.net"
TENANT = "00000000-0000-0000-0000-000000000001"
CHALLENGE = f'Bearer authorization="https://login.microsoftonline.com/{TENANT}", resource="{RESOURCE}"'


@dataclass
class KeyVaultState:
    secrets: dict[str, str] = field(default_factory=dict)
    tokens: set[str] = field(default_factory=set)
    identity_header: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    api_versions: list[str] = field(default_factory=list)  # api-version of every Key Vault request

    def vault(self, call: Call) -> Answer:
        self.api_versions.append(call.query.get("api-version", ""))
        auth = call.headers.get("authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        if token is None or token not in self.tokens:
            body = None if token is None else {"error": {"code": "Unauthorized", "message": "AKV10022: Invalid "
                                                         "audience or token."}}
            return 401, {"WWW-Authenticate": CHALLENGE}, body
        parts = [p for p in call.path.split("/") if p]
        if call.method != "GET" or len(parts) not in (2, 3) or parts[0] != "secrets":
            return 400, {}, {"error": {"code": "BadParameter", "message": "unsupported request"}}
        name = parts[1]
        if name not in self.secrets:
            return 404, {}, {"error": {"code": "SecretNotFound", "message": f"A secret with (name/id) {name} was "
                                       "not found in this key vault."}}
        now = int(time.time())
        return 200, {}, {"value": self.secrets[name], "id": f"https://{call.headers.get('host', '')}/secrets/{name}/1",
                         "attributes": {"enabled": True, "created": now, "updated": now,
                                        "recoveryLevel": "Recoverable+Purgeable", "recoverableDays": 90},
                         "tags": {}}

    def identity(self, call: Call) -> Answer:
        if call.headers.get("x-identity-header") != self.identity_header:
            return 400, {}, {"error": "invalid_request", "error_description": "X-IDENTITY-HEADER is missing"}
        if call.query.get("api-version") != "2019-08-01" or not call.query.get("resource"):
            return 400, {}, {"error": "invalid_request", "error_description": "bad query"}
        token = "eyFake." + secrets.token_urlsafe(24)
        self.tokens.add(token)
        return 200, {}, {"access_token": token, "expires_on": str(int(time.time()) + 3600),
                         "resource": call.query["resource"], "token_type": "Bearer",
                         "client_id": "00000000-0000-0000-0000-0000000000c1"}


class FakeKeyVault(LocalServer):
    """The vault (HTTPS); ``identity`` is its token endpoint (HTTP), started and stopped with it."""

    def __init__(self, tls: ServerCertificates) -> None:
        self.state = KeyVaultState()
        super().__init__(self.state.vault, tls)
        self.identity = LocalServer(self.state.identity)

    def __enter__(self) -> Self:
        self.identity.__enter__()
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.identity.__exit__(*exc)
