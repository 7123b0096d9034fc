"""``langorch``: start the platform, run one service, run a procedure and follow it, rebuild projections."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from langorch import timeline

app = typer.Typer(help="LangOrch: durable orchestration of CKP procedures.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
projections_app = typer.Typer(help="Maintain the PostgreSQL projections.", no_args_is_help=True)
app.add_typer(projections_app, name="projections")
console = Console()
SERVICES = ("compiler", "runtime", "gateway")


def _logging(level: str = "INFO") -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=level, format="%(name)s: %(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False)])
    for noisy in ("nats", "httpx", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


async def ensure_database(url: str, name: str = "langorch") -> str:
    """Create database ``name`` on the server of ``url`` if missing; return the URL pointing at it."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name) is None:
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = url.rsplit("/", 1)[0]
    return f"{base}/{name}"


async def _serve_services(names: tuple[str, ...], nats_url: str, database_url: str, host: str,
                          port: int, on_ready: Any = None) -> None:
    import uvicorn

    from langorch.server import ManagedServer
    from langorch_compiler.service import serve as serve_compiler
    from langorch_gateway.app import create_app
    from langorch_infra.settings import CompilerSettings, GatewaySettings, RuntimeSettings
    from langorch_runtime.agents import serve as serve_agents
    from langorch_runtime.service import serve as serve_runtime

    tasks: list[asyncio.Task[Any]] = []
    if "compiler" in names:
        compiler = CompilerSettings(nats_url=nats_url, database_url=database_url)
        tasks.append(asyncio.create_task(serve_compiler(compiler), name="compiler"))
    if "runtime" in names:
        runtime = RuntimeSettings(nats_url=nats_url, database_url=database_url)
        tasks.append(asyncio.create_task(serve_runtime(runtime), name="runtime"))
        tasks.append(asyncio.create_task(serve_agents(runtime), name="runtime-agents"))
    server = None
    if "gateway" in names:
        settings = GatewaySettings(nats_url=nats_url, database_url=database_url, host=host, port=port)
        config = uvicorn.Config(create_app(settings), host=host, port=port, log_level="warning",
                                lifespan="on")
        server = ManagedServer(config)
        tasks.append(asyncio.create_task(server.serve(), name="gateway"))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if server is not None:
        while not server.started:
            if any(t.done() for t in tasks):
                break
            await asyncio.sleep(0.05)
    if on_ready is not None:
        on_ready()
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    failed = [t for t in done if t is not stopper and t.exception() is not None]
    if server is not None:
        server.should_exit = True
    for task in tasks:
        if task.get_name() != "gateway":
            task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, 10)
    stopper.cancel()
    if failed:
        raise failed[0].exception()  # type: ignore[misc]


@app.command()
def up(
    state_dir: Annotated[Path, typer.Option(envvar="LANGORCH_STATE_DIR", help="Data of embedded servers.")]
    = Path(".langorch"),
    host: Annotated[str, typer.Option(envvar="LANGORCH_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="LANGORCH_PORT")] = 8080,
) -> None:
    """Start LangOrch in one process: embedded NATS and PostgreSQL (unless LANGORCH_NATS_URL /
    LANGORCH_DATABASE_URL are set) and every service. Ctrl-C stops it; data stays in the state directory."""
    from langorch_infra.embedded import EmbeddedNats, EmbeddedPostgres

    _logging()
    nats_url = os.environ.get("LANGORCH_NATS_URL")
    database_url = os.environ.get("LANGORCH_DATABASE_URL")
    embedded: list[Any] = []
    try:
        if not nats_url:
            nats = EmbeddedNats(state_dir / "nats").start()
            embedded.append(nats)
            nats_url = nats.url
            console.print(f"[dim]embedded NATS (JetStream) on {nats_url}, data in {state_dir / 'nats'}[/]")
        if not database_url:
            pg = EmbeddedPostgres(state_dir / "postgres").start()
            embedded.append(pg)
            database_url = asyncio.run(ensure_database(pg.url))
            console.print(f"[dim]embedded PostgreSQL on 127.0.0.1:{pg.port}, data in {state_dir / 'postgres'}[/]")

        def ready() -> None:
            console.print(f"[bold green]LangOrch is up[/]: API http://{host}:{port}/api  "
                          f"(docs http://{host}:{port}/docs) — Ctrl-C to stop")

        asyncio.run(_serve_services(SERVICES, nats_url, database_url, host, port, ready))
    finally:
        for server in reversed(embedded):
            server.stop()
        console.print("[dim]stopped; data kept in[/] " + str(state_dir))


@app.command()
def serve(
    service: Annotated[str, typer.Argument(help="compiler, runtime or gateway")],
    host: Annotated[str, typer.Option(envvar="LANGORCH_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="LANGORCH_PORT")] = 8080,
) -> None:
    """Run one service against LANGORCH_NATS_URL and LANGORCH_DATABASE_URL (what Kubernetes runs)."""
    from langorch_infra.settings import CommonSettings

    if service not in SERVICES:
        console.print(f"[red]unknown service {service!r}; expected one of {', '.join(SERVICES)}[/]")
        raise typer.Exit(2)
    _logging()
    common = CommonSettings()
    asyncio.run(_serve_services((service,), common.nats_url, common.database_url, host, port))


@app.command()
def validate(files: list[Path], as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Compile CKP files and print their diagnostics; exit 1 when any has errors."""
    from ckp_core.compiler import compile_text

    failed = False
    report: dict[str, Any] = {}
    for f in files:
        result = compile_text(f.read_bytes())
        failed |= not result.ok
        report[str(f)] = [d.model_dump(mode="json") for d in result.diagnostics]
        if not as_json:
            console.print(f"[bold]{f}[/]: " + ("[green]ok[/]" if result.ok else "[red]rejected[/]"))
            for d in result.diagnostics:
                color = {"error": "red", "warning": "yellow", "info": "blue"}[d.severity]
                console.print(f"  [{color}]{d.severity}[/] {d.code} at {d.path or '/'}: {d.message}",
                              highlight=False)
    if as_json:
        print(json.dumps(report, indent=2))
    raise typer.Exit(1 if failed else 0)


@app.command()
def run(
    file: Path,
    var: Annotated[list[str] | None, typer.Option("--var", help="Input variable k=v (JSON values parsed).")]
    = None,
    follow: Annotated[bool, typer.Option("--follow/--no-follow")] = False,
    api: Annotated[str, typer.Option(envvar="LANGORCH_API_URL")] = "http://127.0.0.1:8080",
) -> None:
    """Import FILE (unless that exact version is already imported), start a run and print its timeline."""
    inputs: dict[str, Any] = {}
    for item in var or []:
        key, sep, raw = item.partition("=")
        if not sep:
            console.print(f"[red]--var {item!r}: expected key=value[/]")
            raise typer.Exit(2)
        try:
            inputs[key] = json.loads(raw)
        except ValueError:
            inputs[key] = raw
    code = asyncio.run(timeline.import_and_run(api, json.loads(file.read_text()), inputs, follow, console))
    raise typer.Exit(code)


@projections_app.command("rebuild")
def projections_rebuild() -> None:
    """Drop the projection tables and replay LO_EVT into them (stop gateways first)."""
    import asyncpg

    from langorch_gateway.projector import rebuild
    from langorch_infra.jetstream import connect
    from langorch_infra.settings import CommonSettings

    settings = CommonSettings()

    async def main() -> int:
        nc = await connect(settings.nats_url, "langorch-rebuild")
        pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
        assert pool is not None
        try:
            return await rebuild(pool, nc.jetstream())
        finally:
            await pool.close()
            await nc.close()

    position = asyncio.run(main())
    console.print(f"projections rebuilt up to LO_EVT position {position}")


def main() -> None:  # pragma: no cover
    sys.exit(app())
