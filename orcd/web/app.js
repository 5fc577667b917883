// orcd playground: stream a job from POST /execute, stop it with POST /cancel, watch
// GET /jobs and GET /health. Plain browser JavaScript, no build step, same origin only.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "orcd.token";
const JOBS_EVERY_MS = 700;
const HEALTH_EVERY_MS = 2000;
const ACTIVE = new Set(["queued", "running"]);

let current = null; // the job this page is streaming: {jobId, cancelAt, pieces, ...}

// ---- HTTP ------------------------------------------------------------------------

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const token = $("token").value.trim();
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

async function getJson(path) {
  const resp = await fetch(path, { headers: headers(), cache: "no-store" });
  const body = await resp.json().catch(() => null);
  return { resp, body };
}

async function postJson(path, body, signal) {
  return fetch(path, {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify(body),
    signal,
  });
}

// The error envelope {"error": {code, message}} as one line.
async function errorLine(resp) {
  const body = await resp.json().catch(() => null);
  const err = body && body.error;
  if (err && typeof err === "object") {
    return `${err.code || err.type || resp.status}: ${err.message || ""}`;
  }
  return `HTTP ${resp.status} ${resp.statusText}`;
}

// Server-Sent Events from a fetch body: frames end with a blank line; `event:` names the
// frame, `data:` lines carry JSON, lines starting with ':' are keep-alive comments.
async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const frame = buffer.slice(0, cut);
        buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
        const event = parseFrame(frame);
        if (event) yield event;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function parseFrame(frame) {
  let name = "message";
  const data = [];
  for (const line of frame.split(/\r?\n/)) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  return { name, data: JSON.parse(data.join("\n")) };
}

// ---- formatting ------------------------------------------------------------------

function fmtMs(ms) {
  if (ms < 10) return ms.toFixed(1) + " ms";
  if (ms < 1000) return Math.round(ms) + " ms";
  return (ms / 1000).toFixed(2) + " s";
}

function fmtBytes(n) {
  if (!n) return "0";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

function fmtUptime(s) {
  if (s < 60) return Math.floor(s) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function fmtClock(stamp) {
  if (!stamp) return "–";
  const d = new Date(stamp);
  return isNaN(d) ? stamp : d.toLocaleTimeString([], { hour12: false });
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

// ---- the run ---------------------------------------------------------------------

function setRunState(state, text) {
  const badge = $("run-state");
  badge.className = "state state-" + state;
  badge.textContent = text || state;
  const busy = state === "connecting" || state === "queued" || state === "running" || state === "cancelling";
  $("send").disabled = busy;
  $("stop").disabled = !busy || state === "cancelling";
}

function showTerminal(kind, title, detail) {
  const box = $("terminal");
  box.hidden = false;
  box.className = "terminal terminal-" + kind;
  box.replaceChildren(el("span", { class: "terminal-title" }, title),
                      el("span", { class: "terminal-detail" }, detail || ""));
}

function numberField(id) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : Number(raw);
}

function requestBody(jobId) {
  const body = { job_id: jobId, prompt: $("prompt").value };
  for (const field of ["max_tokens", "temperature", "top_p", "top_k", "seed"]) {
    const value = numberField(field);
    if (value !== undefined) body[field] = value;
  }
  return body;
}

function newJobId() {
  const typed = $("job_id").value.trim();
  if (typed) return typed;
  const bytes = crypto.getRandomValues(new Uint8Array(4));
  return "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// Tokens are appended once per animation frame, not once per token.
function appendText(run, text) {
  run.pending += text;
  if (run.frame) return;
  run.frame = requestAnimationFrame(() => {
    run.frame = 0;
    const out = $("output");
    const atBottom = out.scrollHeight - out.scrollTop - out.clientHeight < 40;
    out.append(run.pending);
    run.pending = "";
    if (atBottom) out.scrollTop = out.scrollHeight;
  });
}

function liveStats(run) {
  if (!run.firstTokenAt) return;
  const secs = (performance.now() - run.firstTokenAt) / 1000;
  const rate = secs > 0.05 ? ` · ${(run.pieces / secs).toFixed(0)} tok/s` : "";
  $("run-stats").textContent = `${run.pieces} tokens${rate}`;
}

function onEvent(run, event) {
  const d = event.data;
  switch (event.name) {
    case "queued":
      setRunState("queued", `queued · #${d.position}`);
      break;
    case "started":
      if (!run.cancelAt) setRunState("running");
      $("run-meta").textContent = `${d.job_id} · ${d.model} · seed ${d.seed} · ${d.prompt_tokens} prompt tokens`;
      break;
    case "token":
      if (!run.firstTokenAt) run.firstTokenAt = performance.now();
      run.pieces += 1;
      appendText(run, d.t);
      liveStats(run);
      break;
    case "end": {
      const rate = d.decode_time_ms > 0 ? ` · ${(d.tokens_out / d.decode_time_ms * 1000).toFixed(0)} tok/s` : "";
      const why = d.stop_reason === "stop_sequence" ? `stop sequence ${JSON.stringify(d.stop_sequence)}` : d.stop_reason;
      setRunState("completed");
      showTerminal("end", "END", `${why} · ${d.tokens_out} tokens · ${fmtMs(d.decode_time_ms)}${rate}`);
      break;
    }
    case "error":
      if (d.code === "CANCELLED") {
        const latency = run.cancelAt ? ` · ${fmtMs(event.at - run.cancelAt)} after Stop` : "";
        setRunState("cancelled");
        showTerminal("cancelled", "CANCELLED", `${d.reason}${latency}`);
      } else {
        setRunState("failed");
        showTerminal("error", d.code, d.message + (d.reason ? ` (${d.reason})` : ""));
      }
      break;
  }
}

async function send() {
  if (current) return;
  if (!$("prompt").value.trim()) { $("prompt").focus(); return; }
  const jobId = newJobId();
  const run = { jobId, cancelAt: 0, pieces: 0, firstTokenAt: 0, pending: "", frame: 0, ended: false, accepted: false };
  current = run;
  $("output").replaceChildren();
  $("terminal").hidden = true;
  $("run-stats").textContent = "";
  $("run-meta").textContent = jobId;
  setRunState("connecting", "connecting…");
  try {
    const resp = await postJson("/execute", requestBody(jobId));
    if (!resp.ok) {
      setRunState("failed", "rejected");
      showTerminal("error", "REJECTED", await errorLine(resp));
      return;
    }
    run.accepted = true;
    for await (const event of sseEvents(resp.body)) {
      event.at = performance.now();
      onEvent(run, event);
      if (event.name === "end" || event.name === "error") { run.ended = true; break; }
    }
    if (!run.ended) {
      setRunState("failed", "cut off");
      showTerminal("error", "DISCONNECTED", "the stream closed without a terminal event");
    }
  } catch (err) {
    setRunState("failed", "offline");
    showTerminal("error", "NETWORK", String(err.message || err));
  } finally {
    current = null;
    if (run.frame) { cancelAnimationFrame(run.frame); run.frame = 0; }
    if (run.pending) { $("output").append(run.pending); run.pending = ""; }
    liveStats(run);
    refreshJobs();
    if (run.accepted) showRecord(run.jobId);
  }
}

// After the stream: the job's own record has the exact token count.
async function showRecord(jobId) {
  try {
    const { resp, body } = await getJson("/jobs/" + encodeURIComponent(jobId));
    if (!resp.ok || !body || current) return;
    const pct = Math.round((body.progress || 0) * 100);
    $("run-stats").textContent = `${body.tokens_out}/${body.max_tokens} tokens · ${pct}%`;
  } catch (err) {
    // the live count stays
  }
}

async function cancelJob(jobId) {
  const resp = await postJson("/cancel", { job_id: jobId });
  if (resp.status !== 202) throw new Error(await errorLine(resp));
  return resp.json();
}

async function stop() {
  const run = current;
  if (!run || run.cancelAt) return;
  run.cancelAt = performance.now();
  setRunState("cancelling", "cancelling…");
  try {
    await cancelJob(run.jobId);
  } catch (err) {
    showTerminal("error", "CANCEL FAILED", String(err.message || err));
  }
  refreshJobs();
}

// ---- jobs ------------------------------------------------------------------------

let jobsBusy = false;

async function refreshJobs() {
  if (jobsBusy) return;
  jobsBusy = true;
  try {
    const state = $("jobs-state").value;
    const { resp, body } = await getJson("/jobs" + (state ? "?state=" + encodeURIComponent(state) : ""));
    if (!resp.ok) {
      renderJobsMessage(body && body.error ? `${body.error.code}: ${body.error.message}` : `HTTP ${resp.status}`);
      return;
    }
    renderJobs(body.jobs || []);
  } catch (err) {
    renderJobsMessage("worker unreachable");
  } finally {
    jobsBusy = false;
  }
}

function renderJobsMessage(text) {
  $("jobs").tBodies[0].replaceChildren();
  jobRows.clear();
  $("jobs-empty").hidden = false;
  $("jobs-empty").textContent = text;
}

// Rows are kept per job and updated in place, so a Cancel button under the pointer is not
// replaced by an identical one between mouse-down and mouse-up.
const jobRows = new Map(); // job_id -> {row, cells, fill, label, key}

function jobRow(jobId) {
  let entry = jobRows.get(jobId);
  if (!entry) {
    const cells = Array.from({ length: 7 }, () => el("td"));
    cells[0].className = "mono";
    cells[0].textContent = jobId;
    cells[2].className = "num mono";
    cells[4].className = "mono";
    cells[5].className = "detail";
    const fill = el("div", { class: "bar-fill" });
    const label = el("span", { class: "bar-label" });
    cells[3].append(el("div", { class: "progress" }, el("div", { class: "bar" }, fill), label));
    entry = { row: el("tr", { dataset: { jobId } }, ...cells), cells, fill, label, key: "" };
    jobRows.set(jobId, entry);
  }
  return entry;
}

function renderJobs(jobs) {
  const shown = jobs.slice(0, 100);
  const ids = new Set(shown.map((job) => job.job_id));
  for (const [jobId, entry] of jobRows) {
    if (!ids.has(jobId)) { entry.row.remove(); jobRows.delete(jobId); }
  }
  const tbody = $("jobs").tBodies[0];
  shown.forEach((job, index) => {
    const entry = jobRow(job.job_id);
    const pct = Math.round((job.progress || 0) * 100);
    const detail = job.stop_reason || job.cancel_reason || (job.error && job.error.code) || "";
    const key = [job.state, job.tokens_out, job.max_tokens, pct, detail].join("|");
    if (entry.key !== key) {
      const c = entry.cells;
      entry.row.dataset.state = job.state;
      c[1].replaceChildren(el("span", { class: "state state-" + job.state }, job.state));
      c[2].textContent = `${job.tokens_out}/${job.max_tokens}`;
      entry.fill.className = "bar-fill bar-" + job.state;
      entry.fill.style.width = pct + "%"; // CSSOM: the page's CSP allows it, a style attribute not
      entry.label.textContent = pct + "%";
      c[4].textContent = fmtClock(job.created_at);
      c[5].textContent = detail;
      const active = ACTIVE.has(job.state);
      if (active && !c[6].firstChild) {
        c[6].append(el("button", { class: "btn btn-small btn-danger", type: "button",
                                   "data-cancel": job.job_id, title: "POST /cancel" }, "cancel"));
      } else if (!active) {
        c[6].replaceChildren();
      }
      entry.key = key;
    }
    entry.row.classList.toggle("mine", Boolean(current && job.job_id === current.jobId));
    if (tbody.children[index] !== entry.row) tbody.insertBefore(entry.row, tbody.children[index] || null);
  });
  $("jobs-empty").hidden = shown.length > 0;
  $("jobs-empty").textContent = "No jobs yet.";
}

// ---- health ----------------------------------------------------------------------

async function refreshHealth() {
  const badge = $("health-badge");
  try {
    const { body } = await getJson("/health");
    if (!body || !body.state) throw new Error("no health");
    const label = body.state === "starting" ? `loading ${Math.round((body.load_progress || 0) * 100)}%` : body.state;
    badge.textContent = label;
    badge.className = "pill pill-" + (body.status === "ok" ? body.state : body.status);
    const rows = [
      ["status", body.status],
      ["model", body.model || "–"],
      ["quant", body.quant_kind || "–"],
      ["device", body.device + (body.resident ? " · resident" : "")],
      ["slots", `${body.active_jobs} busy / ${body.slots}`],
      ["queue", `${body.queued_jobs} waiting`],
      ["context", body.context_length ? `${body.context_length} tokens` : "–"],
      ["ram", fmtBytes(body.ram_bytes_used)],
    ];
    if (body.vram_bytes_used) rows.push(["vram", fmtBytes(body.vram_bytes_used)]);
    rows.push(["uptime", fmtUptime(body.uptime_seconds || 0)], ["version", body.version || "–"]);
    if (body.worker_id) rows.push(["worker", body.worker_id]);
    $("health").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { "data-key": k }, String(v))]));
    $("health-age").textContent = "updated " + new Date().toLocaleTimeString([], { hour12: false });
  } catch (err) {
    badge.textContent = "offline";
    badge.className = "pill pill-offline";
  }
}

// ---- wiring ----------------------------------------------------------------------

function every(ms, fn) {
  fn();
  setInterval(() => { if (!document.hidden) fn(); }, ms);
}

document.addEventListener("DOMContentLoaded", () => {
  const token = $("token");
  token.value = localStorage.getItem(TOKEN_KEY) || "";
  token.addEventListener("change", () => {
    const value = token.value.trim();
    if (value) localStorage.setItem(TOKEN_KEY, value);
    else localStorage.removeItem(TOKEN_KEY);
    refreshJobs();
  });
  $("send").addEventListener("click", send);
  $("stop").addEventListener("click", stop);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); send(); }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") stop(); });
  $("jobs-state").addEventListener("change", refreshJobs);
  $("jobs").addEventListener("click", async (e) => {
    const button = e.target.closest("button[data-cancel]");
    if (!button) return;
    button.disabled = true;
    const jobId = button.dataset.cancel;
    if (current && current.jobId === jobId) { stop(); return; }
    try { await cancelJob(jobId); } catch (err) { renderJobsMessage(String(err.message || err)); }
    refreshJobs();
  });
  every(JOBS_EVERY_MS, refreshJobs);
  every(HEALTH_EVERY_MS, refreshHealth);
});
