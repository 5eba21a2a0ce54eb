// typevisor's web console (docs/web.md): a single page over the daemon's own REST API.
// The session is an HttpOnly cookie (POST /v1/login?cookie=true); every request that changes
// something carries X-Requested-With: typevisor (the daemon's CSRF check). Text from the daemon
// (VM names, event messages, log lines) is only ever set as textContent, never parsed as HTML.
"use strict";

const ACTIONS = ["start", "stop", "pause", "resume", "reboot"];
/** Which actions make sense in which state (the daemon decides; this only avoids offering nonsense). */
const OFFERED = {
  defined: ["start"], stopped: ["start"], crashed: ["start"], running: ["pause", "reboot", "stop"], paused: ["resume", "stop"], starting: ["stop"], stopping: [],
};
const RANGES = { "15m": 900, "1h": 3600, "6h": 21600, "24h": 86400, "7d": 604800 };

const app = {
  me: undefined,
  vms: new Map(),
  alerts: [],
  events: [],
  /** Per VM: recent CPU percent samples for the VM list's sparklines. */
  sparks: new Map(),
  lastSeq: 0,
  source: undefined,
  /** What the current page set up (timers, charts, the console): undone when the page changes. */
  cleanups: [],
  range: "1h",
};

// ---- DOM helpers -----------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  // Element.prototype.append, not el.append: a form's named fields shadow its methods (the VM spec has a field "append")
  for (const c of children.flat()) if (c !== undefined && c !== null && c !== false) Element.prototype.append.call(el, c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

function bytes(n) {
  if (n === undefined || n === null) return "-";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${u[i]}`;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "-";
}

function can(p) {
  return app.me !== undefined && app.me.permissions.includes(p);
}

// ---- the API ----------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message, hint) {
    super(message);
    this.status = status;
    this.code = code;
    this.hint = hint;
  }
}

/** An API error as the page shows it: the daemon's words, its hint, and the status and code (docs/control-plane.md, problems). */
function problemText(x) {
  if (!(x instanceof ApiError)) return String(x?.message ?? x);
  return `${x.message}${x.hint ? ` (${x.hint})` : ""} [${x.status} ${x.code}]`;
}

async function api(method, path, body) {
  const headers = { "x-requested-with": "typevisor", accept: "application/json" };
  if (body !== undefined) headers["content-type"] = "application/json";
  const r = await fetch(path, { method, headers, credentials: "same-origin", ...(body !== undefined ? { body: JSON.stringify(body) } : {}) });
  const text = await r.text();
  let data;
  try {
    data = text !== "" ? JSON.parse(text) : undefined;
  } catch {
    data = undefined;
  }
  if (!r.ok) {
    if (r.status === 401 && !path.startsWith("/v1/login")) {
      app.me = undefined;
      showLogin();
    }
    throw new ApiError(r.status, data?.code ?? "HTTP", data?.detail ?? `${r.status} ${r.statusText}`, typeof data?.hint === "string" ? data.hint : undefined);
  }
  return data;
}

// ---- page plumbing -----------------------------------------------------------------------------------

function cleanup() {
  for (const f of app.cleanups.splice(0)) {
    try {
      f();
    } catch {
      /* already gone */
    }
  }
}

function every(ms, f) {
  const t = setInterval(f, ms);
  app.cleanups.push(() => clearInterval(t));
}

function show(...nodes) {
  const main = document.getElementById("main");
  main.replaceChildren(...nodes);
}

function flash(message) {
  const el = document.getElementById("flash");
  if (el) el.textContent = message;
}

// ---- login -------------------------------------------------------------------------------------------

function showLogin(message) {
  cleanup();
  if (app.source) app.source.close();
  app.source = undefined;
  document.getElementById("nav").hidden = true;
  const err = h("p", { class: "error", role: "alert", id: "login-error" }, message ?? "");
  const form = h(
    "form",
    { class: "login card", id: "login", onsubmit: (e) => void login(e, form, err) },
    h("h1", {}, "Log in"),
    h("label", { for: "user" }, "User"),
    h("input", { id: "user", name: "user", autocomplete: "username", required: true, autofocus: true }),
    h("label", { for: "password" }, "Password"),
    h("input", { id: "password", name: "password", type: "password", autocomplete: "current-password", required: true }),
    h("label", { for: "totp" }, "Authenticator code (if MFA is on)"),
    h("input", { id: "totp", name: "totp", inputmode: "numeric", autocomplete: "one-time-code", pattern: "[0-9]{6}", maxlength: 6 }),
    h("p", {}, h("button", { class: "primary", type: "submit" }, "Log in")),
    err,
  );
  show(form);
  form.querySelector("#user").focus();
}

async function login(e, form, err) {
  e.preventDefault();
  const body = { user: form.user.value, password: form.password.value };
  if (form.totp.value !== "") body.totp = form.totp.value;
  err.textContent = "";
  try {
    await api("POST", "/v1/login?cookie=true", body);
    await boot();
  } catch (x) {
    err.textContent = x.message;
  }
}

async function logout() {
  try {
    await api("POST", "/v1/logout");
  } catch {
    /* the session may be gone already */
  }
  app.me = undefined;
  showLogin("Logged out.");
}

// ---- live events --------------------------------------------------------------------------------------

function listen() {
  if (app.source) return;
  // SSE (GET /v1/events?follow=true), resumed after the last event seen; the cookie authenticates it
  const es = new EventSource(`/v1/events?follow=true&after=${app.lastSeq}`);
  app.source = es;
  es.addEventListener("vm-event", (m) => {
    const e = JSON.parse(m.data);
    app.lastSeq = Math.max(app.lastSeq, e.seq);
    app.events.push(e);
    if (app.events.length > 200) app.events.shift();
    void onEvent(e);
  });
  es.onerror = () => {
    // the browser retries by itself; if the session ended, the next API call shows the login
  };
}

async function onEvent(e) {
  if (e.vm !== undefined) {
    try {
      const vm = await api("GET", `/v1/vms/${encodeURIComponent(e.vm)}`);
      app.vms.set(vm.name, vm);
    } catch (x) {
      if (x.status === 404) app.vms.delete(e.vm);
    }
  }
  if (e.type.startsWith("alert.")) await loadAlerts();
  for (const f of app.onEvent ?? []) f(e);
}

async function loadVms() {
  const { vms } = await api("GET", "/v1/vms");
  app.vms = new Map(vms.map((v) => [v.name, v]));
}

async function loadAlerts() {
  try {
    app.alerts = (await api("GET", "/v1/alerts")).alerts;
  } catch {
    app.alerts = [];
  }
}

// ---- actions -----------------------------------------------------------------------------------------

function actionButtons(vm) {
  if (!can("vm:lifecycle")) return [];
  const offered = OFFERED[vm.state] ?? [];
  return offered.filter((a) => ACTIONS.includes(a)).map((a) =>
    h("button", { type: "button", class: a === "stop" ? "danger" : "", "data-action": a, "aria-label": `${a} ${vm.name}`, onclick: () => void act(vm.name, a) }, a),
  );
}

async function act(name, action) {
  // destructive ones are confirmed: a stop ends what the guest is doing
  if ((action === "stop" || action === "reboot") && !confirm(`${action} VM ${name}?`)) return;
  try {
    const vm = await api("POST", `/v1/vms/${encodeURIComponent(name)}/${action}`);
    app.vms.set(vm.name, vm);
    flash(`${name}: ${action} done (${vm.state})`);
  } catch (x) {
    flash(`${name}: ${action} failed: ${problemText(x)}`);
  }
  render();
}

async function remove(name) {
  if (!confirm(`Delete VM ${name} and its disks? This cannot be undone.`)) return;
  try {
    await api("DELETE", `/v1/vms/${encodeURIComponent(name)}?force=true`);
    app.vms.delete(name);
    location.hash = "#/";
  } catch (x) {
    flash(`${name}: delete failed: ${problemText(x)}`);
  }
}

// ---- charts ------------------------------------------------------------------------------------------

/** A uPlot chart of some history figures; returns a function that feeds it new history. */
function chart(container, title, series, format) {
  const width = () => Math.max(260, container.clientWidth - 4);
  const opts = {
    title,
    width: width(),
    height: 170,
    series: [{}, ...series.map((s, i) => ({ label: s.label, stroke: ["#2459c7", "#16794c", "#a15c00", "#b42318"][i], width: 1.5, value: (_u, v) => (v === null ? "-" : format(v)) }))],
    axes: [{}, { size: 70, values: (_u, ticks) => ticks.map(format) }],
    // the chosen range, whatever the points cover (one point alone would make uPlot guess a range of years)
    scales: { x: { time: true, range: () => [Math.floor(Date.now() / 1000) - RANGES[app.range], Math.ceil(Date.now() / 1000)] }, y: { range: (_u, _min, max) => [0, max > 0 ? max * 1.1 : 1] } },
    legend: { live: true },
  };
  const plot = new uPlot(opts, [[], ...series.map(() => [])], container);
  const onResize = () => plot.setSize({ width: width(), height: 170 });
  window.addEventListener("resize", onResize);
  app.cleanups.push(() => {
    window.removeEventListener("resize", onResize);
    plot.destroy();
  });
  return (points) => {
    const xs = points.map((p) => Date.parse(p.t) / 1000);
    plot.setData([xs, ...series.map((s) => points.map((p) => (p[s.key] === undefined ? null : p[s.key])))]);
    container.dataset.points = String(points.filter((p) => p.samples > 0).length);
  };
}

async function history(vm) {
  const from = new Date(Date.now() - RANGES[app.range] * 1000).toISOString();
  const q = new URLSearchParams({ from });
  if (vm !== undefined) q.set("vm", vm);
  return (await api("GET", `/v1/metrics/history?${q}`)).points;
}

function rangeSelect(onChange) {
  const sel = h("select", { id: "range", "aria-label": "time range", onchange: () => {
    app.range = sel.value;
    onChange();
  } }, Object.keys(RANGES).map((r) => h("option", { value: r, selected: r === app.range }, r)));
  return h("label", { class: "row" }, "Range ", sel);
}

const pct = (v) => `${v.toFixed(0)}%`;
const rate = (v) => `${bytes(v)}/s`;

// ---- sparklines ---------------------------------------------------------------------------------------

const SPARK_POINTS = 90; // 15 minutes of 10 s history buckets

/** A VM's recent CPU for its sparkline: seeded once from the history, then fed by each stats poll. */
async function sparkOf(name) {
  let s = app.sparks.get(name);
  if (s === undefined) {
    s = [];
    app.sparks.set(name, s);
    try {
      const from = new Date(Date.now() - 15 * 60_000).toISOString();
      const pts = (await api("GET", `/v1/metrics/history?vm=${encodeURIComponent(name)}&from=${from}&step=10`)).points;
      s.push(...pts.filter((p) => p.cpuPercent !== undefined).map((p) => p.cpuPercent));
    } catch {
      /* no history: the polls fill it */
    }
  }
  return s;
}

/** A small inline SVG line of `values` (CPU percent), scaled to its own maximum (at least 100%). */
function sparkline(values) {
  const NS = "http://www.w3.org/2000/svg";
  const w = 90;
  const hgt = 20;
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${hgt}`);
  svg.setAttribute("width", String(w));
  svg.setAttribute("height", String(hgt));
  svg.setAttribute("class", "spark");
  svg.setAttribute("role", "img");
  const last = values.slice(-SPARK_POINTS);
  svg.setAttribute("aria-label", last.length > 0 ? `CPU over the last minutes, now ${last[last.length - 1].toFixed(0)}%` : "no CPU samples yet");
  svg.dataset.points = String(last.length);
  if (last.length > 1) {
    const max = Math.max(100, ...last);
    const line = document.createElementNS(NS, "polyline");
    line.setAttribute("points", last.map((v, i) => `${((i / (SPARK_POINTS - 1)) * w).toFixed(1)},${(hgt - 1 - (v / max) * (hgt - 2)).toFixed(1)}`).join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", "#2459c7");
    line.setAttribute("stroke-width", "1.5");
    svg.append(line);
  }
  return svg;
}

// ---- the dashboard ------------------------------------------------------------------------------------

function dashboard() {
  const scoped = app.me.scopes !== undefined;
  const hostCard = h("div", { class: "card", id: "host" }, h("h2", {}, "Host"), h("p", { class: "muted" }, "…"));
  const vmTable = h("div", { class: "card", id: "vms" });
  const alertsCard = h("div", { class: "card", id: "alerts" });
  const eventsCard = h("div", { class: "card", id: "events" });
  const cpuEl = h("div", { class: "chart", id: "host-cpu" });
  const memEl = h("div", { class: "chart", id: "host-mem" });
  const charts = scoped ? [] : [h("div", { class: "card" }, cpuEl), h("div", { class: "card" }, memEl)];
  show(h("h1", {}, "Dashboard"), h("p", { id: "flash", role: "status", class: "muted" }), h("div", { class: "grid" }, hostCard, alertsCard), scoped ? "" : rangeSelect(() => void refreshCharts()), h("div", { class: "grid" }, ...charts), vmTable, h("div", { class: "grid" }, eventsCard));

  const feedCpu = scoped ? undefined : chart(cpuEl, "Host CPU", [{ key: "cpuPercent", label: "CPU" }], pct);
  const feedMem = scoped ? undefined : chart(memEl, "Host memory in use", [{ key: "memoryBytes", label: "memory" }], bytes);
  const refreshCharts = async () => {
    if (scoped) return;
    const pts = await history();
    feedCpu(pts);
    feedMem(pts);
  };

  const drawHost = async () => {
    if (scoped) {
      hostCard.replaceChildren(h("h2", {}, "Host"), h("p", { class: "muted" }, `Scoped to ${app.me.scopes.join(", ") || "no VMs"}`));
      return;
    }
    const host = await api("GET", "/v1/host");
    const gauge = (label, r, fmt) => [h("dt", {}, label), h("dd", {}, h("meter", { min: 0, max: r.budget || 1, value: r.allocated, title: `${fmt(r.allocated)} of ${fmt(r.budget)}` }), ` ${fmt(r.allocated)} allocated of ${fmt(r.budget)}; ${fmt(r.used)} used`)];
    const byState = Object.entries(host.vms).map(([s, n]) => `${n} ${s}`).join(", ") || "none";
    hostCard.replaceChildren(h("h2", {}, "Host"), h("dl", { class: "kv" }, ...gauge("CPU", host.cpu, (n) => (Number.isInteger(n) ? `${n}` : n.toFixed(1))), ...gauge("Memory", host.memory, bytes), ...gauge("Disk", host.disk, bytes), h("dt", {}, "VMs"), h("dd", { id: "vm-states" }, byState)));
  };

  const drawVms = async () => {
    const stats = new Map();
    await Promise.all(
      [...app.vms.values()].filter((v) => v.state === "running" || v.state === "paused").map(async (v) => {
        try {
          const spark = await sparkOf(v.name);
          const u = (await api("GET", `/v1/vms/${encodeURIComponent(v.name)}/stats`)).usage;
          stats.set(v.name, u);
          if (u !== undefined && u.at !== spark.at) {
            spark.push(u.cpuPercent);
            spark.at = u.at;
            if (spark.length > SPARK_POINTS) spark.splice(0, spark.length - SPARK_POINTS);
          }
        } catch {
          /* gone meanwhile */
        }
      }),
    );
    const rows = [...app.vms.values()].sort((a, b) => a.name.localeCompare(b.name)).map((v) => {
      const u = stats.get(v.name);
      return h(
        "tr",
        { "data-vm": v.name },
        h("td", {}, h("a", { href: `#/vm/${encodeURIComponent(v.name)}` }, v.name)),
        h("td", {}, h("span", { class: `state ${v.state}`, "data-state": v.state }, v.state)),
        h("td", { class: "opt" }, `${v.spec.cpus ?? "-"}`),
        h("td", { class: "opt" }, bytes((v.spec.memoryMiB ?? 0) * 1048576)),
        h("td", { class: "cpu" }, app.sparks.has(v.name) ? sparkline(app.sparks.get(v.name)) : "", " ", u ? pct(u.cpuPercent) : "-"),
        h("td", {}, u ? bytes(u.memoryBytes) : "-"),
        h("td", {}, ...actionButtons(v)),
      );
    });
    vmTable.replaceChildren(
      h("h2", {}, "Virtual machines"),
      rows.length === 0
        ? h("p", { class: "muted" }, "No VMs yet (typevisor vm create).")
        : h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "State"), h("th", { class: "opt" }, "vCPUs"), h("th", { class: "opt" }, "Memory"), h("th", {}, "CPU"), h("th", {}, "RSS"), h("th", {}, "Actions"))), h("tbody", {}, rows))),
    );
  };

  const drawAlerts = () => {
    alertsCard.replaceChildren(
      h("h2", {}, `Active alerts (${app.alerts.length})`),
      app.alerts.length === 0 ? h("p", { class: "muted" }, "None firing.") : h("ul", { class: "events" }, app.alerts.map((a) => h("li", { class: "alert" }, `${a.severity ?? ""} ${a.rule}${a.vm ? ` (${a.vm})` : ""}: ${a.message ?? ""}`))),
    );
  };

  const drawEvents = () => {
    const recent = app.events.slice(-30).reverse();
    eventsCard.replaceChildren(h("h2", {}, "Recent events"), h("ul", { class: "events", id: "event-list" }, recent.map((e) => h("li", {}, h("span", { class: "muted" }, new Date(e.at).toLocaleTimeString()), ` ${e.type} `, e.vm ? h("strong", {}, e.vm) : "", ` ${e.message}`))));
  };

  app.onEvent = [
    () => {
      drawEvents();
      drawAlerts();
      void drawVms();
      void drawHost();
    },
  ];
  app.cleanups.push(() => (app.onEvent = []));
  drawAlerts();
  drawEvents();
  void drawHost();
  void drawVms();
  void refreshCharts();
  every(5000, () => {
    void drawVms();
    void refreshCharts();
  });
}

// ---- one VM ------------------------------------------------------------------------------------------

function vmPage(name) {
  const vm = app.vms.get(name);
  if (vm === undefined) {
    show(h("h1", {}, "Not found"), h("p", {}, `No VM named ${name}.`), h("a", { href: "#/" }, "Back"));
    return;
  }
  const summary = h("div", { class: "card", id: "summary" });
  const actions = h("div", { class: "row", id: "actions" });
  const termEl = h("div", { class: "term", id: "console", tabindex: "-1" });
  const consoleNote = h("p", { class: "muted", id: "console-note" });
  const figures = [
    ["cpu", "CPU", [{ key: "cpuPercent", label: "CPU" }], pct],
    ["mem", "Memory", [{ key: "memoryBytes", label: "RSS" }], bytes],
    ["disk", "Disk", [{ key: "diskReadBps", label: "read" }, { key: "diskWriteBps", label: "write" }], rate],
    ["net", "Network", [{ key: "netRxBps", label: "rx" }, { key: "netTxBps", label: "tx" }], rate],
  ];
  const chartEls = figures.map(([id]) => h("div", { class: "chart", id: `chart-${id}` }));
  const eventsEl = h("ul", { class: "events", id: "vm-events" });
  const snaps = snapshotsCard(name);
  show(
    h("p", {}, h("a", { href: "#/" }, "← Dashboard")),
    h("h1", {}, `VM ${name}`),
    h("p", { id: "flash", role: "status", class: "muted" }),
    actions,
    h("div", { class: "grid" }, summary, snaps.card, h("div", { class: "card" }, h("h2", {}, "Events"), eventsEl)),
    h("div", { class: "card" }, h("h2", {}, "Serial console"), consoleNote, termEl),
    rangeSelect(() => void refreshCharts()),
    h("div", { class: "grid" }, chartEls.map((el) => h("div", { class: "card" }, el))),
  );
  const feeds = figures.map(([, title, series, fmt], i) => chart(chartEls[i], title, series, fmt));
  const refreshCharts = async () => {
    const pts = await history(name);
    for (const f of feeds) f(pts);
  };

  const draw = () => {
    const v = app.vms.get(name);
    if (v === undefined) {
      summary.replaceChildren(h("p", {}, "This VM was removed."));
      actions.replaceChildren();
      return;
    }
    actions.replaceChildren(
      ...actionButtons(v),
      can("vm:delete") ? h("button", { type: "button", class: "danger", "data-action": "delete", onclick: () => void remove(name) }, "delete") : "",
    );
    summary.replaceChildren(
      h("h2", {}, "Summary"),
      h(
        "dl",
        { class: "kv" },
        h("dt", {}, "State"), h("dd", {}, h("span", { class: `state ${v.state}`, id: "vm-state", "data-state": v.state }, v.state)),
        h("dt", {}, "vCPUs"), h("dd", {}, `${v.spec.cpus ?? "-"}`),
        h("dt", {}, "Memory"), h("dd", {}, bytes((v.spec.memoryMiB ?? 0) * 1048576)),
        h("dt", {}, "Disks"), h("dd", {}, v.disks.map((d) => `${d.name ?? ""} ${bytes(d.sizeBytes)}`).join(", ") || "none"),
        h("dt", {}, "Started"), h("dd", {}, when(v.startedAt)),
        h("dt", {}, "Created"), h("dd", {}, when(v.createdAt)),
      ),
    );
    eventsEl.replaceChildren(...app.events.filter((e) => e.vm === name).slice(-30).reverse().map((e) => h("li", {}, h("span", { class: "muted" }, new Date(e.at).toLocaleTimeString()), ` ${e.type}: ${e.message}`)));
  };

  // the console: xterm.js over the console WebSocket, after the captured output's tail
  let ws;
  let connecting = false;
  // convertEol: a guest that ends lines with a bare LF (the test guest; many boot loaders) is still readable
  const term = new Terminal({ convertEol: true, cursorBlink: true, fontSize: 13, scrollback: 5000 });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(termEl);
  const refit = () => {
    try {
      fit.fit();
    } catch {
      /* not laid out yet */
    }
  };
  refit();
  window.addEventListener("resize", refit);
  let left = false;
  app.cleanups.push(() => {
    left = true;
    window.removeEventListener("resize", refit);
    if (ws) ws.close();
    term.dispose();
  });
  const typing = can("vm:console-input");
  term.onData((d) => {
    if (typing && ws && ws.readyState === WebSocket.OPEN) ws.send(new TextEncoder().encode(d));
  });
  const connect = async () => {
    const v = app.vms.get(name);
    if (!can("vm:console")) {
      consoleNote.textContent = "You may not see this VM's console.";
      return;
    }
    if (connecting || (ws && ws.readyState <= WebSocket.OPEN)) return;
    if (v === undefined || !["running", "paused", "starting"].includes(v.state)) {
      consoleNote.textContent = `The console is live while the VM runs (it is ${v?.state ?? "gone"}).`;
      return;
    }
    connecting = true;
    try {
      const r = await fetch(`/v1/vms/${encodeURIComponent(name)}/console?tail=16384`, { credentials: "same-origin" });
      if (r.ok) term.write(new Uint8Array(await r.arrayBuffer()));
    } catch {
      /* only the backlog is missing */
    }
    // The VM may have stopped, or the page been left, while the backlog came: no socket then (the
    // daemon would refuse it with 409, which the browser logs as an error).
    const now = app.vms.get(name);
    if (left || now === undefined || !["running", "paused", "starting"].includes(now.state)) {
      connecting = false;
      return;
    }
    ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/vms/${encodeURIComponent(name)}/console/ws`);
    connecting = false;
    ws.binaryType = "arraybuffer";
    ws.onopen = () => {
      consoleNote.textContent = typing ? "Connected: type here." : "Connected, read-only (your role cannot type into consoles).";
      consoleNote.dataset.connected = "true";
      term.focus();
    };
    ws.onmessage = (m) => term.write(new Uint8Array(m.data));
    ws.onclose = () => {
      consoleNote.textContent = "The console is closed.";
      consoleNote.dataset.connected = "false";
    };
  };

  app.onEvent = [
    (e) => {
      if (e.vm !== name) return;
      draw();
      void connect();
      // a snapshot, rollback or clone by anyone (the CLI, another browser) shows at once
      void snaps.reload();
    },
  ];
  app.cleanups.push(() => (app.onEvent = []));
  draw();
  void connect();
  void refreshCharts();
  every(5000, () => void refreshCharts());
}

// ---- a VM's snapshots (docs/snapshots.md) --------------------------------------------------------------

/**
 * The snapshots card of a VM's page: the snapshots as a tree (each under the one the VM stood on
 * when it was taken), with their date, size and whether memory was saved; for the roles that may,
 * a form to take one (built from the API's schema) and per snapshot rollback, clone and delete
 * (rollback and delete confirmed). Returns the card and a function that reads the list again
 * (called on each of the VM's events, so other users' snapshots show without a reload).
 */
function snapshotsCard(name) {
  const card = h("div", { class: "card", id: "snapshots" });
  const tree = h("div", { id: "snap-tree" }, h("p", { class: "muted" }, "…"));
  const err = h("p", { class: "error", role: "alert", id: "snap-error" });
  const formSlot = h("div", {});
  card.append(h("h2", {}, "Snapshots"), tree, err, formSlot);
  const vmPath = `/v1/vms/${encodeURIComponent(name)}`;
  let loading;

  const load = async () => {
    try {
      const { snapshots } = await api("GET", `${vmPath}/snapshots`);
      draw(snapshots);
    } catch (x) {
      if (x.status !== 404) err.textContent = `Cannot list the snapshots: ${problemText(x)}`;
    }
  };
  // one read at a time: a burst of events (a snapshot pauses, saves and resumes the VM) reads once more at most
  let again = false;
  const reload = () => {
    if (loading !== undefined) {
      again = true;
      return loading;
    }
    loading = (async () => {
      do {
        again = false;
        await load();
      } while (again);
    })().finally(() => (loading = undefined));
    return loading;
  };

  /** Run an action; its failure is shown as the daemon's problem (status, code, detail, hint). */
  const run = async (what, f) => {
    err.textContent = "";
    try {
      const done = await f();
      if (done !== undefined) flash(done);
    } catch (x) {
      err.textContent = `${what} failed: ${problemText(x)}`;
    }
    await reload();
  };

  const buttons = (s) => {
    const out = [];
    if (can("vm:lifecycle")) {
      out.push(h("button", { type: "button", "data-snap-action": "rollback", "aria-label": `roll ${name} back to snapshot ${s.name}`, onclick: () => {
        const lost = s.memory ? "its disks and its running state since then are replaced by the snapshot's" : "its disks are replaced by the snapshot's (and a running guest is restarted)";
        if (!confirm(`Roll VM ${name} back to snapshot ${s.name}? ${lost}; what it did since is lost.`)) return;
        void run(`rollback to ${s.name}`, async () => {
          const vm = await api("POST", `${vmPath}/snapshots/${encodeURIComponent(s.name)}/rollback`);
          app.vms.set(vm.name, vm);
          return `${name}: rolled back to ${s.name} (${vm.state})`;
        });
      } }, "rollback"));
    }
    if (can("vm:create")) {
      out.push(h("button", { type: "button", "data-snap-action": "clone", "aria-label": `clone ${name} from snapshot ${s.name}`, onclick: () => {
        const to = prompt(`Name of the new VM, a linked clone of ${name} as in snapshot ${s.name}${s.memory ? " (it starts running from the saved state)" : ""}:`, `${name}-${s.name}`.slice(0, 63));
        if (to === null || to === "") return;
        void run(`clone of ${s.name}`, async () => {
          const vm = await api("POST", `${vmPath}/clone`, { name: to, snapshot: s.name });
          app.vms.set(vm.name, vm);
          return `${vm.name}: cloned from ${name}'s snapshot ${s.name} (${vm.state})`;
        });
      } }, "clone"));
    }
    if (can("vm:delete")) {
      out.push(h("button", { type: "button", class: "danger", "data-snap-action": "delete", "aria-label": `delete snapshot ${s.name} of ${name}`, onclick: () => {
        if (!confirm(`Delete snapshot ${s.name} of VM ${name}? Its children stay, under its parent.`)) return;
        void run(`delete of ${s.name}`, async () => {
          await api("DELETE", `${vmPath}/snapshots/${encodeURIComponent(s.name)}`);
          return `${name}: snapshot ${s.name} deleted`;
        });
      } }, "delete"));
    }
    return out;
  };

  const draw = (list) => {
    // the tree: children under their parent, oldest first (the API's order); a parent gone hangs them at the root
    const names = new Set(list.map((s) => s.name));
    const kids = new Map();
    for (const s of list) {
      const p = s.parent !== undefined && names.has(s.parent) ? s.parent : "";
      if (!kids.has(p)) kids.set(p, []);
      kids.get(p).push(s);
    }
    const item = (s) =>
      h(
        "li",
        { "data-snapshot": s.name, "data-current": s.current ? "true" : "false", "data-memory": s.memory ? "true" : "false" },
        h("div", { class: "snap" },
          h("strong", {}, s.name), " ",
          s.current ? h("span", { class: "state running", title: "the VM stands on this snapshot: the next one's parent" }, "current") : "",
          h("span", { class: "muted" }, ` ${when(s.createdAt)} · ${bytes(s.sizeBytes)} · ${s.memory ? "disks and memory" : "disks only"} · taken ${s.vmState}`),
          s.description ? h("div", { class: "muted" }, s.description) : "",
        ),
        h("div", { class: "row" }, ...buttons(s)),
        kids.has(s.name) ? h("ul", { class: "tree" }, kids.get(s.name).map(item)) : "",
      );
    tree.replaceChildren(list.length === 0 ? h("p", { class: "muted" }, "No snapshots.") : h("ul", { class: "tree root" }, (kids.get("") ?? []).map(item)));
  };

  if (can("vm:lifecycle")) {
    void bodySchema("/v1/vms/{name}/snapshots", "post")
      .then((schema) => {
        const form = schemaForm(schema, {
          id: "take-snapshot",
          prefix: "s",
          submit: "Take snapshot",
          send: async (body) => {
            const s = await api("POST", `${vmPath}/snapshots`, body);
            flash(`${name}: snapshot ${s.name} taken (${s.memory ? "disks and memory" : "disks only"})`);
            Element.prototype.querySelector.call(form, "#s-name").value = "";
            await reload();
          },
        });
        formSlot.replaceChildren(h("h2", {}, "Take a snapshot"), form);
      })
      .catch((x) => (err.textContent = problemText(x)));
  }
  void reload();
  return { card, reload };
}

// ---- forms from the API's own schemas ------------------------------------------------------------------

/** A request body's JSON Schema from the API's OpenAPI document (GET /openapi.json, fetched once). */
async function bodySchema(path, method) {
  if (app.openapi === undefined) app.openapi = await api("GET", "/openapi.json");
  return app.openapi.paths[path][method].requestBody.content["application/json"].schema;
}

/** A pattern the browser can use as an input's pattern attribute (compiled with the v flag), or undefined. */
function htmlPattern(p) {
  if (typeof p !== "string") return undefined;
  // the API's patterns are JavaScript regexes; the v flag also wants a literal "-" at a class's end escaped
  const inner = p.replace(/^\^/, "").replace(/\$$/, "").replace(/([^\\])-\]/g, "$1\\-]");
  try {
    new RegExp(`^(?:${inner})$`, "v");
    return inner;
  } catch {
    return undefined; // the daemon checks it anyway
  }
}

/** One form field for a property of the schema; undefined for what a form does not edit (lists of NICs). */
function field(prefix, key, prop, required) {
  const id = `${prefix}-${key}`;
  const about = prop.description ? h("span", { class: "muted" }, ` — ${prop.description}`) : "";
  let input;
  const alt = Array.isArray(prop.anyOf) ? prop.anyOf.find((a) => a.type === "string") : undefined;
  if (Array.isArray(prop.enum)) {
    input = h("select", { id, name: key }, prop.enum.map((v) => h("option", { value: v, selected: v === prop.default }, v)));
  } else if (prop.type === "boolean") {
    input = h("input", { id, name: key, type: "checkbox", checked: prop.default === true });
    input.dataset.kind = "boolean";
    return h("div", { class: "row" }, input, h("label", { for: id }, key, about));
  } else if (prop.type === "integer" || prop.type === "number") {
    input = h("input", { id, name: key, type: "number", step: prop.type === "integer" ? 1 : "any", min: prop.minimum, max: prop.maximum, placeholder: prop.default !== undefined ? String(prop.default) : undefined, required });
    input.dataset.kind = "number";
  } else if (prop.type === "string" || alt !== undefined) {
    const sp = alt ?? prop;
    input = h("input", { id, name: key, pattern: htmlPattern(sp.pattern), maxlength: sp.maxLength, placeholder: prop.default !== undefined ? String(prop.default) : undefined, required, autocomplete: "off" });
  } else {
    return undefined;
  }
  return h("div", {}, h("label", { for: id }, key, required ? " *" : "", about), input);
}

/**
 * A form for a request body, built from its schema: the browser refuses what the schema refuses
 * before anything is sent; the daemon checks it again (and what a form cannot: images, files,
 * resources), and its problem's detail is shown under the form.
 */
function schemaForm(schema, o) {
  const required = new Set(schema.required ?? []);
  const fields = Object.entries(schema.properties).map(([k, p]) => field(o.prefix, k, p, required.has(k))).filter((f) => f !== undefined);
  const err = h("p", { class: "error", role: "alert", id: `${o.id}-error` });
  const form = h("form", { class: "card", id: o.id, onsubmit: (e) => void submit(e) }, h("div", { class: "form-grid" }, ...fields), ...(o.extra ?? []), h("p", {}, h("button", { type: "submit", class: "primary" }, o.submit)), err);
  const submit = async (e) => {
    e.preventDefault();
    err.textContent = "";
    const body = {};
    for (const el of Element.prototype.querySelectorAll.call(form, "[name]")) {
      if (el.dataset.kind === "boolean") body[el.name] = el.checked;
      else if (el.value === "") continue;
      else body[el.name] = el.dataset.kind === "number" ? Number(el.value) : el.value;
    }
    try {
      await o.send(body);
    } catch (x) {
      err.textContent = problemText(x);
    }
  };
  return form;
}

async function createPage() {
  if (!can("vm:create")) {
    show(h("h1", {}, "Create a VM"), h("p", {}, "Your role cannot create VMs."));
    return;
  }
  const start = h("input", { id: "f-start", type: "checkbox", checked: true });
  const form = schemaForm(await bodySchema("/v1/vms", "post"), {
    id: "create",
    prefix: "f",
    submit: "Create",
    extra: [h("div", { class: "row" }, start, h("label", { for: "f-start" }, "start it now"))],
    send: async (body) => {
      const vm = await api("POST", `/v1/vms${start.checked ? "?start=true" : ""}`, body);
      app.vms.set(vm.name, vm);
      location.hash = `#/vm/${encodeURIComponent(vm.name)}`;
    },
  });
  show(h("h1", {}, "Create a VM"), h("p", { class: "muted" }, "The fields and their limits are the API's own (GET /openapi.json); the daemon checks them again."), form);
  Element.prototype.querySelector.call(form, "input").focus();
}

// ---- events and alerts ------------------------------------------------------------------------------

function eventItem(e) {
  return h("li", { "data-type": e.type }, h("span", { class: "muted" }, when(e.at)), ` ${e.type} `, e.vm ? h("a", { href: `#/vm/${encodeURIComponent(e.vm)}` }, e.vm) : "", ` ${e.message}`);
}

function eventsPage() {
  const list = h("ul", { class: "events tall", id: "all-events" });
  const vmSel = h("select", { id: "events-vm", "aria-label": "VM", onchange: () => void load() }, h("option", { value: "" }, "every VM"), [...app.vms.keys()].sort().map((n) => h("option", { value: n }, n)));
  const text = h("input", { id: "events-filter", placeholder: "type or text…", "aria-label": "filter", oninput: () => draw() });
  let events = [];
  const draw = () => {
    const t = text.value.toLowerCase();
    list.replaceChildren(...events.filter((e) => t === "" || `${e.type} ${e.message}`.toLowerCase().includes(t)).slice(-500).reverse().map(eventItem));
  };
  const load = async () => {
    const q = new URLSearchParams({ limit: "500" });
    if (vmSel.value) q.set("vm", vmSel.value);
    events = (await api("GET", `/v1/events?${q}`)).events;
    draw();
  };
  show(h("h1", {}, "Events"), h("div", { class: "row" }, vmSel, text), list);
  app.onEvent = [
    (e) => {
      if (vmSel.value !== "" && e.vm !== vmSel.value) return;
      events.push(e);
      draw();
    },
  ];
  app.cleanups.push(() => (app.onEvent = []));
  void load();
}

async function alertsPage() {
  const firing = h("div", { class: "card", id: "firing" });
  const rules = h("div", { class: "card", id: "rules" });
  const admin = can("alerts:admin");
  const drawFiring = () => {
    firing.replaceChildren(
      h("h2", {}, `Firing now (${app.alerts.length})`),
      app.alerts.length === 0
        ? h("p", { class: "muted" }, "None.")
        : h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, ["Severity", "Rule", "Subject", "Since", "Message"].map((c) => h("th", {}, c)))), h("tbody", {}, app.alerts.map((a) => h("tr", { "data-rule": a.rule }, h("td", { class: "alert" }, a.severity), h("td", {}, a.rule), h("td", {}, a.subject), h("td", {}, when(a.since)), h("td", {}, a.message)))))),
    );
  };
  const drawRules = async () => {
    const list = (await api("GET", "/v1/alerts/rules")).rules;
    rules.replaceChildren(
      h("h2", {}, "Rules"),
      h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, ["Name", "Severity", "Condition", ""].map((c) => h("th", {}, c)))), h("tbody", {}, list.map((r) =>
        h("tr", { "data-rule": r.name }, h("td", {}, r.name), h("td", {}, r.severity), h("td", {}, r.builtin ? (r.description ?? "built-in") : `${r.metric} above ${r.above}${r.forSeconds ? ` for ${r.forSeconds} s` : ""}${r.vm ? ` on ${r.vm}` : " on every VM"}`),
          h("td", {}, admin && !r.builtin ? h("button", { type: "button", class: "danger", "aria-label": `remove rule ${r.name}`, onclick: async () => {
            if (!confirm(`Remove alert rule ${r.name}?`)) return;
            await api("DELETE", `/v1/alerts/rules/${encodeURIComponent(r.name)}`);
            await drawRules();
          } }, "remove") : "")))))),
    );
  };
  const add = admin
    ? schemaForm(await bodySchema("/v1/alerts/rules", "post"), { id: "add-rule", prefix: "r", submit: "Add rule", send: async (body) => {
      await api("POST", "/v1/alerts/rules", body);
      await drawRules();
    } })
    : "";
  show(h("h1", {}, "Alerts"), firing, rules, admin ? h("h2", {}, "Add a rule") : "", add);
  app.onEvent = [
    (e) => {
      if (e.type.startsWith("alert.")) drawFiring();
    },
  ];
  app.cleanups.push(() => (app.onEvent = []));
  drawFiring();
  await drawRules();
}

// ---- logs --------------------------------------------------------------------------------------------

function logsPage() {
  const out = h("pre", { class: "logs", id: "log-lines" });
  const vmSel = h("select", { id: "log-vm", "aria-label": "VM" }, h("option", { value: "" }, app.me.scopes ? "(pick a VM)" : "all"), [...app.vms.keys()].sort().map((n) => h("option", { value: n }, n)));
  const text = h("input", { id: "log-contains", placeholder: "contains…", "aria-label": "contains" });
  const level = h("select", { id: "log-level", "aria-label": "level" }, ["", "debug", "info", "warn", "error"].map((l) => h("option", { value: l }, l || "any level")));
  // a VM's VMM and console logs are the VM's: the choice means something once a VM is picked
  const source = h("select", { id: "log-source", "aria-label": "logs" }, [["daemon,vmm", "daemon and VMM"], ["console", "serial console"], ["daemon,vmm,console", "all"]].map(([v, t]) => h("option", { value: v }, t)));
  const load = async () => {
    const q = new URLSearchParams({ limit: "500" });
    if (vmSel.value) q.set("vm", vmSel.value);
    if (text.value) q.set("contains", text.value);
    if (level.value) q.set("level", level.value);
    if (vmSel.value && source.value !== "daemon,vmm") q.set("source", source.value);
    try {
      const { lines } = await api("GET", `/v1/logs?${q}`);
      out.textContent = lines.map((l) => `${l.time ?? "-"} ${l.level.padEnd(5)} ${l.source.padEnd(6)} ${(l.vm ?? "-").padEnd(12)} ${l.msg}${l.fields ? " " + JSON.stringify(l.fields) : ""}`).join("\n") || "(no lines)";
      out.scrollTop = out.scrollHeight;
    } catch (x) {
      out.textContent = x.message;
    }
  };
  const form = h("form", { class: "row", onsubmit: (e) => {
    e.preventDefault();
    void load();
  } }, vmSel, source, text, level, h("button", { type: "submit", class: "primary" }, "Search"));
  show(h("h1", {}, "Logs"), form, out);
  void load();
  every(5000, () => void load());
}

// ---- routing -----------------------------------------------------------------------------------------

function render() {
  if (app.me === undefined) return;
  cleanup();
  const hash = location.hash || "#/";
  const m = /^#\/vm\/(.+)$/.exec(hash);
  if (m) vmPage(decodeURIComponent(m[1]));
  else if (hash === "#/logs") logsPage();
  else if (hash === "#/events") eventsPage();
  else if (hash === "#/alerts") void alertsPage().catch((x) => show(h("p", { class: "error" }, x.message)));
  else if (hash === "#/create") void createPage().catch((x) => show(h("p", { class: "error" }, x.message)));
  else dashboard();
}

async function boot() {
  try {
    app.me = await api("GET", "/v1/session");
  } catch (x) {
    if (x.status !== 401) showLogin(x.message);
    return;
  }
  document.getElementById("nav").hidden = false;
  document.getElementById("who").textContent = `${app.me.user} (${app.me.role})`;
  document.getElementById("nav-create").hidden = !can("vm:create");
  await loadVms();
  await loadAlerts();
  try {
    const { events } = await api("GET", `/v1/events?limit=50${app.me.scopes?.length === 1 ? `&vm=${encodeURIComponent(app.me.scopes[0])}` : ""}`);
    app.events = events;
    app.lastSeq = events.reduce((a, e) => Math.max(a, e.seq), 0);
  } catch {
    app.events = [];
  }
  if (app.me.scopes === undefined) listen();
  render();
}

window.addEventListener("hashchange", render);
document.getElementById("logout").addEventListener("click", () => void logout());
void boot();
