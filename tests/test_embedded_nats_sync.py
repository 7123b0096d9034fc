"""How often the embedded NATS server flushes JetStream to disk (``langorch_infra.embedded``, ``sync``): every
write by default, as the embedded PostgreSQL syncs every commit, or at an interval given in JetStream's own duration
syntax. Read back from the started server's monitoring endpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from langorch_infra.embedded import NATS_SYNC_DEFAULT, EmbeddedNats, _monitor, check_nats_sync
from tests.ports import free_port


def jetstream_config_of_a_started_server(state: Path, **kwargs: Any) -> dict[str, Any]:
    server = EmbeddedNats(state, http_port=free_port(), **kwargs).start()
    try:
        varz = _monitor(server.http_port, "varz")
        assert varz is not None
        config: dict[str, Any] = varz["jetstream"]["config"]
        return config
    finally:
        server.stop()


@pytest.mark.integration
def test_every_write_is_synced_by_default(tmp_path: Path) -> None:
    assert NATS_SYNC_DEFAULT == "always"
    assert jetstream_config_of_a_started_server(tmp_path / "nats").get("sync_always") is True


@pytest.mark.integration
@pytest.mark.parametrize(("sync", "nanoseconds"), [("2m", 120_000_000_000), ("100ms", 100_000_000),
                                                   ("1m30s", 90_000_000_000)])
def test_an_interval_is_the_server_s_sync_interval(tmp_path: Path, sync: str, nanoseconds: int) -> None:
    config = jetstream_config_of_a_started_server(tmp_path / "nats", sync=sync)
    assert not config.get("sync_always")
    assert config["sync_interval"] == nanoseconds


@pytest.mark.integration
def test_the_setting_and_the_users_share_the_configuration_file(tmp_path: Path) -> None:
    from langorch_infra.embedded import nats_users

    users = nats_users(tmp_path / "users.json")
    server = EmbeddedNats(tmp_path / "nats", http_port=free_port(), users=users.all).start()
    try:
        varz = _monitor(server.http_port, "varz")
        assert varz is not None
        assert varz["jetstream"]["config"].get("sync_always") is True
        text = server.config_file.read_text()
        assert 'sync_interval: "always"' in text
        assert "authorization" in text
        assert server.config_file.stat().st_mode & 0o777 == 0o600
    finally:
        server.stop()


@pytest.mark.unit
@pytest.mark.parametrize("value", ["always", "ALWAYS", " always ", "2m", "100ms", "1m30s", "0.5s", "250us", "2h"])
def test_accepted_values(value: str) -> None:
    assert check_nats_sync(value) == ("always" if value.strip().lower() == "always" else value.strip())


@pytest.mark.unit
@pytest.mark.parametrize("value", ["", "never", "2", "0s", "-1s", "2 m", "2min", "fast"])
def test_refused_values_are_named(value: str) -> None:
    with pytest.raises(ValueError, match="neither 'always' nor a positive duration") as refused:
        check_nats_sync(value)
    assert repr(value) in str(refused.value)


@pytest.mark.unit
def test_a_refused_value_never_reaches_a_server(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        EmbeddedNats(tmp_path / "nats", sync="sometimes")
    assert not (tmp_path / "nats").exists()
