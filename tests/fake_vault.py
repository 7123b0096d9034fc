"""A local Vault speaking the part of HashiCorp Vault's HTTP API (as documented for Vault 1.15) that the
``vault`` provider's hvac client calls:

* ``GET /v1/auth/token/lookup-self`` — token auth: is ``X-Vault-Token`` a live token;
* ``POST /v1/auth/<mount>/login`` with ``{role_id, secret_id}`` — AppRole login;
* ``POST /v1/auth/<mount>/login`` with ``{role, jwt}`` — Kubernetes login;
* ``GET /v1/<mount>/data/<path>`` — KV version 2 read of the latest version (``{"data": {"data", "metadata"}}``).

Errors answer as Vault does: ``{"errors": [...]}`` with 400 (bad login), 403 (permission denied) or 404.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from tests.fake_tls import Answer, Call, LocalServer, ServerCertificates

DENIED: Answer = (403, {}, {"errors": ["permission denied"]})


@dataclass
class VaultState:
    kv: dict[str, dict[str, object]] = field(default_factory=dict)  # "<mount>/<path>" → data
    tokens: set[str] = field(default_factory=set)
    approles: dict[str, str] = field(default_factory=dict)  # role_id → secret_id
    kubernetes: dict[str, str] = field(default_factory=dict)  # role → the service-account JWT it accepts
    auth_mounts: dict[str, str] = field(default_factory=lambda: {"approle": "approle", "kubernetes": "kubernetes"})
    down: bool = False  # answer 503 to everything (sealed)

    def issue(self) -> str:
        token = "hvs." + secrets.token_urlsafe(24)
        self.tokens.add(token)
        return token

    def route(self, call: Call) -> Answer:
        if self.down:
            return 503, {}, {"errors": ["Vault is sealed"]}
        path = call.path
        if path == "/v1/auth/token/lookup-self" and call.method == "GET":
            token = call.headers.get("x-vault-token", "")
            if token not in self.tokens:
                return DENIED
            return 200, {}, {"data": {"id": token, "policies": ["default"], "ttl": 3600, "renewable": False}}
        for mount, kind in self.auth_mounts.items():
            if path == f"/v1/auth/{mount}/login" and call.method in ("POST", "PUT"):
                return self._login(kind, call.body if isinstance(call.body, dict) else {})
        if call.method == "GET" and "/data/" in path and path.startswith("/v1/"):
            if call.headers.get("x-vault-token", "") not in self.tokens:
                return DENIED
            mount, _, rest = path[len("/v1/"):].partition("/data/")
            data = self.kv.get(f"{mount}/{rest}")
            if data is None:
                return 404, {}, {"errors": []}
            return 200, {}, {"request_id": secrets.token_hex(8), "lease_id": "", "renewable": False,
                             "lease_duration": 0, "data": {"data": data, "metadata": {
                                 "created_time": "2026-01-01T00:00:00Z", "custom_metadata": None,
                                 "deletion_time": "", "destroyed": False, "version": 1}},
                             "wrap_info": None, "warnings": None, "auth": None}
        return 404, {}, {"errors": [f"no handler for route '{path}'"]}

    def _login(self, kind: str, body: dict[str, object]) -> Answer:
        if kind == "approle":
            secret_id = body.get("secret_id")
            if secret_id is None or self.approles.get(str(body.get("role_id"))) != secret_id:
                return 400, {}, {"errors": ["invalid role or secret ID"]}
        else:
            if self.kubernetes.get(str(body.get("role"))) != body.get("jwt"):
                return 403, {}, {"errors": ["permission denied"]}
        token = self.issue()
        return 200, {}, {"auth": {"client_token": token, "accessor": secrets.token_hex(8),
                                  "policies": ["default"], "token_policies": ["default"], "lease_duration": 3600,
                                  "renewable": True, "entity_id": "", "token_type": "service", "orphan": True}}


class FakeVault(LocalServer):
    def __init__(self, tls: ServerCertificates) -> None:
        self.state = VaultState()
        super().__init__(self.state.route, tls)

    def reads(self) -> int:
        return sum(1 for c in self.calls if "/data/" in c.path)
