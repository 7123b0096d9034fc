"""Compile diagnostics (ckp.md §6.3)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Severity = Literal["error", "warning", "info"]


class Diagnostic(BaseModel):
    """One compile finding with the JSON Pointer of what it is about."""

    model_config = ConfigDict(frozen=True)

    severity: Severity
    code: str
    message: str
    path: str
    node_id: str | None = None
    step_id: str | None = None
    hint: str | None = None


def pointer(*parts: str | int) -> str:
    """Build a JSON Pointer (RFC 6901) from path segments."""
    out = []
    for p in parts:
        s = str(p).replace("~", "~0").replace("/", "~1")
        out.append(s)
    return "/" + "/".join(out) if out else ""


def sort_key(d: Diagnostic) -> tuple[str, str]:
    return (d.path, d.code)
