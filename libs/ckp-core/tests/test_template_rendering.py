"""Templates (ckp.md §5.1): whole-value vs embedded rendering, fallbacks, escapes, unresolved reporting."""

from typing import Any

import pytest

from ckp_core.expressions import ExpressionError, MappingScope, UnknownFunctionError
from ckp_core.templates import (
    TemplateSyntaxError,
    compile_template,
    format_embedded,
    has_placeholder,
    render,
    render_text,
    template_errors,
)

pytestmark = pytest.mark.unit

VARS: dict[str, Any] = {
    "count": 3,
    "post_id": 1,
    "score": 120.0,
    "tags": ["a", "b"],
    "obj": {"a": 1},
    "flag": True,
    "nothing": None,
    "region": "eu",
    "name": "Zoë",
}


def rend(value: Any, **extra: Any) -> Any:
    return render(compile_template(value), MappingScope(extra, VARS))


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{count}}", 3),
        ("{{post_id}}", 1),
        ("  {{ score }}  ", 120.0),
        ("{{tags}}", ["a", "b"]),
        ("{{obj}}", {"a": 1}),
        ("{{flag}}", True),
        ("{{missing}}", None),
        ("{{nothing}}", None),
        ("{{count + 1}}", 4),
        ("{{ missing | 5 }}", 5),
        ("{{ missing | default text }}", "default text"),
    ],
)
def test_whole_value_keeps_the_json_type(template: str, expected: Any) -> None:
    result = rend(template)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("eu-{{score}}", "eu-120.0"),
        ("{{region}}-{{score}}", "eu-120.0"),
        ("n={{count}}", "n=3"),
        ("{{flag}}!", "true!"),
        ("[{{nothing}}]", "[]"),
        ("[{{missing}}]", "[]"),
        ("t={{tags}}", 't=["a","b"]'),
        ("o={{obj}}", 'o={"a":1}'),
        ("{{name}} {{count}}", "Zoë 3"),
        ("x{{ missing | 'fb' }}", "xfb"),
        ("{{count}}{{count}}", "33"),
    ],
)
def test_embedded_formatting(template: str, expected: str) -> None:
    assert rend(template) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("s", "s"),
        (7, "7"),
        (120.0, "120.0"),
        (2.5, "2.5"),
        (1e-07, "1e-07"),
        (1e20, "1e+20"),
        (True, "true"),
        (False, "false"),
        (None, ""),
        ([1, "é"], '[1,"é"]'),
        ({"a": [1, None]}, '{"a":[1,null]}'),
    ],
)
def test_format_embedded(value: Any, expected: str) -> None:
    assert format_embedded(value) == expected


def test_worked_example_summary() -> None:
    value = {"total": "{{order_total}}", "label": "{{region}}-{{score}}"}
    assert rend(value, order_total=100) == {"total": 100, "label": "eu-120.0"}


def test_objects_and_arrays_render_recursively_and_keys_are_not_rendered() -> None:
    value = {"{{count}}": ["{{count}}", {"deep": "v{{count}}"}], "n": 5, "b": False, "z": None}
    assert rend(value) == {"{{count}}": [3, {"deep": "v3"}], "n": 5, "b": False, "z": None}


def test_escaped_braces_are_literal() -> None:
    assert rend("\\{{count}}") == "{{count}}"
    assert rend("a \\{{x}} {{count}}") == "a {{x}} 3"
    assert has_placeholder("\\{{x}}") is False
    assert has_placeholder("a {{x}}") is True
    assert has_placeholder("no braces") is False


def test_json_like_braces_around_placeholders() -> None:
    assert rend('{"a": {{count}}}') == '{"a": 3}'
    assert rend("{{{count}}}") == "{3}"


def test_single_pass_rendering() -> None:
    assert rend("{{v}}", v="{{count}}") == "{{count}}"
    assert rend("x {{v}}", v="{{count}}") == "x {{count}}"


def test_unresolved_reported_with_json_path() -> None:
    template = compile_template({"a": ["{{missing}}", "x{{obj.b}}"], "b": "{{tags[5]}}", "c": "{{count.x}}"})
    seen: list[tuple[str, str, str]] = []
    result = render(template, MappingScope(VARS), lambda *args: seen.append(args))
    assert result == {"a": [None, "x"], "b": None, "c": None}
    assert seen == [
        ("missing", "undefined", "/a/0"),
        ("obj", "missing_key", "/a/1"),
        ("tags", "index_out_of_range", "/b"),
        ("count", "not_a_container", "/c"),
    ]


def test_placeholders_paths_and_roots() -> None:
    template = compile_template({"a/b": {"c~d": ["x {{ one }} {{ two.x | 0 }}"]}, "e": "{{ sum(l, f) }}"})
    assert [p.path for p in template.placeholders] == ["/a~1b/c~0d/0", "/a~1b/c~0d/0", "/e"]
    assert template.referenced_roots == frozenset({"one", "two", "l"})
    second = template.placeholders[1]
    assert (second.fallback_set, second.fallback, second.raw) == (True, 0, "{{ two.x | 0 }}")
    assert second.expression.source == "two.x"
    assert compile_template("{{x}}").placeholders[0].path == ""


def test_non_string_templates_pass_through() -> None:
    values: list[Any] = [3, 2.5, True, None, [], {}]
    for value in values:
        template = compile_template(value)
        assert template.placeholders == ()
        assert render(template, MappingScope()) == value


def test_rendered_values_are_copies() -> None:
    data = {"xs": [1, 2]}
    result = render(compile_template("{{xs}}"), MappingScope(data))
    result.append(3)
    assert data["xs"] == [1, 2]


def test_syntax_errors() -> None:
    with pytest.raises(TemplateSyntaxError) as info:
        compile_template({"a": ["ok {{x}}", "bad {{ 1 + }}"]})
    err = info.value
    assert err.path == "/a/1"
    assert err.placeholder == "1 +"
    assert err.raw == "{{ 1 + }}"
    assert "unexpected" in err.reason
    with pytest.raises(TemplateSyntaxError):
        compile_template("{{ unterminated")
    with pytest.raises(TemplateSyntaxError) as info2:
        compile_template("{{ nope(1) }}")
    assert isinstance(info2.value.cause, UnknownFunctionError)


def test_template_errors_collects_all() -> None:
    errors = template_errors({"a": "{{ 1 + }} and {{ ( }}", "b": ["{{ ok }}", "{{ a b }}"]})
    assert [(e.path, e.placeholder) for e in errors] == [("/a", "1 +"), ("/a", "("), ("/b/1", "a b")]
    assert template_errors({"a": "{{fine}}"}) == []


def test_render_text_is_always_embedded() -> None:
    assert render_text(compile_template("{{count}}"), MappingScope(VARS)) == "3"
    assert render_text(compile_template(" {{tags}} "), MappingScope(VARS)) == ' ["a","b"] '
    assert render_text(compile_template("{{missing}}"), MappingScope(VARS)) == ""


def test_runtime_errors_propagate() -> None:
    with pytest.raises(ExpressionError):
        rend("x{{ 1 / 0 }}")


def test_string_literal_templates_inside_expressions() -> None:
    assert rend("{{ 'id-{{count}}' }}") == "id-3"
    assert rend("{{ 'n{{nothing | 0}}' + '!' }}") == "n0!"


def test_runtime_error_position_is_relative_to_the_placeholder_expression() -> None:
    template = compile_template("value: {{   a / 0 }}")
    assert template.placeholders[0].expression.source == "a / 0"
    with pytest.raises(ExpressionError) as info:
        render(template, MappingScope({"a": 1}))
    assert info.value.details() == {"expression": "a / 0", "position": 2, "reason": "division by zero"}
