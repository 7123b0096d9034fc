"""The newcomer's credentials of ``langorch up``: the auth secret, the first admin and the CLI's API key.

The flow, with authentication on (the default):

1. **Secret.** The gateway and the runtime sign tokens with ``LANGORCH_AUTH_SECRET_KEY``. Unless it is set, ``langorch
   up`` generates a strong one on the first start (64 URL-safe characters), keeps it in ``<state>/auth-secret-key``
   (mode 0600) and passes it to every service it starts; later starts reuse it, so tokens stay valid across
   restarts.
2. **First admin.** While the state directory holds no CLI key (``<state>/api-key``), ``langorch up`` generates a
   password and passes it to the gateway as ``LANGORCH_BOOTSTRAP_ADMIN_PASSWORD`` (unless that is set: then that
   one is used and never printed); the gateway creates the admin user ``LANGORCH_BOOTSTRAP_ADMIN_USERNAME``
   (``admin``) with it when no user exists yet. The variable is removed from this process's environment once the
   gateway has read it.
3. **CLI key.** Once the gateway serves, ``langorch up`` logs in as that admin (``POST /api/auth/login``), creates
   an admin API key named ``langorch-cli`` (``POST /api/auth/api-keys``), writes it to ``<state>/api-key`` (mode
   0600), and logs the admin's token out again. The banner then shows the generated password (this once only: it
   is not stored anywhere) and the key's file, with ``export LANGORCH_API_KEY=$(cat <state>/api-key)`` for curl.
   The ``langorch`` commands run in the same directory use the key by themselves (:mod:`langorch.access`).
4. **Later starts** find the key, check it against the API (``GET /api/auth/me``) and say where it is; the password
   is never shown again. If users existed before (the generated password was not the admin's), the banner says
   so and how to get a key with ``langorch login``.

With ``LANGORCH_AUTH_ENABLED=false`` none of this happens except the secret, and the banner says that every request
acts as an anonymous admin.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langorch.access import API_FILE, STATE_KEY_FILE, write_private

SECRET_FILE = "auth-secret-key"  # noqa: S105 (a file name)
CLI_KEY_NAME = "langorch-cli"
SECRET_ENV = "LANGORCH_AUTH_SECRET_KEY"  # noqa: S105 (a variable name)
PASSWORD_ENV = "LANGORCH_BOOTSTRAP_ADMIN_PASSWORD"  # noqa: S105 (a variable name)
# how long the CLI key's creation waits for the gateway's first admin (created while the gateway starts)
BOOTSTRAP_WAIT_S = 60.0
# failed logins tolerated while waiting for the admin: the gateway locks a user out after 10 per 15 minutes
LOGIN_ATTEMPTS = 4


@dataclass
class AuthSetup:
    """The authentication part of one ``langorch up``."""

    state: Path
    enabled: bool
    username: str = "admin"
    password: str | None = None  # the bootstrap admin's password, when this start knows it
    generated: bool = False  # the password was generated here (and may be shown once)
    show_password: bool = False  # set once the admin was created with the generated password
    key_created: bool = False
    key_valid: bool | None = None
    host: str = "127.0.0.1"  # the address the gateway listens on
    notes: list[str] = field(default_factory=list)

    @property
    def key_file(self) -> Path:
        return self.state / STATE_KEY_FILE

    @property
    def secret_file(self) -> Path:
        return self.state / SECRET_FILE


class AuthRefused(Exception):
    """The gateway would refuse to start with these settings (a weak secret with auth on, auth off on a non-loopback
    address): said before anything starts."""


def prepare(state: Path, api_url: str, host: str) -> AuthSetup:
    """Before any service starts: the auth secret in the environment (generated and kept in the state directory
    unless set), the API URL recorded for the CLI, and whether this start bootstraps the first admin. Raises
    pydantic's ``ValidationError`` for invalid gateway settings (a usage error)."""
    from langorch_infra.settings import GatewaySettings

    if not os.environ.get(SECRET_ENV):
        os.environ[SECRET_ENV] = _secret(state / SECRET_FILE)
    settings = GatewaySettings(host=host)
    setup = AuthSetup(state, settings.auth_enabled, username=settings.bootstrap_admin_username)
    setup.host = host
    write_private(state / API_FILE, json.dumps({"url": api_url}) + "\n")
    if not setup.enabled or setup.key_file.exists():
        return setup
    given = settings.bootstrap_admin_password
    if given is not None:
        setup.password = given.get_secret_value()
    else:
        setup.password = secrets.token_urlsafe(18)
        setup.generated = True
    return setup


def check(setup: AuthSetup) -> None:
    """:class:`AuthRefused` when the gateway would refuse its settings (called once the gateway is imported)."""
    from langorch_gateway.users import StartupRefused, check_startup
    from langorch_infra.settings import GatewaySettings

    try:
        check_startup(GatewaySettings(host=setup.host))
    except StartupRefused as exc:
        raise AuthRefused(str(exc)) from exc


def _secret(path: Path) -> str:
    try:
        kept = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        kept = ""
    if len(kept.encode()) >= 32:
        return kept
    fresh = secrets.token_urlsafe(48)
    write_private(path, fresh + "\n")
    return fresh


def export_password(setup: AuthSetup) -> None:
    """Hand the generated password to the gateway about to start in this process (the worker processes are
    already started, so they never see it)."""
    if setup.generated and setup.password is not None:
        os.environ[PASSWORD_ENV] = setup.password


def forget_password(setup: AuthSetup) -> None:
    """The gateway has read its settings: the generated password leaves this process's environment."""
    if setup.generated:
        os.environ.pop(PASSWORD_ENV, None)


async def finish(setup: AuthSetup, api_url: str) -> None:
    """Once the gateway serves: create the CLI key (first start), or check the one kept (later starts). Problems are
    notes for the banner, not failures: the platform runs all the same."""
    import httpx

    forget_password(setup)
    if not setup.enabled:
        return
    try:
        async with httpx.AsyncClient(base_url=api_url, timeout=30) as client:
            if setup.key_file.exists():
                await _check_key(setup, client)
            elif setup.password is not None:
                await _create_key(setup, client)
    except httpx.HTTPError as exc:
        setup.notes.append(f"the CLI key could not be set up ({type(exc).__name__}: {exc}); log in with "
                           "`langorch login`")


async def _check_key(setup: AuthSetup, client: Any) -> None:
    key = setup.key_file.read_text(encoding="utf-8").strip()
    r = await client.get("/api/auth/me", headers={"X-API-Key": key})
    setup.key_valid = r.status_code == 200
    if r.status_code == 401:
        setup.notes.append(f"the CLI key in {setup.key_file} is refused by the API (revoked or expired); log in "
                           "with `langorch login`, create a key with `langorch api-keys create langorch-cli --role "
                           f"admin` and write it to that file (mode 0600), or delete the file and the state to "
                           "start over")
    elif r.status_code != 200:
        setup.notes.append(f"the CLI key in {setup.key_file} could not be checked: GET /api/auth/me answered "
                           f"{r.status_code}")


async def _login(setup: AuthSetup, client: Any) -> str | None:
    """The admin's token; None when the password is refused (an admin existed already)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOOTSTRAP_WAIT_S
    refused = 0
    while True:
        r = await client.post("/api/auth/login", json={"username": setup.username, "password": setup.password})
        if r.status_code == 200:
            token = r.json().get("access_token")
            return token if isinstance(token, str) else None
        if r.status_code == 401:
            refused += 1
            if refused >= LOGIN_ATTEMPTS:
                return None
        elif r.status_code not in (429, 503):
            setup.notes.append(f"the CLI key could not be created: POST /api/auth/login answered {r.status_code} "
                               f"{r.text[:200]}")
            return None
        if loop.time() > deadline:
            setup.notes.append(f"the admin {setup.username!r} was not created within {BOOTSTRAP_WAIT_S:g} s; log in "
                               "with `langorch login` once it is")
            return None
        await asyncio.sleep(1.0)


async def _create_key(setup: AuthSetup, client: Any) -> None:
    token = await _login(setup, client)
    if token is None:
        if not setup.notes:
            setup.notes.append(
                f"users existed before this start, so the admin {setup.username!r} was not created with a new "
                "password; log in with `langorch login`, then create the CLI key with `langorch api-keys create "
                f"langorch-cli --role admin` and write it to {setup.key_file} (mode 0600)")
        return
    bearer = {"Authorization": f"Bearer {token}"}
    try:
        r = await client.post("/api/auth/api-keys", headers=bearer, json={
            "name": CLI_KEY_NAME, "roles": ["admin"],
            "description": f"created by langorch up for the langorch commands using {setup.state}"})
        body = r.json() if r.status_code == 201 else {}
        key = body.get("key") if isinstance(body, dict) else None
        if not isinstance(key, str):
            setup.notes.append(f"the CLI key could not be created: POST /api/auth/api-keys answered "
                               f"{r.status_code} {r.text[:200]}")
        else:
            write_private(setup.key_file, key + "\n")
            setup.key_created = True
            setup.key_valid = True
    finally:
        await client.post("/api/auth/logout", headers=bearer)
    setup.show_password = setup.generated


def banner_rows(setup: AuthSetup | None) -> list[tuple[str, str]]:
    """The banner's lines about authentication (label, text; rich markup)."""
    if setup is None:
        return []
    if not setup.enabled:
        return [("Auth", "[bold red]DISABLED[/] (LANGORCH_AUTH_ENABLED=false): requests without a credential act as "
                 "'anonymous' with every role; keep the API on 127.0.0.1")]
    rows: list[tuple[str, str]] = []
    if setup.show_password and setup.password is not None:
        rows.append(("Admin", f"user [bold]{setup.username}[/], password [bold]{setup.password}[/]  (shown only "
                     "this once and stored nowhere: note it now)"))
    elif setup.key_created:
        rows.append(("Admin", f"user [bold]{setup.username}[/], with the password of "
                     "LANGORCH_BOOTSTRAP_ADMIN_PASSWORD"))
    usable = setup.key_file.exists() and setup.key_valid is not False
    if not setup.show_password and not setup.key_created:
        rows.append(("Auth", "enabled; the langorch commands run here use the CLI key below" if usable else
                     "enabled; sign in with `langorch login`"))
    if usable:
        rows.append(("CLI key", f"{setup.key_file}  (an admin API key, readable only by you; the langorch commands "
                     "run here use it)"))
        rows.append(("", f"for curl: export LANGORCH_API_KEY=$(cat {_shown_path(setup.key_file)})"))
    return rows


def _shown_path(path: Path) -> str:
    """``path`` relative to the current directory when it is below it (``.langorch/api-key``)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
