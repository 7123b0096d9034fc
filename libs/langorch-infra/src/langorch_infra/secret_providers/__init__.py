"""Secret providers (ckp.md §7.14, api.md §11): ``env``, ``vault`` (hvac, KV v2), ``aws`` (boto3 Secrets Manager)
and ``azure`` (azure-keyvault-secrets). Values are read at the moment of use, kept in memory for a short TTL and
never persisted; a failure is one :class:`SecretError` carrying the provider's reason, never the value.

* :mod:`.base` — :class:`SecretError`, the ``Provider`` protocol, the TTL cache
* :mod:`.env`, :mod:`.vault`, :mod:`.aws`, :mod:`.azure` — the providers
* :mod:`.resolver` — :class:`SecretResolver` (which provider a name uses, and the resolution), metadata records
"""

from langorch_infra.secret_providers.base import PROVIDERS, Provider, ProviderName, SecretError, TtlCache
from langorch_infra.secret_providers.env import EnvProvider, env_secret
from langorch_infra.secret_providers.resolver import (
    EventStoreRecords,
    RecordLookup,
    Resolution,
    SecretLookup,
    SecretRecord,
    SecretResolver,
    fold_record,
    select_field,
)

__all__ = [
    "PROVIDERS",
    "EnvProvider",
    "EventStoreRecords",
    "Provider",
    "ProviderName",
    "RecordLookup",
    "Resolution",
    "SecretError",
    "SecretLookup",
    "SecretRecord",
    "SecretResolver",
    "TtlCache",
    "env_secret",
    "fold_record",
    "select_field",
]
