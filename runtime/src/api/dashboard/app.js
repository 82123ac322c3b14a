// The Stoker dashboard: reads the node's JSON endpoints and renders them.
// A tenant token is kept in localStorage and sent as `Authorization:
// Bearer`; without one the node answers as it would an admin without a
// token configured.
"use strict";

const TOKEN_KEY = "stoker.token";
const REFRESH_MS = 2000;

function token() {
  return window.localStorage.getItem(TOKEN_KEY) || "";
}

async function api(path) {
  const headers = {};
  if (token()) headers["Authorization"] = "Bearer " + token();
  const r = await fetch(path, { headers });
  let body;
  try {
    body = await r.json();
  } catch (e) {
    throw new Error(path + ": HTTP " + r.status);
  }
  if (!r.ok) throw new Error(body.error || path + ": HTTP " + r.status);
  return body;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) {
    e.append(c instanceof Node ? c : document.createTextNode(c === undefined || c === null ? "" : String(c)));
  }
  return e;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function fmtFuel(n) {
  if (!n) return "0";
  const units = [["T", 1e12], ["G", 1e9], ["M", 1e6], ["k", 1e3]];
  for (const [u, v] of units) if (n >= v) return (n / v).toFixed(1) + u;
  return String(n);
}

function fmtTime(ms) {
  return ms ? new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z") : "";
}

function stateCell(state) {
  return el("td", { class: "state state-" + state }, state);
}

function progressCell(p) {
  const pct = p.total ? Math.round((100 * p.done) / p.total) : 0;
  const bar = el("span", { class: "bar" }, el("span", {}));
  bar.firstChild.style.width = pct + "%";
  return el("td", { class: "progress" }, bar, p.done + "/" + p.total);
}

function showError(e) {
  const p = document.getElementById("error");
  if (e) {
    p.textContent = e.message || String(e);
    p.hidden = false;
  } else {
    p.hidden = true;
  }
}

async function renderOverview() {
  const tenant = document.getElementById("tenant-filter").value.trim();
  const q = tenant ? "?tenant=" + encodeURIComponent(tenant) : "";
  const [ov, tasks, rules] = await Promise.all([
    api("/api/overview"),
    api("/api/tasks" + q),
    api("/api/rules"),
  ]);
  document.getElementById("served-by").textContent = ov.node_id;
  document.getElementById("whoami").textContent = ov.admin ? "admin view" : "tenant view";
  document.getElementById("leader").textContent =
    ov.leader_id ? "Leader (owner): node " + ov.leader_id : "No leader known";
  fill(document.querySelector("#nodes tbody"), ov.nodes.map((n) => {
    const l = n.load;
    const role = [n.scheduler ? "scheduler" : "", n.worker ? "worker" : ""].filter(Boolean).join("+");
    const labels = Object.entries(n.labels || {}).map(([k, v]) => k + "=" + v).join(", ");
    return el("tr", { "data-node-id": n.id },
      el("td", {}, n.id), el("td", {}, n.addr), el("td", {}, role),
      el("td", { class: n.up ? "" : "down" }, n.up ? "up" : "down"),
      el("td", {}, n.scope), el("td", {}, labels),
      el("td", {}, (l ? l.running : n.assigned) + "/" + n.slots),
      el("td", {}, l && l.cpu !== null && l.cpu !== undefined ? (100 * l.cpu).toFixed(0) + "%" : ""),
      el("td", {}, l ? (l.scheduler || "none") + ": " + l.command : ""),
      el("td", {}, l ? l.active + " active / " + l.allowed + " allowed" : ""),
      el("td", {}, l ? (l.fuel_rate ? fmtFuel(l.fuel_rate) + "/s" : "unlimited") : ""));
  }));
  fill(document.querySelector("#fuel tbody"), Object.entries(ov.tenant_fuel).map(([t, f]) =>
    el("tr", {}, el("td", {}, t), el("td", {}, fmtFuel(f)))));
  fill(document.querySelector("#tasks tbody"), tasks.tasks.map((t) =>
    el("tr", { class: "task", "data-task-id": t.id, "data-state": t.state },
      el("td", {}, el("a", { href: "#/task/" + t.id }, t.id)),
      el("td", {}, t.tenant), el("td", {}, t.key), stateCell(t.state), el("td", {}, t.step),
      progressCell(t.progress), el("td", {}, t.priority), el("td", {}, fmtFuel(t.fuel_used)),
      el("td", { class: "error" }, t.error))));
  fill(document.querySelector("#rules tbody"), rules.rules.map((r) =>
    el("tr", {}, el("td", {}, r.name), el("td", {}, r.kind), el("td", {}, r.status))));
  document.getElementById("rules-empty").hidden = rules.rules.length > 0;
}

// Logs of finished runs never change: kept here, keyed by
// task/step/ordinal/attempt, so the refresh does not fetch them again.
const finishedLogs = new Map();
const FINISHED = new Set(["succeed", "failed", "canceled"]);

// The log of one run of subtask `s` (the latest without `attempt`).
async function subtaskLog(taskId, s, attempt) {
  const a = attempt || s.attempt;
  const key = [taskId, s.step, s.ordinal, a].join("/");
  if (finishedLogs.has(key)) return finishedLogs.get(key);
  const path = "/api/tasks/" + taskId + "/subtasks/" + s.step + "/" + s.ordinal + "/log" +
    (attempt ? "?attempt=" + attempt : "");
  const log = await api(path);
  if (FINISHED.has(s.state) || a < s.attempt) finishedLogs.set(key, log);
  return log;
}

// The row under a subtask that shows one run's log, with links to the
// other attempts.
async function logRow(taskId, s, attempt, columns) {
  const log = await subtaskLog(taskId, s, attempt);
  const base = "#/task/" + taskId + "/log/" + s.step + "/" + s.ordinal;
  const attempts = [];
  for (let a = 1; a <= s.attempt; a++) {
    attempts.push(a === log.attempt ? el("b", {}, a) : el("a", { href: base + "/" + a }, a), " ");
  }
  const pre = el("pre", { id: "subtask-log", "data-step": s.step, "data-ordinal": s.ordinal,
    "data-attempt": log.attempt }, log.log || "(nothing logged)");
  return el("tr", { class: "log-row" }, el("td", { colSpan: columns },
    el("div", { class: "log-head" }, "log of subtask " + s.step + "/" + s.ordinal + ", attempt ", ...attempts),
    pre));
}

async function renderTask(id, open) {
  const d = await api("/api/tasks/" + encodeURIComponent(id));
  const t = d.task;
  const title = document.getElementById("task-title");
  title.replaceChildren("Task " + t.id + " ", el("span", { class: "state-" + t.state, id: "task-state" }, t.state));
  const fields = [["tenant", t.tenant], ["key", t.key], ["module", t.module], ["priority", t.priority],
    ["concurrency", t.concurrency], ["step", t.step], ["progress", t.progress.done + "/" + t.progress.total],
    ["fuel used", fmtFuel(t.fuel_used)], ["fuel limit per subtask", t.fuel_limit || "default"],
    ["created", fmtTime(t.create_time_ms)], ["finished", fmtTime(t.finish_time_ms)],
    ["error", t.error], ["result", t.result_bytes + " bytes: " + t.result_preview]];
  document.getElementById("task-fields").replaceChildren(...fields.flatMap(([k, v]) =>
    [el("dt", {}, k), el("dd", {}, v)]));
  fill(document.querySelector("#steps tbody"), d.steps.map((s) =>
    el("tr", {}, el("td", {}, s.step),
      el("td", {}, Object.entries(s.counts).map(([k, v]) => k + ": " + v).join(", ")))));
  const columns = document.querySelectorAll("#subtasks thead th").length;
  const rows = [];
  for (const s of d.subtasks) {
    const shown = open && open.step === s.step && open.ordinal === s.ordinal;
    const link = shown
      ? el("a", { href: "#/task/" + t.id, class: "log-link" }, "hide log")
      : el("a", { href: "#/task/" + t.id + "/log/" + s.step + "/" + s.ordinal, class: "log-link" }, "log");
    rows.push(el("tr", { class: "subtask", "data-state": s.state },
      el("td", {}, s.step), el("td", {}, s.ordinal), stateCell(s.state), el("td", {}, s.node || ""),
      el("td", {}, s.attempt), el("td", {}, s.retries), el("td", {}, fmtFuel(s.fuel_used)),
      el("td", {}, s.end_time_ms && s.start_time_ms ? (s.end_time_ms - s.start_time_ms) + " ms" : ""),
      el("td", { class: "error" }, s.error), el("td", {}, s.attempt ? link : "")));
    if (shown && s.attempt) rows.push(await logRow(t.id, s, open.attempt, columns));
  }
  fill(document.querySelector("#subtasks tbody"), rows);
}

async function render() {
  // #/task/<id>, or #/task/<id>/log/<step>/<ordinal>[/<attempt>] with
  // that subtask's log open.
  const m = window.location.hash.match(/^#\/task\/(\d+)(?:\/log\/(\d+)\/(\d+)(?:\/(\d+))?)?$/);
  document.getElementById("overview-view").hidden = !!m;
  document.getElementById("task-view").hidden = !m;
  try {
    if (m) {
      const open = m[2] === undefined ? null
        : { step: Number(m[2]), ordinal: Number(m[3]), attempt: m[4] ? Number(m[4]) : 0 };
      await renderTask(m[1], open);
    } else {
      await renderOverview();
    }
    showError(null);
  } catch (e) {
    showError(e);
  }
}

document.getElementById("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const v = document.getElementById("token").value.trim();
  if (v) window.localStorage.setItem(TOKEN_KEY, v);
  document.getElementById("token").value = "";
  render();
});
document.getElementById("logout").addEventListener("click", () => {
  window.localStorage.removeItem(TOKEN_KEY);
  render();
});
document.getElementById("tenant-filter").addEventListener("change", render);
window.addEventListener("hashchange", render);
render();
setInterval(render, REFRESH_MS);
