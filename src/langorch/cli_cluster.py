"""``langorch cluster up``: LangOrch on a local cluster (:class:`langorch.cluster.LocalCluster`) — a NATS cluster with
JetStream, PostgreSQL and replicas of every service as separate processes, all on 127.0.0.1 — until Ctrl-C or
SIGTERM, which stop everything."""

from __future__ import annotations

import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from langorch.errors import EXIT_CODES_HELP

cluster_app = typer.Typer(help="A LangOrch cluster on this machine, to try replicas and failover.",
                          no_args_is_help=True, epilog=EXIT_CODES_HELP)


def _count(minimum: int) -> Any:
    def check(value: int) -> int:
        if value < minimum:
            raise typer.BadParameter(f"give {minimum} or more")
        return value
    return check


@cluster_app.command("up")
def up(
    nodes: Annotated[int, typer.Option(help="NATS servers (3 or 5 for JetStream quorum).",
                                       callback=_count(1))] = 3,
    runtimes: Annotated[int, typer.Option(help="Runtime replicas.", callback=_count(1))] = 2,
    gateways: Annotated[int, typer.Option(help="Gateway replicas (each on a port of its own).",
                                          callback=_count(1))] = 1,
    approvals: Annotated[int, typer.Option(help="Approvals replicas.", callback=_count(1))] = 1,
    compilers: Annotated[int, typer.Option(help="Compiler replicas.", callback=_count(1))] = 1,
    triggers: Annotated[int, typer.Option(help="Triggers replicas (0: none).", callback=_count(0))] = 1,
    state_dir: Annotated[Path | None, typer.Option(help="Stores, logs and secrets of the cluster (default: a "
                                                   "temporary directory, removed at the end).")] = None,
    database_url: Annotated[str | None, typer.Option(envvar="LANGORCH_DATABASE_URL", help="A PostgreSQL server to "
                                                     "use instead of an embedded one.")] = None,
    auth: Annotated[bool, typer.Option(help="Require credentials at the gateways (the user admin, its password "
                                       "printed); --no-auth: the development mode without them.")] = True,
) -> None:
    """Start a local cluster and print the gateways' URLs and the NATS seed list; Ctrl-C (or SIGTERM) stops every
    process and server. Exit 3 when something does not become ready."""
    from langorch.cluster import ClusterLayout, ClusterNotReady, LocalCluster
    from langorch.errors import CLIError, ExitCode

    state = state_dir or Path(tempfile.mkdtemp(prefix="langorch-cluster-"))
    layout = ClusterLayout(nodes=nodes, runtimes=runtimes, gateways=gateways, approvals=approvals,
                           compilers=compilers, triggers=triggers)
    cluster = LocalCluster(state, layout, database_url=database_url, auth=auth)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    processes = runtimes + gateways + approvals + compilers + triggers
    typer.echo(f"starting {nodes} NATS nodes and {processes} service processes in {state} …")
    try:
        try:
            cluster.start()
        except ClusterNotReady as exc:
            raise CLIError(f"the cluster did not start: {exc}", ExitCode.UNREACHABLE) from exc
        for line in cluster.describe():
            typer.echo(line)
        typer.echo("")
        for gateway in cluster.gateways:
            typer.echo(f"API: {gateway.url}  (docs {gateway.url}/docs)")
        if cluster.admin_password is not None:
            typer.echo(f"sign in as admin with the password in {state / 'admin-password'}")
        typer.echo(f"\nexport LANGORCH_NATS_URL={cluster.nats_url}\nexport LANGORCH_NATS_REPLICAS={cluster.replicas}"
                   f"\nexport LANGORCH_API_URL={cluster.gateway_url}\n\nCtrl-C stops the cluster.")
        while not stop.wait(0.5):
            pass
        typer.echo("stopping …")
    finally:
        cluster.stop()
        if state_dir is None:
            shutil.rmtree(state, ignore_errors=True)


def register(app: typer.Typer) -> None:
    """Add ``langorch cluster`` to ``langorch``."""
    app.add_typer(cluster_app, name="cluster")
