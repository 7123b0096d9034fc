"""``langorch up`` picks free ports for its embedded servers; another program can take one between that check and
the server's bind. The embedded PostgreSQL then starts on a fresh port instead of failing the start, while a port
the user asked for is never changed."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from langorch.up import Up, UpOptions
from tests.ports import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another program listens on (taken after LangOrch checked it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def _up(tmp_path: Path, postgres_port: int | None) -> Up:
    return Up(UpOptions(state_dir=tmp_path / "state", postgres_port=postgres_port), Console(quiet=True))


def test_a_chosen_port_taken_before_the_bind_is_replaced_by_a_fresh_one(tmp_path: Path, taken_port: int) -> None:
    up = _up(tmp_path, None)
    servers = {"postgres": {"port": taken_port}}
    pg = up._start_postgres(servers)
    try:
        assert pg.port != taken_port
        assert servers["postgres"]["port"] == pg.port
        with socket.create_connection(("127.0.0.1", pg.port), timeout=5):
            pass
        assert any(str(taken_port) in note and str(pg.port) in note for note in up.notes), up.notes
        assert up.embedded == [pg]
    finally:
        pg.stop("immediate")


def test_an_explicit_port_that_is_taken_is_an_error(tmp_path: Path, taken_port: int) -> None:
    up = _up(tmp_path, taken_port)
    with pytest.raises(subprocess.CalledProcessError):
        up._start_postgres({"postgres": {"port": taken_port}})
    for pg in up.embedded:
        pg.stop("immediate")


def test_the_embedded_nats_moves_too(tmp_path: Path, taken_port: int) -> None:
    up = Up(UpOptions(state_dir=tmp_path / "state", database_url="postgresql://unused@127.0.0.1:1/x"),
            Console(quiet=True))
    up.state.path.mkdir(parents=True)
    up.state.logs.mkdir()
    servers: dict[str, dict[str, int]] = {"nats": {"port": taken_port}}
    try:
        nats_url, _ = up.start_servers(servers)
        port = servers["nats"]["port"]
        assert port != taken_port
        assert f":{port}" in nats_url
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        for server in up.embedded:
            server.kill()


def test_a_state_directory_too_deep_for_a_unix_socket_still_starts(tmp_path: Path) -> None:
    """PostgreSQL refuses socket paths longer than 107 bytes; a deep state directory gets a short socket directory."""
    deep = tmp_path.joinpath(*(["nested-directory-level"] * 5))
    up = _up(deep, None)
    servers = {"postgres": {"port": free_port()}}
    pg = up._start_postgres(servers)
    try:
        assert len(str(pg.state_dir / "pgsock")) > 107 - len("/.s.PGSQL.65535")
        with socket.create_connection(("127.0.0.1", pg.port), timeout=5):
            pass
    finally:
        pg.stop("immediate")
