// The usage page: reads the admin API with the admin token kept in this tab's sessionStorage.
// Every value from the API is put in the page as text (textContent), never as HTML.
"use strict";

const TOKEN_KEY = "gateway-admin-token";
const DECISION_LABELS = {
  served: "Served",
  policy_denied: "Policy-denied",
  rate_limited: "Rate-limited",
  failed: "Failed",
  rejected: "Rejected (bad request or key)",
};
const SVG = "http://www.w3.org/2000/svg";
const REFRESH_MS = 30000;

const $ = (id) => document.getElementById(id);
let refreshTimer = null;

class Unauthorized extends Error {}

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  return node;
}

function svg(tag, attrs, title) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  if (title) {
    const t = document.createElementNS(SVG, "title");
    t.textContent = title;
    node.appendChild(t);
  }
  return node;
}

function usd(value) {
  return "$" + Number(value).toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 4 });
}

function amount(value, unit) {
  return unit === "usd" ? usd(value) : Number(value).toLocaleString("en-US") + " " + unit;
}

function utcDay(offsetDays) {
  const d = new Date(Date.now() + (offsetDays || 0) * 86400000);
  return d.toISOString().slice(0, 10);
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(path, accept) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const response = await fetch(new URL(path, window.location.href), {
    headers: { Authorization: "Bearer " + token, Accept: accept || "application/json" },
    cache: "no-store",
    credentials: "omit",
  });
  if (response.status === 401) throw new Unauthorized("The admin token was refused.");
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      message = (await response.json()).error.message || message;
    } catch (_) { /* not an OpenAI-style error body */ }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return accept === "text/csv" ? response.blob() : response.json();
}

function ledgerQuery(from, to, tenant) {
  const query = new URLSearchParams({ from, to });
  if (tenant) query.set("tenant", tenant);
  return "usage?" + query.toString();
}

// --- tenants and their limits -------------------------------------------------------------

function limitRow(limit) {
  const row = el("div", null, { class: "limit" });
  const id = "limit-" + Math.random().toString(36).slice(2);
  row.appendChild(el("span", limit.limit.replaceAll("_", " "), { class: "limit-name", id }));
  const meter = el("meter", null, {
    min: 0, max: limit.value, value: limit.used, low: limit.value * 0.75, high: limit.value * 0.9,
    optimum: 0, "aria-labelledby": id,
  });
  row.appendChild(meter);
  const reset = limit.reset_seconds > 0 ? `, resets in ${limit.reset}` : "";
  row.appendChild(el("span",
    `${amount(limit.remaining, limit.unit)} left of ${amount(limit.value, limit.unit)}` +
    ` (used ${amount(limit.used, limit.unit)}${reset})`,
    { class: "limit-left", "data-limit": limit.limit }));
  return row;
}

function renderTenants(data) {
  const box = $("tenants");
  box.replaceChildren();
  const select = $("tenant");
  const chosen = select.value;
  select.replaceChildren(el("option", "All tenants", { value: "" }));
  for (const tenant of data.tenants) {
    select.appendChild(el("option", tenant.tenant, { value: tenant.tenant }));
    const card = el("article", null, { class: "tenant", "data-tenant": tenant.tenant });
    card.appendChild(el("h3", tenant.tenant));
    card.appendChild(el("p", `policy ${tenant.policy}, limits ${tenant.limits_mode}`, { class: "note" }));
    if (!tenant.scopes.length) card.appendChild(el("p", "No limits configured.", { class: "note" }));
    for (const scope of tenant.scopes) {
      card.appendChild(el("h4", scope.scope));
      for (const limit of scope.limits) card.appendChild(limitRow(limit));
    }
    box.appendChild(card);
  }
  select.value = chosen;
}

// --- spend today and this month ---------------------------------------------------------

function renderSpend(month, today) {
  const totals = new Map();
  for (const row of month.rows) {
    const key = row.tenant + "\u0000" + row.model;
    const entry = totals.get(key) || { tenant: row.tenant, model: row.model, today: 0, month: 0, images: 0 };
    entry.month += row.usd;
    entry.images += row.images;
    if (row.day === today) entry.today += row.usd;
    totals.set(key, entry);
  }
  const body = $("spend").tBodies[0];
  body.replaceChildren();
  const entries = [...totals.values()].sort((a, b) => a.tenant.localeCompare(b.tenant) || a.model.localeCompare(b.model));
  if (!entries.length) {
    const tr = el("tr");
    tr.appendChild(el("td", "Nothing spent this month.", { colspan: 5 }));
    body.appendChild(tr);
  }
  for (const e of entries) {
    const tr = el("tr", null, { "data-tenant": e.tenant, "data-model": e.model });
    for (const cell of [e.tenant, e.model, usd(e.today), usd(e.month), e.images]) tr.appendChild(el("td", cell));
    body.appendChild(tr);
  }
}

// --- requests by decision over the last hour ------------------------------------------------

function renderActivity(data) {
  const head = $("activity").tHead.rows[0];
  const totals = $("activity").tBodies[0].rows[0];
  head.replaceChildren();
  totals.replaceChildren();
  for (const d of data.decisions) {
    head.appendChild(el("th", DECISION_LABELS[d] || d, { scope: "col" }));
    totals.appendChild(el("td", data.totals[d], { "data-decision": d }));
  }
  $("activity-note").textContent =
    `Counted by the gateway process that answered (pid ${data.pid}); with several workers, each counts its own.`;
  const width = 1000, height = 120, barWidth = width / data.minutes.length;
  const peak = Math.max(1, ...data.minutes.map((m) => data.decisions.reduce((s, d) => s + m[d], 0)));
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height + 16}`, role: "img",
    "aria-label": "Requests per minute over the last hour, stacked by decision" });
  data.minutes.forEach((minute, i) => {
    let y = height;
    for (const d of data.decisions) {
      if (!minute[d]) continue;
      const h = (minute[d] / peak) * height;
      y -= h;
      chart.appendChild(svg("rect", { x: i * barWidth + 1, y, width: barWidth - 2, height: h, class: "d-" + d },
        `${minute.minute.slice(11, 16)} UTC: ${minute[d]} ${DECISION_LABELS[d] || d}`));
    }
  });
  chart.appendChild(svg("text", { x: 0, y: height + 14, class: "axis" })).textContent = "60 min ago";
  chart.appendChild(svg("text", { x: width, y: height + 14, class: "axis", "text-anchor": "end" })).textContent = "now";
  const legend = el("ul", null, { class: "legend" });
  for (const d of data.decisions) {
    const item = el("li");
    item.appendChild(el("span", null, { class: "swatch d-" + d, "aria-hidden": "true" }));
    item.appendChild(document.createTextNode(DECISION_LABELS[d] || d));
    legend.appendChild(item);
  }
  $("activity-chart").replaceChildren(chart, legend);
}

// --- upstreams (provider quota and health, where the gateway reports them) -------------------

function renderUpstreams(data) {
  const box = $("upstreams");
  box.replaceChildren();
  if (data === null) {
    box.appendChild(el("p", "This gateway does not report its upstreams.", { class: "note" }));
    return;
  }
  for (const [name, upstream] of Object.entries(data.upstreams)) {
    const card = el("article", null, { class: "tenant", "data-upstream": name });
    card.appendChild(el("h3", name));
    for (const [field, value] of Object.entries(upstream)) {
      if (field !== "limits" && (typeof value !== "object" || value === null)) {
        card.appendChild(el("p", `${field.replaceAll("_", " ")}: ${value}`, { class: "note" }));
      }
    }
    const limits = upstream.limits || [];
    if (!limits.length) card.appendChild(el("p", "No provider quota configured.", { class: "note" }));
    for (const limit of limits) card.appendChild(limitRow(limit));
    box.appendChild(card);
  }
}

// --- the ledger for a date range ------------------------------------------------------------

function renderDaily(data) {
  const byDay = new Map();
  for (let d = new Date(data.from + "T00:00:00Z"); d <= new Date(data.to + "T00:00:00Z"); d = new Date(d.getTime() + 86400000)) {
    byDay.set(d.toISOString().slice(0, 10), 0);
  }
  for (const row of data.rows) byDay.set(row.day, (byDay.get(row.day) || 0) + row.usd);
  const days = [...byDay.entries()];
  const width = 1000, height = 140, barWidth = width / days.length;
  const peak = Math.max(...days.map(([, v]) => v), 0);
  const total = days.reduce((s, [, v]) => s + v, 0);
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height + 16}`, role: "img",
    "aria-label": `Spend per day from ${data.from} to ${data.to}: ${usd(total)} in all, at most ${usd(peak)} a day` });
  days.forEach(([day, value], i) => {
    const h = peak > 0 ? (value / peak) * height : 0;
    chart.appendChild(svg("rect", { x: i * barWidth + (barWidth > 4 ? 1 : 0), y: height - h,
      width: Math.max(barWidth - (barWidth > 4 ? 2 : 0), 0.5), height: h, class: "spend" }, `${day}: ${usd(value)}`));
  });
  chart.appendChild(svg("text", { x: 0, y: height + 14, class: "axis" })).textContent = data.from;
  chart.appendChild(svg("text", { x: width, y: height + 14, class: "axis", "text-anchor": "end" })).textContent = data.to;
  $("daily-chart").replaceChildren(chart, el("p", `${usd(total)} in all; the highest day ${usd(peak)}.`, { class: "note" }));
}

function renderLedger(data) {
  const body = $("ledger").tBodies[0];
  body.replaceChildren();
  if (!data.rows.length) {
    const tr = el("tr");
    tr.appendChild(el("td", "No usage in this range.", { colspan: 10 }));
    body.appendChild(tr);
  }
  for (const r of data.rows) {
    const tr = el("tr");
    for (const cell of [r.day, r.tenant, r.model, r.requests, r.images, r.tokens, usd(r.usd), r.failed,
      r.rejected_rate, r.rejected_quota]) tr.appendChild(el("td", cell));
    body.appendChild(tr);
  }
  renderDaily(data);
}

async function loadLedger() {
  renderLedger(await api(ledgerQuery($("from").value, $("to").value, $("tenant").value)));
}

async function downloadCsv() {
  try {
    const from = $("from").value, to = $("to").value;
    const blob = await api(ledgerQuery(from, to, $("tenant").value), "text/csv");
    const link = el("a", null, { href: URL.createObjectURL(blob), download: `usage-${from}-${to}.csv` });
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  } catch (error) {
    handle(error);
  }
}

// --- session ------------------------------------------------------------------------------

function signedIn(yes) {
  $("login").hidden = yes;
  $("session").hidden = !yes;
  $("data").hidden = !yes;
  if (!yes) {
    $("tenants").replaceChildren();
    $("ledger").tBodies[0].replaceChildren();
    $("spend").tBodies[0].replaceChildren();
  }
}

function handle(error) {
  if (error instanceof Unauthorized) {
    sessionStorage.removeItem(TOKEN_KEY);
    clearInterval(refreshTimer);
    signedIn(false);
    showError("The admin token was refused: enter the gateway's admin.token.");
  } else {
    showError("Could not load the usage data: " + error.message);
  }
}

async function refresh() {
  try {
    const today = utcDay(0);
    const [tenants, activity, month, upstreams] = await Promise.all([
      api("tenants"),
      api("activity"),
      api(ledgerQuery(today.slice(0, 8) + "01", today)),
      api("upstreams").catch((error) => { if (error.status === 404) return null; throw error; }),
    ]);
    renderTenants(tenants);
    renderActivity(activity);
    renderSpend(month, today);
    renderUpstreams(upstreams);
    await loadLedger();
    signedIn(true);
    showError("");
    $("updated").textContent = "Updated " + new Date().toLocaleTimeString();
  } catch (error) {
    handle(error);
  }
}

function start() {
  $("from").value = utcDay(-29);
  $("to").value = utcDay(0);
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value);
    $("token").value = "";
    refresh();
    clearInterval(refreshTimer);
    refreshTimer = setInterval(refresh, REFRESH_MS);
  });
  $("range").addEventListener("submit", (event) => {
    event.preventDefault();
    loadLedger().catch(handle);
  });
  $("csv").addEventListener("click", downloadCsv);
  $("refresh").addEventListener("click", refresh);
  $("signout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    clearInterval(refreshTimer);
    signedIn(false);
    showError("");
  });
  if (sessionStorage.getItem(TOKEN_KEY)) {
    refresh();
    refreshTimer = setInterval(refresh, REFRESH_MS);
  } else {
    signedIn(false);
  }
}

document.addEventListener("DOMContentLoaded", start);
