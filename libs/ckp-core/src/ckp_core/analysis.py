"""Static views of a compiled procedure (api.md §4.6): graph layout, explain, diff, Mermaid and DOT renderings.

Everything here is pure: it reads a :class:`~ckp_core.ir.ProcedureIR` (or two CKP documents for :func:`diff`) and
returns JSON-ready dicts or text. Nothing is executed; the route trace evaluates logic conditions only when every
name they read is statically known (an input or a default no earlier node on the path overwrites).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator, Mapping
from typing import Any

from ckp_core.compiler import CONVENTIONAL_ACTIONS, compile_document, content_hash
from ckp_core.errors import InvalidInputVars
from ckp_core.expressions import ExpressionError, MappingScope, evaluate_condition
from ckp_core.ir import (
    EdgeIR,
    HumanApprovalPayload,
    LlmActionPayload,
    LogicPayload,
    LoopPayload,
    NodeIR,
    OperationIR,
    ParallelPayload,
    ProcedureIR,
    ProcessingPayload,
    SequencePayload,
    StepIR,
    SubflowPayload,
    TerminatePayload,
    TransformPayload,
    VerificationPayload,
)
from ckp_core.templates import compile_template, has_placeholder, render
from ckp_core.variables import BUILTIN_NAMES, coerce, validate_inputs

__all__ = [
    "ANIMATED_EDGE_KINDS",
    "NODE_COLORS",
    "diff",
    "dot",
    "explain",
    "graph_view",
    "json_pointer",
    "mermaid",
    "node_writes",
]

# One fixed colour per node type (Tailwind 500 shades), shared by the console, Mermaid and DOT renderings.
NODE_COLORS: dict[str, str] = {
    "sequence": "#3b82f6",
    "logic": "#f59e0b",
    "loop": "#8b5cf6",
    "parallel": "#06b6d4",
    "subflow": "#6366f1",
    "processing": "#64748b",
    "verification": "#14b8a6",
    "llm_action": "#ec4899",
    "human_approval": "#f97316",
    "transform": "#84cc16",
    "terminate": "#ef4444",
}
# Edges drawn animated in the console: the ones that start a nested path (a loop body or a parallel branch).
ANIMATED_EDGE_KINDS = frozenset({"loop_body", "branch"})
X_SPACING = 260
Y_SPACING = 140


def json_pointer(*parts: str | int) -> str:
    """A JSON Pointer (RFC 6901) from raw segments."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


# -- graph and layout --------------------------------------------------------------------------------------


def _successors(ir: ProcedureIR) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {node_id: [] for node_id in ir.nodes}
    for e in ir.edges:
        if e.source in out and e.target in ir.nodes and e.target not in out[e.source]:
            out[e.source].append(e.target)
    return out


def _layers(ir: ProcedureIR) -> dict[str, tuple[int, int]]:
    """``{node_id: (layer, index_in_layer)}``: longest-path layering of the graph without its back-edges.

    Back-edges are found by a depth-first walk from ``start_node`` (edges in IR order), so every cycle is cut at
    the edge that closes it. Nodes unreachable from the start go in one final layer, in document order. Within a
    layer nodes are ordered by the mean x of their placed predecessors, then by breadth-first discovery order.
    """
    succ = _successors(ir)
    start = ir.start_node
    if start not in ir.nodes:
        return {node_id: (0, i) for i, node_id in enumerate(ir.nodes)}
    # breadth-first discovery order: the deterministic tie-breaker
    discovery: dict[str, int] = {start: 0}
    queue = [start]
    for node_id in queue:
        for t in succ[node_id]:
            if t not in discovery:
                discovery[t] = len(discovery)
                queue.append(t)
    # depth-first walk marking back-edges (target on the current stack)
    back: set[tuple[str, str]] = set()
    state: dict[str, int] = {}  # 1 on stack, 2 done
    stack: list[tuple[str, Iterator[str]]] = [(start, iter(succ[start]))]
    state[start] = 1
    while stack:
        node_id, it = stack[-1]
        nxt = next(it, None)
        if nxt is None:
            state[node_id] = 2
            stack.pop()
            continue
        if state.get(nxt) == 1:
            back.add((node_id, nxt))
        elif nxt not in state:
            state[nxt] = 1
            stack.append((nxt, iter(succ[nxt])))
    # longest path over the remaining DAG (Kahn's algorithm, ready nodes taken in discovery order)
    preds: dict[str, list[str]] = {n: [] for n in discovery}
    for u in discovery:
        for v in succ[u]:
            if (u, v) not in back:
                preds[v].append(u)
    indegree = {n: len(preds[n]) for n in discovery}
    layer: dict[str, int] = {}
    ready = sorted((n for n in discovery if indegree[n] == 0), key=discovery.__getitem__)
    while ready:
        u = ready.pop(0)
        layer[u] = max((layer[p] + 1 for p in preds[u]), default=0)
        newly = []
        for v in succ[u]:
            if (u, v) in back:
                continue
            indegree[v] -= 1
            if indegree[v] == 0:
                newly.append(v)
        ready = sorted(ready + newly, key=discovery.__getitem__)
    depth = max(layer.values(), default=-1) + 1
    by_layer: dict[int, list[str]] = {}
    for n in sorted(layer, key=discovery.__getitem__):
        by_layer.setdefault(layer[n], []).append(n)
    unreachable = [n for n in ir.nodes if n not in layer]
    placed: dict[str, tuple[int, int]] = {}
    x_of: dict[str, float] = {}
    for level in range(depth):
        members = by_layer.get(level, [])

        def key(n: str) -> tuple[float, int]:
            xs = [x_of[p] for p in preds[n] if p in x_of]
            return (sum(xs) / len(xs) if xs else 0.0, discovery[n])

        members.sort(key=key)
        for i, n in enumerate(members):
            placed[n] = (level, i)
            x_of[n] = (i - (len(members) - 1) / 2) * X_SPACING
    for i, n in enumerate(unreachable):
        placed[n] = (depth, i)
    return placed


def _edge_ids(edges: list[EdgeIR]) -> list[str]:
    """``"<source>-><target>"``; a repeated pair gets ``#2``, ``#3``… in IR edge order."""
    seen: dict[str, int] = {}
    out = []
    for e in edges:
        base = f"{e.source}->{e.target}"
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return out


def graph_view(ir: ProcedureIR) -> dict[str, Any]:
    """The ``GraphOut`` of api.md §4.6: React Flow nodes (laid out top to bottom) and edges."""
    placed = _layers(ir)
    width = {level: 0 for level, _ in placed.values()}
    for level, _ in placed.values():
        width[level] += 1
    nodes = []
    for node_id, node in ir.nodes.items():
        level, index = placed[node_id]
        x = round((index - (width[level] - 1) / 2) * X_SPACING)
        nodes.append({
            "id": node_id,
            "type": node.type,
            "position": {"x": x, "y": level * Y_SPACING},
            "data": {
                "label": node.description or node_id,
                "description": node.description,
                "agent": node.agent,
                "node_type": node.type,
                "color": NODE_COLORS[node.type],
                "is_checkpoint": node.is_checkpoint,
                "sla_ms": node.sla.max_duration_ms if node.sla is not None else None,
            },
        })
    edges = [
        {"id": edge_id, "source": e.source, "target": e.target, "label": e.label, "kind": e.kind,
         "animated": e.kind in ANIMATED_EDGE_KINDS}
        for edge_id, e in zip(_edge_ids(ir.edges), ir.edges, strict=True)
    ]
    return {"procedure_id": ir.procedure_id, "version": ir.version, "start_node": ir.start_node,
            "nodes": nodes, "edges": edges}


# -- what nodes do ------------------------------------------------------------------------------------------


def _steps(node: NodeIR) -> list[StepIR]:
    return list(node.payload.steps) if isinstance(node.payload, SequencePayload) else []


def _recovery_steps(node: NodeIR) -> list[StepIR]:
    return [s for h in node.error_handlers for s in h.recovery_steps]


def _operations(node: NodeIR) -> list[OperationIR]:
    p = node.payload
    if isinstance(p, ProcessingPayload):
        return list(p.operations)
    if isinstance(p, TerminatePayload):
        return [*p.cleanup_actions, *p.error_actions]
    return []


def _actions(node: NodeIR) -> list[str]:
    p = node.payload
    if isinstance(p, SequencePayload):
        return [s.action for s in p.steps]
    if isinstance(p, ProcessingPayload | TerminatePayload):
        return [op.action for op in _operations(node)]
    if isinstance(p, TransformPayload):
        return [f"transform:{t.type}" for t in p.transformations]
    if isinstance(p, LlmActionPayload):
        return ["llm"]
    if isinstance(p, HumanApprovalPayload):
        return ["approval"]
    if isinstance(p, SubflowPayload):
        return [f"subflow:{p.procedure_id}"]
    if isinstance(p, VerificationPayload):
        return [f"check:{c.id}" for c in p.checks]
    return []


def _root(name: str) -> str:
    return name.split(".", 1)[0].split("[", 1)[0]


def _operation_writes(action: str, names: Mapping[str, str], output_variable: str | None) -> list[str]:
    out = []
    if action == "set_variable" and "variable" in names:
        out.append(_root(names["variable"]))
    if action == "append_to_array" and "array" in names:
        out.append(_root(names["array"]))
    if output_variable:
        out.append(output_variable)
    return out


def _step_writes(step: StepIR) -> list[str]:
    out = _operation_writes(step.action, step.names, step.output_variable) if step.binding.kind == "internal" \
        else ([step.output_variable] if step.output_variable else [])
    out.extend(step.output_mapping)
    return out


def node_writes(node: NodeIR) -> list[str]:
    """Variable names a node can write (ckp.md §2.3 writers and §2.5 engine variables), in order, no repeats."""
    out: list[str] = []
    p = node.payload
    for step in [*_steps(node), *_recovery_steps(node)]:
        out.extend(_step_writes(step))
    for op in _operations(node):
        out.extend(_operation_writes(op.action, op.names, op.output_variable))
    if isinstance(p, TransformPayload):
        out.extend(t.output_variable for t in p.transformations)
    elif isinstance(p, LoopPayload):
        out.extend(v for v in (p.iterator_variable, p.index_variable, p.collect_variable, p.errors_variable) if v)
    elif isinstance(p, LlmActionPayload):
        out.extend(p.outputs or ["llm_output"])
    elif isinstance(p, ParallelPayload):
        out.append("parallel_results")
    elif isinstance(p, SubflowPayload):
        out.extend(p.output_mapping or ["subflow_output"])
    elif isinstance(p, HumanApprovalPayload):
        out.extend(v for v in (p.input_variable, p.decision_variable) if v)
    return list(dict.fromkeys(out))


def _external_calls(ir: ProcedureIR) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for node in ir.nodes.values():
        p = node.payload
        if isinstance(p, LlmActionPayload):
            out.append({"node_id": node.id, "step_id": "llm", "binding": "llm", "channel": None,
                        "action": p.model or "chat"})
            continue
        for step in [*_steps(node), *_recovery_steps(node)]:
            if step.binding.kind == "channel":
                out.append({"node_id": node.id, "step_id": step.step_id, "binding": "agent_http",
                            "channel": step.binding.channel, "action": step.binding.action})
        if isinstance(p, SequencePayload):
            for v in p.validations:
                if v.binding is not None and v.binding.kind == "channel":
                    out.append({"node_id": node.id, "step_id": v.id, "binding": "agent_http",
                                "channel": v.binding.channel, "action": v.binding.action})
    return out


def _hints(ir: ProcedureIR) -> list[dict[str, Any]]:
    out = []
    common = CONVENTIONAL_ACTIONS.get("*", frozenset())
    for node in ir.nodes.values():
        for step in [*_steps(node), *_recovery_steps(node)]:
            b = step.binding
            if b.kind != "channel" or b.channel is None:
                continue
            known = CONVENTIONAL_ACTIONS.get(b.channel, frozenset())
            if b.action in known or b.action in common:
                continue
            if known:
                why = f"'{b.action}' is not a conventional action of the '{b.channel}' channel"
            else:
                why = f"'{b.channel}' has no conventional action catalogue"
            out.append({"node_id": node.id, "step_id": step.step_id, "channel": b.channel, "action": b.action,
                        "message": f"{why}; it works if an agent of that channel declares the capability"})
    return out


def _policy_summary(ir: ProcedureIR) -> dict[str, Any]:
    gc = ir.global_config
    retries: list[dict[str, Any]] = []
    step_timeouts: list[dict[str, Any]] = []
    node_timeouts: list[dict[str, Any]] = []
    dispatch: list[dict[str, Any]] = []
    for node in ir.nodes.values():
        p = node.payload
        for source, steps in (("step", _steps(node)), ("recovery_step", _recovery_steps(node))):
            for step in steps:
                if step.retry is not None:
                    retries.append({"node_id": node.id, "step_id": step.step_id, "source": source,
                                    **step.retry.model_dump(mode="json")})
                if step.timeout_ms is not None:
                    step_timeouts.append({"node_id": node.id, "step_id": step.step_id, "timeout_ms": step.timeout_ms})
                if step.binding.kind == "channel":
                    dispatch.append({"node_id": node.id, "step_id": step.step_id,
                                     "dispatch_mode": step.dispatch_mode})
        for h in node.error_handlers:
            if h.action in ("retry", "retry_node"):
                policy = h.retry_policy.model_dump(mode="json") if h.retry_policy is not None else {
                    "max_retries": h.max_retries, "retry_delay_ms": h.delay_ms}
                retries.append({"node_id": node.id, "step_id": None, "source": "error_handler",
                                "handler_index": h.index, "error_type": h.error_type or "*", "action": h.action,
                                **policy})
        if isinstance(p, LlmActionPayload):
            if p.retry is not None:
                retries.append({"node_id": node.id, "step_id": "llm", "source": "llm",
                                **p.retry.model_dump(mode="json")})
            if p.timeout_ms is not None:
                node_timeouts.append({"node_id": node.id, "timeout_ms": p.timeout_ms})
        if isinstance(p, HumanApprovalPayload) and p.timeout_ms is not None:
            node_timeouts.append({"node_id": node.id, "timeout_ms": p.timeout_ms, "timeout_action": p.timeout_action})
    return {
        "retries": retries,
        "timeouts": {"run_timeout_ms": gc.timeout_ms, "default_step_timeout_ms": gc.default_step_timeout_ms,
                     "steps": step_timeouts, "nodes": node_timeouts},
        "sla": [{"node_id": n.id, **n.sla.model_dump(mode="json")} for n in ir.nodes.values() if n.sla is not None],
        "checkpoints": {"strategy": gc.checkpoint_strategy,
                        "nodes": [n.id for n in ir.nodes.values() if n.is_checkpoint]},
        "dispatch_modes": dispatch,
    }


# -- explain: inputs and the route trace --------------------------------------------------------------------


def _provided(value: Any) -> bool:
    return not (value is None or (isinstance(value, str) and not value.strip()))


def _known_start(ir: ProcedureIR, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Variables whose starting value is known statically: coerced inputs, literal defaults, and template
    defaults that read only those (built-ins such as ``today`` are not known before a run)."""
    known: dict[str, Any] = {k: v for k, v in inputs.items() if k not in ir.variables and k not in BUILTIN_NAMES}
    templated = []
    for name, spec in ir.variables.items():
        raw = inputs.get(name)
        if _provided(raw):
            ok, value, _ = coerce(raw, spec.type)
            known[name] = value if ok else raw
        elif spec.has_default and spec.default is not None:
            if isinstance(spec.default, str) and has_placeholder(spec.default):
                templated.append((name, spec.default))
            else:
                known[name] = spec.default
    for name, default in templated:
        template = compile_template(default)
        if template.referenced_roots <= set(known):
            try:
                known[name] = render(template, MappingScope(known))
            except ExpressionError:
                continue
    return known


def _region(ir: ProcedureIR, start: str, stop_at: str | None) -> list[str]:
    """Nodes a nested path (loop body, parallel branch) can visit: reachable from ``start`` without passing
    ``stop_at`` (the loop node or the join)."""
    succ = _successors(ir)
    seen = [start] if start in ir.nodes else []
    for n in seen:
        for t in succ[n]:
            if t != stop_at and t not in seen:
                seen.append(t)
    return seen


class _Trace:
    def __init__(self, ir: ProcedureIR, known: dict[str, Any]) -> None:
        self.ir = ir
        self.known = known
        self.overwritten: dict[str, str] = {}  # variable -> node that made its value unknown
        self.entries: list[dict[str, Any]] = []

    def add(self, node: NodeIR, reason: str) -> None:
        self.entries.append({"node_id": node.id, "type": node.type, "reason": reason})

    def forget(self, names: list[str], by: str) -> None:
        for name in names:
            self.known.pop(name, None)
            self.overwritten[name] = by

    def simulate_step(self, node: NodeIR, step: StepIR | OperationIR) -> None:
        """Apply a ``set_variable`` whose value is known; anything else the step writes becomes unknown."""
        if isinstance(step, StepIR) and step.binding.kind != "internal":
            self.forget(_step_writes(step), node.id)
            return
        writes = _step_writes(step) if isinstance(step, StepIR) else \
            _operation_writes(step.action, step.names, step.output_variable)
        name = step.names.get("variable", "")
        plain = step.action == "set_variable" and name and "." not in name and "[" not in name
        if plain and step.params.roots <= set(self.known):
            try:
                value = render(step.params.compiled, MappingScope(self.known))
            except ExpressionError:
                value = None
            else:
                if isinstance(value, dict) and "value" in value:
                    self.known[name] = value["value"]
                    self.overwritten.pop(name, None)
                    writes = [w for w in writes if w != name]
        self.forget(writes, node.id)

    def unknown_roots(self, roots: list[str]) -> list[str]:
        return [r for r in roots if r not in self.known]

    def why_unknown(self, names: list[str]) -> str:
        parts = []
        for n in names:
            if n in self.overwritten:
                parts.append(f"'{n}' (written by node '{self.overwritten[n]}')")
            elif n in BUILTIN_NAMES:
                parts.append(f"'{n}' (a built-in, known only at run time)")
            else:
                parts.append(f"'{n}' (not an input and no default)")
        return ", ".join(parts)

    def logic(self, node: NodeIR, p: LogicPayload) -> str | None:
        for i, rule in enumerate(p.rules):
            missing = self.unknown_roots(rule.condition.roots)
            if missing:
                self.add(node, f"stop: rule {i} `{rule.condition.source}` reads {self.why_unknown(missing)}; "
                               "the route cannot be decided statically")
                return None
            try:
                matched = evaluate_condition(rule.condition.compiled, MappingScope(self.known))
            except ExpressionError as exc:
                self.add(node, f"stop: rule {i} `{rule.condition.source}` fails with an expression error: {exc}")
                return None
            if matched:
                self.add(node, f"rule {i} `{rule.condition.source}` is true → '{rule.next_node}'")
                return rule.next_node
        if p.default_next_node is None:
            self.add(node, "stop: no rule is true and there is no default_next_node (logic_no_route at run time)")
            return None
        self.add(node, f"no rule is true → default '{p.default_next_node}'")
        return p.default_next_node

    def run(self) -> list[dict[str, Any]]:
        visited: set[str] = set()
        current: str | None = self.ir.start_node
        while current is not None:
            node = self.ir.nodes.get(current)
            if node is None:
                break
            if current in visited:
                self.add(node, f"stop: '{current}' was already visited (a cycle; the run may loop here)")
                break
            visited.add(current)
            current = self.visit(node)
        return self.entries

    def then(self, node: NodeIR, what: str) -> str | None:
        if node.next_node is None:
            self.add(node, f"{what}; no next_node: the path ends here")
        else:
            self.add(node, f"{what} → next '{node.next_node}'")
        return node.next_node

    def visit(self, node: NodeIR) -> str | None:
        p = node.payload
        if isinstance(p, TerminatePayload):
            self.add(node, f"terminate with status '{p.status}'")
            return None
        if isinstance(p, LogicPayload):
            return self.logic(node, p)
        if isinstance(p, HumanApprovalPayload):
            routes = [f"{e.kind}{' ' + repr(e.label) if e.kind == 'option' else ''} → '{e.target}'"
                      for e in self.ir.edges if e.source == node.id and e.kind in ("approve", "reject", "timeout",
                                                                                   "option")]
            self.add(node, "stop: waits for a human decision; possible routes: " + (", ".join(routes) or "none"))
            return None
        if isinstance(p, LlmActionPayload) and p.orchestration_mode and p.branches:
            self.add(node, "stop: the model chooses the next node among " + ", ".join(f"'{b}'" for b in p.branches))
            return None
        if isinstance(p, SequencePayload):
            for step in p.steps:
                self.simulate_step(node, step)
            self.forget([w for s in _recovery_steps(node) for w in _step_writes(s)], node.id)
            return self.then(node, f"{len(p.steps)} step(s)")
        if isinstance(p, ProcessingPayload):
            for op in p.operations:
                self.simulate_step(node, op)
            return self.then(node, f"{len(p.operations)} operation(s)")
        if isinstance(p, LoopPayload):
            body = _region(self.ir, p.body_node, node.id)
            self.forget(node_writes(node), node.id)
            for n in body:
                self.forget(node_writes(self.ir.nodes[n]), n)
            return self.then(node, f"loop over `{p.iterator.source}` (body '{p.body_node}')")
        if isinstance(p, ParallelPayload):
            for br in p.branches:
                for n in _region(self.ir, br.start_node, node.next_node):
                    self.forget(node_writes(self.ir.nodes[n]), n)
            self.forget(node_writes(node), node.id)
            names = ", ".join(f"'{b.branch_id}' → '{b.start_node}'" for b in p.branches)
            return self.then(node, f"runs branches {names} ({p.wait_strategy}); joins")
        self.forget(node_writes(node), node.id)
        return self.then(node, node.type)


def explain(ir: ProcedureIR, input_vars: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``ExplainOut`` of api.md §4.6 (plus ``hints``, ``input_errors``, ``trigger``, ``provenance`` and
    ``retrieval_metadata``, which ckp.md §1.4 says explain shows)."""
    inputs = dict(input_vars or {})
    variables = ir.variables
    required = [n for n, s in variables.items() if s.required and not (s.has_default and s.default is not None)]
    produced = list(dict.fromkeys(w for node in ir.nodes.values() for w in node_writes(node)))
    input_errors: dict[str, list[str]] = {}
    try:
        validate_inputs(variables, inputs)
    except InvalidInputVars as exc:
        # A template default reading built-ins (``{{today}}``) renders only at run creation: not an input error.
        dynamic = {f"input_vars.{n}" for n, s in variables.items() if not _provided(inputs.get(n))
                   and isinstance(s.default, str) and has_placeholder(s.default)}
        input_errors = {k: v for k, v in exc.errors.items() if k not in dynamic}
    return {
        "procedure_id": ir.procedure_id,
        "version": ir.version,
        "name": ir.name,
        "description": ir.description,
        "nodes": [{"id": n.id, "type": n.type, "agent": n.agent, "description": n.description,
                   "actions": _actions(n)} for n in ir.nodes.values()],
        "edges": [{"from": e.source, "to": e.target, "condition": e.label if e.kind == "condition" else e.kind}
                  for e in ir.edges],
        "variables": {
            "schema": ir.variables_schema(),
            "required": required,
            "produced": sorted(produced),
            "missing_inputs": [n for n in required if not _provided(inputs.get(n))],
            "provided": list(inputs),
        },
        "input_errors": input_errors,
        "route_trace": _Trace(ir, _known_start(ir, inputs)).run(),
        "external_calls": _external_calls(ir),
        "policy_summary": _policy_summary(ir),
        "hints": _hints(ir),
        "trigger": ir.trigger_view(),
        "provenance": ir.provenance,
        "retrieval_metadata": ir.retrieval_metadata,
        "diagnostics": [d.model_dump(mode="json") for d in ir.diagnostics],
    }


# -- diff -----------------------------------------------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    """Equality with JSON types kept apart (``1`` ≠ ``true``; ``1`` ≠ ``1.0`` as their canonical texts differ)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _changes(a: Any, b: Any, path: str, out: list[dict[str, Any]]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key, value in a.items():
            p = f"{path}{json_pointer(key)}"
            if key in b:
                _changes(value, b[key], p, out)
            else:
                out.append({"op": "remove", "path": p, "from_value": value, "value": None})
        for key, value in b.items():
            if key not in a:
                out.append({"op": "add", "path": f"{path}{json_pointer(key)}", "from_value": None, "value": value})
    elif isinstance(a, list) and isinstance(b, list):
        common = min(len(a), len(b))
        for i in range(common):
            _changes(a[i], b[i], f"{path}/{i}", out)
        for i in range(len(a) - 1, common - 1, -1):  # from the tail, so each index is valid when applied in order
            out.append({"op": "remove", "path": f"{path}/{i}", "from_value": a[i], "value": None})
        for i in range(common, len(b)):
            out.append({"op": "add", "path": f"{path}/{i}", "from_value": None, "value": b[i]})
    elif not _same(a, b):
        out.append({"op": "replace", "path": path, "from_value": a, "value": b})


def _nodes_of(doc: Mapping[str, Any]) -> dict[str, Any]:
    wg = doc.get("workflow_graph")
    nodes = wg.get("nodes") if isinstance(wg, dict) else None
    return nodes if isinstance(nodes, dict) else {}


def _flat_variables(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The flat variables schema of ckp.md §2.1, normalised by hand (used when a document does not compile)."""
    schema = doc.get("variables_schema")
    if not isinstance(schema, dict):
        return {}
    if not any(isinstance(schema.get(k), dict) for k in ("required", "optional")):
        return {name: spec for name, spec in schema.items()}
    out: dict[str, Any] = {}
    for section in ("required", "optional"):
        group = schema.get(section)
        if not isinstance(group, dict):
            continue
        for name, spec in group.items():
            flat = dict(spec) if isinstance(spec, dict) else {}
            if section == "required":
                flat["required"] = True
            else:
                flat.setdefault("required", False)
            out[name] = flat
    return out


def _variables_schemas(from_doc: Mapping[str, Any], to_doc: Mapping[str, Any]) -> tuple[dict[str, Any],
                                                                                         dict[str, Any]]:
    a, b = compile_document(dict(from_doc)).ir, compile_document(dict(to_doc)).ir
    if a is not None and b is not None:
        return a.variables_schema(), b.variables_schema()
    return _flat_variables(from_doc), _flat_variables(to_doc)


def _pretty(doc: Any) -> list[str]:
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").splitlines(keepends=True)


def diff(from_doc: Mapping[str, Any], to_doc: Mapping[str, Any], from_version: str, to_version: str,
         procedure_id: str, unified: bool = False) -> dict[str, Any]:
    """The ``DiffOut`` of api.md §4.6 between two CKP documents (``from`` → ``to``).

    ``changes`` turns ``from`` into ``to`` when applied in order (objects key by key, arrays element-wise with
    removals and additions at the tail). With ``unified`` the result carries ``unified`` (a unified diff of the
    two documents pretty-printed in their stored key order) and ``changes`` is empty; without it there is no
    ``unified`` key.
    """
    from_hash, to_hash = content_hash(from_doc), content_hash(to_doc)
    nodes_a, nodes_b = _nodes_of(from_doc), _nodes_of(to_doc)
    vars_a, vars_b = _variables_schemas(from_doc, to_doc)
    summary = {
        "nodes_added": [n for n in nodes_b if n not in nodes_a],
        "nodes_removed": [n for n in nodes_a if n not in nodes_b],
        "nodes_changed": [n for n in nodes_a if n in nodes_b and not _same(nodes_a[n], nodes_b[n])],
        "variables_changed": sorted(n for n in set(vars_a) | set(vars_b)
                                    if n not in vars_a or n not in vars_b or not _same(vars_a[n], vars_b[n])),
        "trigger_changed": not _same(from_doc.get("trigger"), to_doc.get("trigger")),
        "global_config_changed": not _same(from_doc.get("global_config"), to_doc.get("global_config")),
    }
    out: dict[str, Any] = {
        "procedure_id": procedure_id, "from": from_version, "to": to_version, "from_hash": from_hash,
        "to_hash": to_hash, "identical": from_hash == to_hash, "summary": summary, "changes": [],
    }
    if unified:
        out["unified"] = "".join(difflib.unified_diff(
            _pretty(from_doc), _pretty(to_doc), fromfile=f"{procedure_id}@{from_version}",
            tofile=f"{procedure_id}@{to_version}"))
    else:
        _changes(from_doc, to_doc, "", out["changes"])
    return out


# -- text renderings ------------------------------------------------------------------------------------------


def _edge_text(e: EdgeIR) -> str:
    if e.kind == "condition" and e.label:
        return e.label
    if e.label and e.kind in ("option", "branch", "fallback"):
        return f"{e.kind}: {e.label}"
    return e.kind


def _mermaid_ids(ir: ProcedureIR) -> dict[str, str]:
    """Mermaid-safe node ids (``n_`` + letters, digits and ``_``), unique, so ``end`` or ``a-b`` cannot break."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for node_id in ir.nodes:
        base = "n_" + "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in node_id)
        candidate, i = base, 2
        while candidate in used:
            candidate, i = f"{base}_{i}", i + 1
        used.add(candidate)
        out[node_id] = candidate
    return out


def _mermaid_text(s: str) -> str:
    """Text for a quoted Mermaid label: entity codes for characters Mermaid would read as syntax."""
    s = s.replace("#", "#35;")
    for ch, code in (('"', "#quot;"), ("<", "#lt;"), (">", "#gt;"), ("`", "#96;"), ("|", "#124;")):
        s = s.replace(ch, code)
    return " ".join(s.split())


_MERMAID_SHAPES = {
    "logic": ('{"', '"}'), "human_approval": ('{{"', '"}}'), "terminate": ('(["', '"])'),
    "loop": ('[/"', '"/]'), "parallel": ('[["', '"]]'), "subflow": ('[["', '"]]'), "llm_action": ('("', '")'),
}


def mermaid(ir: ProcedureIR) -> str:
    """A Mermaid flowchart (top to bottom) of the procedure graph."""
    ids = _mermaid_ids(ir)
    lines = ["flowchart TD"]
    for node_id, node in ir.nodes.items():
        left, right = _MERMAID_SHAPES.get(node.type, ('["', '"]'))
        label = _mermaid_text(f"{node_id} ({node.type})" + (f": {node.description}" if node.description else ""))
        lines.append(f"    {ids[node_id]}{left}{label}{right}")
    for e in ir.edges:
        if e.source not in ids or e.target not in ids:
            continue
        arrow = "-.->" if e.kind in ("fallback", "on_failure", "timeout") else "-->"
        lines.append(f'    {ids[e.source]} {arrow}|"{_mermaid_text(_edge_text(e))}"| {ids[e.target]}')
    for node_type, color in NODE_COLORS.items():
        lines.append(f"    classDef {node_type} fill:{color},color:#ffffff")
    for node_id, node in ir.nodes.items():
        lines.append(f"    class {ids[node_id]} {node.type}")
    return "\n".join(lines) + "\n"


def _dot_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "").replace("\n", "\\n") + '"'


_DOT_SHAPES = {"logic": "diamond", "human_approval": "hexagon", "terminate": "doublecircle", "loop": "trapezium",
               "parallel": "box3d", "subflow": "component", "llm_action": "ellipse"}


def dot(ir: ProcedureIR) -> str:
    """A Graphviz DOT digraph (top to bottom) of the procedure graph; every id and label is a quoted string."""
    lines = [f"digraph {_dot_string(ir.procedure_id + '@' + ir.version)} {{", "    rankdir=TB;",
             '    node [shape=box, style="rounded,filled", fontcolor="#ffffff"];']
    for node_id, node in ir.nodes.items():
        label = f"{node_id}\n({node.type})" + (f"\n{node.description}" if node.description else "")
        attrs = [f"label={_dot_string(label)}", f"fillcolor={_dot_string(NODE_COLORS[node.type])}"]
        if node.type in _DOT_SHAPES:
            attrs.append(f"shape={_DOT_SHAPES[node.type]}")
        if node_id == ir.start_node:
            attrs.append("penwidth=3")
        lines.append(f"    {_dot_string(node_id)} [{', '.join(attrs)}];")
    for e in ir.edges:
        attrs = [f"label={_dot_string(_edge_text(e))}"]
        if e.kind in ("fallback", "on_failure", "timeout"):
            attrs.append("style=dashed")
        lines.append(f"    {_dot_string(e.source)} -> {_dot_string(e.target)} [{', '.join(attrs)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"
