"""Which credential a ``langorch`` command sends to the API, where credentials are kept, and what a 401 or 403 means.

A command that calls the API sends one credential, the first found of:

1. ``--api-key`` or ``LANGORCH_API_KEY`` (an API key ``lo_<key_id>_<secret>``, sent as ``X-API-Key``);
2. the token ``langorch login`` saved for that API (``<config>/credentials.json``, sent as a bearer token);
3. the admin API key a local ``langorch up`` stored in its state directory (``<state>/api-key``, where ``<state>``
   is ``LANGORCH_STATE_DIR`` or ``./.langorch``), used only for the API address that ``langorch up`` serves
   (recorded in ``<state>/api.json`` at each start), so it is never sent to another server.

``<config>`` is ``LANGORCH_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/langorch``, else ``~/.config/langorch``. Every file
holding a credential is written readable only by its owner (mode 0600; its directory 0700 when created here).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from langorch.errors import CLIError, ExitCode

STATE_KEY_FILE = "api-key"  # in the state directory: the admin API key `langorch up` created for the CLI
API_FILE = "api.json"  # in the state directory: {"url": the API URL of the last `langorch up` start}
LOGINS_FILE = "credentials.json"  # in the config directory: tokens saved by `langorch login`, by API
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0", "::", ""}


def state_dir() -> Path:
    """The state directory of a local ``langorch up`` (``LANGORCH_STATE_DIR``, default ``./.langorch``)."""
    return Path(os.environ.get("LANGORCH_STATE_DIR") or ".langorch")


def config_dir() -> Path:
    """Where ``langorch login`` keeps its tokens."""
    explicit = os.environ.get("LANGORCH_CONFIG_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "langorch"


def api_identity(url: str) -> str:
    """``scheme://host:port`` of an API base URL, with every loopback name as ``127.0.0.1``: the key under which a
    login is saved, and what a ``langorch up``'s recorded URL is compared with."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower() or "http"
    host = (parts.hostname or "").lower()
    if host in _LOOPBACK or host.startswith("127."):
        host = "127.0.0.1"
    try:
        port = parts.port
    except ValueError:
        port = None
    port = port or (443 if scheme == "https" else 80)
    return f"{scheme}://{host}:{port}"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable only by its owner (0600), atomically (a temporary file renamed over it),
    creating its directory (0700) when missing."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}; delete it to start over",
                       ExitCode.USAGE) from exc
    return data if isinstance(data, dict) else {}


# -- saved logins --------------------------------------------------------------------------------------------------


def logins_file() -> Path:
    return config_dir() / LOGINS_FILE


def saved_login(api: str) -> dict[str, Any] | None:
    """The login saved for ``api``: ``{token, identity, roles, expires_at}`` (``expires_at`` in epoch seconds)."""
    entry = _read_json(logins_file()).get(api_identity(api))
    return entry if isinstance(entry, dict) and isinstance(entry.get("token"), str) else None


def save_login(api: str, token: str, identity: str, roles: list[str], expires_in: float | None) -> Path:
    path = logins_file()
    data = _read_json(path)
    data[api_identity(api)] = {"token": token, "identity": identity, "roles": roles,
                               "expires_at": time.time() + expires_in if expires_in else None}
    write_private(path, json.dumps(data, indent=2) + "\n")
    return path


def forget_login(api: str) -> bool:
    """Remove the login saved for ``api``; whether there was one."""
    path = logins_file()
    data = _read_json(path)
    if data.pop(api_identity(api), None) is None:
        return False
    write_private(path, json.dumps(data, indent=2) + "\n")
    return True


# -- the key of a local `langorch up` ---------------------------------------------------------------------------------


def state_key_path(state: Path | None = None) -> Path:
    return (state or state_dir()) / STATE_KEY_FILE


def recorded_api(state: Path | None = None) -> str | None:
    """The API URL the ``langorch up`` of ``state`` serves (last recorded at its start)."""
    path = (state or state_dir()) / API_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    url = data.get("url") if isinstance(data, dict) else None
    return url if isinstance(url, str) else None


def state_key(api: str, state: Path | None = None) -> tuple[str, Path] | None:
    """The key a local ``langorch up`` stored, and its file, when that ``langorch up`` serves ``api``."""
    path = state_key_path(state)
    recorded = recorded_api(state)
    if recorded is None or api_identity(recorded) != api_identity(api):
        return None
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return (key, path) if key else None


# -- the credential of one command -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credential:
    """What a command sends, and where it came from (for error messages; never the secret itself)."""

    kind: str  # "api_key" or "login"
    secret: str
    source: str  # "--api-key", "LANGORCH_API_KEY", "login", "state"
    where: str  # human description of the source
    identity: str | None = None
    expires_at: float | None = None  # a login's token: when it expires (epoch seconds)

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= time.time()

    def headers(self) -> dict[str, str]:
        if self.kind == "api_key":
            return {"X-API-Key": self.secret}
        return {"Authorization": f"Bearer {self.secret}"}


def resolve(api: str, api_key: str | None) -> Credential | None:
    """The credential for ``api`` (``api_key``: the ``--api-key`` option or ``LANGORCH_API_KEY``'s value), or None."""
    if api_key:
        from_env = os.environ.get("LANGORCH_API_KEY") == api_key
        key = api_key.strip()
        if not key.startswith("lo_"):
            option = "LANGORCH_API_KEY" if from_env else "--api-key"
            raise CLIError(f"{option} is not a LangOrch API key (expected lo_<key_id>_<secret>, as `langorch "
                           "api-keys create` prints it)", ExitCode.USAGE)
        if from_env:
            return Credential("api_key", key, "LANGORCH_API_KEY", "the API key in LANGORCH_API_KEY")
        return Credential("api_key", key, "--api-key", "the API key given with --api-key")
    login = saved_login(api)
    if login is not None:
        identity = str(login.get("identity") or "")
        expires = login.get("expires_at")
        return Credential("login", login["token"], "login",
                          f"the login of {identity or 'a user'} saved in {logins_file()}", identity or None,
                          float(expires) if isinstance(expires, int | float) else None)
    found = state_key(api)
    if found is not None:
        key, path = found
        return Credential("api_key", key, "state", f"the admin API key `langorch up` stored in {path}")
    return None


NO_CREDENTIAL_HINT = ("give an API key with --api-key or LANGORCH_API_KEY, or log in with `langorch login`; a "
                      "`langorch up` started in this directory stores an admin key in .langorch/api-key, which "
                      "the langorch commands run here use (for curl: export LANGORCH_API_KEY=$(cat "
                      ".langorch/api-key))")


def auth_hint(status: int, problem: dict[str, Any] | None, credential: Credential | None) -> str | None:
    """What a 401, 403 or 429 of the API means for this command's credential, and what to do; None otherwise."""
    code = str((problem or {}).get("code") or "")
    if status == 401:
        if credential is None:
            return f"the API needs a credential: {NO_CREDENTIAL_HINT}"
        if credential.source == "login":
            who = credential.identity or "your user"
            if code == "token_expired" or credential.expired:
                return f"the login of {who} has expired; run `langorch login` again"
            return (f"{credential.where} was refused (logged out, deactivated, or the server's secret changed); "
                    "run `langorch login` again")
        if credential.source == "state":
            return (f"{credential.where} was refused (revoked or expired?); log in with `langorch login`, or give "
                    "a valid key with --api-key or LANGORCH_API_KEY")
        return (f"{credential.where} was refused: revoked, expired or mistyped; an admin can list the valid keys "
                "with `langorch api-keys list` and create one with `langorch api-keys create`")
    if status == 403 and code == "forbidden":
        role = (problem or {}).get("required_role")
        who = credential.where if credential is not None else "this request"
        needed = f"the role '{role}'" if role else "a role it lacks"
        if credential is not None and credential.kind == "api_key":
            return (f"{who} lacks {needed}; an API key keeps the roles it was created with: an admin can create one "
                    f"with `langorch api-keys create <name> --role {role or '<role>'}`")
        user = (credential.identity or "").removeprefix("user:") if credential is not None else ""
        return (f"{who} lacks {needed}; an admin can grant it with `langorch users set-roles {user or '<user>'} "
                f"<roles>…`")
    if status == 429 and code == "too_many_login_attempts":
        retry = (problem or {}).get("retry_after_seconds")
        return "too many failed logins for this user from this address" + (
            f"; try again in {retry} s" if retry is not None else "; try again later")
    return None
