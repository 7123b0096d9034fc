"""``langorch login|logout|whoami``, ``langorch users …`` and ``langorch api-keys …``: sign in, and manage users and
API keys through the API (api.md §2.3). Which credential each command sends is :mod:`langorch.access`'s rule; an
answer the API refuses is an :class:`~langorch.timeline.ApiError`, whose message says which credential was
refused and what to do."""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from langorch import access
from langorch.errors import API_HELP, API_KEY_HELP, DEFAULT_API, EXIT_CODES_HELP, CLIError, ExitCode

if TYPE_CHECKING:
    import httpx

console = Console()

users_app = typer.Typer(help="Manage users (admin): create, list, set roles, deactivate.", no_args_is_help=True,
                        epilog=EXIT_CODES_HELP)
api_keys_app = typer.Typer(help="Manage API keys (admin): create, list, revoke.", no_args_is_help=True,
                           epilog=EXIT_CODES_HELP)


class Role(StrEnum):
    viewer = "viewer"
    operator = "operator"
    approver = "approver"
    admin = "admin"


ApiUrl = Annotated[str, typer.Option("--api", envvar="LANGORCH_API_URL", help=API_HELP)]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="LANGORCH_API_KEY", help=API_KEY_HELP,
                                            show_default=False)]
AsJson = Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table.")]
PAGE = 100


class Api:
    """A synchronous client of one API with one credential; every unexpected answer raises ``ApiError``."""

    def __init__(self, api: str, credential: access.Credential | None) -> None:
        import httpx

        self.api = api
        self.credential = credential
        self.client = httpx.Client(base_url=api, timeout=30,
                                   headers=credential.headers() if credential is not None else {})

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *_: object) -> None:
        self.client.close()

    def call(self, action: str, method: str, path: str, *, expect: tuple[int, ...] = (200,),
             **kwargs: Any) -> httpx.Response:
        from langorch.timeline import ApiError

        response = self.client.request(method, path, **kwargs)
        if response.status_code not in expect:
            raise ApiError(action, response, credential=self.credential)
        return response

    def json(self, action: str, method: str, path: str, *, expect: tuple[int, ...] = (200,),
             **kwargs: Any) -> dict[str, Any]:
        from langorch.timeline import ApiError

        response = self.call(action, method, path, expect=expect, **kwargs)
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ApiError(action, response, credential=self.credential)
        return body

    def pages(self, action: str, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Every item of a paged list (``{items, total, limit, offset}``)."""
        items: list[dict[str, Any]] = []
        while True:
            page = self.json(action, "GET", path, params={**params, "limit": PAGE, "offset": len(items)})
            got = [i for i in page.get("items") or [] if isinstance(i, dict)]
            items.extend(got)
            total = page.get("total")
            if not got or not isinstance(total, int) or len(items) >= total:
                return items


def _client(api: str, api_key: str | None) -> Api:
    return Api(api, access.resolve(api, api_key))


def _password(prompt: str, from_stdin: bool, *, confirm: bool = False) -> str:
    """A password: the first line of standard input with ``--password-stdin``, else asked without echo."""
    if from_stdin:
        line = sys.stdin.readline()
        password = line.rstrip("\r\n")
        if not password:
            raise CLIError("--password-stdin: standard input is empty; pipe the password into the command",
                           ExitCode.USAGE)
        return password
    if not sys.stdin.isatty():
        raise CLIError("no terminal to ask the password on; pipe it into the command with --password-stdin",
                       ExitCode.USAGE)
    password = str(typer.prompt(prompt, hide_input=True, confirmation_prompt=confirm))
    if not password:
        raise CLIError("the password is empty", ExitCode.USAGE)
    return password


_TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\d)T(\d\d:\d\d:\d\d)(?:\.\d+)?Z$")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str) and (stamp := _TIMESTAMP.match(value)):
        return f"{stamp.group(1)} {stamp.group(2)}Z"  # a table shows times to the second
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _table(title: str, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row.get(column)) for column in columns))
    console.print(table)


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


# -- login, logout, whoami ----------------------------------------------------------------------------------------


def login(
    username: Annotated[str | None, typer.Option("--username", "-u", help="Your user name (asked when not given).",
                                                 show_default=False)] = None,
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from the first line "
                                                 "of standard input instead of asking for it.")] = False,
    api: ApiUrl = DEFAULT_API,
) -> None:
    """Log in to the API with a user name and password, and save the token for the next commands (in the user's
    config directory, readable only by you). It lasts as long as the server's token lifetime (60 minutes by
    default); then log in again. Exit 1 when the user name or password is refused."""
    import httpx

    from langorch.timeline import ApiError

    if username is None:
        if password_stdin or not sys.stdin.isatty():
            raise CLIError("give the user name with --username (no terminal to ask it on)", ExitCode.USAGE)
        username = str(typer.prompt("Username")).strip()
    password = _password("Password", password_stdin)
    with httpx.Client(base_url=api, timeout=30) as client:
        response = client.post("/api/auth/login", json={"username": username, "password": password})
    if response.status_code == 401:
        raise CLIError(f"login failed: {api} refused the user name or password of {username!r}")
    if response.status_code != 200:
        raise ApiError("logging in", response)
    body = response.json() if response.headers.get("content-type", "").startswith("application/json") else None
    if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
        raise ApiError("logging in", response)
    identity = str(body.get("identity") or f"user:{username}")
    roles = [str(r) for r in body.get("roles") or []]
    expires_in = body.get("expires_in")
    path = access.save_login(api, body["access_token"], identity, roles,
                             float(expires_in) if isinstance(expires_in, int | float) else None)
    lasting = f" for {round(expires_in / 60)} min" if isinstance(expires_in, int | float) else ""
    console.print(f"logged in to {api} as {identity} (roles: {', '.join(roles) or 'viewer'}); the token is "
                  f"valid{lasting} and saved in {path}", highlight=False, soft_wrap=True)


def logout(api: ApiUrl = DEFAULT_API) -> None:
    """Revoke the token `langorch login` saved for this API (the server refuses it from now on) and forget it."""
    import httpx

    saved = access.saved_login(api)
    if saved is None:
        console.print(f"not logged in to {api}", highlight=False)
        return
    with httpx.Client(base_url=api, timeout=30) as client:
        response = client.post("/api/auth/logout", headers={"Authorization": f"Bearer {saved['token']}"})
    access.forget_login(api)
    if response.status_code in (200, 204):
        console.print(f"logged out of {api}; the token is revoked", highlight=False)
    elif response.status_code == 401:
        console.print(f"logged out of {api}; the server no longer accepted the token (expired or revoked)",
                      highlight=False)
    else:
        from langorch.timeline import ApiError

        raise ApiError("logging out (the saved token is forgotten all the same)", response)


def whoami(api: ApiUrl = DEFAULT_API, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """Show who the API takes you for: identity, roles, and which credential the commands send."""
    with _client(api, api_key) as client:
        me = client.json("asking who you are", "GET", "/api/auth/me")
        credential = client.credential
    if as_json:
        _print_json(me)
        return
    console.print(f"{me.get('identity')} (roles: {_cell(me.get('roles'))}) at {api}", highlight=False)
    if me.get("auth_enabled") is False:
        console.print("[yellow]authentication is disabled on this server: every request acts as anonymous[/]",
                      highlight=False)
    console.print(f"credential: {credential.where if credential is not None else 'none'}", highlight=False,
                  soft_wrap=True)


# -- users ----------------------------------------------------------------------------------------------------------

USER_COLUMNS = ("username", "roles", "is_active", "email", "last_login_at")  # --json: every field


def _user(client: Api, username: str) -> dict[str, Any]:
    """The ``UserOut`` of ``username`` (found with the list's search)."""
    for user in client.pages(f"looking up user {username!r}", "/api/users", {"search": username}):
        if user.get("username") == username:
            return user
    raise CLIError(f"no user named {username!r} at {client.api} (`langorch users list` shows them)")


@users_app.command("create")
def users_create(
    username: Annotated[str, typer.Argument(help="User name (letters, digits, _ . -).", show_default=False)],
    email: Annotated[str, typer.Option("--email", help="The user's e-mail address.", show_default=False)],
    role: Annotated[list[Role] | None, typer.Option("--role", help="A role; repeat for several (default: "
                                                    "viewer).", show_default=False)] = None,
    full_name: Annotated[str | None, typer.Option("--full-name", show_default=False)] = None,
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the new user's password from "
                                                 "standard input instead of asking for it twice.")] = False,
    direct: Annotated[bool, typer.Option("--direct", help="Create the first user without the API, straight in the "
                                         "event log on LANGORCH_NATS_URL (with its NATS credential settings); "
                                         "refused once any user exists.")] = False,
    api: ApiUrl = DEFAULT_API, api_key: ApiKey = None, as_json: AsJson = False,
) -> None:
    """Create a user with a password (at least 12 characters) and roles. Needs an admin credential; the first admin
    of a gateway without LANGORCH_BOOTSTRAP_ADMIN_PASSWORD is created with --direct --role admin."""
    password = _password("Password for the new user", password_stdin, confirm=True)
    roles = sorted({r.value for r in role or [Role.viewer]})
    if direct:
        import asyncio

        user_id = asyncio.run(_create_first_user(username, email, full_name, roles, password))
        console.print(f"created user {username} (user_id {user_id}), roles: {', '.join(roles)}; the gateways "
                      "see it within moments", highlight=False)
        return
    body: dict[str, Any] = {"username": username, "email": email, "password": password, "roles": roles}
    if full_name is not None:
        body["full_name"] = full_name
    with _client(api, api_key) as client:
        user = client.json(f"creating user {username!r}", "POST", "/api/users", json=body, expect=(201,))
    if as_json:
        _print_json(user)
        return
    console.print(f"created user {user.get('username')} (user_id {user.get('user_id')}), roles: "
                  f"{_cell(user.get('roles'))}", highlight=False)


async def _create_first_user(username: str, email: str, full_name: str | None, roles: list[str],
                             password: str) -> str:
    """Append ``user_created`` for the first user to the event log over NATS (the gateways' projection picks it
    up); a :class:`CLIError` once any user event exists. The same rules as the API: the password's length, the
    user name's pattern, a hash (argon2id) and never the password in the event."""
    from ckp_core.errors import ConcurrencyError
    from ckp_core.events import Actor, UserCreated
    from ckp_core.ids import new_id
    from langorch.cli import connect_nats
    from langorch_gateway import users
    from langorch_infra.jetstream import JetStreamEventStore, ensure_topology
    from langorch_infra.settings import CommonSettings

    if not users.PASSWORD_MIN <= len(password) <= users.PASSWORD_MAX:
        raise CLIError(f"the password must have {users.PASSWORD_MIN} to {users.PASSWORD_MAX} characters",
                       ExitCode.USAGE)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", username):
        raise CLIError(f"user name {username!r}: letters, digits, _ . - (starting with a letter or digit), at most "
                       "128", ExitCode.USAGE)
    settings = CommonSettings()
    nc = await connect_nats(settings.nats_url, "langorch-users", settings=settings)
    try:
        js = nc.jetstream()
        await ensure_topology(js, audit_retention_days=settings.audit_retention_days, replicas=settings.nats_replicas)
        if await users.last_user_position(js) > 0:
            raise CLIError("users exist already: --direct creates only the first one; create this one through the "
                           "API with an admin's credential (without --direct)")
        digest = await users.hash_password(password)
        user_id = new_id()
        event = UserCreated(user_id=user_id, username=username, email=email, full_name=full_name, roles=roles,
                            password_hash=digest)
        try:
            await users.append(JetStreamEventStore(js), "user", username, None, [event], actor=Actor.system("cli"),
                               causation_id=None)
        except ConcurrencyError as exc:
            raise CLIError(f"a user named {username!r} was created meanwhile") from exc
        return user_id
    finally:
        await nc.close()


@users_app.command("list")
def users_list(
    search: Annotated[str | None, typer.Option(help="Only users whose name, e-mail or full name contain this.",
                                               show_default=False)] = None,
    role: Annotated[Role | None, typer.Option(help="Only users holding this role.", show_default=False)] = None,
    active: Annotated[bool | None, typer.Option("--active/--inactive", help="Only active, or only deactivated, "
                                                "users (default: both).", show_default=False)] = None,
    api: ApiUrl = DEFAULT_API, api_key: ApiKey = None, as_json: AsJson = False,
) -> None:
    """List the users, by user name. Needs an admin credential."""
    params: dict[str, Any] = {"sort": "username"}
    if search is not None:
        params["search"] = search
    if role is not None:
        params["role"] = role.value
    if active is not None:
        params["is_active"] = "true" if active else "false"
    with _client(api, api_key) as client:
        users = client.pages("listing users", "/api/users", params)
    if as_json:
        _print_json(users)
        return
    _table(f"{len(users)} user{'s' if len(users) != 1 else ''}", USER_COLUMNS, users)


@users_app.command("set-roles")
def users_set_roles(
    username: Annotated[str, typer.Argument(show_default=False)],
    roles: Annotated[list[Role], typer.Argument(help="The user's roles from now on (replacing the current ones).",
                                                show_default=False)],
    api: ApiUrl = DEFAULT_API, api_key: ApiKey = None, as_json: AsJson = False,
) -> None:
    """Replace a user's roles (effective within 30 seconds, also for tokens already issued). Needs an admin
    credential; the last active admin keeps the admin role."""
    with _client(api, api_key) as client:
        user = _user(client, username)
        updated = client.json(f"setting the roles of {username!r}", "PATCH", f"/api/users/{user['user_id']}",
                              json={"roles": sorted({r.value for r in roles})})
    if as_json:
        _print_json(updated)
        return
    console.print(f"{username}: roles {_cell(updated.get('roles'))}", highlight=False)


@users_app.command("deactivate")
def users_deactivate(
    username: Annotated[str, typer.Argument(show_default=False)],
    api: ApiUrl = DEFAULT_API, api_key: ApiKey = None, as_json: AsJson = False,
) -> None:
    """Deactivate a user: their logins and tokens stop working (within 30 seconds). Needs an admin credential;
    the last active admin cannot be deactivated."""
    with _client(api, api_key) as client:
        user = _user(client, username)
        updated = client.json(f"deactivating {username!r}", "PATCH", f"/api/users/{user['user_id']}",
                              json={"is_active": False})
    if as_json:
        _print_json(updated)
        return
    console.print(f"{username}: deactivated", highlight=False)


# -- API keys -------------------------------------------------------------------------------------------------------

KEY_COLUMNS = ("key_id", "name", "roles", "expires_at", "last_used_at", "revoked_at")  # --json: every field


def _expiry(expires_at: str | None, expires_in_days: float | None) -> str | None:
    if expires_at is not None and expires_in_days is not None:
        raise CLIError("give --expires-at or --expires-in-days, not both", ExitCode.USAGE)
    if expires_in_days is not None:
        if expires_in_days <= 0:
            raise CLIError(f"--expires-in-days {expires_in_days:g}: give a number of days above 0", ExitCode.USAGE)
        moment = datetime.now(UTC) + timedelta(days=expires_in_days)
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    if expires_at is not None:
        try:
            parsed = datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
        except ValueError as exc:
            raise CLIError(f"--expires-at {expires_at!r}: not an RFC 3339 time such as 2027-01-31T00:00:00Z",
                           ExitCode.USAGE) from exc
        if parsed.tzinfo is None:
            raise CLIError(f"--expires-at {expires_at!r}: give the time zone (Z for UTC)", ExitCode.USAGE)
        return parsed.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return None


@api_keys_app.command("create")
def api_keys_create(
    name: Annotated[str, typer.Argument(help="A name saying what the key is for.", show_default=False)],
    role: Annotated[list[Role], typer.Option("--role", help="A role of the key; repeat for several. Fixed for the "
                                             "key's life.", show_default=False)],
    description: Annotated[str | None, typer.Option(show_default=False)] = None,
    expires_at: Annotated[str | None, typer.Option("--expires-at", help="Expiry time (RFC 3339, e.g. "
                                                   "2027-01-31T00:00:00Z); default: never.",
                                                   show_default=False)] = None,
    expires_in_days: Annotated[float | None, typer.Option("--expires-in-days", help="Expiry in days from now.",
                                                          show_default=False)] = None,
    api: ApiUrl = DEFAULT_API, api_key: ApiKey = None, as_json: AsJson = False,
) -> None:
    """Create an API key and print it: the only time it is shown (the server keeps only its SHA-256). Needs an
    admin credential."""
    body: dict[str, Any] = {"name": name, "roles": sorted({r.value for r in role})}
    if description is not None:
        body["description"] = description
    expiry = _expiry(expires_at, expires_in_days)
    if expiry is not None:
        body["expires_at"] = expiry
    with _client(api, api_key) as client:
        created = client.json(f"creating API key {name!r}", "POST", "/api/auth/api-keys", json=body,
                              expect=(201,))
    if as_json:
        _print_json(created)
        return
    console.print(f"created API key {created.get('key_id')} ({name}), roles {_cell(created.get('roles'))}, "
                  f"expires {_cell(created.get('expires_at')) if created.get('expires_at') else 'never'}",
                  highlight=False)
    console.print("the key (shown only now; keep it secret):", highlight=False)
    console.print(f"  export LANGORCH_API_KEY={created.get('key')}", highlight=False, soft_wrap=True)


@api_keys_app.command("list")
def api_keys_list(
    revoked: Annotated[bool | None, typer.Option("--revoked/--valid", help="Only revoked, or only unrevoked, keys "
                                                 "(default: all).", show_default=False)] = None,
    api: ApiUrl = DEFAULT_API, api_key: ApiKey = None, as_json: AsJson = False,
) -> None:
    """List the API keys (never the keys themselves). Needs an admin credential."""
    params: dict[str, Any] = {}
    if revoked is not None:
        params["revoked"] = "true" if revoked else "false"
    with _client(api, api_key) as client:
        keys = client.pages("listing API keys", "/api/auth/api-keys", params)
    if as_json:
        _print_json(keys)
        return
    _table(f"{len(keys)} API key{'s' if len(keys) != 1 else ''}", KEY_COLUMNS, keys)


@api_keys_app.command("revoke")
def api_keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (the key_id column of `langorch api-keys list`).",
                                          show_default=False)],
    api: ApiUrl = DEFAULT_API, api_key: ApiKey = None,
) -> None:
    """Revoke an API key: every request with it is refused with 401 from now on. Needs an admin credential."""
    with _client(api, api_key) as client:
        client.call(f"revoking API key {key_id!r}", "DELETE", f"/api/auth/api-keys/{key_id}", expect=(204, 200))
    console.print(f"revoked API key {key_id}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the commands of this module to ``langorch``."""
    app.command()(login)
    app.command()(logout)
    app.command()(whoami)
    app.add_typer(users_app, name="users")
    app.add_typer(api_keys_app, name="api-keys")
    for info in (*users_app.registered_commands, *api_keys_app.registered_commands):
        if not info.epilog:
            info.epilog = EXIT_CODES_HELP
