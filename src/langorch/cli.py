"""``langorch``: start the platform, run one service, run a procedure and follow it, rebuild projections."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from langorch import timeline
from langorch.serving import SERVICES, serve_services

app = typer.Typer(help="LangOrch: durable orchestration of CKP procedures.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
projections_app = typer.Typer(help="Maintain the PostgreSQL projections.", no_args_is_help=True)
app.add_typer(projections_app, name="projections")
console = Console()


def _logging(level: str = "INFO") -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=level, format="%(name)s: %(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False)])
    for noisy in ("nats", "httpx", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def up(
    state_dir: Annotated[Path, typer.Option(envvar="LANGORCH_STATE_DIR", help="Data and logs of the embedded "
                                            "servers.")] = Path(".langorch"),
    host: Annotated[str, typer.Option(envvar="LANGORCH_HOST", help="Address the API listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="LANGORCH_PORT", help="Port of the API.")] = 8080,
    nats_port: Annotated[int | None, typer.Option(envvar="LANGORCH_NATS_PORT", help="Port of the embedded NATS "
                                                  "server (default: chosen on the first start, then kept).")] = None,
    postgres_port: Annotated[int | None, typer.Option(envvar="LANGORCH_POSTGRES_PORT", help="Port of the embedded "
                                                      "PostgreSQL (default: chosen on the first start, then kept).")]
    = None,
) -> None:
    """Start LangOrch in one process: embedded NATS and PostgreSQL (unless LANGORCH_NATS_URL /
    LANGORCH_DATABASE_URL name existing servers) and every service. Ctrl-C stops it (a second Ctrl-C forces the
    stop); the data stays in the state directory. Exit codes: 0 stopped on request, 1 failed while running,
    2 could not start (port taken, state directory in use)."""
    from langorch.up import UpError, UpOptions
    from langorch.up import run as run_up

    _logging()
    options = UpOptions(state_dir=state_dir, host=host, port=port, nats_port=nats_port, postgres_port=postgres_port,
                        nats_url=os.environ.get("LANGORCH_NATS_URL") or None,
                        database_url=os.environ.get("LANGORCH_DATABASE_URL") or None)
    try:
        code = run_up(options, console)
    except UpError as exc:
        Console(stderr=True).print(f"[red]langorch up[/]: {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    raise typer.Exit(code)


@app.command()
def serve(
    service: Annotated[str, typer.Argument(help="compiler, runtime, approvals or gateway")],
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
    asyncio.run(serve_services((service,), common.nats_url, common.database_url, host, port))


SEVERITY_COLORS = {"error": "red", "warning": "yellow", "info": "blue"}


def _parse_vars(items: list[str] | None) -> dict[str, Any]:
    """``--var k=v`` options; values are parsed as JSON when they are JSON, else kept as strings."""
    inputs: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            console.print(f"[red]--var {item!r}: expected key=value[/]", highlight=False)
            raise typer.Exit(2)
        try:
            inputs[key] = json.loads(raw)
        except ValueError:
            inputs[key] = raw
    return inputs


def _decode_error_line(data: bytes) -> int | None:
    try:
        json.loads(data)
    except json.JSONDecodeError as exc:
        return exc.lineno
    except (ValueError, RecursionError):
        return None
    return None


class _Source:
    """One CKP file's text, for locating diagnostics' JSON Pointers in it."""

    def __init__(self, data: bytes) -> None:
        from langorch.excerpt import pointer_offsets

        self.data = data
        self.text = data.decode("utf-8", errors="replace")
        self.offsets = pointer_offsets(self.text)
        self.decode_error_line = _decode_error_line(data)

    def locate(self, pointer: str) -> tuple[int | None, str | None, bool]:
        """``(line, pointer found, exact)``; for a document that is not JSON, the parser's error line."""
        from langorch.excerpt import locate

        if self.decode_error_line is not None:
            return self.decode_error_line, None, False
        found = locate(self.text, pointer, self.offsets)
        return (found.line, found.pointer, found.exact) if found is not None else (None, None, False)


def _print_diagnostic(d: Any, source: _Source | None, context: int = 2, out: Console | None = None) -> None:
    from rich.text import Text

    from langorch.excerpt import excerpt

    out = out or console
    color = SEVERITY_COLORS[d.severity]
    head = Text("  ")
    head.append(d.severity, style=color)
    message = d.message.removeprefix(f"{d.path}: ") if d.path else d.message
    head.append(f" {d.code} at {d.path or '/'}: {message}")
    out.print(head)
    if d.hint:
        out.print(Text(f"      hint: {d.hint}", style="dim"))
    if source is None:
        return
    line, found, exact = source.locate(d.path)
    if line is None:
        return
    if found is not None and not exact:
        out.print(Text(f"      (not in the file; nearest: {found or '/'})", style="dim"))
    for n, text in excerpt(source.text, line, context):
        marker = ">" if n == line else " "
        row = Text(f"    {marker}{n:>5} | ", style="bold " + color if n == line else "dim")
        row.append(text)
        out.print(row, soft_wrap=True)


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, readable=True)],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report instead.")] = False,
    context: Annotated[int, typer.Option(help="Lines of source shown around each diagnostic.")] = 2,
) -> None:
    """Compile CKP files and print every diagnostic with the source lines it is about; exit 1 when any file has
    errors."""
    from ckp_core.compiler import compile_text

    failed = False
    report: dict[str, Any] = {}
    for f in files:
        data = f.read_bytes()
        result = compile_text(data)
        source = _Source(data)
        failed |= not result.ok
        if as_json:
            diagnostics = []
            for d in result.diagnostics:
                line, found, exact = source.locate(d.path)
                diagnostics.append({**d.model_dump(mode="json"), "line": line, "located_at": found,
                                    "exact": exact})
            report[str(f)] = {"valid": result.ok, "procedure_id": result.procedure_id, "version": result.version,
                              "summary": result.summary(), "diagnostics": diagnostics}
            continue
        counts = result.summary()
        status = "[green]ok[/]" if result.ok else "[red]rejected[/]"
        console.print(f"[bold]{f}[/]: {status} ({counts['errors']} errors, {counts['warnings']} warnings, "
                      f"{counts['infos']} infos)", highlight=False)
        for d in result.diagnostics:
            _print_diagnostic(d, source, context)
    if as_json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    raise typer.Exit(1 if failed else 0)


def _compile_or_exit(file: Path) -> Any:
    """The IR of FILE; on compile errors print them (with excerpts) to stderr and exit 1."""
    from ckp_core.compiler import compile_text

    data = file.read_bytes()
    result = compile_text(data)
    if result.ir is None:
        err = Console(stderr=True)
        err.print(f"[bold]{file}[/]: [red]rejected[/]", highlight=False)
        source = _Source(data)
        for d in result.errors:
            _print_diagnostic(d, source, out=err)
        raise typer.Exit(1)
    return result.ir


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _print_explain(out: dict[str, Any]) -> None:
    from rich.table import Table

    def table(title: str, *columns: str) -> Table:
        t = Table(title=title, title_justify="left", show_lines=False)
        for c in columns:
            t.add_column(c, overflow="fold")
        return t

    console.print(f"[bold]{out['procedure_id']}[/] {out['version']}"
                  + (f" — {out['description']}" if out.get("description") else ""), highlight=False)
    nodes = table("Nodes", "id", "type", "agent", "actions", "description")
    for n in out["nodes"]:
        nodes.add_row(n["id"], n["type"], _cell(n["agent"]), ", ".join(n["actions"]), _cell(n["description"]))
    console.print(nodes)
    edges = table("Edges", "from", "to", "condition")
    for e in out["edges"]:
        edges.add_row(e["from"], e["to"], e["condition"])
    console.print(edges)
    v = out["variables"]
    variables = table("Variables", "name", "type", "required", "default", "status")
    for name, spec in v["schema"].items():
        status = "missing" if name in v["missing_inputs"] else "provided" if name in v["provided"] else ""
        if name in v["produced"]:
            status = (status + ", " if status else "") + "produced"
        variables.add_row(name, _cell(spec.get("type")), "yes" if spec.get("required") else "no",
                          _cell(spec.get("default")), status)
    for name in v["produced"]:
        if name not in v["schema"]:
            variables.add_row(name, "-", "no", "-", "produced (undeclared)")
    console.print(variables)
    for field, messages in out.get("input_errors", {}).items():
        console.print(f"[red]{field}[/]: {'; '.join(messages)}", highlight=False)
    trace = table("Route trace", "#", "node", "type", "reason")
    for i, entry in enumerate(out["route_trace"], 1):
        trace.add_row(str(i), entry["node_id"], entry["type"], entry["reason"])
    console.print(trace)
    calls = table(f"External calls ({len(out['external_calls'])})", "node", "step", "binding", "channel", "action")
    for c in out["external_calls"]:
        calls.add_row(c["node_id"], c["step_id"], c["binding"], _cell(c["channel"]), c["action"])
    console.print(calls)
    policy = out["policy_summary"]
    timeouts = policy["timeouts"]
    console.print(f"[bold]Policies[/]: run timeout {_cell(timeouts['run_timeout_ms'])} ms, default step timeout "
                  f"{_cell(timeouts['default_step_timeout_ms'])} ms, checkpoints "
                  f"{policy['checkpoints']['strategy']} ({', '.join(policy['checkpoints']['nodes']) or 'none'})",
                  highlight=False)
    if policy["retries"]:
        retries = table("Retries", "node", "step", "source", "max_retries", "strategy", "delay ms")
        for r in policy["retries"]:
            retries.add_row(r["node_id"], _cell(r["step_id"]), r["source"], str(r["max_retries"]),
                            _cell(r.get("strategy")), _cell(r.get("retry_delay_ms")))
        console.print(retries)
    if policy["sla"]:
        sla = table("SLA", "node", "max_duration_ms", "on_breach", "escalation")
        for s in policy["sla"]:
            sla.add_row(s["node_id"], str(s["max_duration_ms"]), s["on_breach"], _cell(s["escalation_handler"]))
        console.print(sla)
    if out["hints"]:
        hints = table("Hints", "node", "step", "message")
        for h in out["hints"]:
            hints.add_row(h["node_id"], h["step_id"], h["message"])
        console.print(hints)
    if out["diagnostics"]:
        diags = table("Diagnostics", "severity", "code", "path", "message")
        for d in out["diagnostics"]:
            diags.add_row(d["severity"], d["code"], d["path"] or "/", d["message"])
        console.print(diags)


@app.command()
def explain(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    var: Annotated[list[str] | None, typer.Option("--var", help="Input variable k=v (JSON values parsed).")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the ExplainOut JSON instead.")] = False,
) -> None:
    """Static analysis of a CKP file: nodes, edges, variables, the route the inputs take, external calls,
    policies. Nothing runs."""
    from ckp_core.analysis import explain as explain_ir

    inputs = _parse_vars(var)
    out = explain_ir(_compile_or_exit(file), inputs)
    if as_json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        _print_explain(out)


class GraphFormat(StrEnum):
    mermaid = "mermaid"
    dot = "dot"
    json = "json"


@app.command()
def graph(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    fmt: Annotated[GraphFormat, typer.Option("--format", "-f", help="mermaid, dot (Graphviz) or json (GraphOut).")]
    = GraphFormat.mermaid,
) -> None:
    """Print the procedure graph of a CKP file as Mermaid, DOT or the API's GraphOut JSON."""
    from ckp_core import analysis

    ir = _compile_or_exit(file)
    if fmt is GraphFormat.json:
        sys.stdout.write(json.dumps(analysis.graph_view(ir), indent=2, ensure_ascii=False) + "\n")
    elif fmt is GraphFormat.dot:
        sys.stdout.write(analysis.dot(ir))
    else:
        sys.stdout.write(analysis.mermaid(ir))


@app.command()
def run(
    file: Path,
    var: Annotated[list[str] | None, typer.Option("--var", help="Input variable k=v (JSON values parsed).")]
    = None,
    follow: Annotated[bool, typer.Option("--follow/--no-follow")] = False,
    api: Annotated[str, typer.Option(envvar="LANGORCH_API_URL")] = "http://127.0.0.1:8080",
) -> None:
    """Import FILE (unless that exact version is already imported), start a run and print its timeline."""
    inputs = _parse_vars(var)
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
            return await rebuild(pool, nc.jetstream(), audit_retention_days=settings.audit_retention_days)
        finally:
            await pool.close()
            await nc.close()

    position = asyncio.run(main())
    console.print(f"projections rebuilt up to LO_EVT position {position}")


def main() -> None:  # pragma: no cover
    sys.exit(app())
