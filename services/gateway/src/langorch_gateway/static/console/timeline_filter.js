// The run page's timeline filters, for the live events: the history is filtered by the server (ui/timeline.py),
// and the events that arrive over SSE afterwards are all the run's, so each one the filter excludes is taken out
// as soon as it is added. The filter is what the page carries: data-filter-types (a comma list; empty: every
// type) and data-filter-node (empty: any node).
(function () {
  "use strict";

  function excluded(list, item) {
    var types = (list.dataset.filterTypes || "").split(",").filter(Boolean);
    var node = list.dataset.filterNode || "";
    if (types.length && types.indexOf(item.dataset.type || "") < 0) { return true; }
    return node !== "" && (item.dataset.node || "") !== node;
  }

  function watch() {
    var list = document.querySelector("[data-timeline]");
    if (!list || (!list.dataset.filterTypes && !list.dataset.filterNode)) { return; }
    new MutationObserver(function (changes) {
      changes.forEach(function (change) {
        Array.prototype.forEach.call(change.addedNodes, function (item) {
          if (item.nodeType === 1 && item.dataset && excluded(list, item)) { item.remove(); }
        });
      });
    }).observe(list, { childList: true });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", watch);
  } else {
    watch();
  }
}());
