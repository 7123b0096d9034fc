"""The cluster fixtures, one per test module that asks for it, with its stores in the module's temporary directory:
``nats_cluster``, a 3-node JetStream cluster (:class:`langorch_infra.embedded.EmbeddedNatsCluster`), and
``local_cluster``, a whole LangOrch cluster on it (:class:`langorch.cluster.LocalCluster`). A test module imports
the one it uses."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from langorch.cluster import ClusterLayout, LocalCluster
from langorch_infra.embedded import EmbeddedNatsCluster


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsCluster]:
    cluster = EmbeddedNatsCluster(tmp_path_factory.mktemp("nats-cluster"), n=3)
    try:
        cluster.start(timeout=90)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory: pytest.TempPathFactory, module_database_url: str,
                  request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    """A :class:`langorch.cluster.LocalCluster` for one test module: 3 NATS nodes at R3, the module's database, and
    the replicas a module asks for with ``CLUSTER_LAYOUT`` (a :class:`ClusterLayout`; default: the class's), each a
    ``langorch serve`` process; no authentication. Its logs are in the module's temporary directory."""
    layout = getattr(request.module, "CLUSTER_LAYOUT", ClusterLayout())
    env = getattr(request.module, "CLUSTER_ENV", {})
    cluster = LocalCluster(tmp_path_factory.mktemp("local-cluster"), layout, database_url=module_database_url,
                           auth=False, env=env)
    cluster.start(timeout=240)
    try:
        yield cluster
    finally:
        cluster.stop()
