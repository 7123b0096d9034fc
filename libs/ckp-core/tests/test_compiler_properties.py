"""Property tests: the compiler turns any input into diagnostics, never into an exception (ckp.md §6.1, §6.3).

Inputs are (a) random JSON values and random document-shaped objects and (b) mutated copies of the real
documents in ``examples/`` and ``examples/rejected/``. For every input:

* ``compile_document`` / ``compile_text`` return normally (no exception of any kind);
* ``.ir`` is ``None`` exactly when there is an error diagnostic, and ``.ok`` / ``.errors`` agree;
* every diagnostic path is a well-formed JSON Pointer (RFC 6901: "" or ``/``-separated tokens in which ``~`` is
  only used as ``~0`` / ``~1``);
* an IR serialises with ``model_dump_json`` and validates back to an equal IR.

Only the stable entry points are used: ``compile_document``, ``compile_text`` and the result's ``diagnostics``,
``ir``, ``ok`` and ``errors``. The ``test_regression_*`` functions pin inputs the properties found.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckp_core.compiler import compile_document, compile_text, content_hash
from ckp_core.compiler.document import MAX_NESTING

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.ckp.json")) + sorted((EXAMPLES / "rejected").glob("*.json"))
EXAMPLE_TEXTS: dict[str, str] = {p.name: p.read_text(encoding="utf-8") for p in EXAMPLE_FILES}
EXAMPLE_DOCS: dict[str, Any] = {name: json.loads(text) for name, text in EXAMPLE_TEXTS.items()}
# The two examples the compiler accepts today are listed twice so mutations reach the IR path more often.
COMPILING = ("minimal_greeting.ckp.json", "internal_variables.ckp.json")
EXAMPLE_CHOICES = sorted(EXAMPLE_DOCS) + [n for n in COMPILING if n in EXAMPLE_DOCS]

POINTER_RE = re.compile(r"(/([^/~]|~[01])*)*")

SETTINGS = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def check_result(result: Any) -> None:
    """The properties every compile result must have."""
    diagnostics = list(result.diagnostics)
    errors = [d for d in diagnostics if d.severity == "error"]
    assert all(d.severity in ("error", "warning", "info") for d in diagnostics)
    assert (result.ir is None) == bool(errors), [(d.code, d.path) for d in errors]
    assert result.ok == (result.ir is not None)
    assert list(result.errors) == errors
    for d in diagnostics:
        assert isinstance(d.code, str)
        assert d.code
        assert isinstance(d.message, str)
        assert isinstance(d.path, str)
        assert POINTER_RE.fullmatch(d.path), f"{d.code}: {d.path!r} is not a JSON Pointer"
    if result.ir is not None:
        ir_type = type(result.ir)
        text = result.ir.model_dump_json()
        assert ir_type.model_validate_json(text) == result.ir
        aliased = result.ir.model_dump_json(by_alias=True)
        assert ir_type.model_validate_json(aliased) == result.ir


# ---------------------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------------------

NASTY_FRAGMENTS = [
    "{{", "}}", "{{ ", " }}", "\\{{", "|", "{{x}}", "{{ a | 1 }}", "{{evil}}", "{{ 1 + }}", "{{ (", "{{{{x}}}}",
    "{{ 'a{{b}}' }}", " and ", " or ", "not ", " == ", " != ", " < ", " >= ", " in ", " not in ", " contains ",
    " matches ", "'(' ", "'", '"', "\\", "\\u00e9", "(", ")", "[", "]", ".", ",", "+", "-", "*", "/", "%",
    "amount", "post_id", "api_response.id", "secrets.key", "len(", "nope(", "coalesce(", "is_empty ", "null",
    "true", "1e400", "9" * 40, "é", "Zoë", "日本", "🙂", "\u200b", "\x00", "\ud800", "\n", "\t", "~", "~1", "/",
    "a~b", "__proto__", "constructor",
]
nasty_strings = st.one_of(
    st.sampled_from(NASTY_FRAGMENTS),
    st.lists(st.sampled_from(NASTY_FRAGMENTS), min_size=1, max_size=8).map("".join),
    st.text(max_size=20),
)
HUGE_NUMBERS: list[int | float] = [
    2**31, -(2**31) - 1, 2**53 + 1, 2**63, -(2**63) - 1, 2**64, 10**30, -(10**30), 10**4000, -(10**4000),
    1.7976931348623157e308, -1.7976931348623157e308, 5e-324, 1e-300, -0.0, 0.1, 1e20,
]
json_scalars: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(HUGE_NUMBERS),
    st.floats(allow_nan=False, allow_infinity=False),
    nasty_strings,
)
json_keys = st.one_of(nasty_strings, st.sampled_from(["type", "steps", "next_node", "_comment", "value", ""]))
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(json_keys, children, max_size=4),
    max_leaves=12,
)

KINDS = ("null", "boolean", "integer", "number", "string", "array", "object")
VALUES_OF_KIND: dict[str, st.SearchStrategy[Any]] = {
    "null": st.none(),
    "boolean": st.booleans(),
    "integer": st.integers() | st.sampled_from([h for h in HUGE_NUMBERS if isinstance(h, int)]),
    "number": st.floats(allow_nan=False, allow_infinity=False),
    "string": nasty_strings,
    "array": st.lists(json_values, max_size=3),
    "object": st.dictionaries(json_keys, json_values, max_size=3),
}


def kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


IDS = ["start", "end", "a", "b", "check", "n-1", "_hidden", "1bad", "", "a b", "a~b", "a/b", "ü", "x" * 130]
node_ids = st.sampled_from(IDS) | nasty_strings
EXPRESSIONS = [
    "amount > 0", "{{amount}} > 0", "{{ amount | 0 }} >= 1", "a and (b or not c)", "not not x", "x in [1, 2]",
    "name == 'x and y'", "'{{evil}}' == v", "len(xs) > 2", "nope(1)", "len(1, 2)", "x matches '('",
    "x matches '(a)\\\\1'", "1 < 2 < 3", "{{ 1 + }}", "secrets.api_key == 'x'", "a.b[0].c", "", "(((", "TRUE",
]
expressions = st.sampled_from(EXPRESSIONS) | nasty_strings | json_values
actions = st.sampled_from(
    ["log", "set_variable", "wait", "calculate", "parse_json", "screenshot", "navigate", "restore_checkpoint", ""]
) | json_values
steps = st.fixed_dictionaries(
    {"step_id": node_ids, "action": actions},
    optional={
        "message": nasty_strings | json_values,
        "value": json_values,
        "variable": st.sampled_from(["out", "a.b", "a..b", "run_id", "1x", "vars"]) | json_values,
        "level": st.sampled_from(["info", "DEBUG", "loud", "{{lvl}}"]) | json_values,
        "duration_ms": st.integers() | nasty_strings | json_values,
        "output_variable": st.sampled_from(["out", "run_id", "bad name"]) | json_values,
        "params": st.dictionaries(json_keys, json_values, max_size=3) | json_values,
        "timeout_ms": st.integers() | json_values,
        "retry_config": json_values,
        "_note": json_values,
    },
)
rules = st.fixed_dictionaries({}, optional={"condition": expressions, "next_node": node_ids | json_values,
                                            "extra": json_values})
nodes = st.fixed_dictionaries(
    {"type": st.sampled_from(["sequence", "logic", "terminate", "loop", "parallel", "human_approval", "nope"])
     | json_values},
    optional={
        "description": nasty_strings | json_values,
        "agent": st.sampled_from(["MasterAgent", "masteragent", "WEB", ""]) | json_values,
        "next_node": node_ids | json_values,
        "steps": st.lists(steps, max_size=3) | json_values,
        "rules": st.lists(rules, max_size=3) | json_values,
        "default_next_node": node_ids | json_values,
        "status": st.sampled_from(["success", "failure", "failed", "ok"]) | json_values,
        "outputs": st.dictionaries(json_keys, nasty_strings | json_values, max_size=3) | json_values,
        "is_checkpoint": json_values,
        "error_handlers": json_values,
        "iterator": expressions,
    },
)
variable_specs = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["string", "number", "integer", "boolean", "array", "object", "date"])
        | json_values,
        "required": json_values,
        "default": nasty_strings | json_values,
        "validation": st.fixed_dictionaries({}, optional={"regex": nasty_strings, "min": json_values,
                                                          "max": json_values, "allowed_values": json_values})
        | json_values,
        "sensitive": json_values,
    },
)
documents = st.fixed_dictionaries(
    {
        "procedure_id": st.sampled_from(["p", "invoice-flow", "bad id", ""]) | json_values,
        "version": st.sampled_from(["1.0.0", "latest", "v 1"]) | json_values,
        "workflow_graph": st.fixed_dictionaries(
            {"start_node": node_ids | json_values, "nodes": st.dictionaries(node_ids, nodes, max_size=4)},
            optional={"extra": json_values},
        )
        | json_values,
    },
    optional={
        "name": json_values,
        "status": st.sampled_from(["draft", "weird"]) | json_values,
        "effective_date": st.sampled_from(["2024-01-01", "2024-13-01", "20240101"]) | json_values,
        "global_config": st.dictionaries(
            st.sampled_from(["max_hops", "logging_level", "checkpoint_strategy", "execution_mode", "on_failure",
                             "audit_config", "max_retries", "unknown"]),
            json_values,
            max_size=4,
        )
        | json_values,
        "variables_schema": st.dictionaries(node_ids, variable_specs | json_values, max_size=3)
        | st.fixed_dictionaries({}, optional={"required": st.dictionaries(node_ids, variable_specs, max_size=2),
                                              "optional": json_values})
        | json_values,
        "trigger": json_values,
        "nodes": json_values,
        "entry": json_values,
    },
)


# ---------------------------------------------------------------------------------------------------------
# Mutations of the example documents
# ---------------------------------------------------------------------------------------------------------

Path_ = tuple[str | int, ...]


def all_paths(value: Any, prefix: Path_ = ()) -> list[Path_]:
    """Every location inside a JSON value (the root excluded), parents before children."""
    out: list[Path_] = []
    children: list[tuple[str | int, Any]] = []
    if isinstance(value, dict):
        children = list(value.items())
    elif isinstance(value, list):
        children = list(enumerate(value))
    for key, child in children:
        out.append((*prefix, key))
        out.extend(all_paths(child, (*prefix, key)))
    return out


def get_at(doc: Any, path: Path_) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def set_at(doc: Any, path: Path_, value: Any) -> Any:
    if not path:
        return value
    get_at(doc, path[:-1])[path[-1]] = value
    return doc


def delete_at(doc: Any, path: Path_) -> None:
    parent = get_at(doc, path[:-1])
    if isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent.pop(path[-1])


def graph_nodes(doc: Any) -> dict[str, Any] | None:
    wg = doc.get("workflow_graph") if isinstance(doc, dict) else None
    nodes_ = wg.get("nodes") if isinstance(wg, dict) else None
    return nodes_ if isinstance(nodes_, dict) and nodes_ else None


def wrap(value: Any, depth: int, as_object: bool) -> Any:
    for _ in range(depth):
        value = {"k": value} if as_object else [value]
    return value


MUTATIONS = ("delete", "retype", "null", "string", "retext", "huge", "nest", "rename_node", "duplicate_node",
             "duplicate_step_id", "retarget", "add_key")


def mutate(data: st.DataObject, doc: Any) -> Any:
    """Apply one random mutation to ``doc`` (in place where possible) and return the document."""
    op = data.draw(st.sampled_from(MUTATIONS), label="mutation")
    paths = all_paths(doc)
    nodes_ = graph_nodes(doc)
    if op in ("rename_node", "duplicate_node", "retarget") and nodes_ is not None:
        node_id = data.draw(st.sampled_from(sorted(nodes_)), label="node")
        new_id = data.draw(st.sampled_from(sorted(nodes_)) | node_ids, label="new id")
        if op == "rename_node":  # edges keep naming the old id; renaming onto an existing id overwrites it
            nodes_[new_id] = nodes_.pop(node_id)
        elif op == "duplicate_node":
            nodes_[new_id] = copy.deepcopy(nodes_[node_id])
        else:  # point some edge field (or the start node) at another, possibly missing, node
            field = data.draw(st.sampled_from(["next_node", "default_next_node", "start_node"]), label="edge")
            if field == "start_node":
                doc["workflow_graph"]["start_node"] = new_id
            elif isinstance(nodes_[node_id], dict):
                nodes_[node_id][field] = new_id
        return doc
    if op == "duplicate_step_id":
        step_lists = [p for p in paths if p and p[-1] == "steps" and isinstance(get_at(doc, p), list)]
        if step_lists:
            found = get_at(doc, data.draw(st.sampled_from(step_lists), label="steps"))
            if found and isinstance(found[0], dict):
                found.append(copy.deepcopy(found[0]))
                return doc
    if op == "retext":  # keep the shape, change the text: most likely to reach the IR
        strings = [p for p in paths if isinstance(get_at(doc, p), str)]
        if strings:
            return set_at(doc, data.draw(st.sampled_from(strings), label="path"), data.draw(nasty_strings))
    if not paths:
        return data.draw(json_values, label="whole document")
    path = data.draw(st.sampled_from(paths), label="path")
    old = get_at(doc, path)
    if op == "delete":
        delete_at(doc, path)
    elif op == "retype":
        kind = data.draw(st.sampled_from([k for k in KINDS if k != kind_of(old)]), label="kind")
        doc = set_at(doc, path, data.draw(VALUES_OF_KIND[kind], label="value"))
    elif op == "null":
        doc = set_at(doc, path, None)
    elif op == "string":
        doc = set_at(doc, path, data.draw(nasty_strings, label="string"))
    elif op == "huge":
        doc = set_at(doc, path, data.draw(st.sampled_from(HUGE_NUMBERS), label="number"))
    elif op == "nest":
        depth = data.draw(st.sampled_from([1, 2, 8, 40, 120, 300]), label="depth")
        doc = set_at(doc, path, wrap(old, depth, data.draw(st.booleans(), label="as object")))
    else:  # add_key: a new key (often a comment, an alias or garbage) next to an existing value
        target = old if isinstance(old, dict) else get_at(doc, path[:-1])
        if isinstance(target, dict):
            target[data.draw(json_keys, label="key")] = data.draw(json_values, label="value")
    return doc


@st.composite
def valid_documents(draw: st.DrawFn) -> dict[str, Any]:
    """Documents of node types and operations the compiler supports today, with random free values.

    Their structure is right, so most of them compile and their IR is checked; the free values (messages,
    set_variable values, outputs, conditions, descriptions) are drawn from the random JSON and string pools.
    """
    deep = st.builds(wrap, json_scalars, st.sampled_from([20, 100, 300]), st.booleans())
    free = nasty_strings | json_values | deep
    count = draw(st.integers(1, 4), label="sequence nodes")
    nodes_: dict[str, Any] = {}
    for i in range(count):
        step_list = []
        for j in range(draw(st.integers(0, 3), label="steps")):
            if draw(st.booleans(), label="log?"):
                step_list.append({"step_id": f"s{j}", "action": "log", "message": draw(free, label="message")})
            else:
                step_list.append({"step_id": f"s{j}", "action": "set_variable", "variable": f"v{j}",
                                  "value": draw(free, label="value")})
        nodes_[f"n{i}"] = {"type": "sequence", "description": draw(nasty_strings, label="description"),
                           "steps": step_list, "next_node": f"n{i + 1}" if i + 1 < count else "route"}
    nodes_["route"] = {
        "type": "logic",
        "rules": [{"condition": draw(st.sampled_from(EXPRESSIONS) | nasty_strings, label="condition"),
                   "next_node": "done"}],
        "default_next_node": "done",
    }
    nodes_["done"] = {"type": "terminate", "status": draw(st.sampled_from(["success", "failed", "failure"])),
                      "outputs": draw(st.dictionaries(json_keys, free, max_size=3), label="outputs")}
    return {"procedure_id": "prop-test", "version": "1.0.0", "name": draw(nasty_strings, label="name"),
            "variables_schema": {"amount": {"type": "number", "default": 1}},
            "workflow_graph": {"start_node": "n0", "nodes": nodes_}}


@st.composite
def mutated_examples(draw: st.DrawFn) -> tuple[str, Any]:
    name = draw(st.sampled_from(EXAMPLE_CHOICES), label="example")
    doc = copy.deepcopy(EXAMPLE_DOCS[name])
    data = draw(st.data())
    for _ in range(draw(st.integers(1, 4), label="mutations")):
        doc = mutate(data, doc)
    return name, doc


# Raw JSON tokens spliced into example texts: values json.loads accepts but Python cannot represent exactly
# (1e400 is infinity), lone surrogate escapes, deep nesting, numbers at the digit limit, broken syntax.
RAW_TOKENS = [
    "1e400", "-1e400", "1e-400", "-0", "0.0", "9" * 4300, "9" * 4301, '"\\ud800"', '"\\udfff\\ud83d"',
    '"\\u0000"', '"{{x}}"', '"{{ 1 + }}"', "null", "true", "[]", "{}", "[" * 50 + "]" * 50,
    '{"a":' * 50 + "1" + "}" * 50, "[" * 2000 + "]" * 2000, "", ",", "}", "{", '"', "NaN", "Infinity",
]


@st.composite
def mutated_example_texts(draw: st.DrawFn) -> str | bytes:
    name = draw(st.sampled_from(EXAMPLE_CHOICES), label="example")
    text = EXAMPLE_TEXTS[name]
    how = draw(st.sampled_from(["splice_value", "truncate", "insert", "bytes"]), label="how")
    if how == "splice_value":  # replace one value after a colon by a raw token
        colons = [m.end() for m in re.finditer(r":\s*", text)]
        start = draw(st.sampled_from(colons), label="at")
        end_match = re.compile(r'"(?:[^"\\]|\\.)*"|-?[0-9][0-9.eE+-]*|true|false|null').match(text, start)
        end = end_match.end() if end_match else start
        return text[:start] + draw(st.sampled_from(RAW_TOKENS), label="token") + text[end:]
    if how == "truncate":
        return text[: draw(st.integers(0, len(text)), label="cut")]
    if how == "insert":
        at = draw(st.integers(0, len(text)), label="at")
        return text[:at] + draw(st.sampled_from(RAW_TOKENS) | st.text(max_size=10), label="insert") + text[at:]
    raw = bytearray(text.encode("utf-8"))
    for _ in range(draw(st.integers(1, 5), label="flips")):
        raw[draw(st.integers(0, len(raw) - 1), label="byte")] = draw(st.integers(0, 255), label="to")
    return bytes(raw)


# ---------------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------------


@SETTINGS
@given(json_values)
def test_any_json_value_compiles_to_diagnostics(value: Any) -> None:
    check_result(compile_document(value))


@SETTINGS
@given(documents)
def test_random_documents_compile_to_diagnostics(doc: dict[str, Any]) -> None:
    check_result(compile_document(doc))


@SETTINGS
@given(valid_documents())
def test_valid_documents_with_random_values(doc: dict[str, Any]) -> None:
    check_result(compile_document(doc))


@SETTINGS
@given(mutated_examples())
def test_mutated_examples_compile_to_diagnostics(case: tuple[str, Any]) -> None:
    _name, doc = case
    before = json.dumps(doc)
    check_result(compile_document(doc))
    assert json.dumps(doc) == before  # the compiler does not modify its input


@SETTINGS
@given(mutated_examples())
def test_compile_text_agrees_with_compile_document(case: tuple[str, Any]) -> None:
    _name, doc = case
    by_text = compile_text(json.dumps(doc))
    check_result(by_text)
    by_doc = compile_document(doc)
    assert [(d.severity, d.code, d.path) for d in by_text.diagnostics] == [
        (d.severity, d.code, d.path) for d in by_doc.diagnostics
    ]


@SETTINGS
@given(mutated_example_texts())
def test_mutated_example_texts_compile_to_diagnostics(text: str | bytes) -> None:
    check_result(compile_text(text))


@SETTINGS
@given(st.binary(max_size=400) | st.text(max_size=400))
def test_random_bytes_and_text_compile_to_diagnostics(text: str | bytes) -> None:
    result = compile_text(text)
    check_result(result)


def test_unmutated_examples_satisfy_the_properties() -> None:
    assert len(EXAMPLE_DOCS) >= 10
    for name, text in EXAMPLE_TEXTS.items():
        result = compile_text(text)
        check_result(result)
        if name in COMPILING:
            assert result.ok, name


# ---------------------------------------------------------------------------------------------------------
# Regressions found by the properties above (inputs reduced by hand)
# ---------------------------------------------------------------------------------------------------------


def minimal_document(message: Any) -> dict[str, Any]:
    """A valid two-node document whose only free value is the ``log`` step's message."""
    return {
        "procedure_id": "p",
        "version": "1",
        "workflow_graph": {
            "start_node": "start",
            "nodes": {
                "start": {"type": "sequence", "next_node": "end",
                          "steps": [{"step_id": "s", "action": "log", "message": message}]},
                "end": {"type": "terminate"},
            },
        },
    }


def test_minimal_document_compiles() -> None:
    result = compile_document(minimal_document("hello"))
    check_result(result)
    assert result.ok


def test_regression_deep_json_text() -> None:
    # json.loads raises RecursionError for 100 000 nested arrays; compile_text must report invalid_document.
    check_result(compile_text("[" * 100_000 + "]" * 100_000))


def test_regression_deep_value_in_ir() -> None:
    # Valid JSON text (300 nested arrays in a log message) that compiles, but the IR cannot be serialised
    # (pydantic: "Maximum serialization depth exceeded"), so it could never be stored.
    text = json.dumps(minimal_document("@")).replace('"@"', "[" * 300 + '"v"' + "]" * 300)
    check_result(compile_text(text))


@pytest.mark.parametrize("extra", [0, 1])
def test_nesting_limit_is_the_same_from_text_and_from_a_document(extra: int) -> None:
    # The document's own levels (6 down to the step) and 122 arrays: 128 levels, the most allowed. compile_text
    # checks a float-free document while writing its canonical JSON, compile_document by walking it.
    depth = 122 + extra
    text = json.dumps(minimal_document("@")).replace('"@"', "[" * depth + '"v"' + "]" * depth)
    by_text, by_doc = compile_text(text), compile_document(json.loads(text))
    too_deep = [d.message for d in by_text.diagnostics if d.code == "invalid_document"]
    assert too_deep == ([f"CKP document is nested deeper than {MAX_NESTING} levels"] if extra else [])
    assert [d.model_dump() for d in by_text.diagnostics] == [d.model_dump() for d in by_doc.diagnostics]
    if not extra:
        assert by_text.ir is not None
        assert by_doc.ir is not None
        assert by_text.ir.content_hash == by_doc.ir.content_hash == content_hash(json.loads(text))


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999", "1.5", "-0.0", "10000000000000000000000"])
def test_floats_and_constants_in_text_are_checked_as_in_a_document(token: str) -> None:
    # A text without a float (nor NaN / Infinity) has its canonical JSON written by orjson; these take the
    # general path, which must give what compile_document gives for the decoded document.
    text = json.dumps(minimal_document("@")).replace('"@"', token)
    by_text, by_doc = compile_text(text), compile_document(json.loads(text))
    assert [d.model_dump() for d in by_text.diagnostics] == [d.model_dump() for d in by_doc.diagnostics]
    if token in ("NaN", "Infinity", "-Infinity", "1e999"):
        assert [d.code for d in by_text.diagnostics] == ["invalid_document"]
    else:
        assert by_text.ir is not None
        assert by_doc.ir is not None
        assert by_text.ir.content_hash == by_doc.ir.content_hash == content_hash(json.loads(text))


def test_regression_very_deep_value() -> None:
    # A decoded document with a value nested 3000 lists deep: RecursionError inside compile_document.
    check_result(compile_document(minimal_document(wrap("v", 3000, as_object=False))))


@pytest.mark.parametrize("where", ["value", "key"])
def test_regression_lone_surrogate(where: str) -> None:
    # "\ud800" is a legal JSON string escape; json.loads yields a lone surrogate (in a value, or in an unknown
    # key that only draws a warning) and the content hash (UTF-8 of the canonical JSON) raises UnicodeEncodeError.
    text = json.dumps(minimal_document("@"))
    if where == "value":
        text = text.replace('"@"', '"\\ud800"')
    else:
        text = text.replace('{"procedure_id"', '{"\\ud800": 1, "procedure_id"')
    assert "\\ud800" in text
    check_result(compile_text(text))


def test_regression_infinite_number() -> None:
    # json.loads reads 1e400 as float('inf'); the IR serialises it as null, so the round trip changes the IR.
    text = json.dumps(minimal_document("@")).replace('"@"', "1e400")
    check_result(compile_text(text))


@pytest.mark.parametrize("key", ["a~b", "a/b", "x/~"])
def test_regression_pointer_escaping(key: str) -> None:
    # An unknown key must be reported at its escaped JSON Pointer ('~' -> '~0', '/' -> '~1').
    doc = minimal_document("hello")
    doc["global_config"] = {key: 1}
    result = compile_document(doc)
    check_result(result)
    escaped = "/global_config/" + key.replace("~", "~0").replace("/", "~1")
    assert escaped in [d.path for d in result.diagnostics]
