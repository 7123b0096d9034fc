"""Evaluating a parsed expression against a scope (ckp.md §5.4)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

from ckp_core.expressions.functions import _IMPLS
from ckp_core.expressions.parser import _compile_regex, _regex_problem
from ckp_core.expressions.syntax import (
    _MAX_INT_BITS,
    _MAX_LIST_LEN,
    _MAX_STR_LEN,
    MAX_STEPS,
    Access,
    Arith,
    BoolOp,
    Call,
    Compare,
    Const,
    EmptyTest,
    Expression,
    ExpressionError,
    ListExpr,
    Member,
    Name,
    Neg,
    Node,
    Not,
    PlaceholderExpr,
    TemplateStr,
    UnresolvedCallback,
)
from ckp_core.expressions.values import (
    Scope,
    _deep_eq,
    _is_list,
    _is_num,
    _is_obj,
    _numeric_string,
    _step,
    format_embedded,
    json_type_name,
    truthy,
)

# ---------------------------------------------------------------------------------------------------------
# Evaluator
# ---------------------------------------------------------------------------------------------------------

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
