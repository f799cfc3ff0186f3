// The wasmq console: polls the JSON API once a second and renders topics, subscriptions
// (lag per queue or instance and the node running it, a live throughput chart with a time
// axis), plugins, dead letters, the nodes sharing the storage and undecided transactions; and
// acts through the same API: create topics, browse messages (by queue and offset, key or id;
// bodies decoded) and trace one (every delivery attempt, where it is now), create and edit subscriptions, reset offsets to a time, upload plugins,
// read a plugin's log, pause, resume, redrive, commit, roll back. No framework and nothing
// from a CDN: the host serves this file itself.
"use strict";

const POLL_MS = 1000;
const CHART_POINTS = 60;
const COLORS = ["#0969da", "#1a7f37", "#bf3989", "#9a6700", "#8250df", "#cf222e", "#1b7c83"];

const state = {
  topicCounts: new Map(),   // topic -> {messages, at}
  ackCounts: new Map(),     // group -> {acked, at}
  series: new Map(),        // group -> [acked/s samples]
  dlqGroup: "",
};

const $ = (sel) => document.querySelector(sel);
const tokenInput = $("#token");
tokenInput.value = localStorage.getItem("wasmq-token") || "";
tokenInput.addEventListener("change", () => {
  localStorage.setItem("wasmq-token", tokenInput.value);
  refresh();
});

async function api(method, path, body, contentType) {
  const headers = { "content-type": contentType || "application/json" };
  if (tokenInput.value) headers.authorization = "Bearer " + tokenInput.value;
  const payload = body === undefined || contentType ? body : JSON.stringify(body);
  const resp = await fetch(path, { method, headers, body: payload });
  const text = await resp.text();
  const value = text ? JSON.parse(text) : {};
  if (!resp.ok) {
    const e = value.error || {};
    throw new Error(`${e.message || resp.statusText} (${e.code || resp.status})`);
  }
  return value;
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null ? "–" : String(text);
  if (cls) td.className = cls;
  return td;
}

function button(label, onClick, name) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  if (name) b.dataset.action = name;
  b.addEventListener("click", async () => {
    b.disabled = true;
    try { await onClick(); } catch (e) { setStatus(e.message, true); }
    b.disabled = false;
    refresh();
  });
  return b;
}

function row(cells, attrs) {
  const tr = document.createElement("tr");
  for (const [k, v] of Object.entries(attrs || {})) tr.dataset[k] = v;
  for (const c of cells) tr.appendChild(c);
  return tr;
}

function fill(tbody, rows, empty) {
  tbody.replaceChildren(...rows);
  if (!rows.length) {
    const td = cell(empty, "muted");
    td.colSpan = 10;
    tbody.appendChild(row([td]));
  }
}

function setStatus(text, bad) {
  const s = $("#status");
  s.textContent = text;
  s.className = bad ? "bad" : "muted";
}

function rate(map, key, value) {
  const now = performance.now();
  const prev = map.get(key);
  map.set(key, { value, at: now });
  if (!prev || now <= prev.at) return null;
  return Math.max(0, (value - prev.value) * 1000 / (now - prev.at));
}

function time(ms) {
  return ms ? new Date(ms).toLocaleTimeString() : "–";
}

function renderTopics(topics) {
  fill($("#topics tbody"), topics.map((t) => {
    const r = rate(state.topicCounts, t.name, t.messages);
    return row([cell(t.name), cell(t.queues, "num"), cell(t.messages, "num"), cell(r === null ? "…" : r.toFixed(0), "num rate")], { topic: t.name });
  }), "no topics yet");
}

function lagDetail(sub) {
  if (Array.isArray(sub.instances)) {
    return sub.instances.map((i) => `instance ${i.instance}: lag ${i.lag} [` + i.queues.map((q) => `q${q.queue}:${q.lag}`).join(" ") + "]").join(" · ");
  }
  return (sub.queues || []).map((q) => `q${q.queue}: lag ${q.lag} (${q.committed}/${q.high_water})` + (q.blocked_attempts ? ` blocked ×${q.blocked_attempts}` : "") + (q.node ? ` @${q.node}` : "")).join(" · ");
}

function renderNodes(cluster) {
  $("#node").textContent = `node ${cluster.node} · ${cluster.backend}`;
  const held = new Map();
  for (const l of cluster.leases || []) {
    if (!l.expired) held.set(l.owner, (held.get(l.owner) || 0) + 1);
  }
  fill($("#nodes tbody"), (cluster.nodes || []).map((n) => row([
    cell(n.node + (n.self ? " (this node)" : "")), cell(n.api),
    cell(n.up ? "up" : "down", n.up ? "ok" : "bad"), cell(`${(n.heartbeat_age_ms / 1000).toFixed(1)} s ago`, "num"),
    cell(held.get(n.node) || 0, "num leases"),
  ], { node: n.node })), "no nodes");
}

function renderSubs(subs) {
  const rows = [];
  for (const s of subs) {
    const acked = (s.counters && s.counters.acked) || 0;
    const r = rate(state.ackCounts, s.group, acked);
    const series = state.series.get(s.group) || [];
    if (r !== null) series.push(r);
    while (series.length > CHART_POINTS) series.shift();
    state.series.set(s.group, series);
    const paused = s.state === "paused";
    const action = paused
      ? button("Resume", () => api("POST", `/v1/subscriptions/${encodeURIComponent(s.group)}/resume`, {}), "resume")
      : button("Pause", () => api("POST", `/v1/subscriptions/${encodeURIComponent(s.group)}/pause`, {}), "pause");
    const actions = document.createElement("td");
    actions.append(action, " ", button("Edit", () => editSub(s), "edit"));
    rows.push(row([
      cell(s.group), cell(s.spec.topic), cell(`${s.spec.plugin}` + (s.plugin_version ? ` v${s.plugin_version}` : "")),
      cell(s.spec.mode + (s.spec.ordered ? ", ordered" : "")), cell(s.state, paused ? "bad" : "ok"),
      cell(s.lag, "num lag"), cell(s.in_flight, "num"), cell(r === null ? "…" : r.toFixed(0), "num"),
      cell(s.dlq, s.dlq ? "num bad dlq" : "num dlq"), actions,
    ], { sub: s.group }));
    const detail = cell(lagDetail(s));
    detail.colSpan = 10;
    rows.push(row([detail], { subDetail: s.group }));
    rows[rows.length - 1].className = "detail";
  }
  fill($("#subs tbody"), rows, "no subscriptions yet");
  keepOptions($("#reset-group"), subs.map((s) => s.group));
  drawChart();
}

// Replaces a select's options, keeping the choice when it is still there.
function keepOptions(select, values) {
  const chosen = select.value;
  select.replaceChildren(...values.map((v) => {
    const o = document.createElement("option");
    o.value = o.textContent = v;
    o.selected = v === chosen;
    return o;
  }));
}

// Fills the subscription form with a subscription's spec, to change it.
async function editSub(s) {
  $("#sub-group").value = s.group;
  $("#sub-spec").value = JSON.stringify(s.spec, null, 2);
  $("#sub-spec").focus();
}

function drawChart() {
  const canvas = $("#chart");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 28;
  ctx.clearRect(0, 0, w, h);
  let max = 1;
  for (const s of state.series.values()) for (const v of s) max = Math.max(max, v);
  ctx.strokeStyle = "#dde1e6";
  ctx.fillStyle = "#57606a";
  ctx.font = "11px system-ui";
  ctx.beginPath();
  ctx.moveTo(pad, 4); ctx.lineTo(pad, h - pad); ctx.lineTo(w - 4, h - pad);
  ctx.stroke();
  ctx.fillText(`${max.toFixed(0)}/s`, 2, 12);
  ctx.fillText("0", 2, h - pad);
  // Time axis: a tick every 15 s, seconds before now.
  ctx.textAlign = "center";
  for (let ago = 0; ago < CHART_POINTS; ago += 15) {
    const x = pad + (w - pad - 4) * (CHART_POINTS - 1 - ago) / (CHART_POINTS - 1);
    ctx.beginPath(); ctx.moveTo(x, h - pad); ctx.lineTo(x, h - pad + 4); ctx.stroke();
    ctx.fillText(ago === 0 ? "now" : `−${ago} s`, Math.min(x, w - 16), h - pad + 15);
  }
  ctx.textAlign = "start";
  const legend = [];
  let i = 0;
  for (const [group, s] of state.series) {
    const color = COLORS[i++ % COLORS.length];
    const item = document.createElement("span");
    item.style.color = color;
    item.textContent = `■ ${group}`;
    legend.push(item);
    ctx.strokeStyle = color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    s.forEach((v, j) => {
      const x = pad + (w - pad - 4) * (j + CHART_POINTS - s.length) / (CHART_POINTS - 1);
      const y = h - pad - (h - pad - 8) * v / max;
      if (j === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
  }
  $("#legend").replaceChildren(...legend);
}

function renderPlugins(plugins, subs) {
  fill($("#plugins tbody"), plugins.map((p) => {
    const users = subs.filter((s) => s.spec.plugin === p.name);
    const sum = (k) => users.reduce((n, s) => n + ((s.counters && s.counters[k]) || 0), 0);
    return row([
      cell(p.name), cell(p.version ? `v${p.version}` : "–"), cell(p.versions.length, "num"),
      cell(p.size !== undefined ? `${Math.round(p.size / 1024)} KB` : "–", "num"),
      cell(users.map((s) => s.group).join(", ") || "–"),
      cell(sum("delivered"), "num"), cell(sum("acked"), "num"), cell(sum("failed"), "num"),
      (() => { const td = document.createElement("td"); td.appendChild(button("Logs", () => showLogs(p.name), "logs")); return td; })(),
    ], { plugin: p.name });
  }), "no plugins yet");
}

async function renderDlq(subs) {
  const select = $("#dlq-group");
  const groups = subs.map((s) => s.group);
  if (!groups.includes(state.dlqGroup)) {
    state.dlqGroup = (subs.find((s) => s.dlq > 0) || subs[0] || {}).group || "";
  }
  select.replaceChildren(...groups.map((g) => {
    const o = document.createElement("option");
    o.value = g;
    const sub = subs.find((s) => s.group === g);
    o.textContent = `${g} (${sub.dlq})`;
    o.selected = g === state.dlqGroup;
    return o;
  }));
  if (!state.dlqGroup) {
    fill($("#dlq tbody"), [], "no subscriptions");
    return;
  }
  const group = encodeURIComponent(state.dlqGroup);
  const page = await api("GET", `/v1/subscriptions/${group}/dlq?limit=100`);
  fill($("#dlq tbody"), page.entries.map((e) => {
    const actions = document.createElement("td");
    actions.appendChild(button("Redrive", () => api("POST", `/v1/subscriptions/${group}/dlq/redrive`, { ids: [e.message_id] }), "redrive"));
    return row([cell(e.message_id), cell(e.instance ?? "", "num"), cell(`${e.queue}/${e.offset}`), cell(e.attempts, "num"), cell(e.reason), cell(time(e.dead_at)), actions], { dead: e.message_id });
  }), "no dead letters");
}

$("#dlq-group").addEventListener("change", (ev) => { state.dlqGroup = ev.target.value; refresh(); });
$("#redrive-all").addEventListener("click", async () => {
  if (!state.dlqGroup) return;
  try { await api("POST", `/v1/subscriptions/${encodeURIComponent(state.dlqGroup)}/dlq/redrive`, {}); } catch (e) { setStatus(e.message, true); }
  refresh();
});

async function renderTxns() {
  const lists = await Promise.all(["unresolved", "pending"].map((s) => api("GET", `/v1/transactions?state=${s}&limit=100`)));
  const txns = lists.flatMap((l) => l.transactions || []);
  fill($("#txns tbody"), txns.map((t) => {
    const actions = document.createElement("td");
    const id = encodeURIComponent(t.txn_id);
    actions.append(
      button("Commit", () => api("POST", `/v1/transactions/${id}/commit`, {}), "commit"), " ",
      button("Roll back", () => api("POST", `/v1/transactions/${id}/rollback`, {}), "rollback"),
    );
    return row([cell(t.txn_id), cell(t.topic), cell(t.state, t.state === "unresolved" ? "bad" : ""), cell(`${t.checks}/${t.max_checks}`, "num"), cell(time(t.created_at)), actions], { txn: t.txn_id });
  }), "none");
}

// A body for people: JSON as compact text, base64 bytes as text when they are UTF-8, else
// their size.
function bodyText(m) {
  if (m.body !== undefined) return JSON.stringify(m.body);
  if (m.body_base64 === undefined) return "";
  const bytes = Uint8Array.from(atob(m.body_base64), (c) => c.charCodeAt(0));
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    return `<${bytes.length} bytes>`;
  }
}

async function browse() {
  const topic = $("#browse-topic").value;
  const id = $("#browse-id").value.trim();
  const key = $("#browse-key").value.trim();
  let messages;
  if (id) {
    messages = [await api("GET", `/v1/messages/${encodeURIComponent(id)}`)];
  } else if (!topic) {
    messages = [];
  } else if (key) {
    messages = (await api("GET", `/v1/topics/${encodeURIComponent(topic)}/messages?key=${encodeURIComponent(key)}`)).messages;
  } else {
    const q = Number($("#browse-queue").value) || 0, from = Number($("#browse-from").value) || 0;
    messages = (await api("GET", `/v1/topics/${encodeURIComponent(topic)}/messages?queue=${q}&from=${from}&limit=100`)).messages;
  }
  fill($("#messages tbody"), messages.map((m) => row([
    cell(m.id), cell(`${m.queue}/${m.offset}`), cell(m.key), cell(m.tag), cell(bodyText(m), "body"), cell(new Date(m.stored_at).toLocaleString()),
    (() => { const td = cell(""); td.appendChild(button("trace", () => showTrace(m.id), "trace")); return td; })(),
  ], { message: m.id })), "no messages there");
}

// A message's trace: where it is for each subscription (member), then every attempt.
async function showTrace(id) {
  const t = await api("GET", `/v1/messages/${encodeURIComponent(id)}/trace`);
  $("#trace-id").textContent = `${t.id} (${t.topic}${t.stored ? ` ${t.queue}/${t.offset}` : ", deleted by retention"})`;
  $("#trace-box").hidden = false;
  const subs = t.subscriptions || [];
  fill($("#trace-now tbody"), subs.map((s) => row([
    cell(s.group), cell(s.member), cell(s.state, s.state === "dead_lettered" || s.state === "expired" ? "bad" : s.state === "acked" ? "ok" : ""),
    cell(s.next_attempt_at ? new Date(s.next_attempt_at).toLocaleString() : undefined),
  ], { group: s.group, state: s.state })), "no subscription on its topic");
  fill($("#trace tbody"), subs.flatMap((s) => s.attempts.map((a) => row([
    cell(a.group), cell(a.member), cell(a.attempt, "num"), cell(new Date(a.started_at).toLocaleString()), cell(a.node),
    cell(a.instance, "num"), cell(a.outcome, a.outcome === "ack" ? "ok" : "bad"), cell(a.fate), cell(a.duration_ms.toFixed(2), "num"), cell(a.reason),
  ], { attempt: a.attempt, outcome: a.outcome }))), "no attempt on record yet");
}

async function showLogs(plugin) {
  const page = await api("GET", `/v1/plugins/${encodeURIComponent(plugin)}/logs?limit=100`);
  $("#logs-plugin").textContent = plugin;
  $("#logs-box").hidden = false;
  fill($("#logs tbody"), page.lines.map((l) => row([
    cell(new Date(l.at).toLocaleTimeString()), cell(l.level, l.level === "error" ? "bad" : ""), cell(l.group), cell(l.instance, "num"), cell(l.message),
  ], { line: l.seq })), "no log lines");
}

// Forms: each submits through the API and says in its own <output> whether that worked
// (the status line is the poller's).
function onSubmit(form, action) {
  const out = $(`${form} output`);
  $(form).addEventListener("submit", async (ev) => {
    ev.preventDefault();
    out.textContent = "…";
    out.className = "muted";
    try {
      await action();
      out.textContent = "done";
      out.className = "ok";
    } catch (e) {
      out.textContent = e.message;
      out.className = "bad";
    }
    refresh();
  });
}

onSubmit("#topic-form", () => api("PUT", `/v1/topics/${encodeURIComponent($("#topic-name").value)}`,
  { queues: Number($("#topic-queues").value) }));
onSubmit("#browse-form", browse);
onSubmit("#sub-form", () => {
  let spec;
  try { spec = JSON.parse($("#sub-spec").value); } catch (e) { throw new Error(`the spec is not JSON: ${e.message}`); }
  return api("PUT", `/v1/subscriptions/${encodeURIComponent($("#sub-group").value)}`, spec);
});
onSubmit("#reset-form", () => {
  const at = new Date($("#reset-at").value).getTime();
  if (!Number.isFinite(at)) throw new Error("pick a time to reset to");
  return api("POST", `/v1/subscriptions/${encodeURIComponent($("#reset-group").value)}/reset`, { to: at });
});
onSubmit("#upload-form", async () => {
  const file = $("#upload-file").files[0];
  if (!file) throw new Error("choose a component (.wasm) to upload");
  await api("PUT", `/v1/plugins/${encodeURIComponent($("#upload-name").value)}`, await file.arrayBuffer(), "application/wasm");
});

let busy = false;
async function refresh() {
  if (busy) return;
  busy = true;
  try {
    const [topics, subs, plugins, cluster] = await Promise.all([
      api("GET", "/v1/topics"), api("GET", "/v1/subscriptions"), api("GET", "/v1/plugins"), api("GET", "/v1/cluster"),
    ]);
    renderNodes(cluster);
    renderTopics(topics.topics || []);
    keepOptions($("#browse-topic"), (topics.topics || []).map((t) => t.name));
    renderSubs(subs.subscriptions || []);
    renderPlugins(plugins.plugins || [], subs.subscriptions || []);
    await renderDlq(subs.subscriptions || []);
    await renderTxns();
    setStatus(`updated ${new Date().toLocaleTimeString()}`);
    document.body.dataset.ready = "true";
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    busy = false;
  }
}

refresh();
setInterval(refresh, POLL_MS);
