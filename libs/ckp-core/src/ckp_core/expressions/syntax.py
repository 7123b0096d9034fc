"""The syntax of CKP expressions: limits, errors, the immutable syntax tree and the function table's arities."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

MAX_SOURCE_BYTES = 8 * 1024
MAX_DEPTH = 64
MAX_STEPS = 100_000
MAX_PATTERN_BYTES = 1024
_MAX_INT_BITS = 4096
_MAX_STR_LEN = 16 * 1024 * 1024
_MAX_LIST_LEN = 1_000_000

UnresolvedCallback: TypeAlias = Callable[[str, str], None]


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


class ExpressionSyntaxError(Exception):
    """An expression (or placeholder) does not parse; ``line``/``column`` are 1-based."""

    def __init__(self, reason: str, line: int = 1, column: int = 1, position: int = 0) -> None:
        super().__init__(reason, line, column, position)
        self.reason = reason
        self.line = line
        self.column = column
        self.position = position

    def __str__(self) -> str:
        return f"{self.reason} at {self.line}:{self.column}"


class UnknownFunctionError(ExpressionSyntaxError):
    """Call of a function that §5.5 does not list (diagnostic ``unknown_function``)."""

    def __init__(self, name: str, line: int = 1, column: int = 1, position: int = 0) -> None:
        super().__init__(f"unknown function '{name}'", line, column, position)
        self.args = (name, line, column, position)
        self.name = name


class FunctionArityError(ExpressionSyntaxError):
    """A function called with the wrong number of arguments (diagnostic ``function_arity``)."""

    def __init__(self, name: str, expected: str, line: int = 1, column: int = 1, position: int = 0) -> None:
        noun = "argument" if expected == "1" else "arguments"
        super().__init__(f"{name}() takes {expected} {noun}", line, column, position)
        self.args = (name, expected, line, column, position)
        self.name = name
        self.expected = expected


class InvalidRegexError(ExpressionSyntaxError):
    """A literal ``matches`` pattern that RE2 rejects (diagnostic ``invalid_regex``)."""

    def __init__(self, pattern: str, detail: str, line: int = 1, column: int = 1, position: int = 0) -> None:
        super().__init__(f"invalid regex: {detail}", line, column, position)
        self.args = (pattern, detail, line, column, position)
        self.pattern = pattern
        self.detail = detail


class ExpressionError(Exception):
    """A runtime evaluation error (``expression_error``, §5.4)."""

    def __init__(self, reason: str, expression: str = "", position: int = 0) -> None:
        super().__init__(reason, expression, position)
        self.reason = reason
        self.expression = expression
        self.position = position

    def details(self) -> dict[str, Any]:
        """The ``details`` object of the ``expression_error``: ``{expression, position, reason}``."""
        return {"expression": self.expression, "position": self.position, "reason": self.reason}

    def __str__(self) -> str:
        return f"{self.reason} (at position {self.position} of {self.expression!r})"


# ---------------------------------------------------------------------------------------------------------
# Syntax tree
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Const:
    """A literal value (number, string without ``{{``, true, false, null) or an aggregate field name."""

    value: Any
    pos: int


@dataclass(frozen=True)
class TemplateStr:
    """A string literal containing placeholders: rendered in embedded mode when evaluated."""

    parts: tuple[str | PlaceholderExpr, ...]
    pos: int


@dataclass(frozen=True)
class ListExpr:
    items: tuple[Node, ...]
    pos: int


@dataclass(frozen=True)
class Name:
    """A bare root name (first path segment)."""

    name: str
    pos: int


@dataclass(frozen=True)
class Member:
    """``.identifier`` or ``.integer`` accessor."""

    key: str | int
    pos: int


@dataclass(frozen=True)
class Index:
    """``[expression]`` accessor."""

    expr: Node
    pos: int


@dataclass(frozen=True)
class Access:
    """``base`` followed by accessors; a *path* when ``base`` is a :class:`Name`."""

    base: Node
    accessors: tuple[Member | Index, ...]
    pos: int


@dataclass(frozen=True)
class Call:
    """A function call; ``name`` is lower-cased and known, arity already checked."""

    name: str
    args: tuple[Node, ...]
    pos: int


@dataclass(frozen=True)
class Neg:
    operand: Node
    pos: int


@dataclass(frozen=True)
class Not:
    operand: Node
    pos: int


@dataclass(frozen=True)
class ArithStep:
    op: str
    operand: Node
    pos: int


@dataclass(frozen=True)
class Arith:
    """A left-associative chain ``first op operand op operand …`` of one precedence level."""

    first: Node
    rest: tuple[ArithStep, ...]
    pos: int


@dataclass(frozen=True)
class Compare:
    """A binary predicate; ``op`` is one of ``== != < <= > >= in not_in contains not_contains starts_with
    ends_with matches``."""

    op: str
    left: Node
    right: Node
    pos: int


@dataclass(frozen=True)
class EmptyTest:
    negated: bool
    operand: Node
    pos: int


@dataclass(frozen=True)
class BoolOp:
    """``and``/``or`` chain, short-circuit."""

    op: str
    operands: tuple[Node, ...]
    pos: int


@dataclass(frozen=True)
class PlaceholderExpr:
    """``{{ expr | fallback }}``; ``source`` is the trimmed expression text before ``|``/``}}``."""

    expr: Node
    has_fallback: bool
    fallback: Any
    raw: str
    source: str
    pos: int


Node: TypeAlias = (
    Const | TemplateStr | ListExpr | Name | Access | Call | Neg | Not | Arith | Compare | EmptyTest | BoolOp
    | PlaceholderExpr
)


@dataclass(frozen=True)
class Expression:
    """A parsed expression: its source, syntax tree and the root names it reads."""

    source: str
    ast: Node
    referenced_roots: frozenset[str]


# ---------------------------------------------------------------------------------------------------------
# Function table (arity; implementations further below)
# ---------------------------------------------------------------------------------------------------------

_AGGREGATES = frozenset({"count", "sum", "avg", "min", "max"})
_ARITY: dict[str, tuple[int, int | None]] = {
    "len": (1, 1), "lower": (1, 1), "upper": (1, 1), "trim": (1, 1), "replace": (3, 3), "split": (2, 2),
    "join": (1, 2), "int": (1, 1), "float": (1, 1), "str": (1, 1), "bool": (1, 1), "exists": (1, 1),
    "coalesce": (1, None), "if": (3, 3), "round": (1, 2), "abs": (1, 1), "count": (1, 2), "sum": (1, 2),
    "avg": (1, 2), "min": (1, 2), "max": (1, 2), "keys": (1, 1), "values": (1, 1), "json": (1, 1),
    "now": (0, 0), "today": (0, 0),
}
FUNCTIONS: frozenset[str] = frozenset(_ARITY)


def _arity_desc(lo: int, hi: int | None) -> str:
    if hi is None:
        return f"at least {lo}"
    if lo == hi:
        return str(lo)
    return f"{lo} or {hi}" if hi == lo + 1 else f"{lo} to {hi}"


