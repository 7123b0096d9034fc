"""The README links only to files of this repository (or to public web pages); the examples' README describes
every example."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_every_relative_link_of_the_readme_resolves_inside_the_repository() -> None:
    page = "README.md"
    path = ROOT / page
    links = LINK.findall(path.read_text(encoding="utf-8"))
    assert links, f"{page} has no links"
    for link in links:
        if re.match(r"https?://", link):
            continue
        target = (path.parent / link.split("#", 1)[0]).resolve()
        assert target.is_relative_to(ROOT), f"{page}: {link} leaves the repository"
        assert target.exists(), f"{page}: {link} does not exist"


def test_the_readme_holds_the_two_commands_that_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "python3 -m pip install uv && uv run langorch up" in readme
    assert "python3 -m pip install uv && uv run pytest" in readme
    assert "run pytest" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_the_examples_readme_describes_every_example() -> None:
    text = (ROOT / "examples" / "README.md").read_text(encoding="utf-8")
    assert "../" not in text
    examples = ROOT / "examples"
    files = [p.relative_to(examples).as_posix() for p in examples.rglob("*") if p.suffix in (".json", ".py")]
    assert files
    for name in files:
        assert f"| `{name}` |" in text, f"examples/README.md has no row for {name}"
