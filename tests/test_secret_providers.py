"""The secret providers against servers the tests start (api.md §11, ckp.md §7.14): a local HTTPS Vault
(``tests/fake_vault.py``), moto's standalone Secrets Manager, and a local HTTPS Key Vault with its managed-identity
endpoint (``tests/fake_azure_keyvault.py``). Each provider resolves, fails with one ``SecretError`` carrying the
provider's reason and never the value, answers ``check``, and keeps values no longer than the cache TTL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from langorch_infra.secret_providers import SecretError, SecretRecord, SecretResolver
from langorch_infra.settings import RuntimeSettings
from tests.fake_azure_keyvault import FakeKeyVault
from tests.fake_tls import ServerCertificates, make_certificates
from tests.fake_vault import FakeVault
from tests.ports import free_port

pytestmark = pytest.mark.integration

VAULT_VALUE = "vault-VALUE-4711-unique"
AWS_VALUE = "aws-VALUE-0815-unique"
AZURE_VALUE = "azure-VALUE-1234-unique"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> ServerCertificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def vault(certs: ServerCertificates) -> Iterator[FakeVault]:
    with FakeVault(certs) as server:
        server.state.kv["secret/apps/portal"] = {"password": VAULT_VALUE, "user": "ann"}
        server.state.kv["kv/single"] = {"value": VAULT_VALUE}
        yield server


def vault_settings(vault: FakeVault, certs: ServerCertificates, tmp_path: Path, **extra: Any) -> RuntimeSettings:
    return RuntimeSettings(vault_addr=vault.url, vault_ca_bundle=str(certs.ca_file), secret_provider_timeout_s=5,
                           **extra)


def token_file(tmp_path: Path, token: str) -> str:
    path = tmp_path / "vault-token"
    path.write_text(token + "\n")
    return str(path)


async def failure(resolver: SecretResolver, name: str, **where: Any) -> SecretError:
    with pytest.raises(SecretError) as info:
        await resolver.resolve(name, **where)
    return info.value


def assert_no_value(error: SecretError, *values: str) -> None:
    text = f"{error} {error.reason} {error.details} {error.message}"
    for value in values:
        assert value not in text


# -- vault -------------------------------------------------------------------------------------------------------


async def test_vault_token_auth_reads_kv_v2_fields_and_fails_cleanly(vault: FakeVault, certs: ServerCertificates,
                                                                     tmp_path: Path) -> None:
    token = vault.state.issue()
    resolver = SecretResolver(vault_settings(vault, certs, tmp_path, vault_token_path=token_file(tmp_path, token)))
    assert await resolver.resolve("portal", provider="vault", ref="secret/apps/portal#password") == VAULT_VALUE
    assert await resolver.resolve("single", provider="vault", ref="kv/single") == VAULT_VALUE  # one field
    whole = await resolver.resolve("whole", provider="vault", ref="secret/apps/portal")
    assert json.loads(whole) == {"password": VAULT_VALUE, "user": "ann"}
    assert await resolver.resolve("whole", provider="vault", ref="secret/apps/portal", field="user") == "ann"
    assert [c.path for c in vault.calls][:2] == ["/v1/auth/token/lookup-self", "/v1/secret/data/apps/portal"]

    missing = await failure(resolver, "gone", provider="vault", ref="secret/apps/nothing#password")
    assert (missing.code, missing.retryable, missing.provider) == ("secret_not_found", False, "vault")
    assert "no secret at secret/apps/nothing" in missing.reason
    no_field = await failure(resolver, "nofield", provider="vault", ref="secret/apps/portal#pin")
    assert (no_field.code, no_field.reason) == ("secret_not_found", "the secret at secret/apps/portal has no "
                                                                    "field 'pin'")
    bad_ref = await failure(resolver, "bad", provider="vault", ref="justonesegment")
    assert bad_ref.code == "secret_not_found"
    for error in (missing, no_field, bad_ref):
        assert_no_value(error, VAULT_VALUE)


async def test_vault_refused_token_and_sealed_vault_are_unavailable(vault: FakeVault, certs: ServerCertificates,
                                                                    tmp_path: Path) -> None:
    resolver = SecretResolver(vault_settings(vault, certs, tmp_path,
                                             vault_token_path=token_file(tmp_path, "hvs.not-a-token")))
    refused = await failure(resolver, "portal", provider="vault", ref="secret/apps/portal#password")
    assert (refused.code, refused.retryable) == ("secret_unavailable", True)
    assert "permission denied" in refused.reason
    vault.state.tokens.add("hvs.not-a-token")
    assert await resolver.resolve("portal", provider="vault", ref="secret/apps/portal#password") == VAULT_VALUE
    vault.state.down = True
    resolver.cache.clear()
    sealed = await failure(resolver, "portal", provider="vault", ref="secret/apps/portal#password")
    assert sealed.code == "secret_unavailable"
    assert "Vault is sealed" in sealed.reason
    assert_no_value(sealed, VAULT_VALUE)


async def test_vault_unreachable_is_unavailable(certs: ServerCertificates) -> None:
    settings = RuntimeSettings(vault_addr=f"https://127.0.0.1:{free_port()}", vault_token="hvs.x",
                               vault_ca_bundle=str(certs.ca_file), secret_provider_timeout_s=3)
    error = await failure(SecretResolver(settings), "portal", provider="vault", ref="secret/apps/portal#password")
    assert (error.code, error.provider) == ("secret_unavailable", "vault")
    assert "Vault unreachable" in error.reason


async def test_vault_untrusted_certificate_is_refused(vault: FakeVault, tmp_path: Path) -> None:
    other_ca = make_certificates(tmp_path / "other")  # the client trusts a CA that did not sign the server's
    token = vault.state.issue()
    settings = RuntimeSettings(vault_addr=vault.url, vault_token=token, vault_ca_bundle=str(other_ca.ca_file),
                               secret_provider_timeout_s=5)
    error = await failure(SecretResolver(settings), "p", provider="vault", ref="secret/apps/portal#password")
    assert error.code == "secret_unavailable"
    assert "SSLError" in error.reason


async def test_vault_approle_login_and_login_again_when_the_token_is_revoked(
        vault: FakeVault, certs: ServerCertificates, tmp_path: Path) -> None:
    vault.state.approles["role-1"] = "secret-id-1"
    secret_id = tmp_path / "secret-id"
    secret_id.write_text("secret-id-1")
    resolver = SecretResolver(vault_settings(vault, certs, tmp_path, vault_auth_method="approle",
                                             vault_role="role-1", vault_secret_id_path=str(secret_id),
                                             secret_cache_ttl_s=0))
    assert await resolver.resolve("portal", provider="vault", ref="secret/apps/portal#password") == VAULT_VALUE
    logins = [c for c in vault.calls if c.path == "/v1/auth/approle/login"]
    assert len(logins) == 1
    assert logins[0].body == {"role_id": "role-1", "secret_id": "secret-id-1"}
    vault.state.tokens.clear()  # the token expired: the next read is refused, the provider logs in once more
    assert await resolver.resolve("portal", provider="vault", ref="secret/apps/portal#password") == VAULT_VALUE
    assert len([c for c in vault.calls if c.path == "/v1/auth/approle/login"]) == 2
    secret_id.write_text("wrong")
    vault.state.tokens.clear()
    error = await failure(resolver, "portal", provider="vault", ref="secret/apps/portal#password")
    assert (error.code, error.provider) == ("secret_unavailable", "vault")
    assert "invalid role or secret ID" in error.reason


async def test_vault_kubernetes_login_with_a_custom_mount(vault: FakeVault, certs: ServerCertificates,
                                                          tmp_path: Path) -> None:
    vault.state.auth_mounts = {"k8s-prod": "kubernetes"}
    vault.state.kubernetes["langorch"] = "eyJ.service-account.jwt"
    jwt = tmp_path / "token"
    jwt.write_text("eyJ.service-account.jwt")
    settings = vault_settings(vault, certs, tmp_path, vault_auth_method="kubernetes", vault_role="langorch",
                              vault_jwt_path=str(jwt), vault_auth_mount="k8s-prod")
    resolver = SecretResolver(settings)
    assert await resolver.resolve("portal", provider="vault", ref="secret/apps/portal#password") == VAULT_VALUE
    [login] = [c for c in vault.calls if c.path == "/v1/auth/k8s-prod/login"]
    assert login.body == {"role": "langorch", "jwt": "eyJ.service-account.jwt"}
    jwt.write_text("eyJ.another")
    other = SecretResolver(settings)
    error = await failure(other, "portal", provider="vault", ref="secret/apps/portal#password")
    assert (error.code, "permission denied" in error.reason) == ("secret_unavailable", True)


async def test_values_are_cached_for_the_ttl_only_and_check_reads_past_the_cache(
        vault: FakeVault, certs: ServerCertificates, tmp_path: Path) -> None:
    clock = Clock()
    token = vault.state.issue()
    resolver = SecretResolver(vault_settings(vault, certs, tmp_path, vault_token=token, secret_cache_ttl_s=30),
                              clock=clock)
    for _ in range(3):
        assert await resolver.resolve("portal", provider="vault", ref="secret/apps/portal#password") == VAULT_VALUE
    assert vault.reads() == 1
    vault.state.kv["secret/apps/portal"] = {"password": "rotated-value"}
    clock.now += 29
    assert await resolver.resolve("portal", provider="vault", ref="secret/apps/portal#password") == VAULT_VALUE
    clock.now += 2
    assert await resolver.resolve("portal", provider="vault", ref="secret/apps/portal#password") == "rotated-value"
    assert vault.reads() == 2
    await resolver.check(SecretRecord("portal", "vault", "secret/apps/portal#password"))
    assert vault.reads() == 3
    with pytest.raises(SecretError) as info:
        await resolver.check(SecretRecord("portal", "vault", "secret/apps/portal#nothing"))
    assert info.value.code == "secret_not_found"


# -- aws ---------------------------------------------------------------------------------------------------------


async def test_aws_secrets_manager_by_name_arn_and_json_key(moto: str) -> None:
    sm = boto3.client("secretsmanager", endpoint_url=moto, region_name="eu-west-1")
    plain = sm.create_secret(Name="apps/portal", SecretString=AWS_VALUE)
    sm.create_secret(Name="apps/db", SecretString=json.dumps({"password": AWS_VALUE, "port": 5432}))
    settings = RuntimeSettings(aws_endpoint_url=moto, aws_region="eu-west-1", secret_provider_timeout_s=5)
    resolver = SecretResolver(settings)
    assert await resolver.resolve("portal", provider="aws", ref="apps/portal") == AWS_VALUE
    assert await resolver.resolve("portal", provider="aws", ref=plain["ARN"]) == AWS_VALUE
    assert await resolver.resolve("db", provider="aws", ref="apps/db#password") == AWS_VALUE
    assert await resolver.resolve("db", provider="aws", ref="apps/db#port") == "5432"
    assert await resolver.resolve("db", provider="aws", ref="apps/db", field="password") == AWS_VALUE

    missing = await failure(resolver, "gone", provider="aws", ref="apps/nothing")
    assert (missing.code, missing.provider) == ("secret_not_found", "aws")
    assert "ResourceNotFoundException" in missing.reason
    no_key = await failure(resolver, "db", provider="aws", ref="apps/db#user")
    assert (no_key.code, no_key.reason) == ("secret_not_found", "apps/db is not a JSON object with key 'user'")
    not_json = await failure(resolver, "portal", provider="aws", ref="apps/portal#password")
    assert not_json.code == "secret_not_found"
    for error in (missing, no_key, not_json):
        assert_no_value(error, AWS_VALUE)
    await resolver.check(SecretRecord("portal", "aws", "apps/portal"))


async def test_aws_unreachable_endpoint_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    settings = RuntimeSettings(aws_endpoint_url=f"http://127.0.0.1:{free_port()}", aws_region="eu-west-1",
                               secret_provider_timeout_s=2)
    error = await failure(SecretResolver(settings), "portal", provider="aws", ref="apps/portal")
    assert (error.code, error.retryable) == ("secret_unavailable", True)
    assert "Secrets Manager unreachable" in error.reason


# -- azure -------------------------------------------------------------------------------------------------------


@pytest.fixture
def key_vault(certs: ServerCertificates, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKeyVault]:
    with FakeKeyVault(certs) as server:
        server.state.secrets["portal-pw"] = AZURE_VALUE
        server.state.secrets["db"] = json.dumps({"password": AZURE_VALUE})
        monkeypatch.setenv("IDENTITY_ENDPOINT", server.identity.url + "/msi/token")
        monkeypatch.setenv("IDENTITY_HEADER", server.state.identity_header)
        yield server


def azure_settings(certs: ServerCertificates, **extra: Any) -> RuntimeSettings:
    return RuntimeSettings(azure_ca_bundle=str(certs.ca_file), azure_verify_challenge_resource=False,
                           secret_provider_timeout_s=5, **extra)


@pytest.mark.parametrize("credential", ["managed_identity", "default"])
async def test_azure_key_vault_challenge_then_token_then_secret(key_vault: FakeKeyVault, certs: ServerCertificates,
                                                                credential: str) -> None:
    resolver = SecretResolver(azure_settings(certs, azure_credential=credential))
    assert await resolver.resolve("portal", provider="azure", ref=f"{key_vault.url}/portal-pw") == AZURE_VALUE
    # a procedure's secrets_config.vault_url names the vault; the reference is then the secret's name
    assert await resolver.resolve("db", provider="azure", ref="db", url=key_vault.url, field="password") == \
        AZURE_VALUE
    assert await resolver.resolve("portal", provider="azure", ref=f"{key_vault.url}/secrets/portal-pw") == \
        AZURE_VALUE
    first, second = key_vault.calls[:2]
    assert "authorization" not in first.headers  # the challenge round
    assert second.headers["authorization"].startswith("Bearer eyFake.")
    assert set(key_vault.state.api_versions) == {"7.4"}
    [token_call] = key_vault.identity.calls  # one token, reused
    assert token_call.query["resource"] == "https://vault.azure.net"

    missing = await failure(resolver, "gone", provider="azure", ref=f"{key_vault.url}/nothing")
    assert (missing.code, missing.provider) == ("secret_not_found", "azure")
    assert "SecretNotFound" in missing.reason
    bad_ref = await failure(resolver, "x", provider="azure", ref="portal-pw")  # no vault named anywhere
    assert bad_ref.code == "secret_not_found"
    for error in (missing, bad_ref):
        assert_no_value(error, AZURE_VALUE)
    await resolver.check(SecretRecord("portal", "azure", f"{key_vault.url}/portal-pw"))


async def test_azure_without_a_token_is_unavailable(key_vault: FakeKeyVault, certs: ServerCertificates,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDENTITY_HEADER", "not-the-header")
    resolver = SecretResolver(azure_settings(certs, azure_credential="managed_identity"))
    error = await failure(resolver, "portal", provider="azure", ref=f"{key_vault.url}/portal-pw")
    assert (error.code, error.retryable, error.provider) == ("secret_unavailable", True, "azure")
    assert "no token for Key Vault" in error.reason
    assert_no_value(error, AZURE_VALUE)


# -- env and the default providers ---------------------------------------------------------------------------------


async def test_env_and_names_without_a_record_go_through_the_default_providers(
        vault: FakeVault, certs: ServerCertificates, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANGORCH_SECRET_PORTAL_PW", "env-value")
    monkeypatch.setenv("OTHER_VARIABLE", "other-env-value")
    token = vault.state.issue()
    vault.state.kv["secret/fallback"] = {"value": VAULT_VALUE}
    settings = vault_settings(vault, certs, tmp_path, vault_token=token, secret_providers=["env", "vault"])
    records = {"by-record": SecretRecord("by-record", "env", "OTHER_VARIABLE")}

    async def lookup(name: str) -> SecretRecord | None:
        return records.get(name)

    resolver = SecretResolver(settings, lookup)
    assert await resolver.resolve("portal-pw") == "env-value"  # LANGORCH_SECRET_<NAME>
    assert await resolver.resolve("by-record") == "other-env-value"  # the record's provider_ref
    # a record wins over the provider a procedure names
    assert await resolver.resolve("by-record", provider="vault", url="https://elsewhere") == "other-env-value"
    assert await resolver.resolve("secret/fallback") == VAULT_VALUE  # env has none: vault, name as reference
    error = await failure(resolver, "secret/nothing")
    assert (error.code, error.provider) == ("secret_not_found", "env,vault")
    assert "env: neither LANGORCH_SECRET_SECRET_NOTHING nor secret/nothing is set" in error.reason
    langorch_only = await failure(resolver, "portal-pw", provider="langorch")
    assert (langorch_only.code, langorch_only.provider) == ("secret_not_found", "langorch")
    vault.state.down = True
    down = await failure(resolver, "secret/other")
    assert down.code == "secret_unavailable"  # one provider failed: a retry may find it
    assert await resolver.value("portal-pw") == "env-value"
