// chc ui: the one script. It refreshes the Federation page's nodes table every 5 s from
// /fragments/nodes (same origin, the session cookie goes along). Without it the page is
// complete; it only goes stale.
(function () {
  "use strict";
  var section = document.querySelector("[data-refresh]");
  if (!section || !window.fetch || !window.DOMParser) {
    return;
  }
  var url = section.getAttribute("data-refresh");
  var targetId = section.getAttribute("data-refresh-target");
  var stamp = document.getElementById("refreshed");
  function refresh() {
    fetch(url, { credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.text();
      })
      .then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById(targetId);
        var old = document.getElementById(targetId);
        if (fresh && old) {
          old.replaceWith(document.importNode(fresh, true));
          if (stamp) {
            stamp.textContent = "(updated " + new Date().toLocaleTimeString() + ")";
          }
        }
      })
      .catch(function () {
        if (stamp) {
          stamp.textContent = "(could not refresh; retrying)";
        }
      });
  }
  window.setInterval(refresh, 5000);
})();
