// The run page's live timeline: htmx's SSE extension delivers the run's events (JSON, from the API's stream);
// this renders each one as a list item, in seq order, skipping any it has already shown (after a reconnect the
// server replays from the last event id, so nothing is missed and nothing is shown twice). A dropped stream is
// opened again promptly (LiveSource below).
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

  // A new connection resumes after the last event shown (the browser's own reconnects send Last-Event-ID instead).
  function resumeUrl(url) {
    var list = timeline();
    var after = list ? Number(list.dataset.after || "0") : 0;
    var target = new URL(url, window.location.href);
    if (after > 0) { target.searchParams.set("after", String(after)); }
    return target.toString();
  }

  // The stream the SSE extension listens to. While the server is unreachable the browser reconnects by itself
  // (every 3 s: the streams' retry field). When the browser gives up instead (an answer that is not a stream:
  // a 502 from a proxy, a 503 while the gateway starts), the extension's own retries back off up to 64 s; this
  // one opens a new connection after 0.5 s, 1 s, 2 s, then every 5 s at most, under the same listeners, and
  // reports the connection as reconnecting (never closed) so that the extension does not start a second one.
  var MAX_WAIT_MS = 5000;

  function LiveSource(url) {
    this.url = url;
    this.listeners = {};
    this.onopen = null;
    this.onerror = null;
    this.readyState = 0;  // EventSource.CONNECTING
    this.failures = 0;
    this.closed = false;
    this.open();
  }
  LiveSource.prototype.forward = function (type) {
    var self = this;
    return function (event) {
      (self.listeners[type] || []).slice().forEach(function (listener) { listener.call(self, event); });
    };
  };
  LiveSource.prototype.open = function () {
    var self = this;
    var source = new EventSource(resumeUrl(self.url), { withCredentials: true });
    self.source = source;
    Object.keys(self.listeners).forEach(function (type) { source.addEventListener(type, self.forward(type)); });
    source.onopen = function (event) {
      self.failures = 0;
      self.readyState = 1;  // OPEN
      if (self.onopen) { self.onopen(event); }
    };
    source.onerror = function (event) {
      if (self.closed) { return; }
      self.readyState = 0;
      if (self.onerror) { self.onerror(event); }
      if (source.readyState === 2) {  // EventSource.CLOSED: the browser will not retry this one
        var wait = Math.min(500 * Math.pow(2, self.failures), MAX_WAIT_MS);
        self.failures += 1;
        self.timer = window.setTimeout(function () { if (!self.closed) { self.open(); } }, wait);
        say("Connection lost; reconnecting in " + wait / 1000 + " s…");
      }
    };
  };
  LiveSource.prototype.addEventListener = function (type, listener) {
    if (!this.listeners[type]) {
      this.listeners[type] = [];
      this.source.addEventListener(type, this.forward(type));
    }
    this.listeners[type].push(listener);
  };
  LiveSource.prototype.removeEventListener = function (type, listener) {
    this.listeners[type] = (this.listeners[type] || []).filter(function (l) { return l !== listener; });
  };
  LiveSource.prototype.close = function () {
    this.closed = true;
    this.readyState = 2;
    window.clearTimeout(this.timer);
    this.source.close();
  };

  if (window.htmx) {
    window.htmx.createEventSource = function (url) { return new LiveSource(url); };
  }
}());
