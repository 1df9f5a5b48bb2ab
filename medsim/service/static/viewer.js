// The neighbour view: the query and one neighbour side by side at a readable size, from
// server-rendered previews (nearest neighbour by default, so a 28 px image shows its
// pixels and nothing invented; smooth on request; the stored window or auto contrast),
// one zoom and pan for both images, and the neighbour's full record. It has its own URL
// (?view=ID added to the search's), so it can be shared. From browse, the query pane is
// not shown. "Search from this image" is an explicit button; a click never searches.
"use strict";

const view = { id: null, z: 1, x: 0, y: 0, drag: null };
const PREVIEW = 512;

function previewUrl(id) {
  return `/images/${id}/preview.png?size=${PREVIEW}&smooth=${$("smooth").checked}&window=${$("window").value}`;
}

// the pair's similarity maps as overlays (GET /explain), or null when off or not possible
function explainUrl(which) {
  const q = state.last && !state.browsing ? state.last.query : null;
  if (!$("explain").checked || !q) return null;
  const ref = q.kind === "image_id" ? q.image_id : q.handle;
  return ref ? `/explain?query=${encodeURIComponent(ref)}&neighbour=${view.id}&format=png&which=${which}` +
    `&size=${PREVIEW}` : null;
}

// the deletion test of this pair's maps, run by the server: say so when a map fails it
async function checkFaithful(url) {
  try {
    const r = await api(url);
    const bad = ["query", "neighbour"].filter((w) => r.faithfulness && r.faithfulness[w].faithful === false);
    $("explain-warn").textContent = bad.length ? `Not faithful here: removing the marked detail of the ` +
      `${bad.join(" and the ")} moves the pair apart no faster than removing random pixels, so the ` +
      `map says little about this pair.` : "";
    $("explain-warn").hidden = !bad.length;
    document.body.dataset.faithChecked = bad.length ? "failed" : "passed";
  } catch (e) { /* the overlays say enough */ }
}

function applyTransform() {
  for (const img of [$("view-q"), $("view-n")]) {
    img.style.transform = `translate(${view.x}px, ${view.y}px) scale(${view.z})`;
    img.classList.toggle("pixelated", !$("smooth").checked);
  }
  $("zoom").value = view.z;
}

function resetZoom() { view.z = 1; view.x = 0; view.y = 0; applyTransform(); }

const FIELDS = [
  ["image", (d) => `${d.id}`], ["dataset", (d) => d.dataset], ["split", (d) => d.split],
  ["label", (d) => d.label_name], ["stored size", (d) => `${d.width} × ${d.height}, ${d.channels} channel` +
    `${d.channels > 1 ? "s" : ""}, ${d.bit_depth}-bit`],
  ["original size", (d) => (d.original_width ? `${d.original_width} × ${d.original_height}` : "as stored")],
  ["patient key", (d) => d.patient_key || "none"], ["study", (d) => d.study_id || "none"],
  ["kept tags and metadata", (d) => Object.entries(d.metadata || {}).map(([k, v]) => `${k}: ${v}`).join("; ") || "none"],
  ["sha256", (d) => d.sha256], ["embedded for models", (d) => (d.embedded_for_models || []).join(", ") || "none"],
  ["on file since", (d) => d.created_at],
];

async function showRecord(id) {
  const d = await api(`/images/${id}`);
  const rows = FIELDS.flatMap(([name, f]) => {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = name;
    dd.textContent = f(d);
    return [dt, dd];
  });
  if (d.viewer_url) {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = "in the PACS";
    dd.append(pacsLink(d.viewer_url, `image ${d.id}'s study in the PACS viewer`));
    rows.push(dt, dd);
  }
  $("record").replaceChildren(...rows);
  $("view-n").alt = `image ${d.id}, ${d.dataset} ${d.split}: ${d.label_name} (preview)`;
  return d;
}

function neighbourList() {
  return state.browsing ? state.browseIds : (state.last ? state.last.neighbours.map((n) => n.image_id) : []);
}

async function openViewer(id, push = true) {
  view.id = Number(id);
  const dlg = $("viewer");
  if (push) setViewParam(view.id);
  const q = !state.browsing && state.last ? state.last.query : null;
  $("pane-q").hidden = !q;
  $("explain").disabled = !q || (q.kind !== "image_id" && !q.handle);
  $("explain-key").hidden = !explainUrl("query");
  $("explain-warn").hidden = true;
  if (explainUrl("query")) checkFaithful(explainUrl("query").replace("&format=png", "&format=json"));
  if (q) {
    $("viewer-title").textContent = "Query and neighbour";
    if (explainUrl("query")) showImage($("view-q"), explainUrl("query"));
    else if (q.kind === "image_id") showImage($("view-q"), previewUrl(q.image_id));
    else if (q.preview_url) showImage($("view-q"), `${q.preview_url}?size=${PREVIEW}&smooth=${$("smooth").checked}` +
      `&window=${$("window").value}`);
    else if (state.queryBlob) $("view-q").src = state.queryBlob;
    $("view-q").alt = `the query, ${q.label}`;
    $("view-q-cap").textContent = `query: ${q.label}` + (q.label_name ? ` (${q.label_name})` : "") +
      (q.kind !== "image_id" && !q.preview_url ? ", shown as your browser draws the file" : "");
  } else {
    $("viewer-title").textContent = "Image on file";
  }
  const list = neighbourList(), at = list.indexOf(view.id);
  const n = state.last && !state.browsing ? state.last.neighbours.find((h) => h.image_id === view.id) : null;
  $("view-n-cap").textContent = n ? `neighbour #${n.rank}: image ${n.image_id}, ${n.label_name}, distance ` +
    `${n.distance.toFixed(4)}` + (n.same_label === null ? "" : n.same_label ? ", same label as the query" :
    ", a different label") : `image ${view.id}`;
  $("view-prev").disabled = at <= 0;
  $("view-next").disabled = at < 0 || at >= list.length - 1;
  showImage($("view-n"), explainUrl("neighbour") || previewUrl(view.id));
  if (!dlg.open) { resetZoom(); dlg.showModal(); }
  try {
    await showRecord(view.id);
    document.body.dataset.viewing = String(view.id);
  } catch (e) { $("record").replaceChildren(); showError(e.message); }
}

function closeViewer(push = true) {
  const dlg = $("viewer");
  if (dlg.open) dlg.close();
  view.id = null;
  delete document.body.dataset.viewing;
  if (push) setViewParam(null);
}

function step(by) {
  const list = neighbourList(), at = list.indexOf(view.id);
  if (at >= 0 && list[at + by] !== undefined) openViewer(list[at + by]);
}

function initViewer() {
  $("viewer-close").addEventListener("click", () => closeViewer());
  $("viewer").addEventListener("cancel", (e) => { e.preventDefault(); closeViewer(); });  // Escape
  $("viewer").addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT") return;
    if (e.key === "ArrowRight") step(1);
    if (e.key === "ArrowLeft") step(-1);
  });
  $("view-prev").addEventListener("click", () => step(-1));
  $("view-next").addEventListener("click", () => step(1));
  $("search-from").addEventListener("click", () => {
    const id = view.id;
    closeViewer(false);
    if (state.browsing) leaveBrowse();
    lastFile = null;
    state.box = null;
    searchId(id);
  });
  $("zoom").addEventListener("input", () => { view.z = Number($("zoom").value); applyTransform(); });
  $("zoom-reset").addEventListener("click", resetZoom);
  for (const id of ["smooth", "window", "explain"]) {
    $(id).addEventListener("change", () => { if (view.id != null) openViewer(view.id, false); applyTransform(); });
  }
  for (const frame of [$("frame-q"), $("frame-n")]) {
    frame.addEventListener("wheel", (e) => {
      e.preventDefault();
      view.z = Math.min(8, Math.max(1, view.z * (e.deltaY < 0 ? 1.25 : 0.8)));
      applyTransform();
    }, { passive: false });
    frame.addEventListener("pointerdown", (e) => {
      view.drag = { x: e.clientX - view.x, y: e.clientY - view.y };
      frame.setPointerCapture(e.pointerId);
    });
    frame.addEventListener("pointermove", (e) => {
      if (!view.drag) return;
      view.x = e.clientX - view.drag.x;
      view.y = e.clientY - view.drag.y;
      applyTransform();
    });
    frame.addEventListener("pointerup", () => { view.drag = null; });
  }
}

document.addEventListener("DOMContentLoaded", initViewer);
