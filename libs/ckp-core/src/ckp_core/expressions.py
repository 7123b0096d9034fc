"""The CKP expression language (ckp.md §5.3-§5.5): tokenizer, recursive-descent parser and evaluator.

Expressions are parsed once into an immutable syntax tree and evaluated against a :class:`Scope`. Values are
never pasted into expression text, so data that looks like an operator can never change the parse.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation, localcontext
from functools import lru_cache
from typing import Any, Protocol, TypeAlias

import re2

__all__ = [
    "FUNCTIONS",
    "MAX_DEPTH",
    "MAX_PATTERN_BYTES",
    "MAX_SOURCE_BYTES",
    "MAX_STEPS",
    "Access",
    "Arith",
    "ArithStep",
    "BoolOp",
    "Call",
    "Compare",
    "Const",
    "EmptyTest",
    "Expression",
    "ExpressionError",
    "ExpressionSyntaxError",
    "FunctionArityError",
    "Index",
    "InvalidRegexError",
    "ListExpr",
    "MappingScope",
    "Member",
    "Name",
    "Neg",
    "Node",
    "Not",
    "PlaceholderExpr",
    "Scope",
    "TemplateStr",
    "UnknownFunctionError",
    "ast_from_json",
    "ast_to_json",
    "evaluate",
    "evaluate_condition",
    "expression_from_json",
    "format_embedded",
    "has_placeholder",
    "json_type_name",
    "parse_expression",
    "referenced_roots",
    "scan_template",
    "truthy",
]

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


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------

_NUM, _STR, _IDENT, _OP, _LPH, _RPH, _EOF = "number", "string", "name", "op", "{{", "}}", "eof"
_TWO_CHAR_OPS = ("==", "!=", "<=", ">=")
_ONE_CHAR_OPS = "<>+-*/%()[],.|"
_OPERATOR_WORDS = frozenset({
    "and", "or", "not", "in", "not_in", "contains", "not_contains", "starts_with", "ends_with", "matches",
    "is_empty", "is_not_empty",
})
_WORD_COMPARISONS = frozenset(
    {"in", "not_in", "contains", "not_contains", "starts_with", "ends_with", "matches"}
)
_LITERAL_WORDS: dict[str, Any] = {"true": True, "false": False, "null": None}
_SIMPLE_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "t": "\t", "r": "\r", "/": "/"}


@dataclass(frozen=True)
class _Token:
    kind: str
    value: Any
    start: int
    end: int


def _is_digit(c: str) -> bool:
    return "0" <= c <= "9"


def _is_ident_start(c: str) -> bool:
    return ("a" <= c <= "z") or ("A" <= c <= "Z") or c == "_"


def _is_ident_char(c: str) -> bool:
    return _is_ident_start(c) or _is_digit(c)


def _line_col(source: str, pos: int) -> tuple[int, int]:
    pos = max(0, min(pos, len(source)))
    line = source.count("\n", 0, pos) + 1
    return line, pos - (source.rfind("\n", 0, pos) + 1) + 1


def _describe(tok: _Token) -> str:
    if tok.kind == _EOF:
        return "end of expression"
    if tok.kind == _IDENT:
        word = str(tok.value)
        return f"keyword '{word}'" if word.lower() in _OPERATOR_WORDS else f"name '{word}'"
    if tok.kind == _NUM:
        return f"number {tok.value!r}"
    if tok.kind == _STR:
        return "string literal"
    return f"'{tok.value}'"


# ---------------------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------------------


class _Parser:
    """Recursive-descent parser with an on-demand lexer (member segments and fallbacks need their own
    scanning modes)."""

    def __init__(self, src: str, start: int = 0, depth: int = 0, offset: int = 0) -> None:
        self.src = src
        self.pos = start
        self.depth = depth
        self.offset = offset
        self.last_end = start
        self._cache: list[_Token] = []

    # -- errors / depth ----------------------------------------------------------------------------------
    def error(self, reason: str, at: int) -> ExpressionSyntaxError:
        line, col = _line_col(self.src, at)
        return ExpressionSyntaxError(reason, line, col, at)

    def _loc(self, at: int) -> tuple[int, int, int]:
        line, col = _line_col(self.src, at)
        return line, col, at

    def enter(self, at: int) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"expression nested too deeply (more than {MAX_DEPTH} levels)", at)

    def leave(self) -> None:
        self.depth -= 1

    # -- lexer ---------------------------------------------------------------------------------------------
    def _skip_ws(self, i: int) -> int:
        src = self.src
        n = len(src)
        while i < n and src[i].isspace():
            i += 1
        return i

    def _scan(self, i: int) -> _Token:
        src = self.src
        i = self._skip_ws(i)
        if i >= len(src):
            return _Token(_EOF, None, i, i)
        c = src[i]
        if _is_digit(c):
            return self._scan_number(i)
        if _is_ident_start(c):
            j = i + 1
            while j < len(src) and _is_ident_char(src[j]):
                j += 1
            return _Token(_IDENT, src[i:j], i, j)
        if c in "'\"":
            value, end = self._scan_string(i)
            return _Token(_STR, value, i, end)
        two = src[i:i + 2]
        if two == "{{":
            return _Token(_LPH, two, i, i + 2)
        if two == "}}":
            return _Token(_RPH, two, i, i + 2)
        if two in _TWO_CHAR_OPS:
            return _Token(_OP, two, i, i + 2)
        if c in _ONE_CHAR_OPS:
            if two == "||":
                raise self.error("unexpected '||' (use 'or')", i)
            return _Token(_OP, c, i, i + 1)
        if c == "=":
            raise self.error("unexpected '=' (use '==' to compare)", i)
        if c == "!":
            raise self.error("unexpected '!' (use 'not')", i)
        if two == "&&":
            raise self.error("unexpected '&&' (use 'and')", i)
        raise self.error(f"unexpected character {c!r}", i)

    def _scan_number(self, i: int) -> _Token:
        src = self.src
        n = len(src)
        j = i
        while j < n and _is_digit(src[j]):
            j += 1
        is_float = False
        if j + 1 < n and src[j] == "." and _is_digit(src[j + 1]):
            is_float = True
            j += 2
            while j < n and _is_digit(src[j]):
                j += 1
        if j < n and src[j] in "eE":
            k = j + 1
            if k < n and src[k] in "+-":
                k += 1
            if k < n and _is_digit(src[k]):
                is_float = True
                j = k
                while j < n and _is_digit(src[j]):
                    j += 1
        text = src[i:j]
        value: int | float
        if is_float:
            value = float(text)
            if not math.isfinite(value):
                raise self.error("number out of range", i)
        else:
            try:
                value = int(text)
            except ValueError:
                raise self.error("number out of range", i) from None
            if value.bit_length() > _MAX_INT_BITS:
                raise self.error("number out of range", i)
        return _Token(_NUM, value, i, j)

    def _scan_string(self, i: int) -> tuple[str, int]:
        src = self.src
        n = len(src)
        quote = src[i]
        out: list[str] = []
        j = i + 1
        while True:
            if j >= n:
                raise self.error("unterminated string literal", i)
            c = src[j]
            if c == quote:
                return "".join(out), j + 1
            if c != "\\":
                k = src.find(quote, j)
                b = src.find("\\", j)
                stop = n if k < 0 else k
                if 0 <= b < stop:
                    stop = b
                out.append(src[j:stop])
                j = stop
                continue
            if j + 1 >= n:
                raise self.error("unterminated string literal", i)
            e = src[j + 1]
            if e in _SIMPLE_ESCAPES:
                out.append(_SIMPLE_ESCAPES[e])
                j += 2
            elif e == "u":
                code, j = self._scan_unicode_escape(j)
                out.append(code)
            else:
                # Unknown escapes keep their backslash (regex patterns such as '\d+' stay readable).
                out.append("\\" + e)
                j += 2

    def _hex4(self, j: int) -> int:
        digits = self.src[j + 2:j + 6]
        if len(digits) != 4 or any(ch not in "0123456789abcdefABCDEF" for ch in digits):
            raise self.error("invalid \\u escape (expected 4 hex digits)", j)
        return int(digits, 16)

    def _scan_unicode_escape(self, j: int) -> tuple[str, int]:
        hi = self._hex4(j)
        if 0xD800 <= hi <= 0xDBFF:
            if self.src[j + 6:j + 8] == "\\u":
                lo = self._hex4(j + 6)
                if 0xDC00 <= lo <= 0xDFFF:
                    return chr(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)), j + 12
            raise self.error("invalid \\u escape (unpaired surrogate)", j)
        if 0xDC00 <= hi <= 0xDFFF:
            raise self.error("invalid \\u escape (unpaired surrogate)", j)
        return chr(hi), j + 6

    def peek(self, k: int = 0) -> _Token:
        while len(self._cache) <= k:
            start = self._cache[-1].end if self._cache else self.pos
            self._cache.append(self._scan(start))
        return self._cache[k]

    def advance(self) -> _Token:
        tok = self.peek()
        self._cache.pop(0)
        self.pos = tok.end
        self.last_end = tok.end
        return tok

    def reset_lexer(self) -> None:
        self._cache.clear()

    def is_op(self, value: str, k: int = 0) -> bool:
        tok = self.peek(k)
        return tok.kind == _OP and tok.value == value

    def is_word(self, word: str, k: int = 0) -> bool:
        tok = self.peek(k)
        return tok.kind == _IDENT and str(tok.value).lower() == word

    def expect_op(self, value: str, context: str) -> _Token:
        tok = self.peek()
        if tok.kind == _OP and tok.value == value:
            return self.advance()
        raise self.error(f"expected '{value}' {context}, found {_describe(tok)}", tok.start)

    def p(self, at: int) -> int:
        """Node position: offset into the expression source."""
        return at + self.offset

    # -- grammar -------------------------------------------------------------------------------------------
    def parse_all(self) -> Node:
        if self.peek().kind == _EOF:
            raise self.error("empty expression", self.peek().start)
        node = self.parse_or()
        tok = self.peek()
        if tok.kind != _EOF:
            raise self.error(f"unexpected {_describe(tok)}", tok.start)
        return node

    def parse_or(self) -> Node:
        first = self.parse_and()
        if not self.is_word("or"):
            return first
        pos = self.peek().start
        operands = [first]
        while self.is_word("or"):
            self.advance()
            operands.append(self.parse_and())
        return BoolOp("or", tuple(operands), self.p(pos))

    def parse_and(self) -> Node:
        first = self.parse_not()
        if not self.is_word("and"):
            return first
        pos = self.peek().start
        operands = [first]
        while self.is_word("and"):
            self.advance()
            operands.append(self.parse_not())
        return BoolOp("and", tuple(operands), self.p(pos))

    def parse_not(self) -> Node:
        if self.is_word("not"):
            tok = self.advance()
            self.enter(tok.start)
            operand = self.parse_not()
            self.leave()
            return Not(operand, self.p(tok.start))
        return self.parse_predicate()

    def _comparison_op(self) -> tuple[str, int] | None:
        tok = self.peek()
        if tok.kind == _OP and tok.value in ("==", "!=", "<", "<=", ">", ">="):
            self.advance()
            return str(tok.value), tok.start
        if tok.kind != _IDENT:
            return None
        word = str(tok.value).lower()
        if word in _WORD_COMPARISONS:
            self.advance()
            return word, tok.start
        if word == "not" and self.is_word("in", 1):
            self.advance()
            self.advance()
            return "not_in", tok.start
        return None

    def _at_comparison(self) -> bool:
        tok = self.peek()
        if tok.kind == _OP:
            return tok.value in ("==", "!=", "<", "<=", ">", ">=")
        if tok.kind != _IDENT:
            return False
        word = str(tok.value).lower()
        return word in _WORD_COMPARISONS or (word == "not" and self.is_word("in", 1))

    def parse_predicate(self) -> Node:
        tok = self.peek()
        if tok.kind == _IDENT and str(tok.value).lower() in ("is_empty", "is_not_empty"):
            self.advance()
            operand = self.parse_additive()
            if self._at_comparison():
                raise self.error("a comparison cannot follow is_empty/is_not_empty; use parentheses",
                                 self.peek().start)
            return EmptyTest(str(tok.value).lower() == "is_not_empty", operand, self.p(tok.start))
        left = self.parse_additive()
        found = self._comparison_op()
        if found is None:
            return left
        op, at = found
        right_tok = self.peek()
        right = self.parse_additive()
        if self._at_comparison():
            raise self.error("chained comparisons are not allowed; combine them with 'and'",
                             self.peek().start)
        if op == "matches" and isinstance(right, Const) and isinstance(right.value, str):
            problem = _regex_problem(right.value)
            if problem is not None:
                line, col, at2 = self._loc(right_tok.start)
                raise InvalidRegexError(right.value, problem, line, col, at2)
        return Compare(op, left, right, self.p(at))

    def parse_additive(self) -> Node:
        first = self.parse_multiplicative()
        steps: list[ArithStep] = []
        while self.peek().kind == _OP and self.peek().value in ("+", "-"):
            tok = self.advance()
            steps.append(ArithStep(str(tok.value), self.parse_multiplicative(), self.p(tok.start)))
        return Arith(first, tuple(steps), steps[0].pos) if steps else first

    def parse_multiplicative(self) -> Node:
        first = self.parse_unary()
        steps: list[ArithStep] = []
        while self.peek().kind == _OP and self.peek().value in ("*", "/", "%"):
            tok = self.advance()
            steps.append(ArithStep(str(tok.value), self.parse_unary(), self.p(tok.start)))
        return Arith(first, tuple(steps), steps[0].pos) if steps else first

    def parse_unary(self) -> Node:
        if self.is_op("-"):
            tok = self.advance()
            self.enter(tok.start)
            operand = self.parse_unary()
            self.leave()
            return Neg(operand, self.p(tok.start))
        return self.parse_postfix()

    def _scan_segment(self) -> tuple[str | int, int, int]:
        self.reset_lexer()
        src = self.src
        i = self._skip_ws(self.pos)
        j = i
        if i < len(src) and _is_ident_start(src[i]):
            while j < len(src) and _is_ident_char(src[j]):
                j += 1
            self.pos = self.last_end = j
            return src[i:j], i, j
        if i < len(src) and _is_digit(src[i]):
            while j < len(src) and _is_digit(src[j]):
                j += 1
            try:
                key = int(src[i:j])
            except ValueError:
                raise self.error("index out of range", i) from None
            self.pos = self.last_end = j
            return key, i, j
        raise self.error("expected a name or an integer after '.'", i)

    def parse_postfix(self) -> Node:
        base = self.parse_primary()
        accessors: list[Member | Index] = []
        entered = 0
        while True:
            if self.is_op("."):
                self.advance()
                key, seg_start, _ = self._scan_segment()
                if isinstance(key, str) and self.is_op("("):
                    receiver = Access(base, tuple(accessors), base.pos) if accessors else base
                    self.enter(seg_start)
                    entered += 1
                    args = self.parse_arguments()
                    base = self.make_call(key, (receiver, *args), seg_start, method=True)
                    accessors = []
                else:
                    accessors.append(Member(key, self.p(seg_start)))
            elif self.is_op("["):
                tok = self.advance()
                self.enter(tok.start)
                index = self.parse_or()
                self.leave()
                self.expect_op("]", "to close the index")
                accessors.append(Index(index, self.p(tok.start)))
            else:
                break
        self.depth -= entered
        return Access(base, tuple(accessors), base.pos) if accessors else base

    def parse_arguments(self) -> tuple[Node, ...]:
        open_tok = self.expect_op("(", "to start the arguments")
        self.enter(open_tok.start)
        args: list[Node] = []
        if self.is_op(")"):
            self.advance()
        else:
            while True:
                args.append(self.parse_or())
                if self.is_op(","):
                    self.advance()
                    continue
                self.expect_op(")", "to close the argument list")
                break
        self.leave()
        return tuple(args)

    def make_call(self, name: str, args: tuple[Node, ...], at: int, method: bool = False) -> Call:
        fname = name.lower()
        arity = _ARITY.get(fname)
        if arity is None:
            line, col, at2 = self._loc(at)
            raise UnknownFunctionError(name, line, col, at2)
        lo, hi = arity
        if len(args) < lo or (hi is not None and len(args) > hi):
            line, col, at2 = self._loc(at)
            raise FunctionArityError(fname, _arity_desc(lo, hi), line, col, at2)
        if fname == "exists" and not _is_path(args[0]):
            raise self.error("exists() needs a path argument (a name with optional .keys and [indexes])", at)
        if fname in _AGGREGATES and len(args) == 2:
            field_name = _field_name_of(args[1])
            if field_name is not None:
                args = (args[0], Const(field_name, args[1].pos))
        return Call(fname, args, self.p(at))

    def parse_primary(self) -> Node:
        tok = self.peek()
        kind = tok.kind
        if kind == _NUM:
            self.advance()
            return Const(tok.value, self.p(tok.start))
        if kind == _STR:
            self.advance()
            value = str(tok.value)
            if "{{" in value:
                return self.string_template(value, tok.start)
            return Const(value, self.p(tok.start))
        if kind == _IDENT:
            word = str(tok.value)
            low = word.lower()
            if low in _LITERAL_WORDS:
                self.advance()
                return Const(_LITERAL_WORDS[low], self.p(tok.start))
            if low in _OPERATOR_WORDS:
                raise self.error(f"unexpected keyword '{word}'", tok.start)
            if self.is_op("(", 1):
                self.advance()
                args = self.parse_arguments()
                return self.make_call(word, args, tok.start)
            self.advance()
            return Name(word, self.p(tok.start))
        if kind == _OP and tok.value == "(":
            self.advance()
            self.enter(tok.start)
            if self.is_op(")"):
                raise self.error("empty parentheses", self.peek().start)
            inner = self.parse_or()
            self.leave()
            self.expect_op(")", "to close '('")
            return inner
        if kind == _OP and tok.value == "[":
            self.advance()
            self.enter(tok.start)
            items: list[Node] = []
            if self.is_op("]"):
                self.advance()
            else:
                while True:
                    items.append(self.parse_or())
                    if self.is_op(","):
                        self.advance()
                        continue
                    self.expect_op("]", "to close the list")
                    break
            self.leave()
            return ListExpr(tuple(items), self.p(tok.start))
        if kind == _LPH:
            return self.parse_placeholder()
        if kind == _EOF:
            raise self.error("unexpected end of expression", tok.start)
        raise self.error(f"unexpected {_describe(tok)}", tok.start)

    def string_template(self, value: str, at: int) -> TemplateStr:
        try:
            parts = scan_template(value, self.depth + 1, self.p(at) + 1)
        except ExpressionSyntaxError as exc:
            moved = copy.copy(exc)
            moved.line, moved.column = _line_col(self.src, at)
            moved.position = at
            moved.reason = f"in the template string: {exc.reason}" if type(exc) is ExpressionSyntaxError \
                else exc.reason
            raise moved from None
        return TemplateStr(parts, self.p(at))

    def parse_placeholder(self) -> PlaceholderExpr:
        open_tok = self.advance()
        start = open_tok.start
        self.enter(start)
        if self.peek().kind == _RPH:
            raise self.error("empty placeholder", self.peek().start)
        inner_start = self._skip_ws(self.pos)
        expr = self.parse_or()
        inner_end = self.last_end
        has_fallback = False
        fallback: Any = None
        if self.is_op("|"):
            self.advance()
            self.reset_lexer()
            fallback = self._scan_fallback(start)
            has_fallback = True
        else:
            tok = self.peek()
            if tok.kind != _RPH:
                found = _describe(tok)
                raise self.error(f"expected '}}}}' to close the placeholder, found {found}", tok.start)
            self.advance()
        self.leave()
        return PlaceholderExpr(expr, has_fallback, fallback, self.src[start:self.pos],
                               self.src[inner_start:inner_end], self.p(start))

    def _scan_fallback(self, placeholder_start: int) -> Any:
        src = self.src
        i = self._skip_ws(self.pos)
        if i < len(src) and src[i] in "'\"":
            try:
                value, end = self._scan_string(i)
            except ExpressionSyntaxError:
                value, end = None, -1
            if end >= 0:
                after = self._skip_ws(end)
                if src.startswith("}}", after):
                    self.pos = after + 2
                    return value
        elif i < len(src) and src[i] in "-0123456789[{":
            try:
                value, end = _JSON_DECODER.raw_decode(src, i)
            except ValueError:
                end = -1
            if end >= 0:
                after = self._skip_ws(end)
                if src.startswith("}}", after):
                    self.pos = after + 2
                    return value
        close = src.find("}}", i)
        if close < 0:
            raise self.error("unterminated placeholder (missing '}}')", placeholder_start)
        text = src[i:close].strip()
        self.pos = close + 2
        low = text.lower()
        if low in _LITERAL_WORDS:
            return _LITERAL_WORDS[low]
        return text


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON constant {name}")


_JSON_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _is_path(node: Node) -> bool:
    return isinstance(node, Name) or (isinstance(node, Access) and isinstance(node.base, Name))


def _field_name_of(node: Node) -> str | None:
    """A bare identifier or dotted identifiers used as an aggregate field name."""
    if isinstance(node, Name):
        return node.name
    if isinstance(node, Access) and isinstance(node.base, Name):
        segments = [node.base.name]
        for acc in node.accessors:
            if not isinstance(acc, Member):
                return None
            segments.append(str(acc.key))
        return ".".join(segments)
    return None


def scan_template(
    s: str,
    depth: int = 0,
    offset: int = 0,
    errors: list[tuple[str, str, ExpressionSyntaxError]] | None = None,
) -> tuple[str | PlaceholderExpr, ...]:
    """Split a template string into literal text and placeholders.

    Placeholder node positions are relative to the placeholder's inner text plus ``offset`` (``offset`` 0
    makes them offsets into :attr:`PlaceholderExpr.source`). When ``errors`` is given, bad placeholders are
    collected as ``(inner text, raw text, error)`` and kept as literal text; otherwise the first one raises.
    """
    parts: list[str | PlaceholderExpr] = []
    buf: list[str] = []
    i = 0
    n = len(s)
    while i < n:
        j = s.find("{{", i)
        if j < 0:
            buf.append(s[i:])
            break
        if j > 0 and s[j - 1] == "\\":
            buf.append(s[i:j - 1])
            buf.append("{{")
            i = j + 2
            continue
        while j + 2 < n and s[j + 2] == "{":
            j += 1  # in a run of braces the last "{{" opens the placeholder
        buf.append(s[i:j])
        # Starts on the "{{" token; node positions become offsets into PlaceholderExpr.source.
        parser = _Parser(s, j, depth, offset - _skip_ws_at(s, j + 2))
        try:
            node = parser.parse_placeholder()
            if len(node.source.encode("utf-8", "surrogatepass")) > MAX_SOURCE_BYTES:
                raise parser.error(f"placeholder longer than {MAX_SOURCE_BYTES} bytes", j)
        except ExpressionSyntaxError as exc:
            if errors is None:
                raise
            close = s.find("}}", j + 2)
            end = n if close < 0 else close + 2
            raw = s[j:end]
            inner = s[j + 2:close] if close >= 0 else s[j + 2:]
            errors.append((inner.strip(), raw, exc))
            buf.append(raw)
            i = end
            continue
        if buf:
            text = "".join(buf)
            if text:
                parts.append(text)
            buf = []
        parts.append(node)
        i = parser.pos
    text = "".join(buf)
    if text:
        parts.append(text)
    return tuple(parts)


def _skip_ws_at(s: str, i: int) -> int:
    """Index of the first non-whitespace character of ``s`` at or after ``i``."""
    n = len(s)
    while i < n and s[i].isspace():
        i += 1
    return i


def has_placeholder(s: str) -> bool:
    """True when ``s`` contains a ``{{`` that is not escaped as ``\\{{``."""
    i = 0
    while True:
        j = s.find("{{", i)
        if j < 0:
            return False
        if j == 0 or s[j - 1] != "\\":
            return True
        i = j + 2


@lru_cache(maxsize=512)
def _compile_regex(pattern: str) -> Any:
    options = re2.Options()
    options.log_errors = False
    return re2.compile(pattern, options)


def _regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a usable RE2 pattern, or None."""
    try:
        size = len(pattern.encode("utf-8"))
    except UnicodeEncodeError:
        return "pattern is not valid Unicode"
    if size > MAX_PATTERN_BYTES:
        return f"pattern longer than {MAX_PATTERN_BYTES} bytes"
    try:
        _compile_regex(pattern)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else "invalid pattern"
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        return str(detail)
    except (TypeError, ValueError, UnicodeError) as exc:
        return str(exc)
    return None


def _collect_roots(node: Node, out: set[str]) -> None:
    if isinstance(node, Name):
        out.add(node.name)
    elif isinstance(node, Access):
        _collect_roots(node.base, out)
        for acc in node.accessors:
            if isinstance(acc, Index):
                _collect_roots(acc.expr, out)
    elif isinstance(node, Call):
        for arg in node.args:
            _collect_roots(arg, out)
    elif isinstance(node, (Neg, Not, EmptyTest)):
        _collect_roots(node.operand, out)
    elif isinstance(node, Arith):
        _collect_roots(node.first, out)
        for step in node.rest:
            _collect_roots(step.operand, out)
    elif isinstance(node, Compare):
        _collect_roots(node.left, out)
        _collect_roots(node.right, out)
    elif isinstance(node, BoolOp):
        for operand in node.operands:
            _collect_roots(operand, out)
    elif isinstance(node, ListExpr):
        for item in node.items:
            _collect_roots(item, out)
    elif isinstance(node, PlaceholderExpr):
        _collect_roots(node.expr, out)
    elif isinstance(node, TemplateStr):
        for part in node.parts:
            if isinstance(part, PlaceholderExpr):
                _collect_roots(part.expr, out)


def referenced_roots(node: Node) -> frozenset[str]:
    """Root names read by a syntax tree (function names and aggregate field names excluded)."""
    out: set[str] = set()
    _collect_roots(node, out)
    return frozenset(out)


def parse_expression(source: str) -> Expression:
    """Parse an expression (§5.3). Raises :class:`ExpressionSyntaxError` (or a subclass).

    Results are immutable and cached by source text.
    """
    if not isinstance(source, str):
        raise ExpressionSyntaxError("expression must be a string")
    return _parse_cached(source)


@lru_cache(maxsize=2048)
def _parse_cached(source: str) -> Expression:
    if len(source.encode("utf-8", "surrogatepass")) > MAX_SOURCE_BYTES:
        raise ExpressionSyntaxError(f"expression longer than {MAX_SOURCE_BYTES} bytes")
    try:
        ast = _Parser(source).parse_all()
        return Expression(source, ast, referenced_roots(ast))
    except RecursionError:
        raise ExpressionSyntaxError("expression nested too deeply") from None


# ---------------------------------------------------------------------------------------------------------
# Syntax trees as JSON (the IR stores parsed trees, so nothing is parsed again at run time)
# ---------------------------------------------------------------------------------------------------------

_NODE_CLASSES: dict[str, type] = {
    cls.__name__: cls
    for cls in (Const, TemplateStr, ListExpr, Name, Member, Index, Access, Call, Neg, Not, ArithStep, Arith,
                Compare, EmptyTest, BoolOp, PlaceholderExpr)
}


_NODE_FIELDS: dict[type, tuple[str, ...]] = {cls: tuple(f.name for f in fields(cls)) for cls in _NODE_CLASSES.values()}
_AST_JSON_CACHE: dict[int, tuple[Any, Any]] = {}


def ast_to_json(node: Any) -> Any:
    """A JSON value for a syntax tree: nodes become objects tagged ``"t"``, tuples become arrays.

    Literal values inside nodes are JSON scalars, so objects in the output are always nodes. Results are cached
    by tree identity (parsed trees are immutable and shared through the parser caches); do not mutate them.
    """
    names = _NODE_FIELDS.get(type(node))
    if names is None:
        if isinstance(node, tuple):
            return [ast_to_json(item) for item in node]
        return node
    cached = _AST_JSON_CACHE.get(id(node))
    if cached is not None and cached[0] is node:
        return cached[1]
    out: dict[str, Any] = {"t": type(node).__name__}
    for name in names:
        out[name] = ast_to_json(getattr(node, name))
    if len(_AST_JSON_CACHE) > 65536:
        _AST_JSON_CACHE.clear()
    _AST_JSON_CACHE[id(node)] = (node, out)
    return out


def ast_from_json(data: Any) -> Any:
    """Rebuild a syntax tree written by :func:`ast_to_json`."""
    if isinstance(data, list):
        return tuple(ast_from_json(item) for item in data)
    if isinstance(data, dict):
        cls = _NODE_CLASSES.get(str(data.get("t")))
        if cls is None:
            raise ValueError(f"unknown syntax tree node {data.get('t')!r}")
        return cls(**{k: ast_from_json(v) for k, v in data.items() if k != "t"})
    return data


def expression_from_json(source: str, ast: Any, roots: Any) -> Expression:
    """Rebuild an :class:`Expression` from its IR form without parsing the source again."""
    return Expression(source, ast_from_json(ast), frozenset(roots))


# ---------------------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------------------

_NUMERIC_RE = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_list(v: Any) -> bool:
    return isinstance(v, (list, tuple))


def _is_obj(v: Any) -> bool:
    return isinstance(v, Mapping)


def _numeric_string(s: str) -> int | float | None:
    """The number a numeric string (§5.4) denotes, else None."""
    t = s.strip()
    if not _NUMERIC_RE.fullmatch(t):
        return None
    if "." in t or "e" in t or "E" in t:
        return float(t)
    try:
        return int(t)
    except ValueError:
        return float(t)


def json_type_name(v: Any) -> str:
    """The JSON type name of a value (`null`, `boolean`, `integer`, `number`, `string`, `array`, `object`)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if _is_list(v):
        return "array"
    if _is_obj(v):
        return "object"
    return type(v).__name__


def truthy(value: Any) -> bool:
    """Truthiness (§5.4): null, false, 0, 0.0, "", [], {} are false; everything else is true."""
    if value is None or value is False:
        return False
    if _is_num(value):
        return bool(value)
    if isinstance(value, (str, list, tuple)) or _is_obj(value):
        return len(value) > 0
    return True


def _json_default(o: Any) -> Any:
    if isinstance(o, Mapping):
        return dict(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not a JSON value")


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def format_embedded(value: Any) -> str:
    """Format a value for embedding in a string (§5.1): strings as is, ints as digits, floats in shortest
    round-trip form with a fraction or exponent, true/false, null as "", arrays/objects as compact JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return _compact_json(value)


def _deep_eq(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    a_num, b_num = _is_num(a), _is_num(b)
    if a_num and b_num:
        return bool(a == b)
    if a_num and isinstance(b, str):
        n = _numeric_string(b)
        return n is not None and a == n
    if b_num and isinstance(a, str):
        n = _numeric_string(a)
        return n is not None and b == n
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    if _is_list(a) and _is_list(b):
        return len(a) == len(b) and all(_deep_eq(x, y) for x, y in zip(a, b, strict=True))
    if _is_obj(a) and _is_obj(b):
        if len(a) != len(b):
            return False
        return all(k in b and _deep_eq(v, b[k]) for k, v in a.items())
    return False


# ---------------------------------------------------------------------------------------------------------
# Scopes
# ---------------------------------------------------------------------------------------------------------


class Scope(Protocol):
    """Resolves root names: ``lookup(name) -> (found, value)``."""

    def lookup(self, name: str) -> tuple[bool, Any]: ...


class MappingScope:
    """A scope over layered mappings; the first layer holding the name wins."""

    def __init__(self, *layers: Mapping[str, Any]) -> None:
        self.layers: tuple[Mapping[str, Any], ...] = layers

    def lookup(self, name: str) -> tuple[bool, Any]:
        """Return ``(True, value)`` from the first layer that has ``name``, else ``(False, None)``."""
        for layer in self.layers:
            if name in layer:
                return True, layer[name]
        return False, None


# ---------------------------------------------------------------------------------------------------------
# Evaluator
# ---------------------------------------------------------------------------------------------------------

_MISSING_KEY = "missing_key"
_OUT_OF_RANGE = "index_out_of_range"
_NOT_CONTAINER = "not_a_container"


def _step(cur: Any, key: Any) -> tuple[bool, Any, str]:
    """One path step (§5.2): ``(resolved, value, reason)``."""
    if _is_obj(cur):
        if isinstance(key, str):
            k: Any = key
        elif isinstance(key, int) and not isinstance(key, bool):
            k = str(key)
        else:
            return False, None, _MISSING_KEY
        if k in cur:
            return True, cur[k], ""
        return False, None, _MISSING_KEY
    if _is_list(cur):
        if isinstance(key, float) and key.is_integer():
            key = int(key)
        if isinstance(key, int) and not isinstance(key, bool):
            n = len(cur)
            i = key + n if key < 0 else key
            if 0 <= i < n:
                return True, cur[i], ""
            return False, None, _OUT_OF_RANGE
        if key == "length":
            return True, len(cur), ""
        return False, None, _MISSING_KEY
    if isinstance(cur, str) and key == "length":
        return True, len(cur), ""
    return False, None, _NOT_CONTAINER


def _check_number(value: int | float) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return value.bit_length() <= _MAX_INT_BITS


_COMPARISON_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": lambda x, y: bool(x < y),
    "<=": lambda x, y: bool(x <= y),
    ">": lambda x, y: bool(x > y),
    ">=": lambda x, y: bool(x >= y),
}


class _Evaluator:
    def __init__(self, source: str, scope: Scope, on_unresolved: UnresolvedCallback | None) -> None:
        self.source = source
        self.scope = scope
        self.on_unresolved = on_unresolved
        self.steps = 0

    # -- helpers -------------------------------------------------------------------------------------------
    def fail(self, reason: str, pos: int) -> ExpressionError:
        return ExpressionError(reason, self.source, max(0, pos))

    def tick(self, pos: int, n: int = 1) -> None:
        self.steps += n
        if self.steps > MAX_STEPS:
            raise self.fail(f"evaluation exceeded {MAX_STEPS} steps", pos)

    def report(self, root: str, reason: str) -> None:
        if self.on_unresolved is not None:
            self.on_unresolved(root, reason)

    def number(self, value: int | float, pos: int) -> int | float:
        if not _check_number(value):
            raise self.fail("numeric overflow", pos)
        return value

    # -- dispatch ------------------------------------------------------------------------------------------
    def eval(self, node: Node) -> Any:
        self.tick(node.pos)
        if isinstance(node, Const):
            return node.value
        if isinstance(node, (Name, Access)):
            return self.resolve(node, report=True)[1]
        if isinstance(node, Compare):
            return self.compare(node)
        if isinstance(node, BoolOp):
            if node.op == "and":
                return all(truthy(self.eval(operand)) for operand in node.operands)
            return any(truthy(self.eval(operand)) for operand in node.operands)
        if isinstance(node, Not):
            return not truthy(self.eval(node.operand))
        if isinstance(node, Arith):
            acc = self.eval(node.first)
            for step in node.rest:
                acc = self.arith(step.op, acc, self.eval(step.operand), step.pos)
            return acc
        if isinstance(node, Call):
            return self.call(node)
        if isinstance(node, PlaceholderExpr):
            return self.placeholder(node)
        if isinstance(node, EmptyTest):
            value = self.eval(node.operand)
            empty = value is None or (
                (isinstance(value, (str, list, tuple)) or _is_obj(value)) and len(value) == 0
            )
            return not empty if node.negated else empty
        if isinstance(node, Neg):
            value = self.eval(node.operand)
            if value is None:
                return None
            if not _is_num(value):
                raise self.fail(f"unary '-' needs a number, got {json_type_name(value)}", node.pos)
            return -value
        if isinstance(node, ListExpr):
            return [self.eval(item) for item in node.items]
        if isinstance(node, TemplateStr):
            return self.template(node)
        raise self.fail(f"unknown syntax node {type(node).__name__}", 0)  # pragma: no cover

    def placeholder(self, node: PlaceholderExpr) -> Any:
        value = self.eval(node.expr)
        if value is None and node.has_fallback:
            fb = node.fallback
            return copy.deepcopy(fb) if isinstance(fb, (list, dict)) else fb
        return value

    def template(self, node: TemplateStr) -> str:
        out: list[str] = []
        size = 0
        for part in node.parts:
            text = part if isinstance(part, str) else format_embedded(self.placeholder(part))
            size += len(text)
            if size > _MAX_STR_LEN:
                raise self.fail("string too large", node.pos)
            out.append(text)
        return "".join(out)

    # -- paths ---------------------------------------------------------------------------------------------
    def resolve(self, node: Name | Access, report: bool) -> tuple[bool, Any]:
        if isinstance(node, Name):
            found, value = self.scope.lookup(node.name)
            if not found:
                if report:
                    self.report(node.name, "undefined")
                return False, None
            return True, value
        base = node.base
        root: str | None = None
        if isinstance(base, Name):
            root = base.name
            ok, cur = self.resolve(base, report)
            if not ok:
                return False, None
        else:
            cur = self.eval(base)
        for acc in node.accessors:
            key = acc.key if isinstance(acc, Member) else self.eval(acc.expr)
            ok, cur, reason = _step(cur, key)
            if not ok:
                if report and root is not None:
                    self.report(root, reason)
                return False, None
        return True, cur

    # -- operators -----------------------------------------------------------------------------------------
    def arith(self, op: str, a: Any, b: Any, pos: int) -> Any:
        if a is None or b is None:
            return None
        a_num, b_num = _is_num(a), _is_num(b)
        if op == "+":
            if a_num and b_num:
                return self.number(a + b, pos)
            if isinstance(a, str) and isinstance(b, str):
                if len(a) + len(b) > _MAX_STR_LEN:
                    raise self.fail("string too large", pos)
                return a + b
            if _is_list(a) and _is_list(b):
                if len(a) + len(b) > _MAX_LIST_LEN:
                    raise self.fail("list too large", pos)
                return [*a, *b]
            raise self.fail(f"cannot add {json_type_name(a)} and {json_type_name(b)}", pos)
        if not (a_num and b_num):
            raise self.fail(f"'{op}' needs numbers, got {json_type_name(a)} and {json_type_name(b)}", pos)
        try:
            if op == "-":
                return self.number(a - b, pos)
            if op == "*":
                big = a.bit_length() + b.bit_length() if isinstance(a, int) and isinstance(b, int) else 0
                if big > 2 * _MAX_INT_BITS:
                    raise self.fail("numeric overflow", pos)
                return self.number(a * b, pos)
            if b == 0:
                raise self.fail("division by zero", pos)
            if op == "/":
                return self.number(a / b, pos)
            return self.number(a % b, pos)
        except OverflowError:
            raise self.fail("numeric overflow", pos) from None

    def ordered(self, a: Any, b: Any, op: str, pos: int) -> tuple[Any, Any]:
        """Operands made comparable by the ordering rules of §5.4 (no nulls)."""
        a_num, b_num = _is_num(a), _is_num(b)
        if a_num and b_num:
            return a, b
        if isinstance(a, str) and isinstance(b, str):
            return a, b
        if a_num and isinstance(b, str):
            n = _numeric_string(b)
            if n is not None:
                return a, n
        elif b_num and isinstance(a, str):
            n = _numeric_string(a)
            if n is not None:
                return n, b
        raise self.fail(f"cannot compare {json_type_name(a)} with {json_type_name(b)} using '{op}'", pos)

    def contains(self, container: Any, item: Any, op: str, pos: int) -> bool:
        if container is None:
            return False
        if _is_list(container):
            self.tick(pos, len(container))
            return any(_deep_eq(item, element) for element in container)
        if isinstance(container, str):
            if item is None:
                return False
            if isinstance(item, str):
                return item in container
            if _is_num(item):
                return format_embedded(item) in container
            raise self.fail(f"'{op}' cannot look for {json_type_name(item)} in a string", pos)
        if _is_obj(container):
            if item is None:
                return False
            if isinstance(item, str):
                return item in container
            if isinstance(item, int) and not isinstance(item, bool):
                return str(item) in container
            raise self.fail(f"'{op}' cannot look for {json_type_name(item)} among object keys", pos)
        raise self.fail(f"'{op}' needs a list, string or object, got {json_type_name(container)}", pos)

    def affix_operand(self, value: Any, op: str, pos: int) -> str | None:
        if value is None:
            return None
        if isinstance(value, str):
            return value
        if _is_num(value):
            return format_embedded(value)
        raise self.fail(f"'{op}' needs strings, got {json_type_name(value)}", pos)

    def compare(self, node: Compare) -> bool:
        op = node.op
        a = self.eval(node.left)
        b = self.eval(node.right)
        pos = node.pos
        if op == "==":
            return _deep_eq(a, b)
        if op == "!=":
            return not _deep_eq(a, b)
        if op in _COMPARISON_OPS:
            if a is None or b is None:
                return False
            x, y = self.ordered(a, b, op, pos)
            return _COMPARISON_OPS[op](x, y)
        if op == "in":
            return self.contains(b, a, op, pos)
        if op == "not_in":
            return not self.contains(b, a, op, pos)
        if op == "contains":
            return self.contains(a, b, op, pos)
        if op == "not_contains":
            return not self.contains(a, b, op, pos)
        if op in ("starts_with", "ends_with"):
            s = self.affix_operand(a, op, pos)
            t = self.affix_operand(b, op, pos)
            if s is None or t is None:
                return False
            return s.startswith(t) if op == "starts_with" else s.endswith(t)
        if op == "matches":
            return self.matches(a, b, pos)
        raise self.fail(f"unknown operator {op}", pos)  # pragma: no cover

    def matches(self, subject: Any, pattern: Any, pos: int) -> bool:
        if not isinstance(subject, str):
            return False
        if pattern is None:
            return False
        if not isinstance(pattern, str):
            raise self.fail(f"'matches' needs a string pattern, got {json_type_name(pattern)}", pos)
        problem = _regex_problem(pattern)
        if problem is not None:
            raise self.fail(f"invalid regex: {problem}", pos)
        try:
            return _compile_regex(pattern).search(subject) is not None
        except (UnicodeError, TypeError, ValueError) as exc:
            raise self.fail(f"cannot match: {exc}", pos) from None

    # -- functions -----------------------------------------------------------------------------------------
    def call(self, node: Call) -> Any:
        name = node.name
        if name == "if":
            cond, then, other = node.args
            return self.eval(then) if truthy(self.eval(cond)) else self.eval(other)
        if name == "coalesce":
            for arg in node.args:
                value = self.eval(arg)
                if value is not None:
                    return value
            return None
        if name == "exists":
            target = node.args[0]
            if isinstance(target, (Name, Access)):
                return self.resolve(target, report=False)[0]
            return self.eval(target) is not None  # pragma: no cover - rejected by the parser
        args = [self.eval(arg) for arg in node.args]
        impl = _IMPLS[name]
        return impl(self, args, node.pos)


# -- function implementations ------------------------------------------------------------------------------

_Impl: TypeAlias = Callable[[_Evaluator, list[Any], int], Any]


def _fn_len(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    x = args[0]
    if x is None:
        return 0
    if isinstance(x, (str, list, tuple)) or _is_obj(x):
        return len(x)
    raise ev.fail(f"len() needs a string, list or object, got {json_type_name(x)}", pos)


def _string_fn(name: str, fn: Callable[[str], str]) -> _Impl:
    def impl(ev: _Evaluator, args: list[Any], pos: int) -> Any:
        x = args[0]
        if x is None:
            return None
        if not isinstance(x, str):
            raise ev.fail(f"{name}() needs a string, got {json_type_name(x)}", pos)
        return fn(x)

    return impl


def _need_str(ev: _Evaluator, fname: str, value: Any, pos: int) -> str:
    if not isinstance(value, str):
        raise ev.fail(f"{fname}() needs a string, got {json_type_name(value)}", pos)
    return value


def _fn_replace(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    if args[0] is None:
        return None
    s, old, new = (_need_str(ev, "replace", a, pos) for a in args)
    count = len(s) + 1 if old == "" else s.count(old)
    if len(s) + count * (len(new) - len(old)) > _MAX_STR_LEN:
        raise ev.fail("string too large", pos)
    return s.replace(old, new)


def _fn_split(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    if args[0] is None:
        return None
    s = _need_str(ev, "split", args[0], pos)
    sep = _need_str(ev, "split", args[1], pos)
    return list(s) if sep == "" else s.split(sep)


def _fn_join(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    items = args[0]
    if items is None:
        return None
    sep = _need_str(ev, "join", args[1], pos) if len(args) > 1 else ","
    if not _is_list(items):
        raise ev.fail(f"join() needs a list, got {json_type_name(items)}", pos)
    ev.tick(pos, len(items))
    text = sep.join(format_embedded(item) for item in items)
    if len(text) > _MAX_STR_LEN:
        raise ev.fail("string too large", pos)
    return text


def _to_number(ev: _Evaluator, fname: str, x: Any, pos: int) -> int | float | None:
    if x is None:
        return None
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return x
    if isinstance(x, str):
        n = _numeric_string(x)
        if n is not None:
            return n
        raise ev.fail(f"{fname}() cannot convert {x[:40]!r} to a number", pos)
    raise ev.fail(f"{fname}() needs a number or numeric string, got {json_type_name(x)}", pos)


def _fn_int(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    n = _to_number(ev, "int", args[0], pos)
    if n is None:
        return None
    if isinstance(n, float):
        if not math.isfinite(n):
            raise ev.fail("numeric overflow", pos)
        return math.trunc(n)
    return n


def _fn_float(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    n = _to_number(ev, "float", args[0], pos)
    if n is None:
        return None
    try:
        return ev.number(float(n), pos)
    except OverflowError:
        raise ev.fail("numeric overflow", pos) from None


def _fn_str(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    return format_embedded(args[0])


_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _fn_bool(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    x = args[0]
    if isinstance(x, str):
        word = _BOOL_WORDS.get(x.strip().lower())
        if word is not None:
            return word
    return truthy(x)


def _fn_round(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    x = args[0]
    ndigits = args[1] if len(args) > 1 else 0
    if x is None:
        return None
    if not _is_num(x):
        raise ev.fail(f"round() needs a number, got {json_type_name(x)}", pos)
    if not isinstance(ndigits, int) or isinstance(ndigits, bool):
        raise ev.fail(f"round() needs an integer number of digits, got {json_type_name(ndigits)}", pos)
    if isinstance(x, int):
        if ndigits >= 0:
            return x
        if ndigits < -5000:
            return 0
        return ev.number(round(x, ndigits), pos)
    if ndigits > 400:
        return x
    if ndigits < -400:
        return 0
    with localcontext() as ctx:
        ctx.prec = 1000
        try:
            d = Decimal(repr(x)).quantize(Decimal(1).scaleb(-ndigits), rounding=ROUND_HALF_EVEN)
        except InvalidOperation:
            return x if ndigits > 0 else int(x)
    return int(d) if ndigits <= 0 else float(d)


def _fn_abs(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    x = args[0]
    if x is None:
        return None
    if not _is_num(x):
        raise ev.fail(f"abs() needs a number, got {json_type_name(x)}", pos)
    return abs(x)


def _field_value(item: Any, field_name: str) -> Any:
    cur = item
    for part in field_name.split("."):
        ok, cur, _ = _step(cur, part)
        if not ok:
            return None
    return cur


def _aggregate_values(ev: _Evaluator, fname: str, args: list[Any], pos: int) -> list[Any]:
    items = args[0]
    if items is None:
        return []
    if not _is_list(items):
        raise ev.fail(f"{fname}() needs a list, got {json_type_name(items)}", pos)
    field_name = args[1] if len(args) > 1 else None
    if field_name is not None and not isinstance(field_name, str):
        raise ev.fail(f"{fname}() needs a field name, got {json_type_name(field_name)}", pos)
    ev.tick(pos, len(items))
    if field_name is None:
        return [item for item in items if item is not None]
    values = (_field_value(item, field_name) for item in items)
    return [v for v in values if v is not None]


def _numbers(ev: _Evaluator, fname: str, values: list[Any], pos: int) -> list[int | float]:
    for v in values:
        if not _is_num(v):
            raise ev.fail(f"{fname}() needs numbers, got {json_type_name(v)}", pos)
    return values


def _fn_count(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    return len(_aggregate_values(ev, "count", args, pos))


def _fn_sum(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    values = _numbers(ev, "sum", _aggregate_values(ev, "sum", args, pos), pos)
    total: int | float = 0
    try:
        for v in values:
            total = ev.number(total + v, pos)
    except OverflowError:
        raise ev.fail("numeric overflow", pos) from None
    return total


def _fn_avg(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    values = _numbers(ev, "avg", _aggregate_values(ev, "avg", args, pos), pos)
    if not values:
        return None
    try:
        total: int | float = 0
        for v in values:
            total = ev.number(total + v, pos)
        return ev.number(total / len(values), pos)
    except OverflowError:
        raise ev.fail("numeric overflow", pos) from None


def _extreme(fname: str, want_less: bool) -> _Impl:
    def impl(ev: _Evaluator, args: list[Any], pos: int) -> Any:
        values = _aggregate_values(ev, fname, args, pos)
        best: Any = None
        for v in values:
            if not (_is_num(v) or isinstance(v, str)):
                raise ev.fail(f"{fname}() needs numbers or strings, got {json_type_name(v)}", pos)
            if best is None:
                best = v
                continue
            x, y = ev.ordered(v, best, fname, pos)
            if (x < y) if want_less else (x > y):
                best = v
        return best

    return impl


def _fn_keys(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    x = args[0]
    if x is None:
        return None
    if not _is_obj(x):
        raise ev.fail(f"keys() needs an object, got {json_type_name(x)}", pos)
    return list(x.keys())


def _fn_values(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    x = args[0]
    if x is None:
        return None
    if not _is_obj(x):
        raise ev.fail(f"values() needs an object, got {json_type_name(x)}", pos)
    return list(x.values())


def _fn_json(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    try:
        return _compact_json(args[0])
    except (TypeError, ValueError) as exc:
        raise ev.fail(f"json() cannot serialise the value: {exc}", pos) from None


def _fn_now(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    found, value = ev.scope.lookup("now")
    if found and value is not None:
        return value
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fn_today(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    found, value = ev.scope.lookup("today")
    if found and value is not None:
        return value
    return datetime.now(UTC).date().isoformat()


_IMPLS: dict[str, _Impl] = {
    "len": _fn_len,
    "lower": _string_fn("lower", str.lower),
    "upper": _string_fn("upper", str.upper),
    "trim": _string_fn("trim", str.strip),
    "replace": _fn_replace,
    "split": _fn_split,
    "join": _fn_join,
    "int": _fn_int,
    "float": _fn_float,
    "str": _fn_str,
    "bool": _fn_bool,
    "round": _fn_round,
    "abs": _fn_abs,
    "count": _fn_count,
    "sum": _fn_sum,
    "avg": _fn_avg,
    "min": _extreme("min", True),
    "max": _extreme("max", False),
    "keys": _fn_keys,
    "values": _fn_values,
    "json": _fn_json,
    "now": _fn_now,
    "today": _fn_today,
}


def evaluate(expr: Expression, scope: Scope, on_unresolved: UnresolvedCallback | None = None) -> Any:
    """Evaluate a parsed expression against ``scope`` (§5.4).

    Unresolved paths evaluate to ``null`` and are reported through ``on_unresolved(root, reason)``
    (``undefined``, ``missing_key``, ``index_out_of_range``, ``not_a_container``). Raises
    :class:`ExpressionError` for runtime errors.
    """
    return _evaluate_node(expr.ast, expr.source, scope, on_unresolved)


def _evaluate_node(node: Node, source: str, scope: Scope, on_unresolved: UnresolvedCallback | None) -> Any:
    ev = _Evaluator(source, scope, on_unresolved)
    try:
        return ev.eval(node)
    except RecursionError:
        raise ExpressionError("value or expression nested too deeply", source, 0) from None


def evaluate_condition(
    expr: Expression, scope: Scope, on_unresolved: UnresolvedCallback | None = None
) -> bool:
    """Evaluate ``expr`` and convert the value by truthiness."""
    return truthy(evaluate(expr, scope, on_unresolved))
