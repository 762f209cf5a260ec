// embedsearch page: upload or pick an image, show per-method probabilities and neighbours.
// Plain DOM, no build step. Text from the server always goes through textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const TOP_CLASSES = 5;
let info = null;
let previewUrl = null;
let requestSeq = 0;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = text;
  return e;
}

function pct(x) { return (100 * x).toFixed(x >= 0.995 || x === 0 ? 0 : 1) + "%"; }

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setStatus(text, busy) {
  const s = $("status");
  s.textContent = text;
  s.classList.toggle("busy", !!busy);
}

async function loadInfo() {
  try {
    const r = await fetch("/info");
    info = await r.json();
  } catch (e) {
    showError("Cannot reach the server: " + e);
    return;
  }
  $("bundle-name").textContent = info.name;
  document.title = "embedsearch · " + info.name;
  const parts = [
    info.encoder.spec + " (" + info.encoder.dim + "-d)",
    info.images.toLocaleString() + " images",
    info.labelled ? info.classes.length + " classes" : "unlabelled",
  ];
  if (info.methods.length) parts.push("methods: " + info.methods.join(", "));
  $("bundle-facts").textContent = parts.join(" · ");
}

function setPreview(src, caption) {
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = src.startsWith("blob:") ? src : null;
  const img = $("query-preview");
  img.onerror = () => {
    img.hidden = true;
    $("drop-hint").hidden = false;
  };
  img.src = src;
  img.hidden = false;
  $("drop-hint").hidden = true;
  $("query-caption").textContent = caption;
  $("query-caption").title = caption;
}

async function send(body, headers) {
  const seq = ++requestSeq;
  showError("");
  setStatus("Searching…", true);
  document.body.classList.add("stale");
  let data;
  try {
    const r = await fetch("/predict", { method: "POST", body, headers });
    data = await r.json().catch(() => ({ detail: "the server answered " + r.status }));
    if (seq !== requestSeq) return; // a newer query was started meanwhile
    if (!r.ok) {
      fail((data.detail || data.error || "request failed") + " (HTTP " + r.status + ")");
      return;
    }
  } catch (e) {
    if (seq === requestSeq) fail("The request failed: " + e.message);
    return;
  }
  document.body.classList.remove("stale");
  render(data);
}

function fail(message) {
  // Clear the previous answer: leaving it would pass it off as this query's result.
  document.body.classList.remove("stale");
  setStatus("No result for this image.");
  $("result").hidden = true;
  $("neighbours").replaceChildren();
  showError(message);
}

function searchFile(file) {
  if (!file) return;
  const limit = info ? info.limits.max_upload_bytes : Infinity;
  if (file.size > limit) {
    showError(file.name + " is " + (file.size / 1048576).toFixed(1) + " MiB; the limit is " +
      (limit / 1048576).toFixed(1) + " MiB");
    return;
  }
  if (file.type && !file.type.startsWith("image/")) {
    showError(file.name + " is not an image (" + file.type + ")");
    return;
  }
  setPreview(URL.createObjectURL(file), file.name);
  if (location.hash) history.replaceState(null, "", location.pathname);
  const form = new FormData();
  form.append("file", file, file.name);
  send(form);
}

function searchId(id) {
  setPreview("/images/" + encodePath(id), id);
  send(JSON.stringify({ id }), { "Content-Type": "application/json" });
}

function encodePath(id) { return id.split("/").map(encodeURIComponent).join("/"); }

function methodBlock(name, m) {
  const box = el("div", "method");
  const h = el("h3", null, name);
  if (m.detail && m.detail !== name) {
    // "knn(k=10, similarity)" under the heading "knn" reads better as "k=10, similarity".
    const inner = m.detail.startsWith(name + "(") && m.detail.endsWith(")")
      ? m.detail.slice(name.length + 1, -1) : m.detail;
    h.appendChild(el("small", null, inner));
  }
  box.appendChild(h);
  const probs = Object.entries(m.probabilities || {});
  probs.slice(0, TOP_CLASSES).forEach(([cls, p]) => {
    const row = el("div", "bar-row" + (cls === m.label ? " top" : ""));
    row.dataset.cls = cls;
    const name = el("span", "name", cls);
    name.title = cls;
    const bar = el("div", "bar");
    const fill = el("div");
    fill.style.width = Math.max(0, Math.min(100, 100 * p)).toFixed(1) + "%";
    bar.appendChild(fill);
    row.append(name, bar, el("span", "pct", pct(p)));
    box.appendChild(row);
  });
  if (probs.length > TOP_CLASSES) {
    const rest = probs.slice(TOP_CLASSES).reduce((a, [, p]) => a + p, 0);
    box.appendChild(el("div", "more",
      "+ " + (probs.length - TOP_CLASSES) + " more classes, " + pct(rest) + " together"));
  }
  return box;
}

function render(data) {
  const ms = data.timing_ms !== undefined ? " in " + Math.round(data.timing_ms) + " ms" : "";
  $("result").hidden = false;
  const methods = Object.entries(data.methods || {});
  if (data.label !== null && data.label !== undefined) {
    $("pred-label").textContent = data.label;
    $("pred-confidence").textContent = data.confidence !== null && data.confidence !== undefined
      ? pct(data.confidence) + " confidence" : "";
    setStatus("Answered" + ms + ".");
  } else {
    $("pred-label").textContent = "—";
    $("pred-confidence").textContent = "";
    setStatus("Unlabelled index: similar-image search only. Answered" + ms + ".");
  }
  const truth = $("query-truth");
  truth.replaceChildren();
  const q = data.query || {};
  if (q.kind === "id") {
    // No agree/disagree verdict: an indexed image is in the reference set and votes for
    // its own label, so agreement would prove nothing.
    truth.append("Indexed image", q.label ? " labelled " : "", q.label ? el("b", null, q.label) : "",
      q.split ? " · " + q.split + " split" : "");
    truth.hidden = false;
  } else if (q.kind === "upload" && q.width) {
    truth.textContent = q.width + "×" + q.height + " " + q.format;
    truth.hidden = false;
  } else {
    truth.hidden = true;
  }
  const mbox = $("methods");
  mbox.replaceChildren(...methods.map(([name, m]) => methodBlock(name, m)));
  renderNeighbours(data.neighbours || []);
}

function renderNeighbours(list) {
  const grid = $("neighbours");
  grid.replaceChildren(...list.map((n) => {
    const card = el("button", "neighbour");
    card.type = "button";
    card.dataset.id = n.id;
    card.title = n.id + (n.split ? " (" + n.split + ")" : "");
    const img = el("img");
    img.loading = "lazy";
    img.alt = n.label || n.id;
    img.src = n.image;
    const meta = el("div", "meta");
    const row = el("div", "row");
    row.append(el("span", n.label ? "chip" : "chip none", n.label || "no label"),
      el("span", "sim", n.similarity.toFixed(3)));
    const simbar = el("div", "simbar");
    const fill = el("div");
    fill.style.width = (100 * Math.max(0, Math.min(1, n.similarity))).toFixed(1) + "%";
    simbar.appendChild(fill);
    meta.append(row, simbar, el("div", "id", n.id));
    card.append(img, meta);
    card.addEventListener("click", () => {
      location.hash = "id=" + encodeURIComponent(n.id);
    });
    return card;
  }));
}

function idFromHash() {
  const m = /^#id=(.*)$/.exec(location.hash);
  return m ? decodeURIComponent(m[1]) : null;
}

function init() {
  const input = $("file-input");
  input.addEventListener("change", () => {
    searchFile(input.files[0]);
    input.value = ""; // choosing the same file again still fires "change"
  });
  let depth = 0;
  document.addEventListener("dragenter", (e) => {
    e.preventDefault();
    depth++;
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", () => {
    if (--depth <= 0) { depth = 0; document.body.classList.remove("dragging"); }
  });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    document.body.classList.remove("dragging");
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) searchFile(file);
    else showError("Drop an image file (not a link or text).");
  });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData ? e.clipboardData.items : [])]
      .find((i) => i.kind === "file" && i.type.startsWith("image/"));
    if (item) searchFile(item.getAsFile());
  });
  window.addEventListener("hashchange", () => {
    const id = idFromHash();
    if (id) { searchId(id); window.scrollTo({ top: 0, behavior: "smooth" }); }
  });
  loadInfo().then(() => {
    const id = idFromHash();
    if (id) searchId(id);
  });
}

document.addEventListener("DOMContentLoaded", init);
