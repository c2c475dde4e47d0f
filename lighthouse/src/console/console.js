// The Tern admin console's one script. Every page works without it: it
// only makes the live parts update themselves (server-sent events carry
// the part re-rendered by the lighthouse) and the copy button copy.
(function () {
  "use strict";
  if (window.EventSource) {
    document.querySelectorAll("[data-live]").forEach(function (region) {
      var source = new EventSource(region.getAttribute("data-live"));
      source.addEventListener("update", function (event) {
        // The lighthouse rendered and escaped this HTML (same origin).
        region.innerHTML = event.data;
        region.setAttribute("data-updated", String(Date.now()));
      });
    });
  }
  document.querySelectorAll("button[data-copy]").forEach(function (button) {
    var field = document.getElementById(button.getAttribute("data-copy"));
    if (!field) {
      return;
    }
    button.hidden = false;
    button.addEventListener("click", function () {
      field.select();
      var done = function () { button.textContent = "Copied"; };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(field.value).then(done);
      } else if (document.execCommand("copy")) {
        done();
      }
    });
  });
})();
