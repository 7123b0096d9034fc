"""The providers' references, read without their SDKs: the gateway checks a secret record's reference when it is
written (``routes_secrets``), and importing hvac, boto3 and azure-identity for that cost every start about a
second; the providers themselves (:mod:`.vault`, :mod:`.aws`, :mod:`.azure`) are imported at their first use."""

from __future__ import annotations

from urllib.parse import urlparse


def vault_ref(ref: str) -> tuple[str, str, str | None]:
    """``<mount>/<path>#<field>`` → (mount, path, field); raises ValueError when malformed."""
    location, _, field = ref.partition("#")
    mount, _, path = location.strip("/").partition("/")
    if not mount or not path:
        raise ValueError("a vault reference is <mount>/<path>#<field> (e.g. secret/apps/portal#password)")
    return mount, path, field or None


def aws_ref(ref: str) -> tuple[str, str | None]:
    """``<name or ARN>#<json key>`` → (secret id, key); an ARN has colons, never '#'."""
    secret_id, _, key = ref.partition("#")
    if not secret_id:
        raise ValueError("an aws reference is <secret name or ARN>[#<json key>]")
    return secret_id, key or None


def azure_ref(ref: str, vault_url: str | None = None) -> tuple[str, str]:
    """→ (vault url, secret name); raises ValueError when no vault is named."""
    text = ref.strip()
    if text.startswith(("https://", "http://")):
        base, _, secret = text.rstrip("/").rpartition("/")
        if base.endswith("/secrets"):  # the secret's own URL, as the portal shows it
            base = base[: -len("/secrets")]
        if urlparse(base).netloc and secret:
            return base, secret
        raise ValueError("an azure reference is <vault url>/<secret name>")
    if vault_url and text and "/" not in text:
        return vault_url.rstrip("/"), text
    raise ValueError("an azure reference is <vault url>/<secret name> (or a secret name with "
                     "secrets_config.vault_url)")
