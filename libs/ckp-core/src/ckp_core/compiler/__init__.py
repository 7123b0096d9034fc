"""The CKP compiler (ckp.md §6): decode → dialect check → parse/normalise → validate → bind → IR.

Every problem becomes a :class:`Diagnostic` with its JSON Pointer; the compiler never raises for bad input and
performs no I/O except through the injected, read-only :class:`ProcedureLookup` used for subflow checks.

One compilation is a :class:`~ckp_core.compiler.fields.Compilation` (its diagnostics, the variables read and
produced, the secrets used) passed to the functions of each module, in document order:

* ``document``: the entry points, the top-level fields, and the order of the passes;
* ``fields``: the compilation state and its typed field readers, which report every problem;
* ``binding``: expressions and templates (variable reads, secret references);
* ``config``, ``variables_schema``, ``trigger``: ``global_config``, ``variables_schema``, ``trigger``;
* ``graph``: ``workflow_graph``, the fields every node has, its edges; ``nodes``: one payload per node type;
* ``steps``, ``operations``, ``retry``, ``policies``: steps and validations, internal operations, retry
  policies, error handlers / SLA / telemetry;
* ``checks``: whole-document checks (subflow recursion, reachability, undeclared variables and secrets).
"""

from ckp_core.compiler.checks import ProcedureLookup
from ckp_core.compiler.document import (
    COMPILER_VERSION,
    MAX_DOCUMENT_BYTES,
    CompileResult,
    canonical_json,
    compile_document,
    compile_text,
    content_hash,
)
from ckp_core.compiler.graph import NODE_TYPES, is_orchestrator
from ckp_core.compiler.operations import INTERNAL_OPERATIONS
from ckp_core.compiler.steps import CONVENTIONAL_ACTIONS

__all__ = [
    "COMPILER_VERSION",
    "CONVENTIONAL_ACTIONS",
    "INTERNAL_OPERATIONS",
    "MAX_DOCUMENT_BYTES",
    "NODE_TYPES",
    "CompileResult",
    "ProcedureLookup",
    "canonical_json",
    "compile_document",
    "compile_text",
    "content_hash",
    "is_orchestrator",
]
