"""The embedded NATS server runs Go's scheduler with one processor unless the environment says otherwise
(``langorch_infra.embedded.NATS_GOMAXPROCS``): read back from the server's own monitoring endpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from langorch_infra.embedded import NATS_GOMAXPROCS, EmbeddedNats, _monitor
from tests.ports import free_port

pytestmark = pytest.mark.integration


def gomaxprocs_of_a_started_server(state: Path) -> int:
    server = EmbeddedNats(state, http_port=free_port()).start()
    try:
        varz = _monitor(server.http_port, "varz")
        assert varz is not None
        return int(varz["gomaxprocs"])
    finally:
        server.stop()


def test_the_embedded_server_runs_one_scheduler_processor_by_default(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOMAXPROCS", raising=False)
    assert NATS_GOMAXPROCS == 1
    assert gomaxprocs_of_a_started_server(tmp_path / "nats") == 1


def test_gomaxprocs_of_the_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOMAXPROCS", "3")
    assert gomaxprocs_of_a_started_server(tmp_path / "nats") == 3
