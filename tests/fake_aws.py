"""AWS Secrets Manager for the tests: moto's standalone server, a real HTTP endpoint on a free port (the fixture
``moto``, registered for every test by ``tests/conftest.py``; moto is imported only when a test uses it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ports import free_port


@pytest.fixture
def moto(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The server's URL, with test credentials and a region in the environment (boto3 asks for both)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
