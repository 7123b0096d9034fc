// A procedure's graph, laid out by dagre (vendored: /static/vendor/dagrejs-dagre-*/) from the graph JSON the page
// embeds (ui/graph.py client_data: nodes, edges, start node, node statuses) and drawn as SVG in place of the
// server-drawn one (what a browser without JavaScript shows).
//
// On the run page the graph's fragment is fetched again as the run's events arrive (htmx): when the procedure's
// shape is the same, only the nodes' statuses change in place (no new layout, keyboard focus stays on its node);
// otherwise the new fragment is swapped in and drawn. A page whose graph container has data-node-href makes each
// node a link (that address followed by the node id).
(function () {
  "use strict";

  var SVG = "http://www.w3.org/2000/svg";
  var NODE_W = 220;
  var NODE_H = 64;
  var ID_CHARS = 24;
  var CAPTION_CHARS = 30;
  var EDGE_LABEL_CHARS = 28;
  // what an edge of these kinds says when the graph JSON gives it no label of its own
  var KIND_LABELS = { "default": "otherwise", approve: "approved", reject: "rejected", timeout: "timed out",
    fallback: "fallback", on_failure: "on failure", loop_body: "each item" };

  function el(name, attrs, text) {
    var node = document.createElementNS(SVG, name);
    Object.keys(attrs || {}).forEach(function (key) {
      if (attrs[key] !== null && attrs[key] !== undefined) { node.setAttribute(key, String(attrs[key])); }
    });
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  function cut(value, chars) {
    return value.length <= chars ? value : value.slice(0, chars - 1) + "…";
  }

  function words(value) {
    return String(value).replace(/_/g, " ");
  }

  function dataOf(container) {
    var script = container.querySelector("script[data-graph-data]");
    return script ? JSON.parse(script.textContent) : null;
  }

  // what must match for statuses to be updated in place rather than the graph drawn again
  function shapeOf(data) {
    return JSON.stringify([data.start, data.nodes, data.edges]);
  }

  function nodeTitle(node, status) {
    return node.id + " (" + words(node.type) + ")" + (status ? ": " + words(status) : "") + " — " + node.label;
  }

  function typeLine(node, status) {
    return words(node.type) + (status ? " · " + words(status) : "");
  }

  // the nodes breadth-first from the start node, then any the start does not reach: dagre breaks each cycle at
  // the edge that closes it in this order, so the start is on top and a loop back points up
  function fromStart(data) {
    var next = {};
    data.edges.forEach(function (edge) { (next[edge.source] = next[edge.source] || []).push(edge.target); });
    var seen = {};
    var order = [];
    var queue = data.start && data.nodes.some(function (n) { return n.id === data.start; }) ? [data.start] : [];
    queue.forEach(function (id) { seen[id] = true; });
    while (queue.length) {
      var id = queue.shift();
      order.push(id);
      (next[id] || []).forEach(function (target) {
        if (!seen[target]) { seen[target] = true; queue.push(target); }
      });
    }
    data.nodes.forEach(function (n) { if (!seen[n.id]) { order.push(n.id); } });
    return order;
  }

  function edgeText(edge) {
    return edge.label ? String(edge.label) : (KIND_LABELS[edge.kind] || "");
  }

  function layout(data) {
    var g = new window.dagre.graphlib.Graph({ multigraph: true });
    g.setGraph({ rankdir: "TB", nodesep: 36, ranksep: 56, edgesep: 16, marginx: 24, marginy: 24 });
    g.setDefaultEdgeLabel(function () { return {}; });
    fromStart(data).forEach(function (id) { g.setNode(id, { width: NODE_W, height: NODE_H }); });
    data.edges.forEach(function (edge) {
      var label = cut(edgeText(edge), EDGE_LABEL_CHARS);
      // a label is a box dagre keeps room for beside its edge
      var box = label ? { width: label.length * 7 + 10, height: 18, labelpos: "c" } : {};
      g.setEdge(edge.source, edge.target, box, edge.id);
    });
    window.dagre.layout(g);
    return g;
  }

  // a smooth path through dagre's bend points: straight ends, quadratic curves between the segments' middles
  function pathOf(points) {
    var d = "M" + points[0].x + "," + points[0].y;
    for (var i = 1; i < points.length - 1; i++) {
      var mx = (points[i].x + points[i + 1].x) / 2;
      var my = (points[i].y + points[i + 1].y) / 2;
      d += " Q" + points[i].x + "," + points[i].y + " " + mx + "," + my;
    }
    var last = points[points.length - 1];
    return d + " L" + last.x + "," + last.y;
  }

  function setStatus(group, node, status) {
    group.setAttribute("class", "node node-" + node.type + (status ? " node-status-" + status : "") +
      (group.dataset.start === "true" ? " node-start" : ""));
    group.dataset.status = status || "";
    group.querySelector("title").textContent = nodeTitle(node, status);
    group.querySelector(".node-type").textContent = typeLine(node, status);
  }

  function draw(container, data) {
    var id = container.dataset.graph;
    var label = container.dataset.graphLabel || "Graph";
    var href = container.dataset.nodeHref;
    var g = layout(data);
    var size = g.graph();
    var svg = el("svg", {
      "class": "graph", "data-testid": "graph", "data-layout": "dagre",
      viewBox: "0 0 " + size.width + " " + size.height, width: size.width, height: size.height,
      role: href ? "group" : "img", "aria-labelledby": id + "-title"
    });
    svg.appendChild(el("title", { id: id + "-title" }, label));
    var defs = el("defs");
    var marker = el("marker", { id: id + "-arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7,
      markerHeight: 7, orient: "auto-start-reverse" });
    marker.appendChild(el("path", { d: "M0,0 L10,5 L0,10 z", "class": "arrow" }));
    defs.appendChild(marker);
    svg.appendChild(defs);

    data.edges.forEach(function (edge) {
      var laid = g.edge({ v: edge.source, w: edge.target, name: edge.id });
      var back = g.node(edge.target).rank <= g.node(edge.source).rank;  // closes a cycle (dagre reversed it)
      svg.appendChild(el("path", {
        d: pathOf(laid.points), "class": "edge edge-" + edge.kind + (back ? " edge-back" : ""),
        "data-edge": edge.id, "data-source": edge.source, "data-target": edge.target,
        "marker-end": "url(#" + id + "-arrow)"
      }));
      var caption = edgeText(edge);
      if (caption) {
        var text = el("text", { x: laid.x, y: laid.y + 4, "class": "edge-label", "text-anchor": "middle",
          "data-edge-label": edge.id }, cut(caption, EDGE_LABEL_CHARS));
        text.appendChild(el("title", {}, words(edge.kind) + ": " + caption));
        svg.appendChild(text);
      }
    });

    data.nodes.forEach(function (node) {
      var box = g.node(node.id);
      var x = box.x - NODE_W / 2;
      var y = box.y - NODE_H / 2;
      var status = data.status[node.id];
      var group = el("g", { "data-node": node.id });
      group.dataset.start = String(node.id === data.start);
      group.appendChild(el("title"));
      var body = href ? el("a", { href: href + encodeURIComponent(node.id) + "#timeline-heading" }) : group;
      var terminal = node.type === "terminate";
      body.appendChild(el("rect", { x: x, y: y, width: NODE_W, height: NODE_H, rx: terminal ? 22 : 6 }));
      body.appendChild(el("text", { x: x + 10, y: y + 20, "class": "node-id" },
        cut(node.id, ID_CHARS) + (node.id === data.start ? " ▸ start" : "")));
      body.appendChild(el("text", { x: x + 10, y: y + 38, "class": "node-label" }, cut(node.label, CAPTION_CHARS)));
      body.appendChild(el("text", { x: x + 10, y: y + 55, "class": "node-type" }));
      if (body !== group) { group.appendChild(body); }
      svg.appendChild(group);
      setStatus(group, node, status);
    });

    var old = container.querySelector("svg");
    if (old) { container.replaceChild(svg, old); } else { container.appendChild(svg); }
    container.dataset.rendered = shapeOf(data);
  }

  function render(container) {
    if (!window.dagre || container.dataset.rendered) { return; }
    var data = dataOf(container);
    if (data && data.nodes.length) { draw(container, data); }
  }

  function renderAll() {
    Array.prototype.forEach.call(document.querySelectorAll("[data-graph]"), render);
  }

  // the same graph with new statuses: change them in place and tell htmx not to swap
  function updateInPlace(target, html) {
    var current = target.querySelector("[data-graph][data-rendered]");
    if (!current) { return false; }
    var incoming = document.createElement("template");
    incoming.innerHTML = html;
    var fresh = incoming.content.querySelector("[data-graph]");
    var data = fresh ? dataOf(fresh) : null;
    if (!data || fresh.dataset.graph !== current.dataset.graph || shapeOf(data) !== current.dataset.rendered) {
      return false;
    }
    data.nodes.forEach(function (node) {
      var group = current.querySelector('g[data-node="' + CSS.escape(node.id) + '"]');
      if (group) { setStatus(group, node, data.status[node.id]); }
    });
    return true;
  }

  document.addEventListener("htmx:beforeSwap", function (evt) {
    var target = evt.detail.target;
    if (evt.detail.shouldSwap && !evt.detail.isError && target && target.hasAttribute("data-graph-live") &&
        typeof evt.detail.serverResponse === "string" && updateInPlace(target, evt.detail.serverResponse)) {
      evt.detail.shouldSwap = false;
    }
  });
  // a graph that arrived with new content (a new shape, a replay position) is drawn before the browser paints it
  document.addEventListener("htmx:afterSwap", renderAll);
  renderAll();
}());
