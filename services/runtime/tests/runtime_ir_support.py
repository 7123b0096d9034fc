"""Builds real IR objects for the execution-library unit tests by compiling tiny CKP documents."""

from __future__ import annotations

from typing import Any

from ckp_core.compiler import compile_document
from ckp_core.expressions import MappingScope
from ckp_core.ir import (
    OperationIR,
    OutputMappingIR,
    ProcedureIR,
    ProcessingPayload,
    SequencePayload,
    StepIR,
    TemplateIR,
    TransformationIR,
    TransformPayload,
)
from ckp_core.templates import render


def compile_ok(nodes: dict[str, Any], start: str) -> ProcedureIR:
    doc = {"procedure_id": "lib_test", "version": "1.0.0",
           "workflow_graph": {"start_node": start, "nodes": {**nodes, "end": {"type": "terminate"}}}}
    result = compile_document(doc)
    assert result.ir is not None, [(d.code, d.path, d.message) for d in result.errors]
    return result.ir


def operation(raw: dict[str, Any]) -> OperationIR:
    """One compiled ``processing`` operation."""
    ir = compile_ok({"p": {"type": "processing", "operations": [raw], "next_node": "end"}}, "p")
    payload = ir.nodes["p"].payload
    assert isinstance(payload, ProcessingPayload)
    return payload.operations[0]


def step(raw: dict[str, Any]) -> StepIR:
    """One compiled internal step of an orchestrator ``sequence`` node."""
    ir = compile_ok({"s": {"type": "sequence", "steps": [{"step_id": "s1", **raw}], "next_node": "end"}}, "s")
    payload = ir.nodes["s"].payload
    assert isinstance(payload, SequencePayload)
    return payload.steps[0]


def transformation(raw: dict[str, Any]) -> TransformationIR:
    ir = compile_ok({"t": {"type": "transform", "transformations": [raw], "next_node": "end"}}, "t")
    payload = ir.nodes["t"].payload
    assert isinstance(payload, TransformPayload)
    return payload.transformations[0]


def output_mapping(mapping: str) -> OutputMappingIR:
    compiled = step({"action": "log", "message": "x", "output_mapping": {"out": mapping}})
    return compiled.output_mapping["out"]


def render_params(tpl: TemplateIR, variables: dict[str, Any] | None = None) -> Any:
    """Render parameters the way the runtime does (type-preserving, against the variables)."""
    return render(tpl.compiled, MappingScope(variables or {}))
