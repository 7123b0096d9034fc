"""``workflow_graph``: the nodes, the fields every node has (agent, next_node, error handlers, SLA, telemetry),
the payload of its type, and the edges between nodes (unknown targets reported)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from operator import itemgetter
from typing import Any, NamedTuple

from ckp_core.compiler.binding import opt_template
from ckp_core.compiler.checks import ends_path
from ckp_core.compiler.fields import ID_RE, MISSING, Compilation, NodeContext
from ckp_core.compiler.nodes import PAYLOADS
from ckp_core.compiler.policies import error_handlers, sla, telemetry
from ckp_core.diagnostics import pointer
from ckp_core.ir import (
    EdgeIR,
    ErrorHandlerIR,
    HumanApprovalPayload,
    LlmActionPayload,
    LogicPayload,
    LoopPayload,
    NodeIR,
    ParallelPayload,
    construct,
)

NODE_TYPES = (
    "sequence", "logic", "loop", "parallel", "subflow", "processing", "verification", "llm_action",
    "human_approval", "transform", "terminate",
)
NODE_COMMON_FIELDS = frozenset({
    "type", "description", "agent", "next_node", "error_handlers", "is_checkpoint", "sla", "telemetry",
    "idempotency_key", "dispatch_mode", "workflow_dispatch_mode",
})
TYPE_FIELDS: dict[str, frozenset[str]] = {
    "sequence": frozenset({"steps", "validations"}),
    "logic": frozenset({"rules", "default_next_node"}),
    "loop": frozenset({"iterator", "iterator_variable", "index_variable", "body_node", "collect_variable",
                       "collect_expression", "errors_variable", "max_iterations", "continue_on_error"}),
    "parallel": frozenset({"branches", "wait_strategy", "branch_failure", "max_concurrency"}),
    "subflow": frozenset({"procedure_id", "version", "input_mapping", "output_mapping", "inherit_context",
                          "on_failure", "max_retries"}),
    "processing": frozenset({"operations"}),
    "verification": frozenset({"checks"}),
    "llm_action": frozenset({"prompt", "system_prompt", "model", "temperature", "max_tokens", "json_mode",
                             "attachments", "retry", "timeout_ms", "max_cost_per_llm_call_usd", "min_llm_quality",
                             "outputs", "orchestration_mode", "branches"}),
    "human_approval": frozenset({"prompt", "decision_type", "options", "option_routes", "input_schema",
                                 "input_variable", "decision_variable", "context_data", "timeout_ms",
                                 "timeout_action", "escalation_contact", "approval_level", "on_approve",
                                 "on_reject", "on_timeout"}),
    "transform": frozenset({"transformations"}),
    "terminate": frozenset({"status", "outputs", "cleanup_actions", "error_actions", "final_audit_log"}),
}
NO_NEXT_NODE = frozenset({"logic", "human_approval", "terminate"})
# The fields of every node that are often absent: when all are, a node is read without their readers.
_NODE_OPTIONS = frozenset({"agent", "workflow_dispatch_mode", "dispatch_mode", "error_handlers", "sla", "telemetry",
                           "idempotency_key", "is_checkpoint"})
_NODES_PATH = "/workflow_graph/nodes/"
_SECOND = itemgetter(1)  # the target of edge_ends
_NODE_FIELDS = {ntype: NODE_COMMON_FIELDS | fields for ntype, fields in TYPE_FIELDS.items()}
_context = partial(tuple.__new__, NodeContext)  # NodeContext(*fields) without its __new__ in Python


def is_orchestrator(agent: Any) -> bool:
    return agent is None or (isinstance(agent, str) and agent.lower() == "masteragent")


class Graph(NamedTuple):
    """Every node and edge of a document, and what the whole-document checks need of them."""

    nodes: dict[str, NodeIR]
    start_node: str | None
    edges: list[EdgeIR]
    unknown_types: bool  # whether a node has no or an unknown type
    node_ids: list[str]  # the keys of workflow_graph.nodes but comments
    # (source, target, kind) of each edge and the nodes that can end a path, read while each node was new in
    # memory (read again from the models at the end, on a large document, they cost as much again)
    edge_ends: list[tuple[str, str, str]]
    path_ends: list[str]


def graph(c: Compilation, doc: dict[str, Any], on_failure: str | None) -> Graph:
    """Every node and edge."""
    nodes: dict[str, NodeIR] = {}
    edges: list[EdgeIR] = []
    edge_ends: list[tuple[str, str, str]] = []
    path_ends: list[str] = []
    wg = c.required(doc, "workflow_graph", "")
    if wg is MISSING:
        return Graph(nodes, None, edges, False, [], edge_ends, path_ends)
    graph = c.obj(wg, "/workflow_graph", ("start_node", "nodes"))
    if graph is None:
        return Graph(nodes, None, edges, False, [], edge_ends, path_ends)
    start_node = c.node_ref(graph, "start_node", "/workflow_graph", required=True)
    raw_nodes = c.required(graph, "nodes", "/workflow_graph")
    if raw_nodes is MISSING or not c.expect(raw_nodes, (dict,), "object", "/workflow_graph/nodes"):
        return Graph(nodes, start_node, edges, False, [], edge_ends, path_ends)
    node_ids = [k for k in raw_nodes if not k.startswith("_")]
    if not node_ids:
        c.add("error", "invalid_value", "/workflow_graph/nodes: '{}' is not valid; expected at least one node",
              "/workflow_graph/nodes")
    unknown_types = False
    for node_id in node_ids:
        result = node(c, node_id, raw_nodes[node_id])
        c.node_id = c.step_id = None
        if type(result) is NodeIR:  # (not result == "unknown" first: a model's __eq__ is Python code)
            nodes[node_id] = result
            edges.extend(_edges_of(result, edge_ends))
            if ends_path(result):
                path_ends.append(node_id)
        elif result == "unknown":
            unknown_types = True
    if on_failure is not None and start_node is not None:
        edges.append(EdgeIR(source=start_node, target=on_failure, kind="on_failure",
                            field="/global_config/on_failure"))
        edge_ends.append((start_node, on_failure, "on_failure"))
    if start_node is not None and start_node not in raw_nodes:
        c.add("error", "unknown_start_node", f"start_node '{start_node}' does not exist in nodes",
              "/workflow_graph/start_node")
    if set(node_ids).issuperset(map(_SECOND, edge_ends)):  # (the node ids: the keys but comments)
        c.node_id = None
        return Graph(nodes, start_node, edges, unknown_types, node_ids, edge_ends, path_ends)
    for e in edges:
        if e.target not in raw_nodes or e.target.startswith("_"):
            c.node_id = e.source if e.kind != "on_failure" else None
            label = _edge_field_name(e)
            who = f"Node '{e.source}'" if e.kind != "on_failure" else "global_config"
            c.add("error", "unknown_target", f"{who}: {label} '{e.target}' not found", e.field)
    c.node_id = None
    return Graph(nodes, start_node, edges, unknown_types, node_ids, edge_ends, path_ends)


def node(c: Compilation, node_id: str, raw: Any) -> NodeIR | str | None:
    """One node: the fields every node has, then the payload of its type (``"unknown"``: no or an unknown type)."""
    path = _NODES_PATH + str(node_id).replace("~", "~0").replace("/", "~1")  # pointer(workflow_graph, nodes, id)
    c.node_id, c.step_id = node_id, None
    if not ID_RE.match(node_id):
        c.add("error", "invalid_identifier", f"{path}: '{node_id}' is not a valid node id", path)
    n = c.view(raw, path)  # (copied below before it is changed)
    if n is None:
        return None
    ntype = n.get("type", MISSING)
    if ntype is MISSING:
        c.required(n, "type", path)
        return "unknown"
    known = _NODE_FIELDS.get(ntype) if isinstance(ntype, str) else None  # (None: not a node type)
    if known is None:
        c.add("error", "unknown_node_type", f"Node '{node_id}': unknown node type '{ntype}' (expected one of: "
              f"{', '.join(NODE_TYPES)})", f"{path}/type")
        return "unknown"
    if not known.issuperset(n):
        c.unknown_fields(n, known, path)
    handlers: list[ErrorHandlerIR] = []
    plain = n.keys().isdisjoint(_NODE_OPTIONS)
    if plain:  # the common case: none of the readers below has anything to read
        agent = channel = dispatch_mode = node_sla = node_telemetry = idem = None
        orchestrator = True
        next_node = n.get("next_node")
        if next_node is not None and (type(next_node) is not str or ntype in NO_NEXT_NODE):
            next_node = _next_node(c, n, node_id, ntype, path)
    else:
        agent = n.get("agent")
        if agent is not None and not c.expect(agent, (str,), "string", f"{path}/agent"):
            agent = None
        orchestrator = is_orchestrator(agent)
        channel = None if orchestrator else str(agent).lower()
        next_node = _next_node(c, n, node_id, ntype, path)
        if "workflow_dispatch_mode" in n and "dispatch_mode" not in n:
            c.add("info", "alias_normalised", f"{path}/workflow_dispatch_mode: 'workflow_dispatch_mode' read as "
                  "'dispatch_mode'", f"{path}/workflow_dispatch_mode")
            n = dict(n)  # (not the document's object)
            n["dispatch_mode"] = n.pop("workflow_dispatch_mode")
        dispatch_mode = c.dispatch_mode(n, "dispatch_mode", path)
        if "error_handlers" in n:
            if ntype == "terminate":
                c.add("error", "edge_not_allowed", f"Node '{node_id}' (terminate) must not have error_handlers",
                      f"{path}/error_handlers")
            else:
                handlers = error_handlers(c, n["error_handlers"], f"{path}/error_handlers", orchestrator, channel)
        node_sla = sla(c, n["sla"], f"{path}/sla", ntype) if "sla" in n else None
        node_telemetry = telemetry(c, n["telemetry"], f"{path}/telemetry") if "telemetry" in n else None
        idem = opt_template(c, n, "idempotency_key", path)
    ctx = _context((node_id, ntype, path, orchestrator, channel, dispatch_mode))
    payload = PAYLOADS[ntype](c, ctx, n)
    if payload is None:
        return None
    description = n.get("description")
    if description is not None and type(description) is not str:
        description = c.string(n, "description", path)
    is_checkpoint = False if plain else c.boolean(n, "is_checkpoint", path)
    return construct(NodeIR, {
        "id": node_id, "type": ntype, "description": description, "agent": agent, "channel": channel,
        "orchestrator": orchestrator, "next_node": next_node, "error_handlers": handlers,
        "is_checkpoint": is_checkpoint, "sla": node_sla, "telemetry": node_telemetry,
        "idempotency_key": idem, "dispatch_mode": dispatch_mode, "payload": payload,
    })


def _next_node(c: Compilation, n: dict[str, Any], node_id: str, ntype: str, path: str) -> str | None:
    next_node = c.node_ref(n, "next_node", path)
    if next_node is not None and ntype in NO_NEXT_NODE:
        c.add("error", "edge_not_allowed", f"Node '{node_id}' ({ntype}) must not have next_node",
              f"{path}/next_node")
        return None
    return next_node


def _edges_of(node: NodeIR, ends: list[tuple[str, str, str]]) -> list[EdgeIR]:
    """The edges a node declares, in the order of its fields; (source, target, kind) of each added to ``ends``."""
    fields = node.__dict__  # (reading a model's attribute goes through pydantic's __getattr__ hook)
    source = fields["id"]
    base = _NODES_PATH + source.replace("~", "~0").replace("/", "~1")
    out: list[EdgeIR] = []
    p = fields["payload"]
    # Exact classes (the payload models have no subclasses): isinstance would go through ABCMeta for each.
    payload_edges = _PAYLOAD_EDGES.get(type(p))
    if payload_edges is not None:
        payload_edges(p, source, base, out, ends)
    next_node = fields["next_node"]
    if next_node is not None:
        _edge(out, ends, source, next_node, "next", None, f"{base}/next_node")
    for h in fields["error_handlers"]:
        if h.fallback_node is not None:
            _edge(out, ends, source, h.fallback_node, "fallback", h.error_type or "*",
                  f"{base}/error_handlers/{h.index}/fallback_node")
    if fields["sla"] is not None and fields["sla"].escalation_handler is not None:
        _edge(out, ends, source, fields["sla"].escalation_handler, "fallback", "sla", f"{base}/sla/escalation_handler")
    return out


def _logic_edges(p: LogicPayload, source: str, base: str, out: list[EdgeIR], ends: list[tuple[str, str, str]]) -> None:
    for i, rule in enumerate(p.rules):  # (a rule always has a target)
        _edge(out, ends, source, rule.next_node, "condition", rule.condition.source, f"{base}/rules/{i}/next_node")
    if p.default_next_node is not None:
        _edge(out, ends, source, p.default_next_node, "default", None, f"{base}/default_next_node")


def _loop_edges(p: LoopPayload, source: str, base: str, out: list[EdgeIR], ends: list[tuple[str, str, str]]) -> None:
    if p.body_node is not None:
        _edge(out, ends, source, p.body_node, "loop_body", None, f"{base}/body_node")


def _parallel_edges(p: ParallelPayload, source: str, base: str, out: list[EdgeIR],
                    ends: list[tuple[str, str, str]]) -> None:
    for i, br in enumerate(p.branches):
        if br.start_node is not None:
            _edge(out, ends, source, br.start_node, "branch", br.branch_id, f"{base}/branches/{i}/start_node")


def _llm_action_edges(p: LlmActionPayload, source: str, base: str, out: list[EdgeIR],
                      ends: list[tuple[str, str, str]]) -> None:
    if p.orchestration_mode:
        for i, target in enumerate(p.branches):
            if target is not None:
                _edge(out, ends, source, target, "condition", "_next_node", f"{base}/branches/{i}")


def _human_approval_edges(p: HumanApprovalPayload, source: str, base: str, out: list[EdgeIR],
                          ends: list[tuple[str, str, str]]) -> None:
    for target, kind, fld in ((p.on_approve, "approve", "on_approve"), (p.on_reject, "reject", "on_reject"),
                              (p.on_timeout, "timeout", "on_timeout")):
        if target is not None:
            _edge(out, ends, source, target, kind, None, f"{base}/{fld}")
    for option, target in p.option_routes.items():
        _edge(out, ends, source, target, "option", option, f"{base}/option_routes/{pointer(option)[1:]}")


_PAYLOAD_EDGES: dict[type, Callable[[Any, str, str, list[EdgeIR], list[tuple[str, str, str]]], None]] = {
    LogicPayload: _logic_edges,
    LoopPayload: _loop_edges,
    ParallelPayload: _parallel_edges,
    LlmActionPayload: _llm_action_edges,
    HumanApprovalPayload: _human_approval_edges,
}


def _edge(out: list[EdgeIR], ends: list[tuple[str, str, str]], source: str, target: str, kind: str,
          label: str | None, fld: str) -> None:
    out.append(construct(EdgeIR, {"source": source, "target": target, "kind": kind, "label": label, "field": fld}))
    ends.append((source, target, kind))


def _edge_field_name(e: EdgeIR) -> str:
    """``rules[0].next_node`` style field name of an edge, for messages."""
    if e.kind == "on_failure":
        return "on_failure"
    parts = e.field.split("/")[4:]
    out = ""
    for part in parts:
        if part.isdigit():
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part.replace("~1", "/").replace("~0", "~")
    return out
