// edgepack fleet dashboard: renders the JSON API (/api/...) and refreshes it every 2 s.
// Every string that comes from a device is inserted as text, never as HTML.
"use strict";

const POLL_MS = 2000;
const MAX_ROWS = 500; // devices drawn in the overview table; the filter reaches the rest
const STATUSES = ["waiting", "pending", "downloading", "installing", "installed", "failed",
  "rolling_back", "rolled_back"];
const LABEL = { waiting: "not started", rolling_back: "rolling back", rolled_back: "rolled back" };
const state = { fleet: null, timer: null, charts: {}, range: 3600, filter: "", busy: false };
window.__charts = state.charts; // for the browser tests

// ---------------------------------------------------------------------------------- helpers
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "cls") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const badge = (s, text) => h("span", { cls: `badge b-${s}`, "data-status": s }, text || LABEL[s] || s);
const fmt = (v, d = 1) => (v === null || v === undefined ? "–" : Number(v).toFixed(d));
const short = (id) => (id ? String(id).slice(0, 12) : "–");
function ago(ts) {
  if (!ts) return "–";
  let s = Math.max(0, Date.now() / 1000 - ts);
  for (const [u, n] of [["d", 86400], ["h", 3600], ["m", 60]]) if (s >= n) return `${Math.floor(s / n)}${u} ago`;
  return `${Math.floor(s)}s ago`;
}
const when = (ts) => (ts ? new Date(ts * 1000).toLocaleString() : "–");
function href(path) {
  return state.fleet ? `${path}?fleet=${encodeURIComponent(state.fleet)}` : path;
}
function a(path, text, attrs) { return h("a", { href: href(path), ...(attrs || {}) }, text); }
async function api(path, opts) {
  const sep = path.includes("?") ? "&" : "?";
  const url = state.fleet ? `${path}${sep}fleet=${encodeURIComponent(state.fleet)}` : path;
  const r = await fetch(url, { headers: { Accept: "application/json" }, ...(opts || {}) });
  const body = await r.json().catch(() => ({}));
  if (r.status === 401) session();
  if (!r.ok) throw Object.assign(new Error(body.message || `${r.status} ${r.statusText}`), { status: r.status });
  return body;
}
// Login: the API token (in the server's fleet-token file) traded for a SameSite=Strict session
// cookie; changing calls work once logged in, reads too when the server keeps them private.
async function session() {
  const s = await fetch("/api/session", { headers: { Accept: "application/json" } }).then((x) => x.json()).catch(() => ({}));
  document.getElementById("login").hidden = !s.auth || s.authenticated;
  document.getElementById("logout").hidden = !s.auth || !s.authenticated;
  return s;
}
async function postJSON(path, body) {
  const r = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json", Accept: "application/json" }, body: JSON.stringify(body || {}) });
  return [r, await r.json().catch(() => ({}))];
}
function setupLogin() {
  const form = document.getElementById("login");
  const input = document.getElementById("login-token");
  form.onsubmit = async (ev) => {
    ev.preventDefault();
    const [r, body] = await postJSON("/api/login", { token: input.value });
    input.value = "";
    if (!r.ok) { form.dataset.error = body.message || r.statusText; setLive(false, `login failed: ${form.dataset.error}`); return; }
    delete form.dataset.error;
    location.reload();
  };
  document.getElementById("logout").onclick = async () => { await postJSON("/api/logout"); location.reload(); };
}
function setLive(ok, text) {
  const el = document.getElementById("live");
  el.className = `live ${ok ? "ok" : "bad"}`;
  el.textContent = text;
}
function table(headers, rows, attrs) {
  return h("div", { cls: "table-wrap" }, h("table", attrs || {},
    h("thead", {}, h("tr", {}, headers.map((x) => (typeof x === "string"
      ? h("th", {}, x) : h("th", { cls: x.cls }, x.t))))),
    h("tbody", {}, rows)));
}
function progressBar(counts, total) {
  const bar = h("div", { cls: "bar", title: STATUSES.filter((s) => counts[s]).map((s) => `${LABEL[s] || s}: ${counts[s]}`).join(", ") });
  for (const s of STATUSES) {
    if (!counts[s] || !total) continue;
    bar.append(h("span", { cls: `s-${s}`, style: `width:${(100 * counts[s]) / total}%` }));
  }
  return bar;
}
function kv(pairs) {
  return h("dl", { cls: "kv" }, pairs.filter(Boolean).map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}
function flatten(obj, prefix = "", out = []) {
  if (obj === null || typeof obj !== "object" || Array.isArray(obj)) {
    out.push([prefix, Array.isArray(obj) ? JSON.stringify(obj) : obj]);
    return out;
  }
  for (const [k, v] of Object.entries(obj)) flatten(v, prefix ? `${prefix}.${k}` : k, out);
  return out;
}

// ---------------------------------------------------------------------------------- pages
const pages = {};

pages.overview = {
  load: () => api("/api/overview"),
  draw(d) {
    const c = d.counts, hl = d.health;
    const card = (id, n, label, cls) => h("div", { cls: `card ${cls || ""}`, "data-testid": `count-${id}` },
      h("div", { cls: "n" }, n), h("div", { cls: "l" }, label));
    const rows = d.devices.filter((r) => !state.filter || JSON.stringify([r.device, r.board, r.target,
      r.bundle_name, r.bundle_version, r.status, r.health, r.groups]).toLowerCase().includes(state.filter));
    const search = h("input", { type: "search", placeholder: "filter devices…", value: state.filter,
      "aria-label": "filter devices", oninput: (e) => { state.filter = e.target.value.toLowerCase(); refresh(true); } });
    return [
      h("h1", {}, `Fleet ${d.fleet}`),
      h("div", { cls: "cards" },
        card("devices", c.devices, "devices"), card("online", c.online, "online", "good"),
        card("offline", c.offline, "offline", c.offline ? "bad" : ""),
        card("healthy", hl.healthy, "healthy", "good"),
        card("degraded", hl.degraded, "over budget / errors", hl.degraded ? "warn" : ""),
        card("stale", hl.stale, "silent", hl.stale ? "warn" : "")),
      d.active_rollouts.length ? [h("h2", {}, "Rollouts in progress"), rolloutCards(d.active_rollouts)] : null,
      h("h2", {}, "Bundles running"),
      h("div", { cls: "panel" }, d.by_bundle.length ? d.by_bundle.map((b) => h("div", {},
        b.bundle_id ? a(`/bundles/${b.bundle_id}`, `${b.name || "?"} ${b.version || ""}`) : h("span", { cls: "muted" }, "no bundle"),
        ` — ${b.devices} device${b.devices === 1 ? "" : "s"}`)) : h("span", { cls: "muted" }, "no device yet")),
      h("h2", {}, `Devices (${rows.length}${rows.length !== d.devices.length ? ` of ${d.devices.length}` : ""})`),
      h("div", { cls: "toolbar" }, search, rows.length > MAX_ROWS
        ? h("span", { cls: "muted" }, `showing the first ${MAX_ROWS}: filter to narrow`) : null),
      table(["device", "status", "board", "target", "bundle", "last seen", "health",
        { t: "p95 ms", cls: "num" }, { t: "RSS MB", cls: "num" }, { t: "drift", cls: "num" }, "control plane"],
      rows.slice(0, MAX_ROWS).map((r) => h("tr", { "data-device": r.device },
        h("td", {}, a(`/devices/${encodeURIComponent(r.device)}`, r.device)),
        h("td", {}, badge(r.status), r.authenticated === false ? [" ", authBadge(r)] : null),
        h("td", {}, r.board || "–"), h("td", {}, r.target || "–"),
        h("td", {}, r.bundle_id ? a(`/bundles/${r.bundle_id}`, `${r.bundle_name || "?"} ${r.bundle_version || ""}`) : "–"),
        h("td", { title: when(r.last_seen) }, ago(r.last_seen)),
        h("td", { title: r.health_detail || "" }, badge(r.health), r.health_detail ? h("span", { cls: "muted" }, " ", r.health_detail) : null),
        h("td", { cls: "num" }, fmt(r.p95_ms)), h("td", { cls: "num" }, fmt(r.rss_mb, 0)),
        driftCell(r), freshnessCell(r))),
      { id: "devices-table" }),
    ];
  },
};

// The control plane as the device sees it: fresh, or stale/missing (withheld or frozen).
function freshnessCell(r) {
  if (!r.freshness) return h("td", { cls: "freshness", "data-freshness": "none", title: "the device does not check freshness" }, "–");
  const age = r.freshness_age_s === null || r.freshness_age_s === undefined ? "never received" : `${fmt(r.freshness_age_s, 0)} s old`;
  const behind = r.freshness_behind && r.freshness_behind.length ? `; withheld: ${r.freshness_behind.join(", ")}` : "";
  return h("td", { cls: "freshness", "data-freshness": r.freshness, title: `freshness signature ${age}${behind}` }, badge(r.freshness === "fresh" ? "online" : "stale", r.freshness));
}

// A device whose reports are not signed by an enrolled key: shown, counted for nothing.
function authBadge(r) {
  const title = `${r.unauthenticated || 0} report(s) refused${r.auth_error ? ` (last: ${r.auth_error})` : ""}`;
  return h("span", { title, "data-auth": "unauthenticated" }, badge("unauthenticated"));
}

// Drift score of the device's last hour (1.0 = the alert threshold): red when a figure alerts.
function driftCell(r) {
  const title = r.drift_note || (r.drift_alert ? "drift: a figure is over its threshold" : "no drift");
  if (r.drift_score === null || r.drift_score === undefined) {
    return h("td", { cls: "num drift", title, "data-drift": "none" }, "–");
  }
  const s = r.drift_alert ? "drifting" : "stable";
  return h("td", { cls: "num drift", title, "data-drift": s }, badge(s, fmt(r.drift_score, 2)));
}

pages.device = {
  load: async (id) => {
    const [dev, tel, drift] = await Promise.all([api(`/api/devices/${encodeURIComponent(id)}`),
      api(`/api/devices/${encodeURIComponent(id)}/telemetry?since=-${state.range}&points=600`),
      api(`/api/drift?device=${encodeURIComponent(id)}&since=-${state.range}&points=30`)]);
    return { dev, tel, drift };
  },
  draw({ dev, tel, drift }) {
    const d = dev;
    const ranges = [[900, "15 min"], [3600, "1 h"], [21600, "6 h"], [86400, "24 h"], [604800, "7 d"]];
    return [
      h("h1", {}, d.device, badge(d.online ? "online" : d.online === false ? "offline" : "unknown"),
        badge(d.health), d.health_detail ? h("span", { cls: "muted" }, d.health_detail) : null),
      h("div", { cls: "panel" }, kv([
        ["board", d.board || "–"], ["target", d.target || "–"], ["agent", d.agent_version || "–"],
        ["groups", (d.groups || []).join(", ") || "–"],
        ["identity", d.authenticated ? `signed by enrolled key ${short(d.key_id)}` : authBadge(d)],
        ["claims groups", (d.claimed_groups || []).join(", ") || "–"],
        ["bundle", d.bundle_id ? a(`/bundles/${d.bundle_id}`, `${d.bundle_name} ${d.bundle_version} (${short(d.bundle_id)})`) : "none"],
        ["slot", d.slot || "–"], ["phase", d.phase || "–"],
        ["desired", d.desired ? h("span", {}, `${d.desired.bundle_name || ""} ${d.desired.version || ""} (${d.desired.scope} ${d.desired.name}, ${d.desired.deployment_id}) `,
          d.in_sync ? badge("installed", "in sync") : badge("pending", "not yet")) : "–"],
        ["last seen", `${ago(d.last_seen)} (${when(d.last_seen)})`],
        [d.online ? "online since" : "offline since", `${ago(d.online_changed)}${d.offline_reason ? ` — ${d.offline_reason}` : ""}`],
        ["budgets", d.budgets && Object.keys(d.budgets).length ? Object.entries(d.budgets).map(([k, v]) => `${k} ${v}`).join(", ") : "–"],
      ])),
      h("div", { cls: "toolbar" }, "range:", ranges.map(([s, l]) => h("button", {
        cls: state.range === s ? "sel" : "", onclick: () => { state.range = s; refresh(true); } }, l)),
      h("span", { cls: "muted" }, `${tel.raw_points} telemetry reports`)),
      h("div", { cls: "grid2" },
        h("div", { cls: "panel chart", id: "chart-latency", "data-points": tel.points }, h("h3", {}, "Inference latency (ms)")),
        h("div", { cls: "panel chart", id: "chart-memory", "data-points": tel.points }, h("h3", {}, "Memory (MB)")),
        h("div", { cls: "panel chart", id: "chart-cpu", "data-points": tel.points }, h("h3", {}, "CPU (%) and temperature (°C)")),
        h("div", { cls: "panel chart", id: "chart-rate", "data-points": tel.points }, h("h3", {}, "Inferences and errors per report")),
        driftPanel(drift)),
      h("h2", {}, "Events"),
      table(["time", "kind", "deployment", "detail"], d.events.map((e) => h("tr", {},
        h("td", { title: when(e.ts) }, ago(e.received)), h("td", {}, badge(e.kind)),
        h("td", { cls: "mono" }, e.deployment_id || "–"), h("td", { cls: "wrap" }, e.detail || "")))),
      h("details", {}, h("summary", {}, "last state message"), h("pre", {}, JSON.stringify(d.state, null, 2))),
    ];
  },
  after({ tel, drift }) {
    driftChart(drift);
    const s = tel.series, b = tel.budgets || {};
    const flat = (v) => s.ts.map(() => v);
    chart("chart-latency", s.ts, [["p50", s.p50, "#2da44e"], ["p95", s.p95, "#0969da"], ["p99", s.p99, "#8250df"],
      b.p95_ms ? ["p95 budget", flat(b.p95_ms), "#cf222e", [6, 4]] : null]);
    chart("chart-memory", s.ts, [["RSS", s.rss_mb, "#0969da"], ["peak RSS", s.peak_rss_mb, "#8250df"],
      b.peak_rss_mb ? ["RSS budget", flat(b.peak_rss_mb), "#cf222e", [6, 4]] : null]);
    chart("chart-cpu", s.ts, [["CPU %", s.cpu_percent, "#0969da"], ["°C", s.temperature_c, "#bf3989"]]);
    chart("chart-rate", s.ts, [["inferences", s.inferences, "#2da44e"], ["errors", s.errors, "#cf222e"]]);
  },
};

// The drift score over the page's range (1.0 = the default alert threshold) and the latest verdict.
function driftPanel(d) {
  const v = (d.verdicts || [])[d.verdicts.length - 1];
  const what = !v ? "no drift windows" : v.score === null ? (v.note || "not judged yet")
    : `${v.alert ? "alert" : "no alert"}: score ${fmt(v.score, 2)} over ${v.verdict.rows} rows`;
  return h("div", { cls: "panel chart", id: "chart-drift", "data-drift": v && v.score !== null ? (v.alert ? "drifting" : "stable") : "none" },
    h("h3", {}, "Drift score (1.0 = alert)"), h("div", { cls: "muted" }, what));
}
function driftChart(d) {
  if (!d || !d.series) return;
  const s = d.series;
  chart("chart-drift", s.ts, [["score", s.score, "#8250df"], ["confidence drop ×10", s.confidence_drop.map((x) => (x === null ? null : x * 10)), "#bf3989"],
    ["alert threshold", s.ts.map(() => 1), "#cf222e", [6, 4]]]);
}

function chart(id, xs, lines) {
  const el = document.getElementById(id);
  if (!el || typeof uPlot === "undefined") return;
  lines = lines.filter(Boolean);
  const data = [xs, ...lines.map((l) => l[1])];
  const width = Math.max(300, el.clientWidth - 24);
  const old = state.charts[id];
  if (old && old.root.isConnected && old.series.length === lines.length + 1) {
    old.setData(data);
    return;
  }
  if (old) old.destroy();
  const u = new uPlot({
    width, height: 220,
    series: [{}, ...lines.map(([label, , stroke, dash]) => ({ label, stroke, width: 1.5, dash, spanGaps: true }))],
    axes: [{}, { size: 50 }], legend: { live: true },
  }, data, el);
  state.charts[id] = u;
  window.__charts = state.charts;
}

function rolloutCards(list) {
  return list.map((r) => h("div", { cls: "panel", "data-rollout": r.id },
    h("div", { cls: "toolbar" }, a(`/rollouts/${r.id}`, r.id, { cls: "mono" }), badge(r.state),
      h("span", {}, `${r.bundle_name} ${r.bundle_version} → group ${r.group_name}`),
      h("span", { cls: "muted" }, `stage ${r.stage}/${r.stage_count} · failures ${r.failures}/${r.allowed_failures} allowed (${r.max_failures}) · soak ${r.soak_s}s`),
      r.halt ? h("span", { cls: "halt-reason" }, `halted: ${r.halt.message}`) : null),
    stageTable(r)));
}

function stageTable(r) {
  return table(["stage", { t: "%", cls: "num" }, { t: "devices", cls: "num" }, "phase", "progress",
    ...STATUSES.map((s) => ({ t: LABEL[s] || s, cls: "num" }))],
  r.stages.map((s) => h("tr", { "data-stage": s.stage },
    h("td", {}, `${s.stage}`), h("td", { cls: "num" }, s.percent), h("td", { cls: "num" }, s.devices),
    h("td", {}, badge(s.phase.replace(" ", "_"), s.phase)), h("td", {}, progressBar(s.counts, s.devices)),
    STATUSES.map((st) => h("td", { cls: "num", "data-count": st }, s.counts[st] || 0)))));
}

pages.deployments = {
  load: () => api("/api/deployments"),
  draw(d) {
    return [
      h("h1", {}, "Deployments"),
      h("h2", {}, "Staged rollouts"),
      d.rollouts.length ? rolloutCards(d.rollouts) : h("p", { cls: "muted" }, "No rollout yet: edgepack deploy BUNDLE --group G --stages 1,10,50,100"),
      h("h2", {}, "Deployments"),
      d.deployments.length ? table(["deployment", "bundle", "to", "progress",
        ...["pending", "downloading", "installing", "installed", "failed", "rolled_back"].map((s) => ({ t: LABEL[s] || s, cls: "num" }))],
      d.deployments.map((x) => h("tr", { "data-deployment": x.deployment_id },
        h("td", { cls: "mono" }, x.deployment_id),
        h("td", {}, x.bundle_id ? a(`/bundles/${x.bundle_id}`, `${x.name || short(x.bundle_id)} ${x.version || ""}`) : "–"),
        h("td", {}, (x.targets || []).map((t) => `${t.scope} ${t.name}`).join(", ") || "–"),
        h("td", {}, progressBar(x.counts, x.total)),
        ["pending", "downloading", "installing", "installed", "failed", "rolled_back"].map((s) =>
          h("td", { cls: "num", "data-count": s }, x.counts[s] || 0))))) : h("p", { cls: "muted" }, "No deployment seen yet."),
    ];
  },
};

pages.rollout = {
  load: (id) => api(`/api/rollouts/${encodeURIComponent(id)}`),
  draw(r) {
    const act = (what, danger) => h("button", { cls: danger ? "danger" : "", "data-action": what, onclick: async () => {
      if (what === "abort" && !confirm(`Abort rollout ${r.id} and roll back every device it reached?`)) return;
      try {
        await api(`/api/rollouts/${encodeURIComponent(r.id)}/${what}`, { method: "POST", headers: { "Content-Type": "application/json", Accept: "application/json" }, body: "{}" });
      } catch (e) {
        if (e.status !== 401) alert(e.message);
        else { const f = document.getElementById("login"); f.dataset.needed = what; f.hidden = false; document.getElementById("login-token").focus(); return; }
      }
      refresh(true);
    } }, what);
    const controls = [];
    if (r.state === "running") controls.push(act("pause"));
    if (r.state === "paused") controls.push(act("resume"));
    if (!["completed", "halted", "aborted", "aborting", "abort_requested"].includes(r.state)) controls.push(act("abort", true));
    return [
      h("h1", {}, `Rollout ${r.id}`, badge(r.state)),
      h("div", { cls: "panel" }, kv([
        ["bundle", a(`/bundles/${r.bundle_id}`, `${r.bundle_name} ${r.bundle_version} (${short(r.bundle_id)})`)],
        ["group", r.group_name], ["stages", r.stages.map((s) => `${s.percent}%`).join(" → ")],
        ["stage", `${r.stage} of ${r.stage_count}`], ["failures", `${r.failures} (${r.allowed_failures} allowed: ${r.max_failures} of ${r.deployed} deployed)`],
        ["soak", `${r.soak_s}s${r.soak_left_s !== undefined ? ` (${Math.ceil(r.soak_left_s)}s left)` : ""}`],
        ["started", when(r.created)], r.finished ? ["finished", when(r.finished)] : null,
        r.detail ? ["detail", r.detail] : null,
      ]), h("div", { cls: "toolbar" }, controls)),
      r.halt ? h("div", { cls: "panel", id: "halt-reason", "data-metric": r.halt.metric },
        h("strong", {}, `Halted at stage ${r.halt.stage}: `), r.halt.message) : null,
      stageTable(r),
      r.comparison && r.comparison.checks ? [h("h2", {}, `Stage ${r.comparison.stage} vs its previous bundle and ${r.comparison.compared_with}`),
        table(["metric", { t: "stage", cls: "num" }, { t: "previous", cls: "num" }, { t: "baseline", cls: "num" }, "verdict", "detail"],
          r.comparison.checks.map((c) => h("tr", { "data-metric": c.metric },
            h("td", {}, c.metric.replace("_", " ")), ...[c.value, c.previous, c.baseline].map((v) =>
              h("td", { cls: "num" }, v === null || v === undefined ? "–" : Number(v).toPrecision(3))),
            h("td", {}, badge({ halt: "failed", beyond: "degraded", ok: "installed" }[c.verdict] || "waiting", c.verdict)),
            h("td", { cls: "wrap" }, c.message))))] : null,
      h("h2", {}, `Devices (${r.devices.length})`),
      r.devices.length > MAX_ROWS ? h("p", { cls: "muted" }, `showing the ${MAX_ROWS} deployed last`) : null,
      table(["device", "stage", "status", "previous", "detail", "updated"], (r.devices.length > MAX_ROWS
        ? r.devices.filter((x) => x.status !== "waiting").slice(-MAX_ROWS) : r.devices).map((x) => h("tr", { "data-device": x.device_id },
        h("td", {}, a(`/devices/${encodeURIComponent(x.device_id)}`, x.device_id)), h("td", {}, x.stage + 1),
        h("td", {}, badge(x.status)), h("td", {}, x.previous ? `${x.previous.name || ""} ${x.previous.version || ""}` : "–"),
        h("td", { cls: "wrap" }, x.detail || ""), h("td", {}, ago(x.updated))))),
      h("h2", {}, "Log"),
      h("ul", { cls: "log" }, r.log.map((l) => h("li", {}, h("span", { cls: "muted" }, `${when(l.ts)} `), l.message))),
    ];
  },
};

pages.bundles = {
  load: () => api("/api/bundles"),
  draw(d) {
    return [h("h1", {}, "Bundles"), d.bundles.length ? table(["bundle", "target", "id", { t: "MB", cls: "num" },
      "optimization", "signed by", { t: "devices", cls: "num" }, "published"],
    d.bundles.map((b) => h("tr", { "data-bundle": b.bundle_id },
      h("td", {}, a(`/bundles/${b.bundle_id}`, `${b.name} ${b.version}`)), h("td", {}, b.target || "–"),
      h("td", { cls: "mono" }, short(b.bundle_id)), h("td", { cls: "num" }, fmt((b.bytes || 0) / 1048576, 2)),
      h("td", {}, b.optimization || "–"), h("td", { cls: "mono", "data-signature": b.signature }, b.signed_by || b.signature),
      h("td", { cls: "num" }, b.devices), h("td", {}, ago(b.published || b.first_seen))))) : h("p", { cls: "muted" }, "No bundle published in this fleet yet.")];
  },
};

pages.bundle = {
  load: async (id) => {
    const b = await api(`/api/bundles/${encodeURIComponent(id)}`);
    b.drift = await api(`/api/drift?bundle=${encodeURIComponent(b.bundle_id)}&since=-${state.range}&points=30`);
    return b;
  },
  after: (b) => driftChart(b.drift),
  draw(b) {
    const m = b.manifest || {};
    const model = m.model || {}, rt = m.runtime || {}, opt = m.optimization || {};
    const metrics = flatten(b.metrics || {});
    const report = b.report;
    const reportRows = report && typeof report === "object" ? flatten(report).filter(([, v]) => typeof v === "number") : [];
    return [
      h("h1", {}, `${b.name} ${b.version}`, h("span", { cls: "muted mono" }, short(b.bundle_id))),
      h("div", { cls: "grid2" },
        h("div", { cls: "panel", id: "manifest" }, h("h3", {}, "Manifest"), kv([
          ["bundle id", h("span", { cls: "mono" }, b.bundle_id)], ["target", b.target || m.target],
          ["created", m.created || "–"], ["size", `${fmt((b.bytes || 0) / 1048576, 2)} MB in ${b.chunks} chunks`],
          ["signed by", h("span", { "data-signature": b.signature }, b.signed_by ? `${b.signed_by} (verified)` : b.signature)],
          ["model", `${model.file || "?"} (${model.format || "?"}, ${fmt((model.bytes || 0) / 1048576, 2)} MB)`],
          ["inputs", (model.inputs || []).map((i) => `${i.name} ${i.dtype} [${i.shape}]`).join(", ")],
          ["outputs", (model.outputs || []).map((i) => `${i.name} ${i.dtype} [${i.shape}]`).join(", ")],
          ["runtime", `${rt.name || "?"} ≥ ${rt.min_version || "?"}`],
          ["optimization", opt.mode ? `${opt.mode}${opt.format ? ` ${opt.format}` : ""}${opt.summary ? ` — ${opt.summary}` : ""}` : "–"],
          ["budgets", Object.entries(b.budgets || {}).map(([k, v]) => `${k} ${v}`).join(", ") || "–"],
        ])),
        h("div", { cls: "panel", id: "metrics" }, h("h3", {}, "Build metrics"), metrics.length
          ? table(["metric", { t: "value", cls: "num" }], metrics.map(([k, v]) => h("tr", {}, h("td", {}, k),
            h("td", { cls: "num" }, typeof v === "number" ? (Number.isInteger(v) ? v : v.toFixed(4)) : String(v)))))
          : h("p", { cls: "muted" }, "The manifest carries no metrics."))),
      h("h2", {}, "Build report"),
      h("div", { cls: "panel", id: "report", "data-report": b.report_status },
        b.report_status === "ready" ? [reportRows.length ? table(["figure", { t: "value", cls: "num" }], reportRows.slice(0, 60).map(([k, v]) =>
          h("tr", {}, h("td", {}, k), h("td", { cls: "num" }, Number.isInteger(v) ? v : v.toFixed(4))))) : null,
        h("details", {}, h("summary", {}, "report.json"), h("pre", {}, JSON.stringify(report, null, 2)))]
          : b.report_status === "fetching" ? h("p", { cls: "muted" }, "Fetching the bundle from the broker to read its report…")
            : h("p", { cls: "muted" }, `Report unavailable: ${b.report_error}`)),
      h("div", { cls: "grid2" }, driftPanel(b.drift)),
      h("h2", {}, `Devices running it (${b.devices.length})`),
      h("div", { cls: "panel" }, b.devices.length ? b.devices.map((d, i) => [i ? ", " : "", a(`/devices/${encodeURIComponent(d)}`, d)]) : h("span", { cls: "muted" }, "none")),
      b.rollouts.length ? [h("h2", {}, "Rollouts"), h("ul", {}, b.rollouts.map((r) => h("li", {}, a(`/rollouts/${r.id}`, r.id), " ", badge(r.state), ` to ${r.group} — ${when(r.created)}`)))] : null,
      h("details", {}, h("summary", {}, "manifest.json"), h("pre", {}, JSON.stringify(m, null, 2))),
    ];
  },
};

// ---------------------------------------------------------------------------------- routing
function route() {
  const parts = location.pathname.split("/").filter(Boolean).map(decodeURIComponent);
  if (parts[0] === "devices" && parts[1]) return { page: "device", id: parts[1], nav: "overview" };
  if (parts[0] === "rollouts" && parts[1]) return { page: "rollout", id: parts[1], nav: "deployments" };
  if (parts[0] === "deployments" || parts[0] === "rollouts") return { page: "deployments", nav: "deployments" };
  if (parts[0] === "bundles" && parts[1]) return { page: "bundle", id: parts[1], nav: "bundles" };
  if (parts[0] === "bundles") return { page: "bundles", nav: "bundles" };
  return { page: "overview", nav: "overview" };
}

async function refresh(now) {
  if (state.busy && !now) return;
  state.busy = true;
  const r = route();
  const page = pages[r.page];
  try {
    const data = await page.load(r.id);
    const app = document.getElementById("app");
    const focused = document.activeElement && document.activeElement.getAttribute("aria-label");
    const y = window.scrollY;
    app.replaceChildren(...[page.draw(data)].flat(Infinity).filter(Boolean));
    if (page.after) page.after(data);
    if (focused) {
      const el = app.querySelector(`[aria-label="${focused}"]`);
      if (el) { el.focus(); if (el.setSelectionRange) el.setSelectionRange(el.value.length, el.value.length); }
    }
    window.scrollTo(0, y);
    app.dataset.loaded = String(Date.now());
    setLive(true, `live · ${new Date().toLocaleTimeString()}`);
  } catch (e) {
    setLive(false, `not updating: ${e.message}`);
    if (!document.getElementById("app").dataset.loaded) {
      document.getElementById("app").replaceChildren(h("p", { cls: "error" }, e.message));
    }
  } finally {
    state.busy = false;
  }
}

async function init() {
  const params = new URLSearchParams(location.search);
  const r = route();
  for (const el of document.querySelectorAll("[data-nav]")) el.classList.toggle("active", el.dataset.nav === r.nav);
  setupLogin();
  await session();
  try {
    const f = await api("/api/fleets");
    state.fleet = params.get("fleet") || f.default;
    const sel = document.getElementById("fleet");
    sel.replaceChildren(...f.fleets.map((x) => h("option", { value: x, selected: x === state.fleet }, x)));
    sel.onchange = () => { location.search = `?fleet=${encodeURIComponent(sel.value)}`; };
  } catch (e) {
    state.fleet = params.get("fleet");
  }
  for (const el of document.querySelectorAll("[data-keep-fleet]")) el.setAttribute("href", href(el.getAttribute("href")));
  await refresh(true);
  state.timer = setInterval(() => { if (!document.hidden) refresh(false); }, POLL_MS);
}

init();
