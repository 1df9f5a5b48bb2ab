// medsim's page: plain JavaScript against the JSON API, no framework, no CDN.
// The URL carries the query (a stored image id, or the handle of an upload the service
// keeps for a while, k, engine, filters) so a result can be shared or bookmarked; once
// the service has deleted an upload, its URL says so.
// viewer.js opens a neighbour beside the query (?view=ID); browse.js pages through what is
// on file (?browse=1). Results can be extended ("More results") and exported.
// The token is asked for once and kept in sessionStorage: this tab only, gone when it
// closes, never in the URL. Thumbnails are fetched with it (an <img> cannot send a
// header) and shown as blob: URLs.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { datasets: [], searches: 0, token: sessionStorage.getItem("medsim.token") || "",
                last: null, queryBlob: null, pageSize: 8 };
const MAX_K = 1000;  // the API's limit
const TOKEN_SHAPE = /^msm_[0-9]+_[A-Za-z0-9_-]{43}$/;

function authHeaders(extra) {
  return state.token ? { ...(extra || {}), authorization: `Bearer ${state.token}` } : (extra || {});
}

function askForToken(why) {
  document.body.dataset.auth = "needed";
  $("login").hidden = false;
  $("login-why").textContent = why || "";
  $("logout").hidden = true;
  $("token").focus();
}

function showError(msg) {
  const el = $("error");
  el.textContent = msg;
  el.hidden = !msg;
}

async function api(path, options) {
  const o = options || {};
  const r = await fetch(path, { ...o, headers: authHeaders(o.headers) });  // o.signal: cancellable
  let body = null;
  try { body = await r.json(); } catch (e) { /* not JSON */ }
  const detail = body && body.detail ? body.detail : `${r.status} ${r.statusText}`;
  if (r.status === 401) { askForToken(detail); throw new Error(detail); }
  if (!r.ok) throw new Error(detail);
  return body;
}

// an image the API serves, fetched with the token, into an <img>
async function showImage(img, url) {
  try {
    const r = await fetch(url, { headers: authHeaders() });
    if (r.status === 401) { askForToken("the token was refused"); return; }
    if (!r.ok) {  // a thumbnail the card can do without; a map or a preview asked for says why not
      if (!url.includes("/thumbnail.png")) {
        try { showError((await r.json()).detail); } catch (e) { showError(`${r.status} ${r.statusText}`); }
      }
      return;
    }
    const old = img.src;
    img.src = URL.createObjectURL(await r.blob());
    if (old.startsWith("blob:")) URL.revokeObjectURL(old);
  } catch (e) { /* the card keeps its text */ }
}

// One search at a time: a new one cancels the one in flight (its answer would overwrite
// the newer one's), the old results are dimmed and "Searching…" shows at once, and an
// error clears the results so that nothing under the red banner looks like an answer.
let inflight = null;
function beginSearch() {
  if (state.browsing) leaveBrowse();
  if (inflight) inflight.abort();
  inflight = new AbortController();
  $("busy").hidden = false;
  $("results").setAttribute("aria-busy", "true");
  $("grid").classList.add("stale");
  $("query").classList.add("stale");
  return inflight;
}
function endSearch(ctl) {
  if (ctl !== inflight) return false;  // superseded: a newer search owns the page
  inflight = null;
  $("busy").hidden = true;
  $("results").removeAttribute("aria-busy");
  $("grid").classList.remove("stale");
  $("query").classList.remove("stale");
  return true;
}
function clearResults() {
  $("grid").replaceChildren();
  $("summary").textContent = "";
  $("calibration-note").hidden = true;
  $("query").hidden = true;
}
function failed(ctl, e) {
  if (e.name === "AbortError" || !endSearch(ctl)) return;
  clearResults();
  showError(e.message);
}

// which splits a search looks among (the service's default: every split, as FAISS builds)
const DEFAULT_SPLITS = "train,val,test";
const SPLIT_WORDS = { "train,val": "the train and val images", "train,val,test": "every image on file",
                      "train": "the train images" };

function options() {
  if (state.box) return { ...plainOptions(), box: state.box };
  return plainOptions();
}

function plainOptions() {
  const filters = {};
  if ($("dataset").value) filters.dataset = $("dataset").value;
  if ($("label").value) filters.label = $("label").value;
  return { k: Number($("k").value), engine: $("engine").value, filters, splits: $("splits").value };
}

function fillLabels() {
  const sel = $("label"), keep = sel.value;
  const ds = state.datasets.filter((d) => !$("dataset").value || d.name === $("dataset").value);
  const names = [...new Set(ds.flatMap((d) => Object.values(d.label_names || {})))].sort();
  sel.replaceChildren(new Option("any", ""), ...names.map((n) => new Option(n, n)));
  if (names.includes(keep)) sel.value = keep;
}

function setUrl(imageId, upload) {
  const o = options(), p = new URLSearchParams();
  if (imageId != null) p.set("image_id", imageId);
  if (upload) p.set("upload", upload);
  p.set("k", o.k);
  p.set("engine", o.engine);
  if (o.splits !== DEFAULT_SPLITS) p.set("splits", o.splits);
  if (o.filters.dataset) p.set("dataset", o.filters.dataset);
  if (o.filters.label) p.set("label", o.filters.label);
  if (o.box) p.set("box", o.box.join(","));
  const url = `${location.pathname}?${p}`;
  if (url !== location.pathname + location.search) history.pushState({}, "", url);
}

function fromUrl() {
  const p = new URLSearchParams(location.search);
  if (p.get("k")) {
    const k = p.get("k");
    if (![...$("k").options].some((o) => o.value === k)) $("k").add(new Option(k, k));
    $("k").value = k;
  }
  if (p.get("engine")) $("engine").value = p.get("engine");
  const splits = p.get("splits") || DEFAULT_SPLITS;
  if (![...$("splits").options].some((o) => o.value === splits)) $("splits").add(new Option(splits, splits));
  $("splits").value = splits;
  const box = (p.get("box") || "").split(",").map(Number);
  state.box = box.length === 4 && box.every(Number.isInteger) ? box : null;
  if (p.get("dataset")) $("dataset").value = p.get("dataset");
  fillLabels();
  if (p.get("label")) {
    const l = p.get("label");
    if (![...$("label").options].some((o) => o.value === l)) $("label").add(new Option(l, l));
    $("label").value = l;
  }
  return p.get("image_id");
}

function uploadInUrl() { return new URLSearchParams(location.search).get("upload"); }

// A card's thumbnail (fetched with the token) and its body, started with the label and
// where the image is; search results add their distance and marks, browse nothing more.
function cardContent(thumbnailUrl, alt, labelText, whereText) {
  const img = document.createElement("img");
  img.alt = alt;
  showImage(img, thumbnailUrl);
  const body = document.createElement("div");
  body.className = "body";
  const label = document.createElement("div");
  label.className = "label";
  label.textContent = labelText;
  const where = document.createElement("div");
  where.className = "where";
  where.textContent = whereText;
  body.append(label, where);
  return [img, body];
}

// A card's content is one link (to the view's own URL: it opens in a new tab too); a
// plain click opens the view in place. A link, not a clickable <li>: the list stays a list.
function cardLink(href, title, go, ...content) {
  const a = document.createElement("a");
  a.className = "cardlink";
  a.href = href;
  a.title = title;
  a.append(...content);
  a.addEventListener("click", (e) => {
    if (e.ctrlKey || e.metaKey || e.shiftKey || e.button !== 0) return;
    e.preventDefault();
    go();
  });
  return a;
}

function viewHref(id) {
  const p = new URLSearchParams(location.search);
  p.set("view", id);
  return `${location.pathname}?${p}`;
}

// the search's URL with (or without) the neighbour view's ?view=ID
function setViewParam(id) {
  const p = new URLSearchParams(location.search);
  if (id == null) p.delete("view"); else p.set("view", id);
  const url = `${location.pathname}?${p}`;
  if (url !== location.pathname + location.search) history.pushState({}, "", url);
}

function render(res, queryImgSrc) {
  state.searches += 1;
  state.last = res;
  state.queryBlob = queryImgSrc && queryImgSrc.startsWith("blob:") ? queryImgSrc : null;
  document.body.dataset.searches = state.searches;
  $("export").hidden = !res.neighbours.length;
  $("export").querySelector("[data-format=zip]").disabled = res.query.kind !== "image_id" && !res.query.handle;
  const k = Number($("k").value);
  $("more").hidden = !(res.neighbours.length >= k && k < MAX_K);
  $("more").textContent = `More results (${Math.min(k + state.pageSize, MAX_K)})`;
  const q = res.query;
  $("query").hidden = false;
  if (state.queryBlob) $("query-img").src = queryImgSrc;
  else if (queryImgSrc) showImage($("query-img"), queryImgSrc);
  $("query-title").textContent = q.label_name ? `${q.label}: ${q.label_name}` : q.label;
  showRegion();
  $("query-meta").textContent = q.dataset ? `${q.dataset}` : "not from the archive";
  $("query-notes").textContent = res.notes.join(" ");
  $("model").textContent = `model ${res.model.id} (${res.model.name}, ${res.model.embedding_dim}-d)`;
  const same = res.neighbours.filter((n) => n.same_label).length;
  const engines = { pgvector: "pgvector HNSW", exact: "pgvector exact", faiss: `FAISS build ${res.index_build}` };
  // beside the set, not in the muted summary: the set's coverage was not met on recent images
  $("calibration-note").textContent = res.calibration_note ? `Calibration ${res.calibration_note}` : "";
  $("calibration-note").hidden = !res.calibration_note;
  if (!res.neighbours.length) {  // a filter or max_distance that left nothing: say why, show nothing
    $("summary").textContent = `No neighbours: ${res.notes.join(" ")}`;
    $("grid").replaceChildren();
    return;
  }
  const among = SPLIT_WORDS[$("splits").value] || `${$("splits").value} images`;
  $("summary").textContent = `${res.neighbours.length} nearest from ${among}, by ` +
    `${engines[res.engine] || res.engine}, in ${res.timing_ms.toFixed(1)} ms` +
    (q.label_name ? `; ${same} of ${res.neighbours.length} share the query's label` : "") +
    (res.vote ? `. Vote: ${voteText(res.vote)}` +
      (res.vote.no_confidence_because && !res.vote.tie ? `. No P(right): ${res.vote.no_confidence_because}` : "")
      : "") + (res.diagnosis_set ? `. Diagnosis set: ${setText(res.diagnosis_set)}` : "");
  const cards = res.neighbours.map((n) => {
    const li = document.createElement("li");
    li.className = "card" + (n.same_label ? " same" : "");
    li.dataset.imageId = n.image_id;
    const [img, body] = cardContent(n.thumbnail_url, `image ${n.image_id}, ${n.dataset} ${n.split}: ` +
      `${n.label_name}, rank ${n.rank}`, n.label_name, `${n.dataset} · ${n.split}`);
    const dist = document.createElement("div");
    dist.className = "dist";
    dist.innerHTML = `<span class="rank">#${n.rank}</span> distance ${n.distance.toFixed(4)}`;
    const ident = document.createElement("div");
    ident.className = "where";
    ident.textContent = `image ${n.image_id}`;
    body.append(dist, ident);
    // where the query's label is known the card says whether the labels match, not a
    // probability that could contradict it
    if (n.p_same !== null && n.p_same !== undefined && n.same_label === null) {
      const p = document.createElement("div");
      p.className = "where psame";
      p.title = "calibrated probability that this image shares the query's diagnosis";
      p.textContent = `P(same) ${n.p_same.toFixed(2)}`;
      body.append(p);
    }
    if (n.same_label !== null) {
      const b = document.createElement("span");
      b.className = "badge " + (n.same_label ? "same" : "diff");
      b.textContent = n.same_label ? "same label as query" : "different label";
      body.append(b);
    }
    li.append(cardLink(viewHref(n.image_id), `open image ${n.image_id} beside the query`,
                       () => openViewer(n.image_id), img, body));
    if (n.viewer_url) li.append(pacsLink(n.viewer_url, `image ${n.image_id}'s study in the PACS viewer`));
    return li;
  });
  $("grid").replaceChildren(...cards);
}

// an image a PACS sync stored: its study where clinicians read it (outside the card's own
// link: a link inside a link is not HTML). Only http(s) links are drawn.
function pacsLink(url, label) {
  const a = document.createElement("a");
  if (!/^https?:\/\//i.test(url)) return a;
  a.className = "pacs";
  a.href = url;
  a.target = "_blank";
  a.rel = "noopener noreferrer";
  a.textContent = "open in the PACS";
  a.setAttribute("aria-label", label);
  return a;
}

async function searchId(imageId, push = true) {
  imageId = Number(imageId);
  if (!Number.isInteger(imageId) || imageId < 1) {
    clearResults();
    showError("an image id is a positive whole number");
    return;
  }
  $("image-id").value = imageId;
  if (push) setUrl(imageId);
  await postSearch({ image_id: imageId }, () => `/images/${imageId}/thumbnail.png`);
}

// A JSON search (a stored id or a kept upload) -> its answer rendered, with the query's
// image from querySrc(answer), and the URL's neighbour view (?view=ID) opened again.
async function postSearch(query, querySrc) {
  const ctl = beginSearch();
  try {
    const res = await api("/search", {
      method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ ...query, ...options() }), signal: ctl.signal,
    });
    if (!endSearch(ctl)) return;
    showError("");
    render(res, querySrc(res));
    const view = new URLSearchParams(location.search).get("view");
    if (view) openViewer(Number(view), false);
  } catch (e) { failed(ctl, e); }
}

async function searchFile(file) {
  const fd = new FormData(), o = options();
  fd.append("image", file);
  fd.append("k", o.k);
  fd.append("engine", o.engine);
  fd.append("splits", o.splits);
  fd.append("filters", JSON.stringify(o.filters));
  if (o.box) fd.append("box", JSON.stringify(o.box));
  $("image-id").value = "";
  setUrl(null);
  const ctl = beginSearch();
  try {
    const res = await api("/search/upload", { method: "POST", body: fd, signal: ctl.signal });
    if (!endSearch(ctl)) return;
    showError("");
    if (res.query.handle) history.replaceState({}, "", urlWith({ upload: res.query.handle }));
    render(res, res.query.preview_url || URL.createObjectURL(file));
  } catch (e) { failed(ctl, e); }
}

// an upload the service kept, searched again by its handle (a shared URL, a changed option)
async function searchKept(handle, push = true) {
  $("image-id").value = "";
  if (push) setUrl(null, handle);
  await postSearch({ upload: handle }, (res) => res.query.preview_url);
}

function urlWith(params) {
  const p = new URLSearchParams(location.search);
  for (const [k, v] of Object.entries(params)) { if (v == null) p.delete(k); else p.set(k, v); }
  return `${location.pathname}?${p}`;
}

let lastFile = null;
function rerun() {
  if ($("image-id").value) searchId($("image-id").value);
  else if (uploadInUrl()) searchKept(uploadInUrl());
  else if (lastFile) searchFile(lastFile);
}

async function init() {
  const drop = $("drop"), file = $("file");
  drop.addEventListener("click", () => file.click());
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") file.click(); });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) { lastFile = e.dataTransfer.files[0]; state.box = null; searchFile(lastFile); }
  });
  file.addEventListener("change", () => {
    if (file.files.length) { lastFile = file.files[0]; state.box = null; searchFile(lastFile); }
  });
  $("go").addEventListener("click", rerun);
  $("image-id").addEventListener("keydown", (e) => { if (e.key === "Enter") { state.box = null; searchId(e.target.value); } });
  $("random").addEventListener("click", async () => {
    try {
      const ds = $("dataset").value ? `&dataset=${encodeURIComponent($("dataset").value)}` : "";
      const r = await api(`/images/random?split=test${ds}`);
      lastFile = null;
      state.box = null;
      searchId(r.image_id);
    } catch (e) { showError(e.message); }
  });
  for (const id of ["k", "engine", "label", "splits"]) $(id).addEventListener("change", rerun);
  $("k").addEventListener("change", () => { state.pageSize = Number($("k").value); });
  $("more").addEventListener("click", () => {
    const k = String(Math.min(Number($("k").value) + state.pageSize, MAX_K));
    if (![...$("k").options].some((o) => o.value === k)) $("k").add(new Option(k, k));
    $("k").value = k;
    rerun();
  });
  for (const b of $("export").querySelectorAll("button")) {
    b.addEventListener("click", () => exportResult(b.dataset.format).catch((e) => showError(e.message)));
  }
  $("dataset").addEventListener("change", () => { fillLabels(); rerun(); });
  window.addEventListener("popstate", () => {
    const p = new URLSearchParams(location.search);
    if (!p.get("view")) closeViewer(false);
    if (routeBrowse()) return;
    if (p.get("view") && state.last && String(state.last.query.image_id) === p.get("image_id")) {
      openViewer(Number(p.get("view")), false);
      return;
    }
    const id = fromUrl();
    if (id) searchId(id, false);
    else if (uploadInUrl()) searchKept(uploadInUrl(), false);
    else { if (inflight) endSearch(inflight); clearResults(); showError(""); $("image-id").value = ""; }
  });

  $("login").addEventListener("submit", (e) => {
    e.preventDefault();
    const t = $("token").value.trim();
    if (!TOKEN_SHAPE.test(t)) { $("login-why").textContent = "a medsim token looks like msm_<id>_<43 characters>"; return; }
    state.token = t;
    sessionStorage.setItem("medsim.token", t);
    $("token").value = "";
    load();
  });
  $("logout").addEventListener("click", () => {
    state.token = "";
    sessionStorage.removeItem("medsim.token");
    clearResults();
    $("notice").hidden = true;
    askForToken("");
  });
  await load();
  document.body.dataset.ready = "1";
}

// what the user may see: their datasets (the filter) and the model; then the URL's query
async function load() {
  try {
    const [datasets, models, me] = await Promise.all([api("/datasets"), api("/models"), api("/me")]);
    $("login").hidden = true;
    // a user granted nothing is told so now, not left to find "no test image" and no matches
    $("notice").textContent = me.notice || "";
    $("notice").hidden = !me.notice;
    $("logout").hidden = !state.token;
    document.body.dataset.auth = "ok";
    showError("");
    state.datasets = datasets;
    $("dataset").replaceChildren(new Option("any", ""), ...datasets.map((d) => new Option(d.name, d.name)));
    const cur = models.find((m) => m.is_current);
    $("model").textContent = cur ? `model ${cur.id} (${cur.name}, ${cur.embedding_dim}-d)` : "no current model";
  } catch (e) { if (document.body.dataset.auth !== "needed") showError(e.message); return; }
  fillBrowseFilters();
  if (routeBrowse()) return;
  const id = fromUrl();
  if (id) searchId(id, false);
  else if (uploadInUrl()) searchKept(uploadInUrl(), false);
}

// A result as a file. A stored query or a kept upload is searched again by the API's
// export (the same answer, logged as an export); an upload the service did not keep is
// written from what the page holds (CSV and JSON; a ZIP needs the server's copy).
const CSV_COLUMNS = ["rank", "image_id", "dataset", "split", "label_name", "distance", "p_same", "same_label",
  "patient_key", "study_id", "thumbnail_url", "vote", "diagnosis_set"];

// the vote and the diagnosis set as the CLI and the CSV say them (medsim/search/present.py):
// a tie claims no label, a set of every label is "cannot tell"; " | " between names (a name
// may hold a comma: "normal, benign")
function voteText(v) {
  if (v.tie) return `tie (${v.votes} of ${v.of} each: ${v.tie.join(" | ")})`;
  return `${v.label_name} (${v.votes} of ${v.of}` +
    (v.confidence !== null ? `, calibrated P(right) ${v.confidence.toFixed(2)})` : ")");
}
function setText(d) {
  const pct = `${+(d.coverage * 100).toFixed(1)}%`;
  if (!d.labels.length) return `no label fits at ${pct} (a query unlike the calibration queries)`;
  if (d.labels.length === 1) return `${d.labels[0]} at ${pct}`;
  if (d.labels.length === d.of.length) return `cannot tell at ${pct}: one of {${d.labels.join(" | ")}}`;
  return `one of {${d.labels.join(" | ")}} at ${pct}`;
}
async function exportResult(format) {
  const res = state.last;
  if (!res) return;
  let blob;
  if (res.query.kind === "image_id" || res.query.handle) {
    const q = res.query.kind === "image_id" ? { image_id: res.query.image_id } : { upload: res.query.handle };
    const r = await fetch(`/search/export?format=${format}`, {
      method: "POST", headers: authHeaders({ "content-type": "application/json" }),
      body: JSON.stringify({ ...q, ...options() }),
    });
    if (!r.ok) throw new Error(`export failed: ${r.status}`);
    blob = await r.blob();
  } else if (format === "json") {
    blob = new Blob([JSON.stringify(res, null, 2)], { type: "application/json" });
  } else {
    const cell = (v) => (v === null || v === undefined ? "" : /[",\n]/.test(String(v)) ?
      `"${String(v).replace(/"/g, '""')}"` : String(v));
    const about = { vote: res.vote ? voteText(res.vote) : "",
      diagnosis_set: res.diagnosis_set ? setText(res.diagnosis_set) : "" };
    const lines = [CSV_COLUMNS.join(","), ...res.neighbours.map((n) => ({ ...n, ...about })).map((n) =>
      CSV_COLUMNS.map((c) => cell(typeof n[c] === "boolean" ? (n[c] ? "True" : "False") : n[c])).join(","))];
    blob = new Blob([lines.join("\n") + "\n"], { type: "text/csv" });
  }
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = `medsim-search-${res.query.image_id || "upload"}.${format}`;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  document.body.dataset.exported = format;
}

document.addEventListener("DOMContentLoaded", init);
