// mlx-cluster dashboard and playground: plain JavaScript, no dependencies, no build step.
// Everything comes from GET /admin/status and the public /v1 API of the same server.
"use strict";

const KEY_NAME = "mlx-cluster-api-key"; // sessionStorage only: gone when the tab closes, never in a URL
const POLL_MS = 2000;
const $ = (sel) => document.querySelector(sel);

function authHeaders() {
  const key = sessionStorage.getItem(KEY_NAME);
  return key ? { Authorization: "Bearer " + key } : {};
}

async function api(path, options = {}) {
  const init = { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } };
  // A restarting cluster keeps its HTTP socket and lets requests wait: give up on status polls after a while.
  if (!init.signal) init.signal = AbortSignal.timeout(5000);
  const res = await fetch(path, init);
  if (res.status === 401) {
    showKeyPrompt(sessionStorage.getItem(KEY_NAME) ? "that key was refused" : "");
    throw new Error("unauthorized");
  }
  return res;
}

function showKeyPrompt(message) {
  $("#key-prompt").hidden = false;
  $("#key-error").textContent = message || "";
  $("#key-input").focus();
}

$("#key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY_NAME, $("#key-input").value.trim());
  $("#key-input").value = "";
  $("#key-prompt").hidden = true;
  refresh();
  loadModels();
});

// ---- tabs ---------------------------------------------------------------------------------
for (const button of document.querySelectorAll(".tab")) {
  button.addEventListener("click", () => {
    for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b === button);
    for (const page of document.querySelectorAll(".page")) page.hidden = page.id !== "page-" + button.dataset.tab;
  });
}

// ---- formatting -----------------------------------------------------------------------------
function bytes(n) {
  if (n == null) return "-";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return n.toFixed(n >= 100 || i === 0 ? 0 : 1) + " " + units[i];
}
const ms = (s) => (s == null ? "-" : (s * 1000).toFixed(1) + " ms");
const pct = (f) => (f == null ? "-" : (f * 100).toFixed(1) + "%");
function duration(s) {
  if (s == null) return "-";
  if (s < 120) return s.toFixed(0) + " s";
  if (s < 7200) return (s / 60).toFixed(0) + " min";
  return (s / 3600).toFixed(1) + " h";
}
function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

// ---- charts: a small SVG line chart, one or two series -------------------------------------------
function drawChart(svg, series, { fixedMax } = {}) {
  const W = 400, H = 120, L = 34, B = 14, T = 6;
  const points = series.flatMap((s) => s.values.filter((v) => v != null));
  const max = fixedMax || Math.max(1e-9, ...points) * 1.1;
  const n = Math.max(2, ...series.map((s) => s.values.length));
  const x = (i) => L + ((W - L - 4) * i) / (n - 1);
  const y = (v) => H - B - ((H - B - T) * v) / max;
  let out = `<line x1="${L}" y1="${H - B}" x2="${W}" y2="${H - B}"/><line x1="${L}" y1="${T}" x2="${W}" y2="${T}"/>`;
  out += `<text x="2" y="${T + 8}">${fmtAxis(max)}</text><text x="2" y="${H - B}">0</text>`;
  out += `<text x="${L}" y="${H - 2}">${n > 2 ? "last " + duration(lastSpan) : ""}</text>`;
  series.forEach((s, k) => {
    let d = "";
    s.values.forEach((v, i) => { if (v != null) d += (d ? "L" : "M") + x(i).toFixed(1) + " " + y(v).toFixed(1); });
    out += `<path class="${k ? "line2" : "line"}" d="${d}"/>`;
  });
  svg.innerHTML = out;
  svg.dataset.points = String(points.length);
}
let lastSpan = 0;
function fmtAxis(v) { return v >= 100 ? v.toFixed(0) : v >= 1 ? v.toFixed(1) : v.toPrecision(2); }

// ---- the dashboard ------------------------------------------------------------------------
let pollTimer = null;
let history = []; // the page keeps the history; each poll asks only for the points after its last one
const HISTORY_KEEP_S = 600;

async function refresh() {
  clearTimeout(pollTimer);
  try {
    const since = history.length ? "?history_since=" + history[history.length - 1].t : "";
    const res = await api("/admin/status" + since);
    if (!res.ok) throw new Error("HTTP " + res.status);
    const status = await res.json();
    history = history.concat(status.history);
    const cut = history.length ? history[history.length - 1].t - HISTORY_KEEP_S : 0;
    history = history.filter((p) => p.t >= cut);
    status.history = history;
    render(status);
    setConn("live", true);
  } catch (err) {
    if (err.message !== "unauthorized") {
      setConn("unreachable", false);
      markRanksUnreachable();
    }
  }
  // A hidden tab stops polling (visibilitychange restarts it): an open but unseen page costs nothing.
  if (!document.hidden) pollTimer = setTimeout(refresh, POLL_MS);
}
document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });

function setConn(text, ok) {
  const pill = $("#conn");
  pill.textContent = text;
  pill.className = "pill " + (ok ? "ok" : "bad");
}

function markRanksUnreachable() {
  for (const row of document.querySelectorAll("#ranks tbody tr")) {
    row.dataset.state = "unreachable";
    const stateCell = row.children[3];
    stateCell.textContent = "unreachable";
    stateCell.className = "l state-down";
  }
}

function render(s) {
  const c = s.cluster;
  $("#cluster-name").textContent = c.name + " · " + c.model;
  const up = s.ranks.filter((r) => r.up).length;
  const last = s.history.length ? s.history[s.history.length - 1] : {};
  const cards = [
    ["state", c.state, s.health.status],
    ["ranks up", up + " / " + c.world_size, c.backend + ", " + c.parallel],
    ["restarts", c.restarts, "uptime " + duration(c.uptime_s)],
    ["generated", (last.gen_tok_s ?? 0).toFixed(1) + " tok/s", "prompt " + (last.prompt_tok_s ?? 0).toFixed(1) + " tok/s"],
    ["queue", s.health.queue_depth + " waiting", s.health.running_requests + " running"],
    ["prefix cache", last.cache_hit_rate == null ? "-" : pct(last.cache_hit_rate), "hit rate, last interval"],
  ];
  const box = $("#cluster-cards");
  box.replaceChildren(...cards.map(([title, value, sub]) => {
    const div = document.createElement("div");
    div.className = "card";
    div.innerHTML = "<small></small><b></b><small></small>";
    div.children[0].textContent = title;
    div.children[1].textContent = value;
    div.children[2].textContent = sub;
    return div;
  }));

  const body = $("#ranks tbody");
  body.replaceChildren(...s.ranks.map((r) => {
    const tr = document.createElement("tr");
    tr.id = "rank-row-" + r.rank;
    const state = r.up ? "up" : r.state === "down" ? "down" : "unknown";
    tr.dataset.state = state;
    const ssd = r.cache && r.cache.ssd ? bytes(r.cache.ssd.bytes) + (r.cache.ssd.errors ? ", " + r.cache.ssd.errors + " errors" : "") : "off";
    const warnings = r.errors ? Object.entries(r.errors).map(([k, v]) => k + " " + v).join(", ") || "0" : "-";
    tr.append(
      cell(String(r.rank)), cell(r.host || "-", "l"), cell(r.pid ? String(r.pid) : "-"),
      cell(state + (r.up && r.state ? " (" + r.state + ")" : ""), "l state-" + state),
      cell(bytes(r.mem_active)), cell(bytes(r.mem_peak)), cell(ms(r.step_s)),
      cell(pct(r.bus_frac)), cell(pct(r.model_frac)), cell(r.tok_s == null ? "-" : r.tok_s.toFixed(1)),
      cell(ssd), cell(warnings), cell(r.age_s == null ? "-" : r.age_s.toFixed(1) + " s"),
    );
    return tr;
  }));

  const h = s.history;
  lastSpan = h.length > 1 ? h[h.length - 1].t - h[0].t : 0;
  drawChart($("#chart-throughput"), [{ values: h.map((p) => p.gen_tok_s) }]);
  drawChart($("#chart-ttft"), [{ values: h.map((p) => p.ttft_s) }]);
  drawChart($("#chart-tpot"), [{ values: h.map((p) => p.tpot_s) }]);
  drawChart($("#chart-queue"), [{ values: h.map((p) => p.running) }, { values: h.map((p) => p.waiting) }]);

  $("#requests tbody").replaceChildren(...s.requests.map((q) => {
    const tr = document.createElement("tr");
    tr.append(cell(q.id), cell(q.state, "l"), cell(String(q.prompt_tokens)), cell(String(q.generated_tokens)),
      cell(q.tok_s.toFixed(1)), cell(q.age_s.toFixed(1) + " s"));
    return tr;
  }));

  const dl = (el, entries) => el.replaceChildren(...entries.flatMap(([k, v]) => {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v;
    return [dt, dd];
  }));
  const cache = s.prefix_cache;
  dl($("#cache"), cache ? [
    ["RAM tier", bytes(cache.ram.bytes) + " in " + cache.ram.blocks + " blocks"],
    ["RAM hits / misses", cache.ram.hits + " / " + cache.ram.misses],
    ["SSD tier", cache.ssd ? bytes(cache.ssd.bytes) + " in " + cache.ssd.blocks + " blocks" : "off"],
    ["hit rate (last interval)", last.cache_hit_rate == null ? "-" : pct(last.cache_hit_rate)],
  ] : [["prefix cache", "off"]]);
  const errs = Object.entries(s.errors);
  dl($("#errors"), errs.length ? errs : [["none", ""]]);
}

// ---- playground ---------------------------------------------------------------------------
const chat = [];
let controller = null;

async function loadModels() {
  try {
    const res = await api("/v1/models");
    const data = await res.json();
    $("#pg-model").replaceChildren(...data.data.map((m) => {
      const o = document.createElement("option");
      o.value = o.textContent = m.id;
      return o;
    }));
  } catch (err) { /* the key prompt is showing, or the server is down: tried again after a key */ }
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.innerHTML = '<span class="who"></span><span class="text"></span><span class="meta"></span>';
  div.querySelector(".who").textContent = role;
  div.querySelector(".text").textContent = text;
  $("#pg-messages").append(div);
  $("#pg-messages").scrollTop = 1e9;
  return div;
}

function requestBody() {
  const messages = [];
  const system = $("#pg-system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...chat);
  const body = {
    model: $("#pg-model").value, messages, stream: true, stream_options: { include_usage: true },
    temperature: Number($("#pg-temperature").value), top_p: Number($("#pg-top-p").value),
    max_tokens: Number($("#pg-max-tokens").value),
  };
  if ($("#pg-seed").value !== "") body.seed = Number($("#pg-seed").value);
  if ($("#pg-json").checked) body.response_format = { type: "json_object" };
  const tools = $("#pg-tools").value.trim();
  if (tools) body.tools = JSON.parse(tools); // a parse error is shown as the reply's error
  return body;
}

async function send(text) {
  chat.push({ role: "user", content: text });
  addMessage("user", text);
  const div = addMessage("assistant", "");
  const out = div.querySelector(".text"), meta = div.querySelector(".meta");
  controller = new AbortController();
  $("#pg-send").disabled = true; $("#pg-stop").disabled = false;
  const t0 = performance.now();
  let tFirst = null, reply = "", usage = null, finish = null, toolCalls = [];
  try {
    const res = await api("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!res.ok) {
      const err = await res.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || "HTTP " + res.status);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const msg = JSON.parse(data);
          if (msg.error) throw new Error(msg.error.message || "stream error");
          if (msg.usage) usage = msg.usage;
          for (const choice of msg.choices || []) {
            const delta = choice.delta || {};
            if (delta.content) {
              if (tFirst == null) tFirst = performance.now();
              reply += delta.content;
              out.textContent = reply;
            }
            if (delta.tool_calls) toolCalls.push(...delta.tool_calls);
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
    }
    if (toolCalls.length) out.textContent = reply + (reply ? "\n" : "") + "tool calls: " + JSON.stringify(toolCalls);
    chat.push({ role: "assistant", content: reply });
  } catch (err) {
    out.textContent = reply;
    meta.classList.add("bad");
    meta.textContent = err.name === "AbortError" ? "stopped" : "error: " + err.message;
    chat.pop();
  } finally {
    controller = null;
    $("#pg-send").disabled = false; $("#pg-stop").disabled = true;
  }
  if (!meta.textContent) {
    const total = (performance.now() - t0) / 1000;
    const ttft = tFirst == null ? null : (tFirst - t0) / 1000;
    const n = usage ? usage.completion_tokens : null;
    const decode = ttft != null && n > 1 ? (n - 1) / (total - ttft) : null;
    meta.textContent = [
      usage ? usage.prompt_tokens + " prompt + " + n + " generated tokens" : "",
      ttft != null ? "TTFT " + ttft.toFixed(2) + " s" : "",
      "total " + total.toFixed(2) + " s",
      decode ? decode.toFixed(1) + " tok/s" : "",
      finish ? "finish: " + finish : "",
    ].filter(Boolean).join(" · ");
    div.dataset.done = "1";
  }
}

$("#pg-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("#pg-input").value.trim();
  if (!text || controller) return;
  $("#pg-input").value = "";
  send(text);
});
$("#pg-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("#pg-form").requestSubmit();
});
$("#pg-stop").addEventListener("click", () => controller && controller.abort());
$("#pg-clear").addEventListener("click", () => { chat.length = 0; $("#pg-messages").replaceChildren(); });

refresh();
loadModels();
