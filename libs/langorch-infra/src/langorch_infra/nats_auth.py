"""How a LangOrch process authenticates to NATS: the credential and TLS settings of :class:`CommonSettings` turned
into the options of nats-py's ``connect`` (services, CLI) and FastStream's ``NatsBroker`` (the same options).

One kind of credential at most (the settings refuse more): a user and password, a token, an nkey seed file or a
``.creds`` file (user JWT and nkey seed, for an operator-mode server). A URL of the form ``nats://user:pw@host``
still works when no credential setting is given (nats-py reads it). Secret values stay :class:`SecretStr` until
this module hands them to the client, and nothing here logs them.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from faststream.nats.security import NatsSecurity

    from langorch_infra.settings import CommonSettings


class NatsCredentialError(ValueError):
    """A credential or TLS file named by the settings cannot be used (missing, unreadable)."""


def _readable(setting: str, path: str) -> str:
    file = Path(path).expanduser()
    if not file.is_file():
        raise NatsCredentialError(f"LANGORCH_{setting.upper()}: no such file {file}")
    try:
        with open(file, "rb"):
            pass
    except OSError as exc:
        raise NatsCredentialError(f"LANGORCH_{setting.upper()}: cannot read {file} ({exc.strerror})") from exc
    return str(file)


def tls_context(settings: CommonSettings) -> ssl.SSLContext | None:
    """The TLS context of the NATS connection, when any ``nats_tls_*`` setting is given (else None: nats-py's
    default context). nats-py switches to TLS when the server requires it."""
    ca, cert, key = settings.nats_tls_ca_file, settings.nats_tls_cert_file, settings.nats_tls_key_file
    if ca is None and cert is None and key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=_readable("nats_tls_ca_file", ca) if ca is not None else None)
    if cert is not None and key is not None:
        context.load_cert_chain(_readable("nats_tls_cert_file", cert), _readable("nats_tls_key_file", key))
    return context


def nats_servers(url: str) -> list[str]:
    """The seed servers of a NATS URL setting: one URL, or several comma-separated (``nats://a:4222,nats://b:4222``,
    the members of a cluster); nats-py and FastStream take the list and fail over between them. Each URL keeps its
    own ``user:password@`` part."""
    return [part.strip() for part in url.split(",") if part.strip()]


def connect_options(settings: CommonSettings | None) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect`` (and ``NatsBroker``) carrying ``settings``' credential and TLS
    context; empty without settings or when none is configured. Raises :class:`NatsCredentialError` for a file
    that is not there."""
    if settings is None:
        return {}
    options: dict[str, Any] = {}
    context = tls_context(settings)
    if context is not None:
        options["tls"] = context
    if settings.nats_user is not None and settings.nats_password is not None:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password.get_secret_value()
    elif settings.nats_token is not None:
        options["token"] = settings.nats_token.get_secret_value()
    elif settings.nats_nkey_seed_file is not None:
        options["nkeys_seed"] = _readable("nats_nkey_seed_file", settings.nats_nkey_seed_file)
    elif settings.nats_creds_file is not None:
        options["user_credentials"] = _readable("nats_creds_file", settings.nats_creds_file)
    return options


def broker_security(settings: CommonSettings | None) -> NatsSecurity | None:
    """The same credential and TLS context as FastStream's ``security=`` object (None: nothing configured)."""
    options = connect_options(settings)
    if not options:
        return None
    from faststream.nats.security import NatsCredentials, NatsNKey, NatsSecurity, NatsToken, NatsUserPassword

    context: ssl.SSLContext | None = options.get("tls")
    if "user" in options:
        return NatsUserPassword(options["user"], options["password"], ssl_context=context)
    if "token" in options:
        return NatsToken(options["token"], ssl_context=context)
    if "nkeys_seed" in options:
        return NatsNKey.from_file(options["nkeys_seed"], ssl_context=context)
    if "user_credentials" in options:
        return NatsCredentials.from_file(options["user_credentials"], ssl_context=context)
    return NatsSecurity(ssl_context=context)
