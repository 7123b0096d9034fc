"""The 3-node JetStream cluster fixture (:class:`langorch_infra.embedded.EmbeddedNatsCluster`): one per test module
that asks for it, with its stores in the module's temporary directory. A test module imports ``nats_cluster``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from langorch_infra.embedded import EmbeddedNatsCluster


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsCluster]:
    cluster = EmbeddedNatsCluster(tmp_path_factory.mktemp("nats-cluster"), n=3)
    try:
        cluster.start(timeout=90)
        yield cluster
    finally:
        cluster.stop()
