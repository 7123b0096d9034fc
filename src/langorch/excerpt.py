"""Find where a JSON Pointer points in the original text of a JSON document, and cut an excerpt around it.

Diagnostics carry JSON Pointers into the decoded document; authors edit text. :func:`pointer_offsets` scans the
text once (a small JSON tokenizer that tracks the path it is in) and records the offset of every member key and
array element; :func:`locate` maps a pointer to its line, falling back to the nearest parent that exists in the
text (a diagnostic about a missing field points at the object that should hold it).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

_WS = " \t\r\n"
_MAX_DEPTH = 512


class _Stop(Exception):
    """The text is not valid JSON past this point; keep what was found."""


def _escape(segment: str) -> str:
    return segment.replace("~", "~0").replace("/", "~1")


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.offsets: dict[str, int] = {}

    def ws(self) -> None:
        n = len(self.text)
        while self.pos < n and self.text[self.pos] in _WS:
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, ch: str) -> None:
        self.ws()
        if self.peek() != ch:
            raise _Stop
        self.pos += 1

    def string(self) -> str:
        start = self.pos
        if self.peek() != '"':
            raise _Stop
        i = start + 1
        n = len(self.text)
        while i < n:
            c = self.text[i]
            if c == "\\":
                i += 2
                continue
            if c == '"':
                break
            i += 1
        else:
            raise _Stop
        self.pos = i + 1
        try:
            value = json.loads(self.text[start:self.pos])
        except ValueError as exc:
            raise _Stop from exc
        if not isinstance(value, str):
            raise _Stop
        return value

    def value(self, path: str, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise _Stop
        self.ws()
        c = self.peek()
        if c == "{":
            self.pos += 1
            self.ws()
            if self.peek() == "}":
                self.pos += 1
                return
            while True:
                self.ws()
                key_at = self.pos
                key = self.string()
                child = f"{path}/{_escape(key)}"
                self.offsets[child] = key_at
                self.expect(":")
                self.value(child, depth + 1)
                self.ws()
                if self.peek() == ",":
                    self.pos += 1
                    continue
                self.expect("}")
                return
        if c == "[":
            self.pos += 1
            self.ws()
            if self.peek() == "]":
                self.pos += 1
                return
            index = 0
            while True:
                self.ws()
                child = f"{path}/{index}"
                self.offsets[child] = self.pos
                self.value(child, depth + 1)
                index += 1
                self.ws()
                if self.peek() == ",":
                    self.pos += 1
                    continue
                self.expect("]")
                return
        if c == '"':
            self.string()
            return
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in _WS + ",]}":
            self.pos += 1
        if self.pos == start:
            raise _Stop


def pointer_offsets(text: str) -> dict[str, int]:
    """``{json_pointer: character offset}`` for every member (at its key) and array element in ``text``; the
    root ``""`` is the first value. A later duplicate key wins, as in :func:`json.loads`."""
    scanner = _Scanner(text)
    scanner.ws()
    scanner.offsets[""] = scanner.pos
    with contextlib.suppress(_Stop, RecursionError):
        scanner.value("", 0)
    return scanner.offsets


@dataclass(frozen=True)
class Location:
    line: int  # 1-based
    pointer: str  # the pointer found in the text: the one asked for, or its nearest parent
    exact: bool


def locate(text: str, pointer: str, offsets: dict[str, int] | None = None) -> Location | None:
    """The line of ``pointer`` in ``text`` (or of its nearest parent present there); None if the text has no
    JSON value at all."""
    found = pointer_offsets(text) if offsets is None else offsets
    candidate = pointer
    while True:
        if candidate in found:
            line = text.count("\n", 0, found[candidate]) + 1
            return Location(line, candidate, candidate == pointer)
        if not candidate:
            return None
        candidate = candidate.rsplit("/", 1)[0]


def excerpt(text: str, line: int, context: int = 2) -> list[tuple[int, str]]:
    """``(line_number, text)`` for the lines ``line - context … line + context`` that exist."""
    lines = text.splitlines()
    lo = max(1, line - context)
    hi = min(len(lines), line + context)
    return [(n, lines[n - 1]) for n in range(lo, hi + 1)]
