// The footer's "embedding status" and "health", fetched with the token and shown in a panel
// on the page: as plain links they answered a signed-in user with a raw 401 (a link cannot
// send the token). The status says, per model and dataset, what is embedded and, in a
// sentence, what a search cannot see yet.
"use strict";

function cell(tag, text) {
  const c = document.createElement(tag);
  c.textContent = text;
  return c;
}

function statusTable(rows) {
  const table = document.createElement("table");
  const head = document.createElement("tr");
  for (const h of ["model", "dataset", "images", "embedded", "pending", "failed"]) head.append(cell("th", h));
  table.append(head);
  for (const r of rows) {
    const tr = document.createElement("tr");
    tr.append(cell("td", `${r.model_id}${r.is_current ? " (current)" : ""} ${r.model_name}`), cell("td", r.dataset),
              cell("td", r.total), cell("td", r.embedded), cell("td", r.pending), cell("td", r.failed));
    table.append(tr);
  }
  return table;
}

async function showPanel(what) {
  const body = $("status-body");
  $("status-title").textContent = what === "status" ? "Embedding status" : "Health";
  body.replaceChildren(cell("p", "loading…"));
  $("status-panel").hidden = false;
  try {
    if (what === "status") {
      const rows = await api("/status");
      const parts = [rows.length ? statusTable(rows) : cell("p", "no models or no images yet")];
      const notes = rows.filter((r) => r.note);
      if (notes.length) {
        const ul = document.createElement("ul");
        ul.id = "status-notes";
        ul.append(...notes.map((r) => cell("li", r.note)));
        parts.push(ul);
      } else if (rows.length) parts.push(cell("p", "every image is embedded for every model"));
      // a calibration whose diagnosis set fell short on recent images (`medsim calibration check`)
      const unverified = rows.filter((r) => r.calibration_note);
      if (unverified.length) {
        const ul = document.createElement("ul");
        ul.id = "status-calibration";
        ul.append(...unverified.map((r) => cell("li", `model ${r.model_id} ${r.calibration_note}`)));
        parts.push(ul);
      }
      body.replaceChildren(...parts);
    } else {
      // not api(): a 503 is an answer here, its body says which check failed
      const r = await fetch("/healthz", { headers: authHeaders() });
      const h = await r.json();
      if (r.status === 401) { askForToken(h.detail); throw new Error(h.detail); }
      const dl = document.createElement("dl");
      dl.className = "record";
      for (const [k, v] of Object.entries(h)) dl.append(cell("dt", k), cell("dd", String(v)));
      body.replaceChildren(dl);
    }
    document.body.dataset.panel = what;
  } catch (e) {
    body.replaceChildren(cell("p", e.message));
    document.body.dataset.panel = `${what} failed`;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("status-btn").addEventListener("click", () => showPanel("status"));
  $("health-btn").addEventListener("click", () => showPanel("health"));
  $("status-close").addEventListener("click", () => {
    $("status-panel").hidden = true;
    delete document.body.dataset.panel;
  });
});
