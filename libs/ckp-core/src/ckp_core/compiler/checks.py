"""Whole-document checks, once every node is compiled: subflow recursion (through the injected, read-only
:class:`ProcedureLookup`), unreachable nodes and dead ends, undeclared variables and secret aliases."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from itertools import chain
from operator import itemgetter
from typing import Protocol

from ckp_core.compiler.fields import Compilation, Read, StringRead
from ckp_core.diagnostics import pointer
from ckp_core.ir import (
    HumanApprovalPayload,
    LlmActionPayload,
    LogicPayload,
    NodeIR,
    SubflowRefIR,
    TerminatePayload,
    TriggerIR,
)
from ckp_core.variables import BUILTIN_NAMES, VariableSpec

_ROOT = itemgetter(0)
_FLOW_KINDS = frozenset({"next", "condition", "default", "approve", "reject", "timeout", "option"})


class ProcedureLookup(Protocol):
    """Read-only access to stored procedure versions, for subflow checks (§3.9).

    Returns the subflow references of the version (``version`` None or ``latest``: the newest active one), or
    None when no such version is stored.
    """

    def __call__(self, procedure_id: str, version: str | None) -> list[SubflowRefIR] | None: ...


def subflow_checks(c: Compilation, lookup: ProcedureLookup | None, procedure_id: str | None,
                   refs: list[SubflowRefIR]) -> None:
    for ref in refs:
        c.node_id = ref.node_id
        path = pointer("workflow_graph", "nodes", ref.node_id, "procedure_id")
        if ref.procedure_id == procedure_id:
            c.add("error", "subflow_recursion", f"Node '{ref.node_id}': subflow '{ref.procedure_id}' calls "
                  f"itself ({procedure_id} -> {ref.procedure_id})", path)
            continue
        if lookup is None:
            continue
        child = lookup(ref.procedure_id, ref.version)
        if child is None:
            c.add("warning", "subflow_not_found", f"Node '{ref.node_id}': subflow "
                  f"'{ref.procedure_id}@{ref.version or 'latest'}' is not imported yet", path)
            continue
        chain = find_cycle(lookup, procedure_id, [procedure_id or "", ref.procedure_id], child, set())
        if chain is not None:
            c.add("error", "subflow_recursion", f"Node '{ref.node_id}': subflow '{ref.procedure_id}' calls "
                  f"itself ({' -> '.join(chain)})", path)
    c.node_id = None


def find_cycle(lookup: ProcedureLookup, root: str | None, chain: list[str], refs: list[SubflowRefIR],
               seen: set[tuple[str, str | None]]) -> list[str] | None:
    for ref in refs:
        if ref.procedure_id == root:
            return [*chain, ref.procedure_id]
        key = (ref.procedure_id, ref.version)
        if key in seen or len(chain) > 32:
            continue
        seen.add(key)
        child = lookup(ref.procedure_id, ref.version)
        if child:
            found = find_cycle(lookup, root, [*chain, ref.procedure_id], child, seen)
            if found:
                return found
    return None


def reachability(c: Compilation, start: str, node_ids: list[str], edge_ends: list[tuple[str, str, str]],
                 nodes: dict[str, NodeIR], path_ends: list[str]) -> None:
    """Unreachable nodes and dead ends. ``edge_ends``: (source, target, kind) of every edge; ``path_ends``: the
    nodes whose normal completion can end their path (:func:`ends_path`)."""
    adjacent: dict[str, list[str]] = {}
    reverse: dict[str, list[str]] = {}  # along the normal flow only
    for source, target, kind in edge_ends:
        if source in adjacent:
            adjacent[source].append(target)
        else:
            adjacent[source] = [target]
        if kind in _FLOW_KINDS:
            if target in reverse:
                reverse[target].append(source)
            else:
                reverse[target] = [source]
    seen = _closure({start}, adjacent)
    if not seen.issuperset(node_ids):
        for node_id in node_ids:
            if node_id not in seen:
                c.node_id = node_id
                c.add("warning", "unreachable_node", f"Node '{node_id}' is unreachable from start_node '{start}'",
                      pointer("workflow_graph", "nodes", node_id))
    c.node_id = None
    # Dead ends: reachable nodes from which the normal flow can never end the path (a cycle with no exit).
    if len(nodes) != len(node_ids):
        return
    can_end = _closure(set(path_ends), reverse)
    if not can_end.issuperset(seen):
        for node_id in node_ids:
            if node_id in seen and node_id not in can_end:
                c.node_id = node_id
                c.add("warning", "dead_end", f"Node '{node_id}': no route from here ever ends the path; it can "
                      "only stop at max_hops or through an error", pointer("workflow_graph", "nodes", node_id))
    c.node_id = None


def _closure(start: set[str], adjacent: dict[str, list[str]]) -> set[str]:
    """The nodes reached from ``start`` along ``adjacent`` (depth first: the order does not matter here)."""
    seen = set(start)
    stack = list(start)
    get = adjacent.get
    while stack:
        for nxt in get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def ends_path(node: NodeIR) -> bool:
    """Whether the node's normal completion can end its path (terminate, or no successor)."""
    p = node.payload
    if type(p) is TerminatePayload:
        return True
    if type(p) is LogicPayload:
        return False
    if type(p) is HumanApprovalPayload:
        return False
    if type(p) is LlmActionPayload and p.orchestration_mode:
        return node.next_node is None and not p.branches
    return node.next_node is None


def undeclared(c: Compilation, variables: Mapping[str, VariableSpec], trigger: TriggerIR | None) -> None:
    known = set(variables) | c.produced | BUILTIN_NAMES | set(trigger.input_vars if trigger else ())
    if known.issuperset(map(_ROOT, c.reads)) and known.issuperset(chain.from_iterable(map(_ROOT, c.string_reads))):
        c.node_id = c.step_id = None  # (most documents)
        return
    # The template strings' reads after the others: the diagnostics are sorted by path, and a path is read either
    # by an expression or by a template string.
    reported: set[tuple[str, str]] = set()
    for root, path, node_id, step_id in chain(c.reads, _string_reads(c.string_reads)):
        if root not in known and (root, path) not in reported:
            reported.add((root, path))
            c.node_id, c.step_id = node_id, step_id
            c.add("warning", "undeclared_variable", f"{path}: '{root}' is not declared and no step produces it; "
                  "it renders as null", path)
    c.node_id = c.step_id = None


def _string_reads(string_reads: list[StringRead]) -> Iterator[Read]:
    for roots, path, at, node_id, step_id in string_reads:
        for root in roots:
            yield root, path + at, node_id, step_id


def check_secret_aliases(c: Compilation) -> None:
    reported: set[tuple[str, str]] = set()
    for alias, path, node_id, step_id in c.secret_uses:
        if alias not in c.secret_aliases and (alias, path) not in reported:
            reported.add((alias, path))
            c.node_id, c.step_id = node_id, step_id
            c.add("warning", "undeclared_secret_alias", f"{path}: secret alias '{alias}' is not declared; it is "
                  "resolved by name", path)
    c.node_id = c.step_id = None
