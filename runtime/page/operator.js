// The llb-edge operator page: polls /page/state.json and draws it. Read-only: it only GETs.
// Everything from the daemon goes into the document as text (textContent), never as markup.
"use strict";

const STATE_URL = "/page/state.json";
const RETRY_MS = 2000;
const cards = new Map(); // camera id -> {root, img, seq, galleryKey, ...}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function imageUrl(seq, view) {
  return `/page/image/${Number(seq)}.jpg?view=${view}`;
}

function fmt(value, digits) {
  return typeof value === "number" && isFinite(value) ? value.toFixed(digits) : "-";
}

function percent(value) {
  return typeof value === "number" && isFinite(value) ? `${(100 * value).toFixed(2)} %` : "-";
}

function duration(seconds) {
  if (typeof seconds !== "number") return "-";
  const s = Math.floor(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return h ? `${h} h ${m} min` : m ? `${m} min ${s % 60} s` : `${s} s`;
}

function clock(ts) {
  return typeof ts === "number" ? new Date(ts * 1000).toLocaleTimeString() : "-";
}

function setText(id, text) {
  document.getElementById(id).textContent = text;
}

function svgNode(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  return node;
}

// A small line plot of values (null: no data) over the window, with an optional dashed reference.
function plot(svg, values, reference, format) {
  svg.replaceChildren();
  const width = 300, height = 80, top = 10;
  const finite = values.filter((v) => typeof v === "number");
  const peak = Math.max(1e-9, ...finite, typeof reference === "number" ? reference * 1.25 : 0);
  const y = (v) => height - (v / peak) * (height - top);
  const x = (i) => (values.length > 1 ? (i / (values.length - 1)) * width : 0);
  svg.append(svgNode("line", { x1: 0, y1: height - 0.5, x2: width, y2: height - 0.5, class: "grid" }));
  svg.append(svgNode("line", { x1: 0, y1: top, x2: width, y2: top, class: "grid" }));
  const label = svgNode("text", { x: 2, y: top - 2 });
  label.textContent = format(peak);
  svg.append(label);
  if (typeof reference === "number") {
    svg.append(svgNode("line", { x1: 0, y1: y(reference), x2: width, y2: y(reference), class: "expected" }));
  }
  let run = [];
  const flush = () => {
    if (run.length > 1) svg.append(svgNode("polyline", { points: run.map((p) => p.join(",")).join(" "), class: "series" }));
    if (run.length === 1) svg.append(svgNode("circle", { cx: run[0][0], cy: run[0][1], r: 2, class: "point" }));
    run = [];
  };
  values.forEach((v, i) => (typeof v === "number" ? run.push([x(i).toFixed(1), y(v).toFixed(1)]) : flush()));
  flush();
}

function openDetail(frame) {
  const dialog = document.getElementById("detail");
  const region = frame.region ? `, region ${frame.region.bbox.join(" ")} (${frame.region.area_px} px)` : "";
  setText("detail-caption",
    `${frame.camera_id} · frame ${frame.frame_id} · ${frame.decision} · score ${fmt(frame.score, 4)} ` +
    `(threshold ${fmt(frame.threshold, 4)}) · ${clock(frame.inspected_at)}${region}`);
  document.getElementById("detail-image").src = imageUrl(frame.seq, "image");
  document.getElementById("detail-overlay").src = imageUrl(frame.seq, "overlay");
  if (!dialog.open) dialog.showModal();
}

function fact(list, label) {
  list.append(el("dt", "", label));
  const value = el("dd");
  list.append(value);
  return value;
}

function createCard(cameraId) {
  const root = el("section", "camera");
  root.dataset.camera = cameraId;
  const title = el("h2");
  const decision = el("span", "decision", "-");
  title.append(el("span", "", cameraId), decision);
  const live = el("div", "live");
  const img = el("img");
  img.alt = `latest frame of ${cameraId}`;
  live.append(img);
  live.addEventListener("click", () => card.frame && openDetail(card.frame));
  const facts = el("dl", "facts");
  const card = {
    root, img, decision, seq: null, galleryKey: "", frame: null,
    frameId: fact(facts, "frame"), score: fact(facts, "score / threshold"),
    latency: fact(facts, "latency"), region: fact(facts, "region"), counts: fact(facts, "frames / NG"),
  };
  const bar = el("div", "scorebar");
  const fill = el("div", "fill"), mark = el("div", "mark");
  bar.append(fill, mark);
  card.bar = { bar, fill, mark };
  const gallery = el("div", "gallery");
  card.gallery = gallery;
  root.append(title, live, facts, bar, el("h3", "", "Last NG frames"), gallery);
  document.getElementById("cameras").append(root);
  cards.set(cameraId, card);
  return card;
}

function updateCard(camera) {
  const card = cards.get(camera.camera_id) || createCard(camera.camera_id);
  const frame = camera.latest;
  card.counts.textContent = `${camera.frames} / ${camera.ng}`;
  if (frame && frame.seq !== card.seq) {
    // Swap only once the new JPEG is loaded, so the live view never flashes empty.
    const next = new Image();
    next.onload = () => {
      card.img.src = next.src;
      card.img.dataset.frameId = String(frame.frame_id);
    };
    next.src = imageUrl(frame.seq, "thumb");
    card.seq = frame.seq;
    card.frame = frame;
    card.decision.textContent = frame.decision;
    card.decision.className = `decision ${frame.decision === "NG" ? "NG" : "OK"}`;
    card.frameId.textContent = `${frame.frame_id} at ${clock(frame.inspected_at)}`;
    card.score.textContent = `${fmt(frame.score, 4)} / ${fmt(frame.threshold, 4)}`;
    card.latency.textContent = `${fmt(frame.latency_ms, 1)} ms`;
    card.region.textContent = frame.region ? `${frame.region.bbox.join(" ")} (${frame.region.area_px} px)` : "none";
    const scale = Math.max(frame.score, frame.threshold) * 1.25 || 1;
    card.bar.bar.className = `scorebar ${frame.decision === "NG" ? "NG" : "OK"}`;
    card.bar.fill.style.width = `${Math.min(100, (100 * frame.score) / scale)}%`;
    card.bar.mark.style.left = `${Math.min(100, (100 * frame.threshold) / scale)}%`;
  }
  const key = camera.gallery.map((item) => item.seq).join(",");
  if (key !== card.galleryKey) {
    card.galleryKey = key;
    card.gallery.replaceChildren(...camera.gallery.map((item) => {
      const button = el("button", "ng-item");
      button.type = "button";
      button.dataset.frameId = String(item.frame_id);
      const img = el("img");
      // Gone already (newer NG frames pushed it out of the daemon's ring): the next poll redraws.
      img.onerror = () => (button.hidden = true);
      img.src = imageUrl(item.seq, "mini");
      img.alt = `NG frame ${item.frame_id}`;
      button.append(img, el("div", "caption", `${clock(item.inspected_at)} · #${item.frame_id} · ${fmt(item.score, 3)}`));
      button.addEventListener("click", () => openDetail(item));
      return button;
    }));
    if (!camera.gallery.length) card.gallery.append(el("span", "quiet", "none yet"));
  }
}

function render(state) {
  const model = state.model || {};
  setText("model", `${model.model_id ?? "-"} v${model.model_version ?? "-"}`);
  setText("backend", model.backend ?? "-");
  setText("threshold", fmt(model.threshold, 4) + (model.threshold_override ? " (override)" : ""));
  setText("uptime", duration(state.uptime_s));
  const totals = state.totals || {};
  setText("total-frames", String(totals.frames ?? "-"));
  setText("total-queue", `${totals.queue_depth ?? "-"}`);
  setText("total-drops", String(totals.drops ?? "-"));
  setText("total-errors", String(totals.errors ?? "-"));
  const link = document.getElementById("link");
  link.textContent = state.ready ? "serving" : String(state.state || "not ready");
  link.className = `badge ${state.ready ? "up" : "down"}`;

  const series = state.series;
  for (const node of document.querySelectorAll(".window")) node.textContent = String(series.window_s / 60);
  const expected = state.expected || {};
  setText("ng-rate", series.frames ? `${percent(series.ng / series.frames)} (${series.ng} of ${series.frames})` : "-");
  setText("expected", typeof expected.expected_frr === "number"
    ? `· expected false rejects ${percent(expected.expected_frr)} (dashed)`
    : `· no expected false-reject rate in the bundle; threshold: ${expected.threshold_method ?? "-"}`);
  setText("fps", fmt(series.frames / series.window_s, 2));
  plot(document.getElementById("plot-ng"), series.ng_rate, expected.expected_frr, (v) => percent(v));
  plot(document.getElementById("plot-fps"), series.frames_per_s, null, (v) => `${v.toFixed(1)}/s`);

  document.getElementById("no-frames").hidden = state.cameras.length > 0;
  for (const camera of state.cameras) updateCard(camera);
}

async function poll() {
  let wait = RETRY_MS;
  try {
    const response = await fetch(STATE_URL, { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const state = await response.json();
    render(state);
    wait = state.refresh_ms || RETRY_MS;
  } catch (err) {
    const link = document.getElementById("link");
    link.textContent = `daemon unreachable (${err.message})`;
    link.className = "badge down";
  }
  setTimeout(poll, wait); // after the answer, never overlapping: at most one request in flight
}

poll();
