"""Events of the user aggregate (owned by the gateway, api.md §2.3). The aggregate id is the username, so two
writers creating the same user race on one aggregate and the expected-position append lets exactly one win.

The argon2id ``password_hash`` travels only inside ``user_created`` and ``user_password_changed``: the ``users``
projection keeps it to check logins, and no view, log line or audit record carries it.
"""

from __future__ import annotations

from ckp_core.events.envelope import EventData


class UserCreated(EventData):
    TYPE = "user_created"
    AGGREGATE = "user"

    user_id: str
    username: str
    email: str
    full_name: str | None = None
    roles: list[str]
    password_hash: str


class UserUpdated(EventData):
    """The user's profile after the change (every field, so the projection needs no history)."""

    TYPE = "user_updated"
    AGGREGATE = "user"

    user_id: str
    username: str
    email: str
    full_name: str | None = None
    roles: list[str]
    is_active: bool = True


class UserDeactivated(EventData):
    TYPE = "user_deactivated"
    AGGREGATE = "user"

    user_id: str
    username: str


class UserDeleted(EventData):
    TYPE = "user_deleted"
    AGGREGATE = "user"

    user_id: str
    username: str


class UserPasswordChanged(EventData):
    TYPE = "user_password_changed"
    AGGREGATE = "user"

    user_id: str
    username: str
    password_hash: str


class UserLoggedIn(EventData):
    TYPE = "user_logged_in"
    AGGREGATE = "user"

    user_id: str
    username: str
    session: bool = False  # a console session (cookies) rather than a bearer token only
    client_ip: str | None = None


class LoginFailed(EventData):
    """A failed login of an existing user (an unknown username is audited only, never appended)."""

    TYPE = "login_failed"
    AGGREGATE = "user"

    user_id: str
    username: str
    reason: str  # invalid_password, inactive
    client_ip: str | None = None


class UserLoggedOut(EventData):
    TYPE = "user_logged_out"
    AGGREGATE = "user"

    user_id: str
    username: str


EVENTS: tuple[type[EventData], ...] = (UserCreated, UserUpdated, UserDeactivated, UserDeleted, UserPasswordChanged,
                                       UserLoggedIn, LoginFailed, UserLoggedOut)
