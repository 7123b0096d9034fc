"""The compiler compiles each template string once per text and reuses it: the IR of every template still equals
what ckp_core.templates makes of the same value, and each use gets its own paths, reads and secret checks."""

from __future__ import annotations

from typing import Any

import pytest

from ckp_core.compiler import compile_document
from ckp_core.compiler.binding import template
from ckp_core.compiler.fields import Compilation
from ckp_core.templates import compile_template_checked, template_to_json

pytestmark = pytest.mark.unit

VALUES: list[Any] = [
    "{{a}}",
    "plain",
    "x {{a}} y {{ b.c | 'none' }} z",
    "\\{{escaped}} and {{a}}",
    "\\{{only escaped}}",
    {"m": "{{a}}", "n": ["{{a}}", 1, None, {"k/~": "{{ len(xs) }} items"}], "o": True},
    ["{{a}}", "{{a}}", ("{{b}}", "t")],
    {"deep": {"er": {"still": "{{ coalesce(x, [1, 'a']) }}"}}},
    "{{ x | [1, 2] }}",
]


@pytest.mark.parametrize("value", VALUES)
def test_template_ir_equals_the_template_module(value: Any) -> None:
    expected, errors = compile_template_checked(value)
    assert expected is not None
    assert not errors
    for _ in range(2):  # the second time from the caches
        ir = template(Compilation(), value, "/p")
        assert ir is not None
        assert ir.model_dump() == template_to_json(expected)


def test_bad_placeholders_are_reported_at_each_use() -> None:
    for path in ("/one", "/two"):
        c = Compilation()
        assert template(c, {"x": "{{ 1 + }}", "y": ["{{ ( }}"]}, path) is None
        assert [d.path for d in c.diags] == [f"{path}/x", f"{path}/y/0"]


def test_the_same_text_is_checked_where_it_is_used() -> None:
    text = "{{secrets.pw}} for {{user}}"
    nodes = {
        "a": {"type": "sequence", "agent": "WEB", "next_node": "b",
              "steps": [{"step_id": "s", "action": "login", "password": text}]},
        "b": {"type": "sequence", "next_node": "c", "steps": [{"step_id": "s", "action": "log", "message": text}]},
        "c": {"type": "terminate", "outputs": {"o": text}},
    }
    result = compile_document({"procedure_id": "p", "version": "1",
                               "variables_schema": {"user": {"type": "string"}},
                               "workflow_graph": {"start_node": "a", "nodes": nodes}})
    assert sorted((d.code, d.path) for d in result.diagnostics if d.severity == "error") == [
        ("secret_not_allowed", "/workflow_graph/nodes/b/steps/0/message"),
        ("secret_not_allowed", "/workflow_graph/nodes/c/outputs/o"),
    ]
    c = Compilation()
    ir = template(c, {"key": text, "value": text}, "/op", secrets=frozenset({"key"}))
    assert ir is None
    assert [(d.code, d.path) for d in c.diags] == [("secret_not_allowed", "/op/value")]
    c = Compilation()
    ir = template(c, {"key": text}, "/op", secrets=frozenset({"key"}))
    assert ir is not None
    assert [(use[0], use[1]) for use in c.secret_uses] == [("pw", "/op/key")]
    assert [(root, path) for root, path, _, _ in c.reads] == [("user", "/op/key")]
