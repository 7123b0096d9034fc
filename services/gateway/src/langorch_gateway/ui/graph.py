"""A procedure's graph for the console's pages, from the API's ``GraphOut``, with a run's node statuses when there
is a run.

In the browser, ``static/console/graph.js`` lays the graph out with dagre (vendored, ``static/vendor/``) from
:attr:`Drawing.data` (the graph's nodes and edges and the statuses, embedded in the page as JSON) and draws it as
SVG; the run page updates its nodes' statuses in place as the run's events arrive. The SVG geometry computed here
from the server's own layout (each node's ``position`` is the top-left corner of its box) is what a browser without
JavaScript shows instead: the page replaces it with dagre's drawing when its script runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

NODE_W = 220
NODE_H = 56
MARGIN = 40
CAPTION_CHARS = 30  # a caption longer than this is cut to fit its box (the full text is the node's tooltip)


@dataclass(frozen=True)
class Box:
    id: str
    x: float
    y: float
    caption: str  # the status (with a run) and the label, cut to fit
    full_label: str
    node_type: str
    status: str | None
    is_start: bool


@dataclass(frozen=True)
class Line:
    path: str
    kind: str
    label: str | None
    label_x: float
    label_y: float
    back: bool  # to a node above or level with its source: a loop back


@dataclass(frozen=True)
class Drawing:
    width: float
    height: float
    view_box: str
    boxes: list[Box]
    lines: list[Line]
    data: dict[str, Any]  # what graph.js lays out and draws: {start, nodes, edges, status}


def drawing(graph: Mapping[str, Any], node_status: Mapping[str, Any] | None = None) -> Drawing:
    """The SVG geometry of ``graph``; ``node_status`` (a run's ``{node_id: {status, …}}``) colours the boxes."""
    statuses = node_status or {}
    nodes = list(graph.get("nodes") or [])
    where = {n["id"]: (float(n["position"]["x"]), float(n["position"]["y"])) for n in nodes}
    boxes = []
    for n in nodes:
        x, y = where[n["id"]]
        label = str((n.get("data") or {}).get("label") or n["id"])
        state = statuses.get(n["id"])
        status = state.get("status") if state else None
        caption = f"{str(status).replace('_', ' ')} · {label}" if status else label
        boxes.append(Box(id=n["id"], x=x, y=y, caption=_cut(caption), full_label=label,
                         node_type=str(n.get("type") or ""), status=status,
                         is_start=n["id"] == graph.get("start_node")))
    lines = [_line(e, where) for e in graph.get("edges") or [] if e["source"] in where and e["target"] in where]
    xs = [x for x, _ in where.values()] or [0.0]
    ys = [y for _, y in where.values()] or [0.0]
    left, top = min(xs) - MARGIN - NODE_W / 2, min(ys) - MARGIN
    width = max(xs) - min(xs) + NODE_W * 2 + 2 * MARGIN  # room for loop-back curves beside the boxes
    height = max(ys) - min(ys) + NODE_H + 2 * MARGIN
    return Drawing(width=width, height=height, view_box=f"{left:g} {top:g} {width:g} {height:g}", boxes=boxes,
                   lines=lines, data=client_data(graph, statuses))


def client_data(graph: Mapping[str, Any], node_status: Mapping[str, Any]) -> dict[str, Any]:
    """The graph as ``graph.js`` reads it: nodes (id, type, label), edges (id, source, target, kind, label) between
    known nodes, the start node and each node's status (``{node_id: status}``, empty without a run)."""
    nodes = [{"id": n["id"], "type": str(n.get("type") or ""),
              "label": str((n.get("data") or {}).get("label") or n["id"])} for n in graph.get("nodes") or []]
    known = {n["id"] for n in nodes}
    edges = [{"id": str(e.get("id") or f"{e['source']}->{e['target']}#{i}"), "source": e["source"],
              "target": e["target"], "kind": str(e.get("kind") or "next"), "label": e.get("label")}
             for i, e in enumerate(graph.get("edges") or []) if e["source"] in known and e["target"] in known]
    status = {node_id: str(state.get("status")) for node_id, state in node_status.items()
              if node_id in known and isinstance(state, Mapping) and state.get("status")}
    return {"start": graph.get("start_node"), "nodes": nodes, "edges": edges, "status": status}


def _cut(label: str) -> str:
    return label if len(label) <= CAPTION_CHARS else label[:CAPTION_CHARS - 1] + "…"


def _line(edge: Mapping[str, Any], where: Mapping[str, tuple[float, float]]) -> Line:
    (sx, sy), (tx, ty) = where[edge["source"]], where[edge["target"]]
    start_x, start_y = sx + NODE_W / 2, sy + NODE_H
    end_x, end_y = tx + NODE_W / 2, ty
    back = ty <= sy
    if back:  # around the right side of both boxes
        side = max(sx, tx) + NODE_W + MARGIN / 2
        start_x, start_y, end_x, end_y = sx + NODE_W, sy + NODE_H / 2, tx + NODE_W, ty + NODE_H / 2
        path = f"M{start_x:g},{start_y:g} C{side:g},{start_y:g} {side:g},{end_y:g} {end_x:g},{end_y:g}"
        label_x, label_y = side, (start_y + end_y) / 2
    else:
        middle = (start_y + end_y) / 2
        path = f"M{start_x:g},{start_y:g} C{start_x:g},{middle:g} {end_x:g},{middle:g} {end_x:g},{end_y:g}"
        label_x, label_y = (start_x + end_x) / 2, middle
    return Line(path=path, kind=str(edge.get("kind") or "next"), label=edge.get("label"), label_x=label_x,
                label_y=label_y, back=back)
