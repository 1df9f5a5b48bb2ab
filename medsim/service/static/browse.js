// Browse what is on file: every split, filtered the way searches are (dataset, split,
// label, modality, patient key), a page at a time; an image opens the neighbour view with
// its record and "Search from this image". The URL carries the filters and the page.
"use strict";

const BROWSE_PAGE = 48;
state.browsing = false;
state.browseIds = [];

function fillBrowseFilters() {
  const keep = $("b-dataset").value;
  $("b-dataset").replaceChildren(new Option("any", ""), ...state.datasets.map((d) => new Option(d.name, d.name)));
  $("b-dataset").value = keep;
  fillBrowseLabels();
}

function fillBrowseLabels() {
  const keep = $("b-label").value;
  const ds = state.datasets.filter((d) => !$("b-dataset").value || d.name === $("b-dataset").value);
  const names = [...new Set(ds.flatMap((d) => Object.values(d.label_names || {})))].sort();
  $("b-label").replaceChildren(new Option("any", ""), ...names.map((n) => new Option(n, n)));
  if (names.includes(keep)) $("b-label").value = keep;
}

const BROWSE_KEYS = [["dataset", "b-dataset"], ["split", "b-split"], ["label", "b-label"],
  ["modality", "b-modality"], ["patient_key", "b-patient"]];

// ?browse=1 -> the browse view (true), else leave it (false)
function routeBrowse() {
  const p = new URLSearchParams(location.search);
  if (!p.get("browse")) { if (state.browsing) leaveBrowse(); return false; }
  state.browsing = true;
  $("browse").hidden = false;
  $("results").hidden = true;
  $("query").hidden = true;
  for (const [key, id] of BROWSE_KEYS) {
    const v = p.get(key) || "";
    if ($(id).tagName === "SELECT" && v && ![...$(id).options].some((o) => o.value === v)) $(id).add(new Option(v, v));
    $(id).value = v;
    if (key === "dataset") fillBrowseLabels();
  }
  showPage(Number(p.get("offset") || 0));
  return true;
}

function leaveBrowse() {
  state.browsing = false;
  $("browse").hidden = true;
  $("results").hidden = false;
}

function browseUrl(offset) {
  const p = new URLSearchParams({ browse: "1" });
  for (const [key, id] of BROWSE_KEYS) if ($(id).value.trim()) p.set(key, $(id).value.trim());
  if (offset) p.set("offset", offset);
  return `${location.pathname}?${p}`;
}

async function showPage(offset) {
  const url = browseUrl(offset);
  if (url !== location.pathname + location.search) history.pushState({}, "", url);
  const q = new URLSearchParams(url.split("?")[1]);
  q.delete("browse");
  q.set("limit", BROWSE_PAGE);
  try {
    const page = await api(`/images?${q}`);
    showError("");
    state.browseIds = page.images.map((d) => d.id);
    const last = Math.min(offset + page.images.length, page.total);
    $("b-count").textContent = page.total ? `${offset + 1}-${last} of ${page.total} images` : "no image matches";
    $("b-prev").disabled = offset <= 0;
    $("b-next").disabled = last >= page.total;
    $("b-prev").onclick = () => showPage(Math.max(0, offset - BROWSE_PAGE));
    $("b-next").onclick = () => showPage(offset + BROWSE_PAGE);
    $("b-grid").replaceChildren(...page.images.map((d) => {
      const li = document.createElement("li");
      li.className = "card";
      li.dataset.imageId = d.id;
      const [img, body] = cardContent(d.thumbnail_url, `image ${d.id}, ${d.dataset} ${d.split}: ${d.label_name}`,
        d.label_name, `${d.dataset} · ${d.split} · image ${d.id}`);
      li.append(cardLink(viewHref(d.id), `open image ${d.id}`, () => openViewer(d.id), img, body));
      return li;
    }));
    document.body.dataset.browsed = `${offset}:${page.images.length}:${page.total}`;
  } catch (e) { $("b-grid").replaceChildren(); $("b-count").textContent = ""; showError(e.message); }
}

function initBrowse() {
  $("b-go").addEventListener("click", () => showPage(0));
  $("b-dataset").addEventListener("change", fillBrowseLabels);
  for (const id of ["b-modality", "b-patient"]) {
    $(id).addEventListener("keydown", (e) => { if (e.key === "Enter") showPage(0); });
  }
  $("to-browse").addEventListener("click", (e) => {
    e.preventDefault();
    history.pushState({}, "", "/?browse=1");
    routeBrowse();
  });
  $("to-search").addEventListener("click", (e) => {
    e.preventDefault();
    history.pushState({}, "", "/");
    leaveBrowse();
    clearResults();
  });
}

document.addEventListener("DOMContentLoaded", initBrowse);
