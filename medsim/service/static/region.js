// Search by a region of the query (SMILY's refine-by-region): "Search a region", then drag
// a box on the query image; the box is sent in the query's own pixels (the API's `box`),
// cut there and resized by the one resize path, and kept in the URL (&box=x0,y0,x1,y1).
// "Whole image" searches with all of it again.
"use strict";

const region = { start: null, dims: null };

// the query image's own size: an upload's comes with the answer, a stored image's record has it
async function queryDims() {
  const q = state.last && state.last.query;
  if (!q) return null;
  if (q.size) return q.size;
  if (q.kind === "image_id") {
    const d = await api(`/images/${q.image_id}`);
    return [d.width, d.height];
  }
  return null;
}

// where the image is drawn inside its <img> box (object-fit: contain)
function drawnRect(img, dims) {
  const r = img.getBoundingClientRect();
  const scale = Math.min(r.width / dims[0], r.height / dims[1]);
  return { left: r.left + (r.width - dims[0] * scale) / 2, top: r.top + (r.height - dims[1] * scale) / 2, scale };
}

function showRegion() {
  const on = !!state.box;
  $("region-clear").hidden = !on;
  $("region").hidden = true;
  if (!on) return;
  queryDims().then((dims) => {
    if (!dims || !state.box) return;
    const img = $("query-img"), d = drawnRect(img, dims), w = img.getBoundingClientRect();
    const [x0, y0, x1, y1] = state.box, el = $("region");
    el.style.left = `${d.left - w.left + x0 * d.scale}px`;
    el.style.top = `${d.top - w.top + y0 * d.scale}px`;
    el.style.width = `${(x1 - x0) * d.scale}px`;
    el.style.height = `${(y1 - y0) * d.scale}px`;
    el.hidden = false;
  }).catch(() => {});
}

function selecting(on) {
  $("query-wrap").classList.toggle("selecting", on);
  $("region-btn").setAttribute("aria-pressed", String(on));
  $("region-help").hidden = !on;
}

function initRegion() {
  const wrap = $("query-wrap"), img = $("query-img");
  $("region-btn").addEventListener("click", async () => {
    const on = wrap.classList.contains("selecting");
    if (!on) region.dims = await queryDims().catch(() => null);
    if (!on && !region.dims) { showError("this query has no image to cut a region from"); return; }
    selecting(!on);
  });
  $("region-clear").addEventListener("click", () => { state.box = null; selecting(false); rerun(); });
  wrap.addEventListener("pointerdown", (e) => {
    if (!wrap.classList.contains("selecting")) return;
    e.preventDefault();
    region.start = [e.clientX, e.clientY];
    wrap.setPointerCapture(e.pointerId);
  });
  wrap.addEventListener("pointermove", (e) => {
    if (!region.start) return;
    const w = wrap.getBoundingClientRect(), el = $("region");
    el.style.left = `${Math.min(region.start[0], e.clientX) - w.left}px`;
    el.style.top = `${Math.min(region.start[1], e.clientY) - w.top}px`;
    el.style.width = `${Math.abs(e.clientX - region.start[0])}px`;
    el.style.height = `${Math.abs(e.clientY - region.start[1])}px`;
    el.hidden = false;
  });
  wrap.addEventListener("pointerup", (e) => {
    if (!region.start) return;
    const dims = region.dims, d = drawnRect(img, dims);
    const px = (v, o, n) => Math.max(0, Math.min(n, (v - o) / d.scale));
    const xs = [px(region.start[0], d.left, dims[0]), px(e.clientX, d.left, dims[0])].sort((a, b) => a - b);
    const ys = [px(region.start[1], d.top, dims[1]), px(e.clientY, d.top, dims[1])].sort((a, b) => a - b);
    region.start = null;
    const box = [Math.floor(xs[0]), Math.floor(ys[0]), Math.ceil(xs[1]), Math.ceil(ys[1])];
    if (box[2] - box[0] < 2 || box[3] - box[1] < 2) { $("region").hidden = true; return; }  // a click, not a box
    selecting(false);
    state.box = box;
    rerun();
  });
}

document.addEventListener("DOMContentLoaded", initRegion);
