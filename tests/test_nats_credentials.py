"""NATS credentials and subject permissions (api.md §16.4) on real nats-servers started by these tests.

* The users ``langorch up`` generates (:func:`langorch_infra.embedded.nats_users`) on an embedded server started
  from that configuration: the example producer publishes to ``lo.ext.>`` (stored in ``LO_EXT``) and is refused
  ``lo.cmd.>`` (a permissions violation, nothing in ``LO_CMD``); the example event consumer reads run events
  through its own durable and nothing else; a client without credentials, or with a wrong password, is refused;
  the services (compiler, runtime, approvals, gateway) work as the service user given by the settings
  ``LANGORCH_NATS_USER`` / ``LANGORCH_NATS_PASSWORD``; ``langorch up``'s own start of the server hands the
  services a URL that works and writes the users file readable by the user only.
* The other kinds of credential on servers configured by hand: a token, an nkey seed file, a ``.creds`` file of
  an operator-mode server, and TLS with a client certificate, each through the services' connect
  (``jetstream.connect``) and their FastStream broker.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import os
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig
from pydantic import ValidationError
from rich.console import Console

from langorch.up import Up, UpError, UpOptions
from langorch_infra import messaging
from langorch_infra.embedded import EmbeddedNats, NatsUser, NatsUsers, nats_server_binary, nats_users
from langorch_infra.jetstream import connect, ensure_topology
from langorch_infra.nats_auth import NatsCredentialError, connect_options
from langorch_infra.settings import CommonSettings, effective_settings
from tests.helpers import (
    decide,
    langorch_command,
    pending_approval,
    platform_of,
    port_open,
    start_document,
    wait_status,
    wait_until,
)
from tests.ports import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def users(tmp_path: Path) -> NatsUsers:
    return nats_users(tmp_path / "nats-users.json")


@pytest.fixture
def server(tmp_path: Path, users: NatsUsers) -> Iterator[EmbeddedNats]:
    """An embedded server with ``langorch up``'s users, as ``langorch up`` starts it."""
    nats_server = EmbeddedNats(tmp_path / "nats", users=users.all).start()
    try:
        yield nats_server
    finally:
        nats_server.stop()


def settings_of(server: EmbeddedNats, user: NatsUser) -> CommonSettings:
    """Settings naming ``user`` the way an operator configures a service (not in the URL)."""
    return CommonSettings(nats_url=server.url, nats_user=user.user, nats_password=user.password)


class Errors:
    """The asynchronous errors the server sends a connection (permissions violations)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def record(self, error: Exception) -> None:
        """The connection's ``error_cb`` (nats-py wants a coroutine function)."""
        self.seen.append(str(error))

    async def violation(self, subject: str) -> str:
        """Wait until the server has refused ``subject`` to this connection; the error."""
        def about(error: str) -> bool:
            return "permissions violation" in error.lower() and subject.lower() in error.lower()

        seen = await wait_until(lambda: list(self.seen), lambda errors: any(about(e) for e in errors), timeout=15)
        return next(e for e in seen if about(e))


@contextlib.asynccontextmanager
async def client(server: EmbeddedNats, user: NatsUser, errors: Errors | None = None) -> AsyncIterator[NATS]:
    """An external system's connection as ``user``, with its own inbox prefix (as the docs tell it to)."""
    nc = await nats.connect(server.url, allow_reconnect=False, connect_timeout=5,
                            inbox_prefix=user.inbox_prefix or "_INBOX", error_cb=(errors or Errors()).record,
                            **connect_options(settings_of(server, user)))
    try:
        yield nc
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def service(server: EmbeddedNats, users: NatsUsers) -> AsyncIterator[NATS]:
    """A connection as the services make it: ``jetstream.connect`` with the service user's settings, topology
    ensured."""
    nc = await connect(server.url, "test-service", settings_of(server, users.service))
    try:
        await ensure_topology(nc.jetstream())
        yield nc
    finally:
        await nc.close()


async def refused(url: str, **options: Any) -> str:
    """The error of a connection attempt the server refuses."""
    try:
        nc = await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5,
                                error_cb=Errors().record, **options)
    except Exception as error:  # nats-py raises its own Error, an ssl error or a NoServersError
        return str(error)
    await nc.close()
    raise AssertionError(f"{url} accepted the connection")


# -- the users langorch up generates ----------------------------------------------------------------------------------


async def test_the_producer_publishes_to_lo_ext_and_is_refused_lo_cmd(server: EmbeddedNats, users: NatsUsers) -> None:
    async with service(server, users) as svc:
        js = svc.jetstream()
        errors = Errors()
        async with client(server, users.producer, errors) as producer:
            ack = await producer.jetstream().publish("lo.ext.orders.created", b'{"order_id":"A-17"}',
                                                     headers={"Nats-Msg-Id": "order-A-17"})
            assert ack.stream == "LO_EXT"
            stored = await js.get_last_msg("LO_EXT", "lo.ext.orders.created")
            assert stored.data == b'{"order_id":"A-17"}'

            await producer.publish("lo.cmd.run.create", b'{"procedure_id":"p"}')
            await producer.flush()
            assert "lo.cmd.run.create" in await errors.violation("lo.cmd.run.create")
            # the connection is still there, and may still publish where it is allowed
            await producer.jetstream().publish("lo.ext.orders.created", b'{"order_id":"A-18"}')
        assert (await js.stream_info("LO_CMD")).state.messages == 0
        assert (await js.stream_info("LO_EXT")).state.messages == 2


async def test_the_producer_reads_nothing_of_langorch(server: EmbeddedNats, users: NatsUsers) -> None:
    async with service(server, users) as svc:
        errors = Errors()
        async with client(server, users.producer, errors) as producer:
            for subject in ("lo.evt.>", "_INBOX.>"):  # events, and other clients' replies
                await producer.subscribe(subject)
                await producer.flush()
                await errors.violation(subject)
            for subject in ("$JS.API.STREAM.INFO.LO_EVT", "$KV.lo_procedures.x", "lo.audit.x.y"):
                await producer.publish(subject, b"{}")
                await producer.flush()
                await errors.violation(subject)
        await svc.jetstream().publish("lo.evt.run.r1.run_started", b"{}")


async def test_the_event_consumer_reads_run_events_through_its_own_durable_only(server: EmbeddedNats,
                                                                                 users: NatsUsers) -> None:
    consumer = users.consumer
    assert consumer.durable is not None
    async with service(server, users) as svc:
        js = svc.jetstream()
        for subject in ("lo.evt.user.u1.user_created", "lo.evt.run.r1.run_started", "lo.evt.run.r1.run_completed"):
            await js.publish(subject, b"{}")
        errors = Errors()
        async with client(server, consumer, errors) as nc:
            cjs = nc.jetstream()
            # a filter outside run, approval and procedure events is refused (the filter is in the create subject)
            with pytest.raises(asyncio.TimeoutError):
                await cjs.add_consumer("LO_EVT", ConsumerConfig(name=consumer.durable, durable_name=consumer.durable,
                                                                filter_subject="lo.evt.user.>"), timeout=2)
            await errors.violation(f"$JS.API.CONSUMER.CREATE.LO_EVT.{consumer.durable}.lo.evt.user.>")
            # so is another durable name, and the legacy create subject that carries no filter
            with pytest.raises(asyncio.TimeoutError):
                await cjs.add_consumer("LO_EVT", ConsumerConfig(name="someone-else", durable_name="someone-else",
                                                                filter_subject="lo.evt.run.>"), timeout=2)
            with pytest.raises(asyncio.TimeoutError):
                await cjs.add_consumer("LO_EVT", ConsumerConfig(durable_name=consumer.durable,
                                                                filter_subject="lo.evt.run.>"), timeout=2)

            info = await cjs.add_consumer("LO_EVT", ConsumerConfig(name=consumer.durable,
                                                                   durable_name=consumer.durable,
                                                                   filter_subject="lo.evt.run.>"))
            assert info.config.filter_subject == "lo.evt.run.>"
            sub = await cjs.pull_subscribe_bind(consumer.durable, "LO_EVT")
            got: list[str] = []
            while len(got) < 2:
                for msg in await sub.fetch(2, timeout=10):
                    got.append(msg.subject)
                    await msg.ack_sync()
            assert got == ["lo.evt.run.r1.run_started", "lo.evt.run.r1.run_completed"]
            assert (await js.consumer_info("LO_EVT", consumer.durable)).num_ack_pending == 0

            await nc.publish("lo.ext.orders.created", b"{}")
            await nc.flush()
            await errors.violation("lo.ext.orders.created")
        assert (await js.stream_info("LO_EXT")).state.messages == 0
        assert [c.name for c in await js.consumers_info("LO_EVT")] == [consumer.durable]


async def test_a_client_without_the_right_credentials_is_refused(server: EmbeddedNats, users: NatsUsers) -> None:
    assert "authorization violation" in (await refused(server.url)).lower()
    assert "authorization violation" in (await refused(server.url, user=users.service.user,
                                                       password="not-" + users.service.password)).lower()
    assert "authorization violation" in (await refused(server.url, token=users.service.password)).lower()


async def test_the_services_work_as_the_service_user(server: EmbeddedNats, users: NatsUsers, database_url: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Every service of the platform, configured through LANGORCH_NATS_USER / LANGORCH_NATS_PASSWORD (the URL
    carries no credential): a run pauses at an approval (runtime, approvals), is approved through the API, and
    completes; its checkpoints come from the runtime over NATS request/reply."""
    monkeypatch.setenv("LANGORCH_NATS_USER", users.service.user)
    monkeypatch.setenv("LANGORCH_NATS_PASSWORD", users.service.password)
    doc = {"procedure_id": "nats_creds", "version": "1",
           "workflow_graph": {"start_node": "review", "nodes": {
               "review": {"type": "human_approval", "prompt": "Ship it?", "on_approve": "done",
                          "on_reject": "stop"},
               "done": {"type": "terminate", "status": "success", "outputs": {"shipped": True}},
               "stop": {"type": "terminate", "status": "failure"}}}}
    async with platform_of(server.url, database_url) as p:
        run_id = await start_document(p.client, doc)
        approval = await pending_approval(p.client, run_id)
        r = await decide(p.client, approval["approval_id"], decision="approved", comment="yes")
        assert r.status_code in (200, 202), r.text
        run = await wait_status(p.client, run_id, timeout=60)
        assert run["status"] == "completed", run
        r = await p.client.get(f"/api/runs/{run_id}/checkpoints")
        assert r.status_code == 200, r.text
        assert r.json()["items"], r.text


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("LANGORCH_")}
    return subprocess.run(langorch_command(*args), capture_output=True, text=True, env={**clean, **env},
                          timeout=120, check=False)


async def test_the_cli_connects_with_the_credential_settings(server: EmbeddedNats, users: NatsUsers,
                                                             database_url: str) -> None:
    async with service(server, users):
        pass  # the streams exist
    env = {"LANGORCH_NATS_URL": server.url, "LANGORCH_DATABASE_URL": database_url}
    proc = await asyncio.to_thread(_cli, "projections", "rebuild", **env, LANGORCH_NATS_USER=users.service.user,
                                   LANGORCH_NATS_PASSWORD=users.service.password)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "projections rebuilt" in proc.stdout
    assert users.service.password not in proc.stdout + proc.stderr

    proc = await asyncio.to_thread(_cli, "projections", "rebuild", **env,
                                   LANGORCH_NATS_NKEY_SEED_FILE="/nonexistent/user.nk")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "LANGORCH_NATS_NKEY_SEED_FILE: no such file /nonexistent/user.nk" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_langorch_up_starts_nats_with_the_users_and_hands_the_services_a_working_url(tmp_path: Path) -> None:
    up = Up(UpOptions(state_dir=tmp_path / "state", database_url="postgresql://unused@127.0.0.1:1/unused"),
            Console(quiet=True))
    port = free_port()
    try:
        nats_url, _ = up.start_servers({"nats": {"port": port}})
        users_file = tmp_path / "state" / "nats-users.json"
        assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "state" / "nats" / "nats-server.conf").stat().st_mode) == 0o600
        users = nats_users(users_file)
        assert nats_url == users.service.url(port)

        async def check() -> None:
            nc = await connect(nats_url, "test-up")  # the URL alone, as the services get it
            try:
                await ensure_topology(nc.jetstream())
                js = nc.jetstream()
                kv = await js.key_value("lo_procedures")  # $KV.lo_procedures.>
                await kv.put("p.1", b"{}")
                assert (await kv.get("p.1")).value == b"{}"
                store = await js.create_object_store("lo_artifacts")  # $O.lo_artifacts.>
                await store.put("a1", b"artifact")
                assert (await store.get("a1")).data == b"artifact"
                for subject, stream in (("lo.cmd.run.create", "LO_CMD"), ("lo.evt.run.r1.run_created", "LO_EVT"),
                                        ("lo.audit.run.create", "LO_AUDIT"), ("lo.ext.orders.created", "LO_EXT")):
                    assert (await js.publish(subject, b"{}")).stream == stream
            finally:
                await nc.close()
            assert "authorization violation" in (await refused(f"nats://127.0.0.1:{port}")).lower()

        asyncio.run(check())
    finally:
        up.stop_servers()
    # a second start keeps the passwords (the file is read back, not generated again)
    again = nats_users(tmp_path / "state" / "nats-users.json")
    assert again == users


def test_langorch_up_refuses_nats_credentials_meant_for_another_server(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANGORCH_NATS_USER", "someone")
    monkeypatch.setenv("LANGORCH_NATS_PASSWORD", "for-another-server")
    up = Up(UpOptions(state_dir=tmp_path / "state", port=free_port()), Console(quiet=True))
    with pytest.raises(UpError) as refusal:
        up.check()
    assert refusal.value.exit_code == 2
    assert "LANGORCH_NATS_PASSWORD, LANGORCH_NATS_USER are set" in str(refusal.value)
    assert "for-another-server" not in str(refusal.value)
    assert not (tmp_path / "state" / "nats").exists()
    # with a server of its own, they are that server's credentials
    elsewhere = Up(UpOptions(state_dir=tmp_path / "other", port=free_port(), nats_url="nats://127.0.0.1:4222",
                             database_url="postgresql://unused@127.0.0.1:1/unused"), Console(quiet=True))
    assert elsewhere.check() == {}


def test_the_users_file_is_private_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "state" / "nats-users.json"
    first = nats_users(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert nats_users(path) == first
    assert len({u.password for u in first.all}) == 3
    assert first.producer.publish == ("lo.ext.>",)
    path.write_text("{}")
    with pytest.raises(RuntimeError, match="not a NATS users file"):
        nats_users(path)


def test_the_credential_settings_are_secrets_and_one_kind_at_most(tmp_path: Path) -> None:
    settings = CommonSettings(nats_user="svc", nats_password="pw-never-shown", nats_tls_ca_file="/etc/ca.pem")
    shown = effective_settings(settings)
    assert shown["nats_password"] == {"set": True}
    assert shown["nats_token"] == {"set": False}
    assert shown["nats_user"] == "svc"
    assert "pw-never-shown" not in repr(settings) + json.dumps(shown)
    for wrong, message in (({"nats_user": "svc"}, "nats_user and nats_password go together"),
                           ({"nats_password": "pw-never-shown"}, "nats_user and nats_password go together"),
                           ({"nats_user": "svc", "nats_password": "pw-never-shown", "nats_token": "t"},
                            "set one kind of NATS credential, not nats_user and nats_token"),
                           ({"nats_token": "t", "nats_creds_file": "/x.creds"},
                            "set one kind of NATS credential, not nats_token and nats_creds_file"),
                           ({"nats_tls_cert_file": "/c.pem"}, "nats_tls_cert_file and nats_tls_key_file go together")):
        with pytest.raises(ValidationError, match=message) as refusal:
            CommonSettings(**wrong)
        assert "pw-never-shown" not in str(refusal.value)


# -- the other kinds of credential, on servers configured by hand ----------------------------------------------------


class ConfiguredNats:
    """A nats-server started from a configuration file of the test's own (JetStream on, loopback only)."""

    def __init__(self, state_dir: Path, config: str) -> None:
        self.state_dir = state_dir
        self.config = config
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ConfiguredNats:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        conf = self.state_dir / "test.conf"
        conf.write_text(self.config)
        with open(self.state_dir / "nats-server.log", "ab") as log:
            self.proc = subprocess.Popen([nats_server_binary(), "-c", str(conf), "-a", "127.0.0.1", "-p",
                                          str(self.port), "-js", "-sd", str(self.state_dir)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 30
        while not port_open(self.port):
            assert self.proc.poll() is None, (self.state_dir / "nats-server.log").read_text()
            assert time.monotonic() < deadline, "nats-server does not listen after 30 s"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


async def works_as_a_service(url: str, settings: CommonSettings) -> None:
    """``jetstream.connect`` and the FastStream broker both connect with ``settings`` and use JetStream."""
    nc = await connect(url, "test-credentials", settings)
    try:
        await ensure_topology(nc.jetstream())
        ack = await nc.jetstream().publish("lo.ext.t.created", b"{}")
        assert ack.stream == "LO_EXT"
    finally:
        await nc.close()
    broker = messaging.broker(url, "test-credentials-broker", None, settings)
    try:
        bnc = await messaging.connect(broker)
        assert (await bnc.jetstream().stream_info("LO_EXT")).state.messages == 1
    finally:
        await broker.stop()


async def test_a_token(tmp_path: Path) -> None:
    with ConfiguredNats(tmp_path / "nats", 'authorization { token: "t0ken-of-the-test" }\n') as s:
        await works_as_a_service(s.url, CommonSettings(nats_url=s.url, nats_token="t0ken-of-the-test"))
        assert "authorization violation" in (await refused(s.url, token="another")).lower()
        assert "authorization violation" in (await refused(s.url)).lower()


async def test_an_nkey_seed_file(tmp_path: Path) -> None:
    import nkeys

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed + b"\n")
    seed_file.chmod(0o600)
    config = f'authorization {{ users: [{{ nkey: "{public}" }}] }}\n'
    with ConfiguredNats(tmp_path / "nats", config) as s:
        await works_as_a_service(s.url, CommonSettings(nats_url=s.url, nats_nkey_seed_file=str(seed_file)))
        assert "authorization violation" in (await refused(s.url)).lower()
    with pytest.raises(NatsCredentialError, match="LANGORCH_NATS_NKEY_SEED_FILE: no such file"):
        connect_options(CommonSettings(nats_nkey_seed_file=str(tmp_path / "missing.nk")))


def _certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA (PEM files)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    files: dict[str, Path] = {}

    def write(name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        files[f"{name}_key"] = directory / f"{name}.key"
        files[f"{name}_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
        files[f"{name}_cert"] = directory / f"{name}.pem"
        files[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test CA")).issuer_name(name("test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    write("ca", ca_key, ca)
    for leaf, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(f"test {leaf}")).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        if leaf == "server":
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        write(leaf, key, builder.sign(ca_key, hashes.SHA256()))
    return files


async def test_tls_with_a_client_certificate_and_a_password(tmp_path: Path) -> None:
    certs = _certificates(tmp_path)
    config = (f'tls {{ cert_file: "{certs["server_cert"]}", key_file: "{certs["server_key"]}", '
              f'ca_file: "{certs["ca_cert"]}", verify: true }}\n'
              'authorization { users: [{ user: "svc", password: "tls-and-a-password" }] }\n')
    with ConfiguredNats(tmp_path / "nats", config) as s:
        settings = CommonSettings(nats_url=s.url, nats_user="svc", nats_password="tls-and-a-password",
                                  nats_tls_ca_file=str(certs["ca_cert"]), nats_tls_cert_file=str(certs["client_cert"]),
                                  nats_tls_key_file=str(certs["client_key"]))
        await works_as_a_service(s.url, settings)
        # the server's certificate checked against the CA but no client certificate: refused by the server
        without_cert = CommonSettings(nats_url=s.url, nats_user="svc", nats_password="tls-and-a-password",
                                      nats_tls_ca_file=str(certs["ca_cert"]))
        await refused(s.url, **connect_options(without_cert))
        # a client certificate but the system's CAs, which do not know the test CA: the client refuses the server
        untrusting = CommonSettings(nats_url=s.url, nats_user="svc", nats_password="tls-and-a-password",
                                    nats_tls_cert_file=str(certs["client_cert"]),
                                    nats_tls_key_file=str(certs["client_key"]))
        assert "certificate" in (await refused(s.url, **connect_options(untrusting))).lower()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _keypair(prefix: int) -> tuple[bytes, Any, str]:
    import nkeys

    seed = nkeys.encode_seed(os.urandom(32), prefix)
    pair = nkeys.from_seed(bytearray(seed))
    return seed, pair, pair.public_key.decode()


def _jwt(issuer: Any, issuer_public: str, subject: str, name: str, claims: dict[str, Any]) -> str:
    """A NATS JWT (ed25519-nkey) signed by ``issuer``, as nsc issues them."""
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps({"jti": _b64(os.urandom(24)), "iat": int(time.time()), "iss": issuer_public,
                            "name": name, "sub": subject, "nats": {**claims, "version": 2}}).encode())
    return f"{header}.{body}.{_b64(issuer.sign(f'{header}.{body}'.encode()))}"


async def test_a_creds_file_of_an_operator_mode_server(tmp_path: Path) -> None:
    """Operator mode: an operator, a system account, LangOrch's account (JetStream without limits) and a user whose
    JWT and seed are in a .creds file, all made here with nkeys (what nsc does)."""
    import nkeys

    _, operator, operator_public = _keypair(nkeys.PREFIX_BYTE_OPERATOR)
    _, _, system_public = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    _, account, account_public = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    user_seed, _, user_public = _keypair(nkeys.PREFIX_BYTE_USER)
    unlimited = dict.fromkeys(("subs", "data", "payload", "imports", "exports", "conn", "leaf"), -1)
    operator_jwt = _jwt(operator, operator_public, operator_public, "test operator", {"type": "operator"})
    system_jwt = _jwt(operator, operator_public, system_public, "SYS",
                      {"type": "account", "limits": {**unlimited, "wildcards": True}})
    account_jwt = _jwt(operator, operator_public, account_public, "LANGORCH", {
        "type": "account", "limits": {**unlimited, "wildcards": True, "mem_storage": -1, "disk_storage": -1,
                                      "streams": -1, "consumer": -1}})
    user_jwt = _jwt(account, account_public, user_public, "langorch",
                    {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1})
    creds = tmp_path / "langorch.creds"
    creds.write_text(f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
                     f"-----BEGIN USER NKEY SEED-----\n{user_seed.decode()}\n------END USER NKEY SEED------\n")
    creds.chmod(0o600)
    config = (f'operator: "{operator_jwt}"\nsystem_account: {system_public}\nresolver: MEMORY\n'
              f'resolver_preload: {{\n  {account_public}: "{account_jwt}"\n  {system_public}: "{system_jwt}"\n}}\n')
    with ConfiguredNats(tmp_path / "nats", config) as s:
        await works_as_a_service(s.url, CommonSettings(nats_url=s.url, nats_creds_file=str(creds)))
        assert "authorization violation" in (await refused(s.url)).lower()


async def test_the_service_user_may_serve_nats_micro_services(server: EmbeddedNats, users: NatsUsers) -> None:
    """The runtime answers the gateway's queries as NATS micro services, which subscribe to the ``$SRV.``
    discovery subjects: the service user may, so a start logs no permissions violation."""
    from nats.micro import add_service

    errors = Errors()
    async with client(server, users.service, errors) as nc:
        service = await add_service(nc, name="probe", version="0.0.1")
        try:
            reply = await nc.request("$SRV.PING.probe", b"", timeout=5)
            assert json.loads(reply.data)["name"] == "probe"
            await nc.flush()
        finally:
            await service.stop()
    assert not [e for e in errors.seen if "permissions violation" in e.lower()], errors.seen
