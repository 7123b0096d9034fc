"""Property tests: the parser and evaluator only ever fail with their own error types."""

import contextlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckp_core.expressions import (
    Expression,
    ExpressionError,
    ExpressionSyntaxError,
    MappingScope,
    evaluate,
    parse_expression,
)
from ckp_core.templates import TemplateSyntaxError, compile_template, render

pytestmark = pytest.mark.unit

TOKENS = [
    "a", "b", "c", "xs", "o", "s", "missing", "1", "0", "-", "2.5", "1e3", "'x'", '"10"', "'{{a}}'", "true",
    "null", "(", ")", "[", "]", "{{", "}}", "|", ",", ".", "+", "*", "/", "%", "==", "!=", "<", ">=", "and",
    "or", "not", "in", "not in", "contains", "starts_with", "matches", "'a+'", "is_empty", "len(", "sum(",
    "coalesce(", "if(", "round(", "int(", "str(", "json(", "keys(", "exists(", ".length", "[0]", "[-1]",
    "'a\\u00e9'", "\n", " ",
]

json_scalars = st.none() | st.booleans() | st.integers(-1000, 1000) | st.floats(
    allow_nan=False, allow_infinity=False, width=32
) | st.text(max_size=6) | st.sampled_from(["10", " 2.5 ", "a", "", "true"])
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["a", "b", "x"]), children, max_size=3),
    max_leaves=10,
)
scopes = st.fixed_dictionaries({}, optional={name: json_values for name in ("a", "b", "c", "xs", "o", "s")})


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=120))
def test_parse_random_text_only_raises_syntax_errors(source: str) -> None:
    error: ExpressionSyntaxError | None = None
    try:
        result = parse_expression(source)
    except ExpressionSyntaxError as exc:
        error = exc
    else:
        assert isinstance(result, Expression)
    if error is not None:
        assert error.line >= 1
        assert error.column >= 1


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(TOKENS), max_size=14).map(" ".join))
def test_parse_token_soup_only_raises_syntax_errors(source: str) -> None:
    with contextlib.suppress(ExpressionSyntaxError):
        parse_expression(source)


def _expressions() -> st.SearchStrategy[str]:
    leaves = st.sampled_from(
        ["a", "b", "c", "xs", "o", "s", "missing", "a.x", "o.a", "xs[0]", "xs[-1]", "s.length", "xs.length",
         "1", "0", "2.5", "-3", "'10'", "'a'", "''", "true", "false", "null", "[]", "[1, 'a']", "{{a | 0}}",
         "'v-{{b}}'"]
    )
    unary = ["not {}", "-{}", "is_empty {}", "is_not_empty {}", "({})", "len({})", "lower({})", "int({})",
             "float({})", "str({})", "bool({})", "abs({})", "round({})", "keys({})", "values({})", "json({})",
             "sum({})", "avg({})", "min({})", "max({})", "count({})", "trim({})", "[{}]", "{{{{ {} | 1 }}}}"]
    binary = ["{} + {}", "{} - {}", "{} * {}", "{} / {}", "{} % {}", "{} == {}", "{} != {}", "{} < {}",
              "{} >= {}", "{} and {}", "{} or {}", "{} in {}", "{} not in {}", "{} contains {}",
              "{} starts_with {}", "{} ends_with {}", "{} matches {}", "coalesce({}, {})", "split({}, {})",
              "join({}, {})", "round({}, {})", "sum({}, {})", "{}[{}]"]

    def extend(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return (
            st.tuples(st.sampled_from(unary), children).map(lambda t: t[0].format(t[1]))
            | st.tuples(st.sampled_from(binary), children, children).map(lambda t: t[0].format(t[1], t[2]))
            | st.tuples(children, children, children).map(lambda t: f"if({t[0]}, {t[1]}, {t[2]})")
        )

    return st.recursive(leaves, extend, max_leaves=8)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(_expressions(), scopes)
def test_evaluate_only_raises_expression_errors(source: str, scope: dict[str, Any]) -> None:
    try:
        expr = parse_expression(source)
    except ExpressionSyntaxError:
        return  # e.g. a chained comparison produced by the generator
    reasons: list[str] = []
    error: ExpressionError | None = None
    try:
        evaluate(expr, MappingScope(scope), lambda root, reason: reasons.append(reason))
    except ExpressionError as exc:
        error = exc
    if error is not None:
        assert error.expression == source
        assert 0 <= error.position <= len(source)
    assert set(reasons) <= {"undefined", "missing_key", "index_out_of_range", "not_a_container"}


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=60), scopes)
def test_templates_only_raise_their_own_errors(text: str, scope: dict[str, Any]) -> None:
    try:
        template = compile_template({"k": [text]})
    except TemplateSyntaxError:
        return
    with contextlib.suppress(ExpressionError):
        render(template, MappingScope(scope))
