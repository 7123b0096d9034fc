"""The tokenizer and recursive-descent parser of CKP expressions (ckp.md §5.3), template scanning, the checks
a parse makes (regular expressions, referenced variables), and syntax trees read back from their JSON form."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

import re2

from ckp_core.expressions.syntax import (
    _AGGREGATES,
    _ARITY,
    _MAX_INT_BITS,
    MAX_DEPTH,
    MAX_PATTERN_BYTES,
    MAX_SOURCE_BYTES,
    Access,
    Arith,
    ArithStep,
    BoolOp,
    Call,
    Compare,
    Const,
    EmptyTest,
    Expression,
    ExpressionSyntaxError,
    FunctionArityError,
    Index,
    InvalidRegexError,
    ListExpr,
    Member,
    Name,
    Neg,
    Node,
    Not,
    PlaceholderExpr,
    TemplateStr,
    UnknownFunctionError,
    _arity_desc,
)

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


