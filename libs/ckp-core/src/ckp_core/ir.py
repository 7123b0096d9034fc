"""The compiled form of a procedure version (ckp.md §6.6), as frozen, JSON-serialisable pydantic models.

This slice keeps the source text of expressions and templates in the IR; the runtime parses them once per
loaded procedure (cached). ``ir_version`` guards the shape.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ckp_core.diagnostics import Diagnostic
from ckp_core.variables import VariableSpec

IR_VERSION = 1


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class Binding(_Frozen):
    kind: Literal["internal", "channel"]
    channel: str | None = None
    action: str


class StepIR(_Frozen):
    step_id: str
    action: str
    binding: Binding
    params: dict[str, Any] = Field(default_factory=dict)
    output_variable: str | None = None
    timeout_ms: int | None = None
    wait_ms: int = 0
    wait_after_ms: int = 0


class RuleIR(_Frozen):
    condition: str
    next_node: str


class SequencePayload(_Frozen):
    kind: Literal["sequence"] = "sequence"
    steps: list[StepIR] = Field(default_factory=list)


class LogicPayload(_Frozen):
    kind: Literal["logic"] = "logic"
    rules: list[RuleIR] = Field(default_factory=list)
    default_next_node: str | None = None


class TerminatePayload(_Frozen):
    kind: Literal["terminate"] = "terminate"
    status: Literal["success", "failed"] = "success"
    outputs: dict[str, Any] = Field(default_factory=dict)


class NodeIR(_Frozen):
    id: str
    type: str
    description: str | None = None
    agent: str | None = None
    channel: str | None = None
    orchestrator: bool = True
    next_node: str | None = None
    is_checkpoint: bool = False
    payload: SequencePayload | LogicPayload | TerminatePayload = Field(discriminator="kind")


class EdgeIR(_Frozen):
    source: str = Field(alias="from")
    target: str = Field(alias="to")
    kind: str
    label: str | None = None

    model_config = ConfigDict(frozen=True, populate_by_name=True)


class GlobalConfigIR(_Frozen):
    max_hops: int = 10000
    logging_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    execution_mode: Literal["production", "dry_run", "validation_only"] = "production"
    checkpoint_strategy: Literal["every_node", "critical_nodes_only", "disabled"] = "every_node"
    redacted_fields: list[str] = Field(default_factory=list)


class ProcedureIR(_Frozen):
    ir_version: int = IR_VERSION
    procedure_id: str
    version: str
    name: str
    description: str | None = None
    status: str | None = None
    effective_date: str | None = None
    content_hash: str
    compiler_version: str
    global_config: GlobalConfigIR = Field(default_factory=GlobalConfigIR)
    variables: dict[str, VariableSpec] = Field(default_factory=dict)
    start_node: str
    nodes: dict[str, NodeIR]
    edges: list[EdgeIR] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    diagnostics: list[Diagnostic] = Field(default_factory=list)

    def variables_schema(self) -> dict[str, Any]:
        """The normalised flat ``variables_schema`` view (api.md ProcedureDetail)."""
        return {
            name: spec.model_dump(mode="json", exclude={"has_default"}, exclude_none=True)
            for name, spec in self.variables.items()
        }
