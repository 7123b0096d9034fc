"""A side-by-side view of two texts, line by line, for the version diff page (the API gives the structural diff;
this only lines the two pretty-printed documents up)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    """One row of the side-by-side view: a line on each side (``None`` where that side has none)."""

    kind: str  # "same", "changed", "removed", "added"
    left_no: int | None
    left: str | None
    right_no: int | None
    right: str | None


def side_by_side(before: str, after: str) -> list[Row]:
    """The two texts lined up: equal runs, replaced lines paired in order, the rest removed or added."""
    a, b = before.splitlines(), after.splitlines()
    rows: list[Row] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            rows.extend(Row("same", i + 1, a[i], j + 1, b[j]) for i, j in zip(range(i1, i2), range(j1, j2),
                                                                              strict=True))
            continue
        left, right = list(range(i1, i2)), list(range(j1, j2))
        for k in range(max(len(left), len(right))):
            i = left[k] if k < len(left) else None
            j = right[k] if k < len(right) else None
            kind = "changed" if i is not None and j is not None else "removed" if i is not None else "added"
            rows.append(Row(kind, None if i is None else i + 1, None if i is None else a[i],
                            None if j is None else j + 1, None if j is None else b[j]))
    return rows
