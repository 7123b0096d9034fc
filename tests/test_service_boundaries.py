"""Service boundaries (DESIGN §1, issue 13 "Boundaries"), checked on the source:

* the gateway imports nothing of LangGraph, and names no storage of the runtime — KV ``lo_steps`` / ``lo_leases``
  nor the LangGraph checkpoint tables — it asks the runtime (``ckp_core.queries``) instead;
* bucket and stream names are spelled only in ``ckp_core/subjects.py``.
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckp_core import subjects

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = ROOT / "services" / "gateway"
SUBJECTS = ROOT / "libs" / "ckp-core" / "src" / "ckp_core" / "subjects.py"

FORBIDDEN_PACKAGES = ("langgraph", "langchain", "langchain_core", "psycopg", "psycopg_pool")
RUNTIME_STORAGE_NAMES = ("STEPS_BUCKET", "LEASES_BUCKET")
RUNTIME_STORAGE_TEXT = re.compile(
    rf"{re.escape(subjects.STEPS_BUCKET)}|{re.escape(subjects.LEASES_BUCKET)}"
    r"|checkpoint_(blobs|writes|migrations)|\b(from|join|into|update|table)\s+checkpoints\b", re.IGNORECASE)
# a bucket or stream name as code uses it: the whole string, a KV/object-store stream of it, or a key prefix of it
STORAGE_NAME = re.compile(r"^(\$KV\.|KV_|OBJ_)?(lo_[a-z]+|LO_[A-Z]+)(\.|$)")


def _sources(*roots: Path) -> Iterator[Path]:
    for root in roots:
        yield from sorted(p for p in root.rglob("*.py") if ".venv" not in p.parts)


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the constant nodes that are docstrings (prose, not names the code uses)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def boundary_violations(source: str, where: str) -> list[str]:
    """What in one gateway module crosses into the runtime: LangGraph/psycopg imports, the runtime's bucket
    constants, and string literals naming its KV buckets or the checkpoint tables."""
    tree = ast.parse(source)
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
            found += [f"{where}:{node.lineno} imports {alias.name}" for alias in node.names
                      if alias.name in RUNTIME_STORAGE_NAMES]
        else:
            modules = []
        found += [f"{where}:{getattr(node, 'lineno', 0)} imports {m}" for m in modules
                  if m.split(".")[0] in FORBIDDEN_PACKAGES]
        if isinstance(node, ast.Name | ast.Attribute):
            name = node.id if isinstance(node, ast.Name) else node.attr
            if name in RUNTIME_STORAGE_NAMES:
                found.append(f"{where}:{node.lineno} uses {name}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and RUNTIME_STORAGE_TEXT.search(node.value):
            found.append(f"{where}:{node.lineno} names runtime storage in {node.value[:60]!r}")
    return found


def storage_name_literals(source: str, where: str) -> list[str]:
    """String literals (docstrings and prose aside) that spell a bucket or stream name."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    return [f"{where}:{node.lineno} spells {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
            and not re.search(r"\s", node.value) and STORAGE_NAME.match(node.value)]


def test_the_gateway_imports_no_langgraph_and_reads_no_runtime_storage() -> None:
    found = [v for path in _sources(GATEWAY / "src")
             for v in boundary_violations(path.read_text(), str(path.relative_to(ROOT)))]
    assert not found, "the gateway reaches into the runtime's storage:\n  " + "\n  ".join(found)


def test_the_gateway_does_not_depend_on_langgraph() -> None:
    deps = tomllib.loads((GATEWAY / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in deps if re.split(r"[\[=<>~!; ]", d, maxsplit=1)[0].replace("-", "_").startswith(
        FORBIDDEN_PACKAGES)], deps


def test_bucket_and_stream_names_are_spelled_only_in_subjects() -> None:
    roots = [ROOT / "src", *sorted((ROOT / "libs").glob("*/src")), *sorted((ROOT / "services").glob("*/src"))]
    found = [v for path in _sources(*roots) if path != SUBJECTS
             for v in storage_name_literals(path.read_text(), str(path.relative_to(ROOT)))]
    assert not found, "name buckets and streams through ckp_core.subjects:\n  " + "\n  ".join(found)


def test_subjects_spells_every_name_the_checks_look_for() -> None:
    names = {v for k, v in vars(subjects).items() if k.endswith(("_BUCKET", "_STREAM"))}
    assert all(STORAGE_NAME.match(n) for n in names), names
    assert {"lo_steps", "lo_leases", "lo_artifacts", "LO_EVT"} <= names


@pytest.mark.parametrize(("source", "expected"), [
    ("from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver", "imports langgraph"),
    ("import psycopg", "imports psycopg"),
    ("from ckp_core.subjects import LEASES_BUCKET", "imports LEASES_BUCKET"),
    ("from ckp_core import subjects\nx = subjects.STEPS_BUCKET", "uses STEPS_BUCKET"),
    ("q = 'SELECT * FROM checkpoints WHERE thread_id = $1'", "names runtime storage"),
    ("k = f'$KV.lo_steps.{run_id}'", "names runtime storage"),
])
def test_the_boundary_check_catches_each_kind_of_crossing(source: str, expected: str) -> None:
    assert any(expected in v for v in boundary_violations(source, "m.py")), boundary_violations(source, "m.py")


@pytest.mark.parametrize(("source", "caught"), [
    ('BUCKET = "lo_artifacts"', True),
    ('stream = "KV_lo_presence"', True),
    ('subject = f"$KV.lo_steps.{key}"', True),
    ('STREAM = "LO_EVT"', True),
    ('"""Reads KV lo_leases."""', False),
    ('help_text = "Leader locks in lo_locks this replica holds."', False),
    ('token = "lo_agt_" + secret', False),
])
def test_the_name_check_tells_code_from_prose(source: str, caught: bool) -> None:
    assert bool(storage_name_literals(source, "m.py")) is caught
