// The operator console: every number and action is an admin API call with the tab's bearer token.
import { language, setLanguage, t } from "/console/i18n.js";
import { barChart, lineChart } from "/console/charts.js";

const TOKEN_KEY = "kfdify.console.token"; // sessionStorage: this tab only, never a cookie or a URL
const TRY_KEY = "kfdify.console.try";
const LANG_KEY = "kfdify.console.lang";
const REFRESH_MS = 5000;
const COUNTERS = ["answered", "fallbacks", "handoffs", "rate_limited", "send_failures", "media_received"];

const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem(TOKEN_KEY) || "";
let timer = null;
let activeTab = "overview";
let lastOverview = null;

class ApiError extends Error {
  constructor(status, message, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

async function api(path, { method = "GET", body } = {}) {
  const headers = { Authorization: `Bearer ${token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new ApiError(response.status, data.error || response.statusText, response.headers.get("Retry-After"));
    if (response.status === 401 || response.status === 403) signOut(t("signInRefused"));
    throw error;
  }
  return data;
}

function node(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "dataset") Object.assign(element.dataset, value);
    else if (key === "onclick") element.addEventListener("click", value);
    else if (key === "className") element.className = value;
    else element.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

function when(seconds) {
  if (!seconds) return "–";
  const d = new Date(seconds * 1000);
  const today = new Date();
  const time = d.toLocaleTimeString(language() === "zh" ? "zh-CN" : "en-GB", { hour12: false });
  return d.toDateString() === today.toDateString() ? time : `${d.toLocaleDateString()} ${time}`;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return t("seconds", { n: Math.floor(seconds) });
  if (seconds < 3600) return t("minutes", { n: Math.floor(seconds / 60) });
  if (seconds < 86400) return t("hours", { n: Math.floor(seconds / 3600) });
  return t("days", { n: Math.floor(seconds / 86400) });
}

// --- sign-in -----------------------------------------------------------------------------------------

function showError(message) {
  const box = $("sign-in-error");
  box.textContent = message;
  box.hidden = !message;
}

function signOut(message = "") {
  token = "";
  sessionStorage.removeItem(TOKEN_KEY);
  clearInterval(timer);
  timer = null;
  lastOverview = null;
  for (const id of ["health", "counters", "chart-answered", "chart-latency", "dify-apps", "customers", "problems", "chat"]) {
    $(id).replaceChildren();
  }
  $("customer-detail").hidden = true;
  $("app").hidden = true;
  $("sign-out").hidden = true;
  $("instance-label").hidden = true;
  $("sign-in").hidden = false;
  $("token").value = "";
  showError(message);
}

async function signIn(candidate) {
  token = candidate;
  try {
    const overview = await api("/admin/overview");
    sessionStorage.setItem(TOKEN_KEY, token);
    showError("");
    $("sign-in").hidden = true;
    $("app").hidden = false;
    $("sign-out").hidden = false;
    renderOverview(overview);
    showTab(activeTab);
  } catch (error) {
    token = "";
    sessionStorage.removeItem(TOKEN_KEY);
    if (error instanceof ApiError && error.status === 429) showError(t("lockedOut", { s: error.retryAfter || "?" }));
    else if (error instanceof ApiError) showError(t("signInRefused"));
    else showError(t("networkError", { e: error.message }));
  }
}

// --- tabs --------------------------------------------------------------------------------------------

function showTab(name) {
  activeTab = name;
  for (const button of document.querySelectorAll("[data-tab]")) {
    button.setAttribute("aria-selected", String(button.dataset.tab === name));
  }
  for (const section of document.querySelectorAll(".tab")) section.hidden = section.id !== `tab-${name}`;
  clearInterval(timer);
  timer = null;
  if (name === "overview") {
    refreshOverview();
    timer = setInterval(refreshOverview, REFRESH_MS);
  } else if (name === "customers") loadCustomers();
  else if (name === "problems") loadProblems();
  else if (name === "try") fillAccounts();
}

// --- overview ----------------------------------------------------------------------------------------

async function refreshOverview() {
  if (!token) return;
  try {
    renderOverview(await api("/admin/overview"));
  } catch (error) {
    $("updated").textContent = t("networkError", { e: error.message });
  }
}

function healthCard(title, ok, lines) {
  return node("div", { className: `card health-card ${ok === null ? "unknown" : ok ? "ok" : "bad"}` },
    node("h3", {}, title), ...lines.map((line) => node("p", {}, line)));
}

function dependency(seen) {
  if (!seen) return [null, [t("notYet")]];
  return [seen.ok, [seen.ok ? t("reachable") : `${t("unreachable")} (${seen.detail || "?"})`, t("lastSeen", { t: when(seen.at) })]];
}

function renderOverview(data) {
  lastOverview = data;
  $("instance").textContent = data.instance;
  $("instance-label").hidden = false;
  const store = data.store || {};
  const storeOk = store.reachable && !store.degraded;
  const [wecomOk, wecomLines] = dependency(data.wecom);
  const [difyOk, difyLines] = dependency(data.dify);
  $("health").replaceChildren(
    healthCard(t("store"), storeOk, [store.backend || "?", store.degraded ? t("degraded") : store.reachable ? t("reachable") : t("unreachable")]),
    healthCard(t("wecom"), wecomOk, wecomLines),
    healthCard(t("dify"), difyOk, difyLines),
    healthCard(t("instance"), true, [data.instance, `${t("version")} ${data.version}`, `${t("uptime")} ${duration(data.uptime_s)}`]),
  );
  const windows = data.windows || {};
  $("counters").replaceChildren(
    node("thead", {}, node("tr", {}, node("th", {}), node("th", {}, t("today")), node("th", {}, t("lastHour")))),
    node("tbody", {}, COUNTERS.map((name) => node("tr", {},
      node("th", { scope: "row" }, t(`c_${name}`)),
      node("td", { dataset: { counter: name, window: "today" } }, (windows.today || {})[name] ?? 0),
      node("td", { dataset: { counter: name, window: "last_hour" } }, (windows.last_hour || {})[name] ?? 0),
    ))),
  );
  $("updated").textContent = t("updated", { t: when(Date.now() / 1000) });
  const series = data.per_minute || [];
  const minutes = series.map((point) => point.minute);
  barChart($("chart-answered"), t("chartAnswered"), minutes, series.map((point) => point.answered));
  lineChart($("chart-latency"), t("chartLatency"), minutes, [
    { label: "p50", values: series.map((point) => point.dify_p50) },
    { label: "p95", values: series.map((point) => point.dify_p95) },
  ]);
  renderApps(data.dify_apps);
}

function renderApps(apps) {
  const entries = Object.entries(apps || {});
  if (!entries.length) {
    $("dify-apps").replaceChildren(node("p", { className: "muted" }, t("noApps")));
    return;
  }
  const pick = (app, ...keys) => keys.map((key) => app[key]).find((value) => value !== undefined) ?? "–";
  $("dify-apps").replaceChildren(node("table", {},
    node("thead", {}, node("tr", {}, [t("app"), t("limit"), t("inFlight"), t("queued")].map((h) => node("th", {}, h)))),
    node("tbody", {}, entries.map(([name, app]) => node("tr", {},
      node("td", {}, name),
      node("td", {}, pick(app || {}, "limit", "concurrency_limit", "current_limit")),
      node("td", {}, pick(app || {}, "in_flight", "running")),
      node("td", {}, pick(app || {}, "queued", "waiting")),
    ))),
  ));
}

function openClear() {
  $("clear-help").textContent = t("clearHelp", { w: t("clearWord") });
  $("clear-form").hidden = false;
  $("clear-word").value = "";
  $("clear-result").textContent = "";
  $("clear-word").focus();
}

async function confirmClear(event) {
  event.preventDefault();
  const typed = $("clear-word").value.trim();
  if (typed !== t("clearWord")) {
    $("clear-result").textContent = t("clearMismatch");
    return;
  }
  try {
    await api("/clear", { method: "POST" });
    $("clear-form").hidden = true;
    $("clear-result").textContent = t("clearDone");
  } catch (error) {
    $("clear-result").textContent = t("networkError", { e: error.message });
  }
}

// --- customers ---------------------------------------------------------------------------------------

// Each list or detail request is numbered: an answer that arrives after a newer request was made (the tab's
// first list overtaking a search) is dropped, so what is shown always matches the last thing asked for.
let customersAsked = 0;
let customerAsked = 0;

async function loadCustomers() {
  const q = $("search").value.trim();
  const asked = ++customersAsked;
  const data = await api(`/admin/customers?q=${encodeURIComponent(q)}`);
  if (asked !== customersAsked) return;
  if (!data.customers.length) {
    $("customers").replaceChildren(node("p", { className: "muted", dataset: { query: q } }, t("noCustomers")));
    return;
  }
  $("customers").replaceChildren(node("table", { className: "list", dataset: { query: q } },
    node("thead", {}, node("tr", {}, [t("kf"), t("customer"), t("lastMessage"), t("turns"), t("owner"), t("lastOutcome")].map((h) => node("th", {}, h)))),
    node("tbody", {}, data.customers.map((row) => node("tr", {
      className: "clickable", tabindex: 0, dataset: { customer: row.customer, kf: row.open_kfid },
      onclick: () => loadCustomer(row.open_kfid, row.customer),
    },
    node("td", { "data-label": t("kf") }, row.open_kfid),
    node("td", { "data-label": t("customer") }, node("code", {}, row.customer), row.nickname ? ` ${row.nickname}` : ""),
    node("td", { "data-label": t("lastMessage") }, when(row.last_message_at)),
    node("td", { "data-label": t("turns") }, row.turns),
    node("td", { "data-label": t("owner") }, t(`o_${row.session_owner}`)),
    node("td", { "data-label": t("lastOutcome") }, row.last_outcome ? t(`r_${row.last_outcome}`) : "–"),
    ))),
  ));
}

async function loadCustomer(kf, customer) {
  const asked = ++customerAsked;
  const data = await api(`/admin/customers/${encodeURIComponent(kf)}/${encodeURIComponent(customer)}`);
  if (asked !== customerAsked) return;
  const conversation = data.conversation;
  const box = $("customer-detail");
  box.replaceChildren(
    node("h2", {}, t("detail")),
    node("dl", {},
      node("dt", {}, t("kf")), node("dd", {}, data.open_kfid),
      node("dt", {}, t("customer")), node("dd", {}, node("code", {}, data.customer)),
      node("dt", {}, t("nickname")), node("dd", {}, data.nickname || "–"),
      node("dt", {}, t("conversationId")), node("dd", { id: "conversation-id" }, conversation ? conversation.conversation_id : t("noConversation")),
      node("dt", {}, t("turns")), node("dd", {}, conversation ? conversation.turns : 0),
      node("dt", {}, t("startedAt")), node("dd", {}, conversation ? when(conversation.started_at) : "–"),
      node("dt", {}, t("owner")), node("dd", {}, t(`o_${data.session_owner}`)),
      node("dt", {}, t("entered")), node("dd", {}, when(data.entered_at)),
      node("dt", {}, t("gender")), node("dd", {}, data.profile ? data.profile.gender || "–" : "–"),
      node("dt", {}, t("entry")), node("dd", { id: "entry-context" }, entryText(data.profile)),
      node("dt", {}, t("messages")), node("dd", {}, data.messages),
    ),
    node("h3", {}, t("recentOutcomes")),
    node("ul", { className: "outcomes" }, (data.outcomes || []).map((o) => node("li", {}, `${when(o.at)} · ${t(`r_${o.outcome}`)}`))),
    node("div", { className: "row" },
      node("button", { type: "button", className: "danger-button", dataset: { action: "reset" }, onclick: () => resetCustomer(kf, customer) }, t("reset")),
      node("button", { type: "button", onclick: () => { box.hidden = true; } }, t("close")),
    ),
    node("p", { id: "reset-result", role: "status" }),
  );
  box.hidden = false;
}

function entryText(profile) {
  const entry = profile && profile.entry;
  if (!entry) return "–";
  const parts = [];
  if (entry.scene) parts.push(`${t("scene")}: ${entry.scene}`);
  if (entry.scene_param) parts.push(`${t("sceneParam")}: ${entry.scene_param}`);
  if (entry.channels_nickname) parts.push(`${t("channels")}: ${entry.channels_nickname}`);
  return parts.length ? parts.join(" · ") : "–";
}

async function resetCustomer(kf, customer) {
  if (!window.confirm(t("resetConfirm", { c: customer }))) return;
  try {
    await api("/reset_conversation", { method: "POST", body: { user_id: customer, open_kfid: kf } });
    await loadCustomer(kf, customer);
    $("reset-result").textContent = t("resetDone");
  } catch (error) {
    if (error.status === 404) $("reset-result").textContent = t("resetNone");
    else $("reset-result").textContent = t("networkError", { e: error.message });
  }
}

// --- problems ----------------------------------------------------------------------------------------

async function loadProblems() {
  const data = await api("/admin/problems");
  if (!data.problems.length) {
    $("problems").replaceChildren(node("p", { className: "muted" }, t("noProblems")));
    return;
  }
  $("problems").replaceChildren(node("ol", { className: "problems" }, data.problems.map((p) => node("li", { dataset: { kind: p.kind } },
    node("div", { className: "problem-head" },
      node("span", { className: "badge" }, t(`k_${p.kind}`)),
      node("time", {}, when(p.at)),
      p.customer ? node("code", {}, p.customer) : null,
    ),
    node("p", { title: p.summary }, t(`s_${p.kind}`, { code: p.code })),
    node("p", { className: "hint" }, `${t("hint")}: ${p.hint}`),
  ))));
}

// --- try it ------------------------------------------------------------------------------------------

function trySession() {
  let id = sessionStorage.getItem(TRY_KEY);
  if (!id) {
    id = crypto.randomUUID().replaceAll("-", "");
    sessionStorage.setItem(TRY_KEY, id);
  }
  return id;
}

function fillAccounts() {
  const select = $("try-kf");
  const current = select.value;
  const accounts = (lastOverview && lastOverview.kf_accounts) || [];
  select.replaceChildren(node("option", { value: "" }, t("tryDefault")), accounts.map((kf) => node("option", { value: kf }, kf)));
  select.value = accounts.includes(current) ? current : "";
}

function bubble(side, text, extra = []) {
  const item = node("div", { className: `bubble ${side}` }, node("div", { className: "text" }, text), extra);
  $("chat").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

async function sendTry(text) {
  if (!text.trim()) return;
  bubble("me", text);
  const waiting = bubble("bot pending", t("trySending"));
  try {
    const data = await api("/admin/try", { method: "POST", body: { text, session: trySession(), open_kfid: $("try-kf").value || null } });
    waiting.remove();
    if (!data.bubbles.length) bubble("bot muted", t("tryNoReply"));
    data.bubbles.forEach((b, index) => {
      const items = b.kind === "menu"
        ? node("div", { className: "menu" }, b.items.map((item) => node("button", { type: "button", className: "menu-item", onclick: () => sendTry(item.text) }, item.text)))
        : null;
      const size = node("div", { className: "size" }, `${index + 1}/${data.bubbles.length} · ${t("bytes", { n: b.bytes })}`);
      bubble("bot", b.text, [items, size]).dataset.kind = b.kind;
    });
  } catch (error) {
    waiting.remove();
    bubble("bot error", t("tryFailed", { e: error.message }));
  }
}

async function resetTry() {
  const id = sessionStorage.getItem(TRY_KEY);
  $("chat").replaceChildren();
  if (id) {
    sessionStorage.removeItem(TRY_KEY);
    await api("/admin/try/reset", { method: "POST", body: { session: id } }).catch(() => {});
  }
}

// --- start -------------------------------------------------------------------------------------------

function start() {
  setLanguage(localStorage.getItem(LANG_KEY) || "zh");
  $("lang").addEventListener("click", () => {
    const next = language() === "zh" ? "en" : "zh";
    localStorage.setItem(LANG_KEY, next);
    setLanguage(next);
    if (lastOverview) renderOverview(lastOverview);
    if (token && activeTab !== "overview" && activeTab !== "try") showTab(activeTab);
  });
  $("sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn($("token").value.trim());
  });
  $("sign-out").addEventListener("click", () => signOut());
  for (const button of document.querySelectorAll("[data-tab]")) button.addEventListener("click", () => showTab(button.dataset.tab));
  $("clear-open").addEventListener("click", openClear);
  $("clear-cancel").addEventListener("click", () => { $("clear-form").hidden = true; });
  $("clear-form").addEventListener("submit", confirmClear);
  $("search-form").addEventListener("submit", (event) => { event.preventDefault(); loadCustomers(); });
  $("try-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("try-text").value;
    $("try-text").value = "";
    sendTry(text);
  });
  $("try-kf").addEventListener("change", resetTry);
  $("try-reset").addEventListener("click", resetTry);
  if (token) signIn(token);
}

start();
