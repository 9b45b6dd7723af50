/* Live refresh of a deployment's page. The page marks its live parts with data-live="<field>" and its
   root with data-live-url (an admin JSON view) and data-state. Every couple of seconds, while the
   deployment is open, the script reads the JSON and updates those parts in place; when the state
   changes (started, finished, approved...) it reloads the page once, so that what it offers is
   decided again by the portal. No library, no CDN. */
(function () {
  "use strict";
  var root = document.querySelector("[data-live-url]");
  if (!root) {
    return;
  }
  var url = root.getAttribute("data-live-url");
  var state = root.getAttribute("data-state");
  var every = parseInt(root.getAttribute("data-every") || "2000", 10);

  function show(name, value) {
    root.querySelectorAll('[data-live="' + name + '"]').forEach(function (element) {
      if (element.tagName === "PROGRESS") {
        element.value = value;
      } else if (element.tagName === "PRE") {
        var atBottom = element.scrollTop + element.clientHeight >= element.scrollHeight - 4;
        if (element.textContent !== value) {
          element.textContent = value || "-";
          if (atBottom) {
            element.scrollTop = element.scrollHeight;
          }
        }
      } else {
        element.textContent = value === "" || value === null || value === undefined ? "-" : value;
      }
    });
  }

  function render(data) {
    root.querySelectorAll('progress[data-live="hosts_done"]').forEach(function (bar) {
      bar.max = Math.max(data.hosts_total, 1);
    });
    ["hosts_done", "hosts_total", "current_task", "current_host", "failed_host", "place", "log", "result"]
      .forEach(function (name) { show(name, data[name]); });
    var hosts = Object.keys(data.hosts || {}).sort().map(function (host) {
      return host + ": " + data.hosts[host];
    });
    show("hosts", hosts.join(", ") || "-");
    root.setAttribute("data-updated", new Date().toISOString());
  }

  function tick() {
    fetch(url, {credentials: "same-origin", cache: "no-store", headers: {"Accept": "application/json"}})
      .then(function (response) {
        return response.ok ? response.json() : null;
      })
      .then(function (data) {
        if (data && data.state !== state) {
          window.location.reload();
          return;
        }
        if (data) {
          render(data);
        }
        if (!data || data.open) {
          window.setTimeout(tick, every);
        }
      })
      .catch(function () {
        window.setTimeout(tick, every * 2);
      });
  }

  var log = root.querySelector('pre[data-live="log"]');
  if (log) {
    log.scrollTop = log.scrollHeight;
  }
  if (root.getAttribute("data-open") === "true") {
    window.setTimeout(tick, every);
  }
})();
