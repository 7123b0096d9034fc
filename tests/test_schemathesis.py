"""Issue 5 acceptance: property-based fuzzing of every operation of the live gateway's ``/openapi.json`` with
schemathesis, asserting that no generated request — valid or invalid — gets a server error (api.md §1.2: a 5xx is
a defect and is never caused by client input).

The platform (gateway on a free port, compiler, runtime, agents, approvals, triggers) runs in this test's event
loop; the synchronous schemathesis/hypothesis driver runs in a worker thread and talks to it over real HTTP. Data is
seeded first (the internal_variables procedure, a completed run, a project) and path parameters are drawn half of
the time from those real ids, so the fuzzing also reaches the code behind existing resources.

Excluded operations: only the two SSE streams, ``GET /api/runs/{run_id}/stream`` and ``GET /api/approvals/stream``
— a stream never ends, so a request to it never yields a response to check.

``LANGORCH_SCHEMATHESIS_EXAMPLES`` (default 25) bounds the examples per operation and generation mode (positive
and negative). The operations are fuzzed in ``SHARDS`` tests, each with a platform of its own and every
``SHARDS``-th operation of the schema, so that pytest-xdist runs them side by side; together they cover every
operation, each with the same examples as one test would.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import hypothesis.errors
import pytest
import requests
import schemathesis
import schemathesis.specs.openapi.schemas  # see PREIMPORTED
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from tests.helpers import example, follow_run, import_procedure, platform_of

pytestmark = pytest.mark.integration

# CPython 3.11 keeps the depth counter of ``ast.parse``'s tree conversion in state shared by all threads: two
# threads converting at once fail one of them with "SystemError: AST constructor recursion depth mismatch" (seen
# twice in CI). During the fuzz, hypothesis parses lambdas' sources in _fuzz's worker thread while the event loop's
# thread may parse too: pytest rewriting a module imported late (hence this import, in the main thread, up front)
# and Python 3.11's traceback formatting, which parses each source line it underlines (a logged exception).
# ``serialised_ast_parse`` makes those parses take turns for the duration of the fuzz.
PREIMPORTED = schemathesis.specs.openapi.schemas.__name__


@contextlib.contextmanager
def serialised_ast_parse() -> Iterator[None]:
    """``ast.parse`` behind one lock, for every thread of this process, until the block ends."""
    original = ast.parse
    lock = threading.Lock()

    def parse(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return original(*args, **kwargs)

    ast.parse = parse
    try:
        yield
    finally:
        ast.parse = original

EXAMPLES = int(os.environ.get("LANGORCH_SCHEMATHESIS_EXAMPLES", "25"))
STREAMS = {("GET", "/api/runs/{run_id}/stream"), ("GET", "/api/approvals/stream")}
REQUEST_TIMEOUT_S = 20
SHARDS = 4


@dataclass
class Finding:
    operation: str
    status: int
    body: str
    curl: str


@dataclass
class Report:
    operations: int = 0  # fuzzed by this shard
    in_schema: int = 0  # every operation of the schema but the streams
    requests: int = 0
    findings: list[Finding] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _checker(report: Report, label: str, base_url: str, session: requests.Session) -> Any:
    def check(case: schemathesis.Case) -> None:
        report.requests += 1
        try:
            response = case.call(base_url=base_url, session=session, timeout=REQUEST_TIMEOUT_S)
        except requests.RequestException as exc:
            report.errors.append(f"{label}: {type(exc).__name__}: {exc}")
            return
        try:
            case.validate_response(response, checks=[not_a_server_error])
        except (AssertionError, schemathesis.errors.FailureGroup):
            report.findings.append(Finding(label, response.status_code, response.text[:500],
                                           case.as_curl_command()))

    return check


def _described(exc: BaseException) -> str:
    """An error with the errors it groups (hypothesis's FlakyFailure holds the first run's failure), tracebacks
    included, so that a failure seen once in CI says what it was."""
    import traceback

    text = f"{type(exc).__name__}: {exc}"
    for inner in getattr(exc, "exceptions", ()):
        text += "\n  " + "".join(traceback.format_exception(inner)).replace("\n", "\n  ")
    return text


def _fuzz(base_url: str, known: dict[str, str], shard: int) -> Report:
    """Drive every ``SHARDS``-th operation, from the ``shard``-th on, with schemathesis-generated cases (runs in a
    worker thread)."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    report = Report()
    session = requests.Session()
    settings = hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                                   phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                                   suppress_health_check=list(hypothesis.HealthCheck))
    for index, result in enumerate(schema.get_all_operations()):
        operation = result.ok()
        if (operation.method.upper(), operation.path) in STREAMS:
            continue
        report.in_schema += 1
        if index % SHARDS != shard:
            continue
        report.operations += 1
        label = f"{operation.method.upper()} {operation.path}"
        path_names = {p.name for p in operation.path_parameters}
        real = {name: value for name, value in known.items() if name in path_names}
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(mode)
            if real:
                strategy = st.one_of(strategy, operation.as_strategy(mode, path_parameters=real))

            try:
                settings(hypothesis.given(case=strategy)(_checker(report, label, base_url, session)))()
            except hypothesis.errors.Unsatisfiable:
                # nothing in this operation can be made invalid (e.g. only a free-form path string): no negatives
                if mode is not schemathesis.GenerationMode.NEGATIVE:
                    raise
            except Exception as exc:  # generation itself failed: report it, do not hide it
                report.errors.append(f"{label} ({mode.value}): {_described(exc)}")
    return report


# a fixed number of requests: how long they take depends on the machine and what runs beside them (3 shards and the
# cluster tests start together in CI: 64-178 s each on 2 cores), so the guard against a hang is generous
@pytest.mark.timeout(600)
@pytest.mark.parametrize("shard", range(SHARDS))
async def test_no_server_errors_on_any_operation(nats_url: str, database_url: str, shard: int) -> None:
    async with platform_of(nats_url, database_url, triggers=True) as p:
        c = p.client
        await import_procedure(c, example("internal_variables.ckp.json"))
        r = await c.post("/api/runs", json={"procedure_id": "internal-variables", "procedure_version": "1.0.0"})
        assert r.status_code == 201, r.text
        run_id = r.json()["run_id"]
        _, end = await follow_run(c, run_id)
        assert end == "completed"
        r = await c.post("/api/projects", json={"name": "fuzz-project"})
        project_id = r.json().get("project_id") if r.status_code == 201 else None
        known = {"run_id": run_id, "procedure_id": "internal-variables", "version": "1.0.0"}
        if project_id:
            known["project_id"] = project_id

        started = time.perf_counter()
        with serialised_ast_parse():
            report = await asyncio.to_thread(_fuzz, p.base_url, known, shard)
        elapsed = time.perf_counter() - started

    print(f"schemathesis shard {shard}: {report.operations} of {report.in_schema} operations, {report.requests} "
          f"requests in {elapsed:.1f}s")
    assert report.in_schema >= 50, "the schema lost operations"
    assert report.operations > 0
    assert report.requests >= report.operations * EXAMPLES  # each operation was really exercised
    details = "\n\n".join(f"{f.operation} -> {f.status}: {f.body}\n  {f.curl}" for f in report.findings)
    assert not report.findings, f"{len(report.findings)} server errors:\n{details}"
    assert not report.errors, "\n".join(report.errors)
