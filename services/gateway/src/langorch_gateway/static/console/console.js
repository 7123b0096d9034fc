// The run page's live timeline: htmx's SSE extension delivers the run's events (JSON, from the API's stream);
// this renders each one as a list item, in seq order, skipping any it has already shown (after a reconnect the
// server replays from the last event id, so nothing is missed and nothing is shown twice).
(function () {
  "use strict";

  function timeline() {
    return document.querySelector("[data-timeline]");
  }

  function text(tag, className, value) {
    var el = document.createElement(tag);
    if (className) { el.className = className; }
    el.textContent = value;
    return el;
  }

  function when(value) {
    return value ? value.replace("T", " ").slice(0, 19) + " UTC" : "—";
  }

  function eventItem(e) {
    var li = document.createElement("li");
    li.className = "event event-" + e.event_type;
    li.dataset.seq = String(e.seq);
    li.dataset.type = e.event_type;  // what the timeline filters look at (timeline_filter.js)
    li.dataset.node = e.node_id || "";
    li.appendChild(text("span", "seq", "#" + e.seq));
    var time = text("time", "", when(e.created_at));
    time.setAttribute("datetime", e.created_at || "");
    li.appendChild(time);
    li.appendChild(text("span", "etype", e.event_type));
    if (e.node_id) {
      li.appendChild(text("span", "where", e.node_id + (e.step_id ? " · " + e.step_id : "")));
    }
    li.appendChild(text("span", "actor muted", e.actor || ""));
    if (e.payload && Object.keys(e.payload).length) {
      var details = document.createElement("details");
      details.appendChild(text("summary", "", "Payload"));
      var pre = text("pre", "", JSON.stringify(e.payload, null, 2));
      pre.tabIndex = 0;  // a scrollable region: reachable by keyboard
      details.appendChild(pre);
      li.appendChild(details);
    }
    return li;
  }

  function say(message) {
    var state = document.getElementById("live-state");
    if (state) { state.textContent = message; }
  }

  document.addEventListener("htmx:sseBeforeMessage", function (evt) {
    var list = evt.target;
    if (!list.hasAttribute || !list.hasAttribute("data-timeline")) { return; }
    evt.preventDefault();  // the data is JSON: rendered here, not swapped in as HTML
    var e = JSON.parse(evt.detail.data);
    if (e.seq <= Number(list.dataset.lastSeq || "0")) { return; }
    list.appendChild(eventItem(e));
    list.dataset.lastSeq = String(e.seq);
    list.dataset.after = String(e.stream_seq);
  });
  // What a stream said is re-read from projections at least as new as it: the run page's header and graph
  // follow its timeline, a live list the last update it was told about.
  document.addEventListener("htmx:sseMessage", function (evt) {
    if (evt.detail && evt.detail.lastEventId && evt.target.dataset) {
      evt.target.dataset.position = evt.detail.lastEventId;
    }
  });
  document.addEventListener("htmx:configRequest", function (evt) {
    var list = timeline();
    var position = evt.target.dataset ? evt.target.dataset.position : "";
    if (list && evt.target.hasAttribute("data-follows-timeline")) { position = list.dataset.after; }
    if (Number(position || "0") > 0) {
      evt.detail.headers["X-LangOrch-Min-Position"] = position;
    }
  });

  // A live list is not replaced under someone typing in it: they are told it changed instead.
  document.addEventListener("htmx:beforeRequest", function (evt) {
    var live = evt.target;
    if (!live.hasAttribute || !live.hasAttribute("data-live-list")) { return; }
    var busy = Array.prototype.some.call(live.querySelectorAll("input, textarea, select"), function (field) {
      return field === document.activeElement || (field.type !== "hidden" && field.value);
    });
    if (busy) {
      evt.preventDefault();
      var state = document.getElementById("inbox-state");
      if (state) { state.textContent = "The inbox has changed: reload the page to see it."; }
    }
  });
  document.addEventListener("htmx:sseOpen", function () { say("Live: new events appear as they happen."); });
  document.addEventListener("htmx:sseError", function () { say("Connection lost; reconnecting…"); });
  document.addEventListener("htmx:sseClose", function () { say("The run has ended; the timeline is complete."); });

  // When the extension opens a new EventSource after a failed reconnect, resume after the last event shown
  // (the browser's own reconnects send Last-Event-ID instead).
  if (window.htmx) {
    window.htmx.createEventSource = function (url) {
      var list = timeline();
      var after = list ? Number(list.dataset.after || "0") : 0;
      var target = new URL(url, window.location.href);
      if (after > 0) { target.searchParams.set("after", String(after)); }
      return new EventSource(target.toString(), { withCredentials: true });
    };
  }
}());
