// Live expiry countdowns, and the instance list refreshed when a lifecycle event arrives.
"use strict";
function tick() {
  const now = Date.now();
  for (const el of document.querySelectorAll("[data-expires]")) {
    const left = Math.max(0, Math.round((Date.parse(el.dataset.expires) - now) / 1000));
    el.textContent = left + " s";
    el.dataset.left = String(left);
  }
}
async function refresh() {
  const body = document.getElementById("instances");
  if (!body) return;
  const resp = await fetch("/dashboard/fragment/instances", {credentials: "same-origin"});
  if (resp.ok) {
    body.innerHTML = await resp.text();
    tick();
  }
}
tick();
setInterval(tick, 1000);
if (document.getElementById("instances")) {
  const source = new EventSource("/events");
  source.addEventListener("lifecycle", () => { refresh(); });
}
