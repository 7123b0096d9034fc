"""Acceptance tests of the expression language against ckp.md §5.3 (grammar) and §5.4 (evaluation).

Complements the focused unit tests next to this file: every precedence level is checked against its
neighbour with a case whose value *depends* on the grouping; short-circuiting and truthiness are checked for
every falsy/truthy kind; bare paths and ``{{…}}`` placeholders are compared on the same data; every operator
of the §5.4 table is checked with a ``null`` (explicit or undefined) on each side; and values that look like
operators, keywords or placeholders are shown to be plain data for a fixed parse.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from ckp_core.expressions import ExpressionError, MappingScope, evaluate, parse_expression
from ckp_core.templates import compile_template, render

pytestmark = pytest.mark.unit


def ev(source: str, **variables: Any) -> Any:
    return evaluate(parse_expression(source), MappingScope(variables))


def outcome(source: str, variables: dict[str, Any]) -> tuple[str, Any]:
    """``("value", v)`` or ``("error", reason)``: lets two evaluations be compared including failures."""
    try:
        return "value", evaluate(parse_expression(source), MappingScope(variables))
    except ExpressionError as exc:
        return "error", exc.reason


# ---------------------------------------------------------------------------------------------------------
# §5.3 precedence: or < and < not < comparison < additive < multiplicative < unary (< postfix)
# ---------------------------------------------------------------------------------------------------------

# (source, how the grammar groups it, the other grouping, expected value). The other grouping evaluates to a
# different value (or fails), so each row really pins the precedence of one pair of levels.
PRECEDENCE = [
    # or < and
    ("true or true and false", "true or (true and false)", "(true or true) and false", True),
    ("false and true or true", "(false and true) or true", "false and (true or true)", True),
    # and < not
    ("not false and false", "(not false) and false", "not (false and false)", False),
    ("not true or true", "(not true) or true", "not (true or true)", True),
    # not < comparison
    ("not 1 == 2", "not (1 == 2)", "(not 1) == 2", True),
    ("not 'a' in ['a', false]", "not ('a' in ['a', false])", "(not 'a') in ['a', false]", False),
    ("not x > 1", "not (x > 1)", "(not x) > 1", False),
    # comparison < additive
    ("1 + 1 == 2", "(1 + 1) == 2", "1 + (1 == 2)", True),
    ("2 == 1 + 1", "2 == (1 + 1)", "(2 == 1) + 1", True),
    ("'a' + 'b' in ['ab']", "('a' + 'b') in ['ab']", "'a' + ('b' in ['ab'])", True),
    ("is_empty s + t", "is_empty (s + t)", "(is_empty s) + t", True),
    # additive < multiplicative
    ("2 + 3 * 4", "2 + (3 * 4)", "(2 + 3) * 4", 14),
    ("10 - 6 / 2", "10 - (6 / 2)", "(10 - 6) / 2", 7.0),
    ("7 - 5 % 3", "7 - (5 % 3)", "(7 - 5) % 3", 5),
    # multiplicative < unary
    ("-3 % 5", "(-3) % 5", "-(3 % 5)", 2),
    ("-2 * -3 + 1", "((-2) * (-3)) + 1", "-(2 * -(3 + 1))", 7),
    # unary < postfix (member, index)
    ("-xs[0] + 10", "(-(xs[0])) + 10", "-(xs[0] + 10)", 7),
    # left associativity of the binary levels
    ("10 - 4 - 3", "(10 - 4) - 3", "10 - (4 - 3)", 3),
    ("64 / 8 / 2", "(64 / 8) / 2", "64 / (8 / 2)", 4.0),
    ("2 * 5 % 3", "(2 * 5) % 3", "2 * (5 % 3)", 1),
]


@pytest.mark.parametrize(("source", "grouped", "other", "expected"), PRECEDENCE)
def test_precedence_ladder(source: str, grouped: str, other: str, expected: Any) -> None:
    variables: dict[str, Any] = {"x": 5, "xs": [3], "s": "", "t": ""}
    assert outcome(source, variables) == ("value", expected)
    assert outcome(grouped, variables) == ("value", expected)
    assert outcome(other, variables) != ("value", expected)


@pytest.mark.parametrize(
    "source",
    ["a or b and c", "not a and b", "a == b or c", "a + b * c == d", "not a in b", "-a * b", "a.b[0] + c"],
)
def test_redundant_parentheses_do_not_change_the_value(source: str) -> None:
    variables: dict[str, Any] = {"a": 2, "b": 3, "c": 4, "d": 14}
    assert outcome(f"({source})", variables) == outcome(source, variables)
    assert outcome(f"{{{{ {source} }}}}", variables) == outcome(source, variables)


# ---------------------------------------------------------------------------------------------------------
# §5.4 and / or / not: short-circuit and truthiness
# ---------------------------------------------------------------------------------------------------------

FALSY: list[Any] = [None, False, 0, 0.0, "", [], {}]
TRUTHY: list[Any] = [True, 1, -1, 0.5, "false", "0", " ", "null", [0], [None], {"a": None}]
BOOM = "1 / 0 > 0"  # evaluating this raises expression_error


@pytest.mark.parametrize("value", FALSY, ids=repr)
def test_falsy_values(value: Any) -> None:
    assert ev("not v", v=value) is True
    assert ev("v or false", v=value) is False
    assert ev(f"v and {BOOM}", v=value) is False  # the right side is never evaluated
    assert ev("if(v, 'yes', 'no')", v=value) == "no"
    with pytest.raises(ExpressionError):
        ev(f"v or {BOOM}", v=value)


@pytest.mark.parametrize("value", TRUTHY, ids=repr)
def test_truthy_values(value: Any) -> None:
    assert ev("not v", v=value) is False
    assert ev("v and true", v=value) is True
    assert ev(f"v or {BOOM}", v=value) is True  # the right side is never evaluated
    assert ev("if(v, 'yes', 'no')", v=value) == "yes"
    with pytest.raises(ExpressionError):
        ev(f"v and {BOOM}", v=value)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("'x' and [1]", True),  # and/or yield booleans, never an operand
        ("0 or ''", False),
        ("a or b", True),
        ("a and b", False),
        ("false or false or 'z'", True),
        ("true and true and 0", False),
        (f"false and {BOOM} or true", True),
        (f"true or {BOOM} and {BOOM}", True),
        (f"(false and {BOOM}) or (true or {BOOM})", True),
        ("not not 'x'", True),
        ("not not ''", False),
        ("not missing", True),
        (f"missing and {BOOM}", False),
    ],
)
def test_boolean_operators(source: str, expected: bool) -> None:
    assert ev(source, a="", b=[0]) is expected


def test_short_circuit_skips_unresolved_reports() -> None:
    reported: list[tuple[str, str]] = []
    expr = parse_expression("flag or missing.deep")
    assert evaluate(expr, MappingScope({"flag": True}), lambda root, why: reported.append((root, why))) is True
    assert reported == []
    assert evaluate(expr, MappingScope({"flag": False}), lambda root, why: reported.append((root, why))) is False
    assert reported == [("missing", "undefined")]


# ---------------------------------------------------------------------------------------------------------
# §5.3 bare paths and {{…}} placeholders are the same expression
# ---------------------------------------------------------------------------------------------------------

EQUIVALENT = [
    ("amount > 0", "{{amount}} > 0"),
    ("amount > 0", "{{ amount }} > 0"),
    ("amount * 2 + 1", "{{amount}} * 2 + 1"),
    ("amount * 2 + 1", "{{ amount * 2 }} + 1"),
    ("-amount", "-{{amount}}"),
    ("order.lines[0].qty >= amount", "{{order.lines[0].qty}} >= {{amount}}"),
    ("order.lines.length == 2", "{{order.lines.length}} == 2"),
    ("name starts_with 'a'", "{{name}} starts_with 'a'"),
    ("tags contains 'x'", "{{tags}} contains 'x'"),
    ("'x' in tags", "'x' in {{tags}}"),
    ("is_empty amount", "is_empty {{amount}}"),
    ("not amount", "not {{amount}}"),
    ("amount and name", "{{amount}} and {{name}}"),
    ("len(tags)", "len({{tags}})"),
    ("coalesce(amount, 5)", "coalesce({{amount}}, 5)"),
    ("name.upper()", "{{name}}.upper()"),
]

SCOPES: list[dict[str, Any]] = [
    {"amount": 5, "name": "alice", "tags": ["x"], "order": {"lines": [{"qty": 7}, {"qty": 1}]}},
    {"amount": 0, "name": "", "tags": [], "order": {"lines": []}},
    {"amount": -2.5, "name": "bob", "tags": ["y", "x"], "order": {"lines": [{"qty": -3}]}},
    {"amount": "7", "name": "a", "tags": ["x"], "order": {}},  # numeric string
    {"amount": None, "name": None, "tags": None, "order": None},
    {},  # everything undefined
    {"amount": "abc", "name": 3, "tags": "xyz", "order": {"lines": "no"}},  # wrong types: both must fail alike
]


@pytest.mark.parametrize(("bare", "placeholder"), EQUIVALENT)
@pytest.mark.parametrize("scope", SCOPES, ids=lambda s: ",".join(f"{k}={v!r}" for k, v in s.items())[:40] or "empty")
def test_bare_path_and_placeholder_agree(bare: str, placeholder: str, scope: dict[str, Any]) -> None:
    assert outcome(bare, scope) == outcome(placeholder, scope)
    assert parse_expression(bare).referenced_roots == parse_expression(placeholder).referenced_roots


@pytest.mark.parametrize(
    ("source", "scope", "expected"),
    [
        ("{{amount | 10}} > 5", {}, True),  # the bare `amount > 5` is false here (null comparison)
        ("{{amount | 10}} > 5", {"amount": None}, True),
        ("{{amount | 10}} > 5", {"amount": 1}, False),  # fallback only replaces null
        ("{{amount | 10}} > 5", {"amount": 0}, False),
        ("{{ order.total | 0 }} + 1", {"order": {}}, 1),
        ("{{ order.total | 0 }} + 1", {"order": {"total": 41}}, 42),
        ("{{ name | 'anon' }} == 'anon'", {}, True),
        ("{{ name | anon }} == 'anon'", {}, True),  # bare text fallback is a trimmed string
        ("{{ name | 'anon' }} == 'anon'", {"name": ""}, False),
        ("{{ tags | [] }} contains 'x'", {}, False),
        ('len({{ tags | ["a", "b"] }})', {}, 2),
        ("{{ flag | true }} and {{ other | false }}", {}, False),
        ("{{ flag | true }} or {{ other | false }}", {}, True),
        ("{{ a | 1 }} + {{ b | 2 }} * {{ c | 3 }}", {}, 7),  # each placeholder is a parenthesised operand
        ("{{ a + b | 100 }} * 2", {"a": 1}, 200),  # `a + null` is null, so the fallback applies
    ],
)
def test_placeholder_fallbacks(source: str, scope: dict[str, Any], expected: Any) -> None:
    assert ev(source, **scope) == expected


def test_fallback_differs_from_bare_path_only_when_null() -> None:
    with_fallback = parse_expression("{{amount | 10}} > 5")
    bare = parse_expression("amount > 5")
    for value in (None, 1, 6, 0, -1, 5.5):
        got = evaluate(with_fallback, MappingScope({"amount": value}))
        assert got == evaluate(bare, MappingScope({"amount": 10 if value is None else value}))
    assert evaluate(bare, MappingScope({})) is False
    assert evaluate(with_fallback, MappingScope({})) is True


# ---------------------------------------------------------------------------------------------------------
# §5.4 null handling, operator by operator, with null on either side
# ---------------------------------------------------------------------------------------------------------

# `n` is null. Every case is evaluated twice: with n = null and with n undefined; the results must agree.
NULL_TABLE = [
    # ==, != : deep equality, null == null only
    ("n == null", True), ("null == n", True), ("n == n", True), ("n == 0", False), ("0 == n", False),
    ("n == ''", False), ("n == false", False), ("n == []", False), ("n == 'null'", False),
    ("n != null", False), ("n != 0", True), ("'' != n", True), ("[n] == [null]", True), ("[n] == []", False),
    # ordering: a null operand is false (not an error)
    ("n < 1", False), ("n <= 1", False), ("n > 1", False), ("n >= 1", False),
    ("1 < n", False), ("1 <= n", False), ("1 > n", False), ("1 >= n", False),
    ("'a' < n", False), ("n >= 'a'", False), ("n <= n", False), ("n >= null", False),
    # + : null operand -> null (whatever the other side's type)
    ("n + 1", None), ("1 + n", None), ("n + 'a'", None), ("'a' + n", None), ("n + [1]", None),
    ("[1] + n", None), ("n + n", None), ("n + 1 + 2", None), ("1 + 2 + n", None),
    # - * / % : null operand -> null (even when the other side is zero)
    ("n - 1", None), ("1 - n", None), ("n * 2", None), ("2 * n", None), ("n / 2", None), ("2 / n", None),
    ("n / 0", None), ("0 / n", None), ("n % 2", None), ("2 % n", None), ("n % 0", None), ("0 % n", None),
    # unary minus
    ("-n", None), ("- -n", None),
    # in / not in / not_in: null container -> false (not in -> true); null element -> membership with ==
    ("1 in n", False), ("'a' in n", False), ("1 not in n", True), ("1 not_in n", True),
    ("n in [null]", True), ("n in [1, 2]", False), ("n not in [null]", False), ("n in [[], '', 0]", False),
    # contains / not_contains: mirror of in
    ("n contains 1", False), ("n not_contains 1", True), ("[null] contains n", True),
    ("[0, ''] contains n", False), ("[1] not_contains n", True),
    # starts_with / ends_with: null -> false
    ("n starts_with 'a'", False), ("'abc' starts_with n", False), ("n ends_with 'a'", False),
    ("'abc' ends_with n", False), ("n starts_with n", False),
    # matches: non-string left -> false; a null pattern -> false
    ("n matches 'a'", False), ("n matches '.*'", False), ("'abc' matches n", False),
    # is_empty / is_not_empty
    ("is_empty n", True), ("is_not_empty n", False), ("is_empty n + 'x'", True),
    # and / or / not by truthiness
    ("n and true", False), ("true and n", False), ("n or true", True), ("n or n", False), ("not n", True),
    ("not n == null", False),
]


@pytest.mark.parametrize(("source", "expected"), NULL_TABLE)
def test_null_operands(source: str, expected: Any) -> None:
    explicit = ev(source, n=None)
    assert explicit == expected
    assert type(explicit) is type(expected)
    assert ev(source) == explicit  # n undefined behaves like n = null


@pytest.mark.parametrize(
    "source",
    ["n + 1", "n < 1", "n in xs", "n contains 1", "n starts_with 'a'", "n matches 'a'", "is_empty n", "-n"],
)
def test_undefined_operand_is_reported_but_not_an_error(source: str) -> None:
    reported: list[tuple[str, str]] = []
    evaluate(parse_expression(source), MappingScope({"xs": [1]}), lambda root, why: reported.append((root, why)))
    assert reported == [("n", "undefined")]
    reported.clear()
    evaluate(parse_expression(source), MappingScope({"n": None, "xs": [1]}), lambda r, w: reported.append((r, w)))
    assert reported == []  # a variable holding null is resolved


# ---------------------------------------------------------------------------------------------------------
# Values that look like syntax never change the parse (§5.3: values are never pasted into expression text)
# ---------------------------------------------------------------------------------------------------------

SYNTAX_LIKE = [
    "x and y", "a contains b", "1 == 1", "{{evil}}", "not", "not true", "true", "false", "null", "0", "",
    "or", "' or '1' == '1", '" or "1" == "1', "x') or ('1' == '1", "}}", "{{", "{{ evil | 1 }}", "\\{{evil}}",
    "len(xs)", "evil.secret", "secrets.api_key", "[1, 2]", "(", ")", "x and y ", " x and y", "X AND Y",
    "x\nand y", "ünï and cödé", "1e400", "-", "is_empty", "__class__",
]


@pytest.mark.parametrize("value", SYNTAX_LIKE)
def test_equality_with_an_operator_like_literal_is_exact(value: str) -> None:
    expr = parse_expression("name == 'x and y'")
    assert evaluate(expr, MappingScope({"name": value, "x": True, "y": True, "evil": "x and y"})) is (
        value == "x and y"
    )


@pytest.mark.parametrize("value", SYNTAX_LIKE)
def test_syntax_like_values_are_ordinary_strings(value: str) -> None:
    data = {"v": value, "evil": "EVIL", "x": True, "y": False, "xs": [1, 2, 3], "secrets": {"api_key": "k"}}
    reported: list[tuple[str, str]] = []

    def run(source: str) -> Any:
        return evaluate(parse_expression(source), MappingScope(data), lambda r, w: reported.append((r, w)))

    assert run("v") == value
    assert run("v + ''") == value
    assert run("'<' + v + '>'") == f"<{value}>"
    assert run("[v][0] == v") is True
    assert run("v in [v]") is True
    assert run("v == 'EVIL'") is False
    assert run("not v") is (value == "")  # any non-empty string is truthy, "false" and "not" included
    assert run("v and true") is (value != "")
    assert run("upper(v)") == value.upper()
    assert run("json(v)") == json.dumps(value, ensure_ascii=False)
    assert run("v starts_with v") is True
    assert run("is_empty v") is (value == "")
    assert reported == []  # nothing inside the value was resolved as a name


@pytest.mark.parametrize("value", SYNTAX_LIKE)
def test_one_parse_serves_every_value(value: str) -> None:
    expr = parse_expression("a contains b or a == b")
    before = (expr.source, expr.ast, expr.referenced_roots)
    got = evaluate(expr, MappingScope({"a": value, "b": value, "evil": 1}))
    assert got is True
    assert evaluate(expr, MappingScope({"a": value, "b": value + "!"})) is False
    assert (expr.source, expr.ast, expr.referenced_roots) == before
    assert expr.referenced_roots == frozenset({"a", "b"})


@pytest.mark.parametrize(
    ("key", "expected"),
    [("a.b", "dotted key"), ("a", {"b": "nested"}), ("a['b']", "brackets"), ("0", None), ("x or y", "spaced")],
)
def test_bracket_keys_from_data_are_not_paths(key: str, expected: Any) -> None:
    obj = {"a.b": "dotted key", "a": {"b": "nested"}, "a['b']": "brackets", "x or y": "spaced"}
    assert ev("o[k]", o=obj, k=key) == expected


@pytest.mark.parametrize("value", SYNTAX_LIKE)
def test_templates_do_not_render_inserted_values(value: str) -> None:
    scope = MappingScope({"v": value, "nested": {"k": [value]}})
    reported: list[tuple[str, str, str]] = []

    def run(template: Any) -> Any:
        return render(compile_template(template), scope, lambda *a: reported.append(a))

    assert run("{{v}}") == value
    assert run("pre {{v}} post") == f"pre {value} post"
    assert run({"a": ["{{v}}", "{{ v }}!"]}) == {"a": [value, f"{value}!"]}
    assert run("{{nested}}") == {"k": [value]}
    assert run("{{ 'lit-{{v}}' }}") == f"lit-{value}"  # a string-literal template inside an expression
    assert run("{{ coalesce(missing, v) }}") == value
    assert reported == [("missing", "undefined", "")]  # `evil` etc. inside the value were never looked up


def test_rendered_output_rendered_again_is_still_data() -> None:
    scope = MappingScope({"v": "{{evil}}", "evil": "EVIL"})
    once = render(compile_template("x={{v}}"), scope)
    assert once == "x={{evil}}"
    # Only an explicit second compilation of the *output* would read `evil`; the renderer never does.
    assert render(compile_template(once), scope) == "x=EVIL"


def test_operator_like_data_in_lists_and_objects() -> None:
    data = {"xs": ["a or b", "1 == 1", "{{evil}}"], "o": {"not": 1, "and": 2, "{{evil}}": 3}}
    assert ev("'1 == 1' in xs", **data) is True
    assert ev("'1' in xs", **data) is False
    # A literal in the expression *source* is a template; the data string "{{evil}}" in xs is not.
    assert ev("'{{evil}}' in xs", evil="zzz", **data) is False
    assert ev("'{{evil}}' in xs", evil="a or b", **data) is True
    assert ev("xs contains x", x="{{evil}}", **data) is True
    assert ev("'not' in o and 'and' in o", **data) is True
    assert ev("o['and'] + o['not']", **data) == 3
    assert ev("keys(o)", **data) == ["not", "and", "{{evil}}"]
