"""Compile-time errors: syntax errors with line/column, unknown functions, arity, literal regexes, limits."""

import pytest

from ckp_core.expressions import (
    MAX_DEPTH,
    ExpressionError,
    ExpressionSyntaxError,
    FunctionArityError,
    InvalidRegexError,
    MappingScope,
    UnknownFunctionError,
    evaluate,
    parse_expression,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("source", "line", "column"),
    [
        ("", 1, 1),
        ("a ==", 1, 5),
        ("a = b", 1, 3),
        ("a +\n  * b", 2, 3),
        ("(a", 1, 3),
        ("a b", 1, 3),
        ("'abc", 1, 1),
        ("1 < 2 < 3", 1, 7),
        ("a and or b", 1, 7),
        ("a.", 1, 3),
        ("a[1", 1, 4),
        ("{{ a ", 1, 6),
        ("{{ }}", 1, 4),
        ("a & b", 1, 3),
        ("a || b", 1, 3),
        ("!a", 1, 1),
        ("x\n\n  @", 3, 3),
        ("'\\u12'", 1, 2),
        ("is_empty x == 1", 1, 12),
        ("1 + not x", 1, 5),
    ],
)
def test_syntax_error_line_and_column(source: str, line: int, column: int) -> None:
    with pytest.raises(ExpressionSyntaxError) as info:
        parse_expression(source)
    err = info.value
    assert type(err) is ExpressionSyntaxError
    assert (err.line, err.column) == (line, column)
    assert str(err) == f"{err.reason} at {line}:{column}"


def test_unknown_function() -> None:
    with pytest.raises(UnknownFunctionError) as info:
        parse_expression("x and frobnicate(1)")
    assert info.value.name == "frobnicate"
    assert info.value.reason == "unknown function 'frobnicate'"
    assert (info.value.line, info.value.column) == (1, 7)
    with pytest.raises(UnknownFunctionError):
        parse_expression("x.frobnicate()")
    assert isinstance(info.value, ExpressionSyntaxError)


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("len()", "len() takes 1 argument"),
        ("len(a, b)", "len() takes 1 argument"),
        ("x.len(b)", "len() takes 1 argument"),
        ("if(a, b)", "if() takes 3 arguments"),
        ("round(1, 2, 3)", "round() takes 1 or 2 arguments"),
        ("coalesce()", "coalesce() takes at least 1 arguments"),
        ("now(1)", "now() takes 0 arguments"),
    ],
)
def test_function_arity(source: str, reason: str) -> None:
    with pytest.raises(FunctionArityError) as info:
        parse_expression(source)
    assert info.value.reason == reason


def test_function_names_are_case_insensitive() -> None:
    assert evaluate(parse_expression("LEN('ab')"), MappingScope()) == 2


def test_exists_requires_a_path() -> None:
    with pytest.raises(ExpressionSyntaxError):
        parse_expression("exists(1 + 2)")
    with pytest.raises(ExpressionSyntaxError):
        parse_expression("exists('a')")
    parse_expression("exists(a.b[0]['c'])")


def test_literal_invalid_regex_is_a_compile_error() -> None:
    with pytest.raises(InvalidRegexError) as info:
        parse_expression("x matches '(unclosed'")
    assert info.value.reason.startswith("invalid regex: ")
    assert (info.value.line, info.value.column) == (1, 11)
    with pytest.raises(InvalidRegexError):
        parse_expression(r"x matches '(a)\1'")  # RE2: no backreferences
    with pytest.raises(InvalidRegexError):
        parse_expression("x matches '(?=a)'")  # RE2: no look-around
    with pytest.raises(InvalidRegexError):
        parse_expression("x matches '" + "a" * 1025 + "'")
    # A non-literal pattern is checked at run time only.
    parse_expression("x matches pattern")


def test_source_size_limit() -> None:
    parse_expression("1" + " " * (8 * 1024 - 1))
    with pytest.raises(ExpressionSyntaxError):
        parse_expression("1" + " " * (8 * 1024))


def test_nesting_depth_limit() -> None:
    ok = "(" * MAX_DEPTH + "1" + ")" * MAX_DEPTH
    assert evaluate(parse_expression(ok), MappingScope()) == 1
    with pytest.raises(ExpressionSyntaxError) as info:
        parse_expression("(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1))
    assert "nested too deeply" in info.value.reason
    with pytest.raises(ExpressionSyntaxError):
        parse_expression("-" * (MAX_DEPTH + 1) + "1")
    with pytest.raises(ExpressionSyntaxError):
        parse_expression("not " * (MAX_DEPTH + 1) + "x")
    with pytest.raises(ExpressionSyntaxError):
        parse_expression("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))


def test_deep_but_allowed_expression_evaluates() -> None:
    source = "a"
    for _ in range(MAX_DEPTH):
        source = f"a or a and a == a + a * ({source})"
    assert evaluate(parse_expression(source), MappingScope({"a": 1})) is True


def test_numbers_out_of_range() -> None:
    with pytest.raises(ExpressionSyntaxError):
        parse_expression("1e999")
    with pytest.raises(ExpressionSyntaxError):
        parse_expression("9" * 5000)


def test_embedded_template_errors_surface_at_parse_time() -> None:
    with pytest.raises(ExpressionSyntaxError) as info:
        parse_expression("x == 'id-{{ a + }}'")
    assert (info.value.line, info.value.column) == (1, 6)
    with pytest.raises(UnknownFunctionError):
        parse_expression("'{{ nope(1) }}'")


def test_runtime_error_details() -> None:
    with pytest.raises(ExpressionError) as info:
        evaluate(parse_expression("count > 'abc'"), MappingScope({"count": 1}))
    assert info.value.details() == {
        "expression": "count > 'abc'",
        "position": 6,
        "reason": "cannot compare integer with string using '>'",
    }


def test_step_limit() -> None:
    items = list(range(60_000))
    expr = parse_expression("sum(xs) + sum(xs)")
    with pytest.raises(ExpressionError) as info:
        evaluate(expr, MappingScope({"xs": items}))
    assert "steps" in info.value.reason
