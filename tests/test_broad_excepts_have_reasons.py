"""Every broad exception handler in ``libs``, ``services`` and ``src`` is narrowed or says why it is broad
(issue 13, "Every broad ``except`` is narrowed, or carries a one-line reason").

Broad means ``except:``, ``except Exception`` / ``except BaseException`` (alone or in a tuple) and
``contextlib.suppress`` of either. A handler whose last statement is a bare ``raise`` only cleans up, so it is
not broad. The reason is a comment on the same line as the ``except`` (or the ``suppress(…)`` call), of a few
words: ``except Exception:  # any NATS failure means not ready``.
"""

from __future__ import annotations

import ast
import io
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
SOURCE_ROOTS = (ROOT / "libs", ROOT / "services", ROOT / "src")
BROAD = frozenset({"Exception", "BaseException"})
MIN_REASON_WORDS = 3
# tool pragmas on the same line are not a reason
PRAGMAS = ("noqa", "type: ignore", "pragma:", "nosec")


def _sources() -> Iterator[Path]:
    for root in SOURCE_ROOTS:
        yield from sorted(p for p in root.rglob("*.py") if ".venv" not in p.parts and "build" not in p.parts)


def _names(node: ast.expr | None) -> set[str]:
    """Exception class names an ``except`` clause or a ``suppress`` argument names (``contextlib.X`` → X)."""
    if node is None:
        return set()
    if isinstance(node, ast.Tuple):
        return set().union(*(_names(e) for e in node.elts))
    if isinstance(node, ast.Name):
        return {node.id}
    if isinstance(node, ast.Attribute):
        return {node.attr}
    return set()


def _reraises(handler: ast.ExceptHandler) -> bool:
    last = handler.body[-1]
    return isinstance(last, ast.Raise) and last.exc is None


def _reasons(source: str) -> dict[int, str]:
    """The comment on each line, without tool pragmas (a comment of only a pragma is no reason)."""
    out: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        text = tok.string.lstrip("#").strip()
        if any(text.startswith(p) for p in PRAGMAS):
            continue
        out[tok.start[0]] = text
    return out


def broad_without_reason(source: str, where: str) -> list[str]:
    """``where:line`` of each broad handler in ``source`` with no reason comment on its line."""
    tree = ast.parse(source)
    reasons = _reasons(source)
    found: list[str] = []

    def check(line: int, what: str) -> None:
        if len(reasons.get(line, "").split()) < MIN_REASON_WORDS:
            found.append(f"{where}:{line}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler):
            if _reraises(node):
                continue
            if node.type is None:
                check(node.lineno, "bare except")
            elif _names(node.type) & BROAD:
                check(node.lineno, f"except {ast.unparse(node.type)}")
        elif (isinstance(node, ast.Call) and "suppress" in _names(node.func)
              and set().union(*(_names(a) for a in node.args)) & BROAD):
            check(node.lineno, ast.unparse(node))
    return found


def test_the_scan_finds_broad_handlers_without_a_reason() -> None:
    source = """
import contextlib
from contextlib import suppress
try:
    pass
except Exception:
    pass
try:
    pass
except (OSError, BaseException) as exc:  # noqa: BLE001
    pass
try:
    pass
except:
    pass
with contextlib.suppress(Exception):
    pass
with suppress(ValueError, BaseException):
    pass
"""
    found = broad_without_reason(source, "m.py")
    assert [f.split(":", 2)[1] for f in found] == ["6", "10", "14", "16", "18"], found


def test_the_scan_accepts_reasons_narrow_handlers_and_cleanup() -> None:
    source = """
import contextlib
try:
    pass
except Exception:  # any NATS failure means not ready
    pass
try:
    pass
except (OSError, ValueError):
    pass
try:
    pass
except BaseException:
    cleanup()
    raise
with contextlib.suppress(Exception):  # the connection may already be closed
    pass
with contextlib.suppress(OSError):
    pass
"""
    assert broad_without_reason(source, "m.py") == []


def test_every_broad_handler_is_narrowed_or_says_why() -> None:
    found: list[str] = []
    for path in _sources():
        found += broad_without_reason(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not found, ("narrow these handlers to the exceptions they expect, or give the reason broad is right in "
                       "a comment on the same line:\n" + "\n".join(found))
