"""The ``aws`` provider (boto3, Secrets Manager): reference ``<name or ARN>#<json key>`` (key optional).

The SDK finds its credentials and region the usual way (environment, profile, instance or task role);
``aws_region`` and ``aws_endpoint_url`` override the region and the endpoint. A binary secret is returned as
UTF-8 text.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from langorch_infra.secret_providers.base import ProviderName, SecretError
from langorch_infra.secret_providers.refs import aws_ref as parse_ref
from langorch_infra.settings import CommonSettings

NOT_FOUND = frozenset({"ResourceNotFoundException"})
# the secret exists but cannot be read as asked (deleted, or the version has no value): no retry helps
NOT_READABLE = frozenset({"InvalidRequestException", "InvalidParameterException"})



class AwsProvider:
    name: ProviderName = "aws"

    def __init__(self, settings: CommonSettings) -> None:
        self.settings = settings
        self._client: Any = None
        self._lock = threading.Lock()

    def _secrets_manager(self) -> Any:
        with self._lock:  # boto3 clients are thread-safe once made; making one is not
            if self._client is None:
                s = self.settings
                timeout = s.secret_provider_timeout_s
                self._client = boto3.session.Session().client(
                    "secretsmanager", region_name=s.aws_region, endpoint_url=s.aws_endpoint_url,
                    config=Config(connect_timeout=timeout, read_timeout=timeout,
                                  retries={"max_attempts": 2, "mode": "standard"}))
            return self._client

    def _read(self, secret_id: str) -> str:
        response = self._secrets_manager().get_secret_value(SecretId=secret_id)
        if response.get("SecretString") is not None:
            return str(response["SecretString"])
        raw = response.get("SecretBinary")
        if isinstance(raw, bytes):
            return raw.decode("utf-8")
        raise KeyError("the secret version holds neither SecretString nor SecretBinary")

    async def fetch(self, name: str, ref: str, *, url: str | None = None) -> str:
        try:
            secret_id, key = parse_ref(ref)
        except ValueError as exc:
            raise SecretError("secret_not_found", name=name, provider="aws", reason=str(exc)) from None
        try:
            text = await asyncio.to_thread(self._read, secret_id)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code") or "ClientError")
            reason = f"Secrets Manager {code}: {error.get('Message') or ''}".strip()
            if code in NOT_FOUND | NOT_READABLE:
                raise SecretError("secret_not_found", name=name, provider="aws", reason=reason) from None
            raise SecretError("secret_unavailable", name=name, provider="aws", reason=reason) from None
        except BotoCoreError as exc:  # no credentials, no region, endpoint unreachable, timeouts
            raise SecretError("secret_unavailable", name=name, provider="aws",
                              reason=f"Secrets Manager unreachable: {type(exc).__name__}: {exc}") from None
        except (KeyError, UnicodeDecodeError) as exc:
            raise SecretError("secret_not_found", name=name, provider="aws",
                              reason=f"{secret_id} has no text value ({type(exc).__name__})") from None
        if key is None:
            return text
        try:
            document = json.loads(text)
            value = document[key]
        except (ValueError, KeyError, TypeError):
            raise SecretError("secret_not_found", name=name, provider="aws",
                              reason=f"{secret_id} is not a JSON object with key '{key}'") from None
        return value if isinstance(value, str) else json.dumps(value)
