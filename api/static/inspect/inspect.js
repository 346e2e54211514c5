// chatlog inspector: plain JavaScript, no build step, nothing loaded from elsewhere.
// It calls the API of the server that serves it. The API key lives in this tab's sessionStorage and is sent
// as a Bearer header; the only credential ever put in a URL is a short-lived, read-only stream token.
"use strict";

// The API's base: this page is served at <base>/inspect/.
const BASE = location.pathname.replace(/\/inspect(\/.*)?$/, "");
const KEY_STORAGE = "chatlog.inspector.key";
// Every event type (format=events frames are named after it, so each needs its own listener).
const TYPES = ["conversation.created", "message.user", "message.system", "turn.started", "text.delta",
  "reasoning.delta", "tool_call.started", "tool_call.delta", "tool_call.completed", "tool.result",
  "turn.finished", "turn.cancelled", "turn.failed", "conversation.titled", "model.requested"];

const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
};
const pretty = (value) => JSON.stringify(value, null, 2);
const short = (text, n = 120) => (text.length > n ? text.slice(0, n - 1) + "…" : text);

const state = {
  key: sessionStorage.getItem(KEY_STORAGE),
  nextBefore: null,
  conv: null,          // the open conversation object
  events: [],          // its events as shown (rows), in seq order
  lastSeq: 0,          // the last seq received (catch-up or live)
  at: 1,               // the slider's seq
  format: "openai",
  turns: [],           // turn ids, in start order
  turn: null,          // the turn shown in "what the model saw"
  messagesAsked: 0,    // the latest messages request wins
  verifyTimer: null,   // verify again after live events
  live: { gen: 0, source: null, token: null, expiresAt: 0, renewTimer: null, retryTimer: null, tokens: 0, backoff: 500 },
};

// -- the API -------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.error ? body.error.message : `HTTP ${status}`);
    this.status = status;
    this.code = body && body.error ? body.error.code : null;
  }
}

async function api(path, { method = "GET", params, body } = {}) {
  const url = new URL(BASE + path, location.origin);
  for (const [k, v] of Object.entries(params || {})) if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, v);
  const headers = { Authorization: `Bearer ${state.key}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) {
    if (response.status === 401) signOut("The key was refused (401). Sign in again.");
    throw new ApiError(response.status, data);
  }
  return data;
}

// -- sign in -------------------------------------------------------------------------------------------

$("sign-in").addEventListener("submit", async (e) => {
  e.preventDefault();
  state.key = $("key").value.trim();
  $("sign-in-error").textContent = "";
  try {
    await loadConversations(true);
  } catch (err) {
    if (err.status !== 401) $("sign-in-error").textContent = `Could not list conversations: ${err.message}`;
    return;
  }
  sessionStorage.setItem(KEY_STORAGE, state.key);
  $("key").value = "";
  showApp();
});

$("sign-out").addEventListener("click", () => signOut(""));

function signOut(message) {
  stopLive();
  sessionStorage.removeItem(KEY_STORAGE);
  state.key = null;
  state.conv = null;
  $("app").hidden = true;
  $("sign-out").hidden = true;
  $("conversation").hidden = true;
  $("sign-in").hidden = false;
  $("sign-in-error").textContent = message;
}

function showApp() {
  $("sign-in").hidden = true;
  $("app").hidden = false;
  $("sign-out").hidden = false;
  const wanted = location.hash.slice(1);
  if (wanted && (!state.conv || state.conv.id !== wanted)) openConversation(wanted);
}

// -- the list ------------------------------------------------------------------------------------------

async function loadConversations(fresh) {
  const page = await api("/v1/conversations", { params: { limit: 50, before: fresh ? null : state.nextBefore } });
  if (fresh) $("conversations").replaceChildren();
  for (const c of page.conversations) {
    const button = el("button", { type: "button", "data-id": c.id, onclick: () => openConversation(c.id) },
      el("span", { class: "title" }, c.title || c.id),
      el("span", { class: "meta" }, `seq ${c.seq} · ${c.updated_at.replace("T", " ").slice(0, 19)}`
        + (c.open_turn_id ? " · turn open" : "")));
    if (state.conv && state.conv.id === c.id) button.classList.add("open");
    $("conversations").append(el("li", {}, button));
  }
  state.nextBefore = page.next_before;
  $("older").hidden = !page.next_before;
  $("list-error").textContent = "";
}

$("older").addEventListener("click", () => loadConversations(false).catch(showListError));
$("refresh").addEventListener("click", () => loadConversations(true).catch(showListError));
function showListError(err) { $("list-error").textContent = err.message; }

// -- a conversation ------------------------------------------------------------------------------------

async function openConversation(id) {
  stopLive();
  let conv;
  try {
    conv = await api(`/v1/conversations/${encodeURIComponent(id)}`);
  } catch (err) {
    $("list-error").textContent = `Cannot open ${id}: ${err.message}`;
    return;
  }
  state.conv = conv;
  history.replaceState(null, "", `#${conv.id}`);
  for (const b of document.querySelectorAll("#conversations button")) b.classList.toggle("open", b.dataset.id === conv.id);
  $("conversation").hidden = false;
  $("conv-title").textContent = conv.title || "(untitled)";
  state.events = [];
  state.lastSeq = 0;
  state.turns = [];
  state.turn = null;
  $("events").replaceChildren();
  $("turn").replaceChildren();
  $("requests").replaceChildren();
  await loadEvents();
  renderMeta();
  setAt(state.lastSeq);
  loadVerify();
  startLive();
}

function renderMeta() {
  const c = state.conv;
  $("conv-meta").textContent = `${c.id} · seq ${state.lastSeq} · created ${c.created_at.replace("T", " ").slice(0, 19)}`
    + (c.open_turn_id ? ` · open turn ${c.open_turn_id}` : "");
}

async function loadEvents() {
  const id = state.conv.id;
  let after = 0;
  for (;;) {
    const page = await api(`/v1/conversations/${id}/events`,
      { params: { after, limit: 1000, compact: $("compact").checked ? "true" : "false" } });
    if (!state.conv || state.conv.id !== id) return;
    for (const event of page.events) addEvent(event, false);
    state.lastSeq = Math.max(state.lastSeq, page.last_seq);
    if (!page.events.length || page.events[page.events.length - 1].seq >= page.last_seq) return;
    after = page.events[page.events.length - 1].seq;
  }
}

$("compact").addEventListener("change", async () => {
  if (!state.conv) return;
  stopLive();
  state.events = [];
  state.turns = [];
  $("events").replaceChildren();
  $("turn").replaceChildren();
  const turn = state.turn;
  const at = state.at;
  await loadEvents();
  if (turn) $("turn").value = turn;
  setAt(at);
  startLive();
});

function eventSummary(event) {
  const d = event.data || {};
  switch (event.type) {
    case "message.user": case "message.system":
      return typeof d.content === "string" ? d.content : JSON.stringify(d.content);
    case "text.delta": case "reasoning.delta": case "tool_call.delta": return JSON.stringify(d.text);
    case "tool_call.started": return `${d.name} ${d.tool_call_id}`;
    case "tool.result": return `${d.status} ${typeof d.content === "string" ? d.content : JSON.stringify(d.content)}`;
    case "turn.finished": return d.finish_reason;
    case "model.requested": return `step ${d.step} at_seq ${d.at_seq} ${d.model}`;
    default: return JSON.stringify(d);
  }
}

function addEvent(event, live) {
  state.events.push(event);
  const first = event.data && event.data.first_seq;
  const label = first && first !== event.seq ? `${first}–${event.seq}` : String(event.seq);
  const row = el("li", { "data-seq": event.seq, "data-first-seq": first || event.seq, "data-type": event.type,
                         title: pretty(event), onclick: () => setAt(event.seq) },
    el("span", { class: "seq" }, label), el("span", { class: "type" }, event.type),
    el("span", { class: "data" }, short(eventSummary(event))));
  if (live) row.classList.add("fresh");
  $("events").append(row);
  if (event.type === "turn.started") {
    state.turns.push(event.data.turn_id);
    $("turn").append(el("option", { value: event.data.turn_id }, `${event.data.turn_id} (seq ${event.seq})`));
  }
  if (event.type === "conversation.titled") $("conv-title").textContent = event.data.title;
}

// -- the slider ----------------------------------------------------------------------------------------

function setAt(seq) {
  const at = Math.max(1, Math.min(seq, state.lastSeq || 1));
  state.at = at;
  const slider = $("slider");
  slider.max = String(Math.max(1, state.lastSeq));
  slider.value = String(at);
  $("seq-label").textContent = `seq ${at} of ${state.lastSeq}`;
  for (const row of $("events").children) {
    const seq = Number(row.dataset.seq), first = Number(row.dataset.firstSeq);
    row.classList.toggle("current", first <= at && at <= seq);
    row.classList.toggle("past", seq < at);
    row.classList.toggle("future", first > at);
  }
  const current = $("events").querySelector("li.current");
  if (current) current.scrollIntoView({ block: "nearest" });
  loadMessages();
  chooseTurn();
}

$("slider").addEventListener("input", (e) => setAt(Number(e.target.value)));
$("prev").addEventListener("click", () => setAt(state.at - 1));
$("next").addEventListener("click", () => setAt(state.at + 1));
for (const format of ["openai", "anthropic"]) {
  $(`format-${format}`).addEventListener("click", () => {
    state.format = format;
    $("format-openai").classList.toggle("on", format === "openai");
    $("format-anthropic").classList.toggle("on", format === "anthropic");
    loadMessages();
  });
}

// -- messages as they stood ----------------------------------------------------------------------------

async function loadMessages() {
  const asked = ++state.messagesAsked;
  const { at, format } = state;
  const id = state.conv.id;
  let answer;
  try {
    answer = await api(`/v1/conversations/${id}/messages`, { params: { format, at_seq: at } });
  } catch (err) {
    if (asked === state.messagesAsked) $("messages-error").textContent = err.message;
    return;
  }
  if (asked !== state.messagesAsked) return;  // the slider moved on meanwhile
  $("messages-error").textContent = "";
  $("messages-at").textContent = `at seq ${answer.seq} · ${format}`;
  $("messages-json").textContent = pretty(answer);
  const box = $("messages");
  box.replaceChildren();
  if (format === "anthropic" && answer.system) box.append(messageCard("system", answer.system));
  for (const m of answer.messages) box.append(messageCard(m.role, m.content, m));
  if (!answer.messages.length) box.append(el("p", { class: "meta" }, "(no messages yet)"));
  box.dataset.format = format;
  box.dataset.seq = String(at);  // set last: tests wait for it
}

function messageCard(role, content, message = {}) {
  const card = el("div", { class: `msg ${role}` }, el("div", {}, el("span", { class: "role" }, role),
    el("span", { class: "meta" }, (message.name ? ` ${message.name}` : "") + (message.tool_call_id ? ` → ${message.tool_call_id}` : ""))));
  const parts = typeof content === "string" || content === null || content === undefined ? [content] : content;
  for (const part of parts) {
    if (part === null || part === undefined) continue;
    if (typeof part === "string") card.append(el("pre", {}, part));
    else if (part.type === "text") card.append(el("pre", {}, part.text));
    else if (part.type === "tool_use") card.append(el("div", { class: "call" }, `${part.name}(${JSON.stringify(part.input)}) ${part.id}`));
    else if (part.type === "tool_result") {
      const inner = typeof part.content === "string" ? part.content : JSON.stringify(part.content);
      card.append(el("div", { class: "call" }, `result for ${part.tool_use_id}${part.is_error ? " (error)" : ""}: ${inner}`));
    } else card.append(el("pre", {}, pretty(part)));
  }
  for (const call of message.tool_calls || []) {
    card.append(el("div", { class: "call" }, `${call.function.name}(${call.function.arguments}) ${call.id}`));
  }
  return card;
}

// -- what the model saw --------------------------------------------------------------------------------

function chooseTurn() {
  // the turn the slider is in (the last one started at or before it), else the first
  let turn = null;
  for (const row of $("events").querySelectorAll('li[data-type="turn.started"]')) {
    if (Number(row.dataset.seq) <= state.at) turn = state.events.find((e) => e.seq === Number(row.dataset.seq)).data.turn_id;
  }
  turn = turn || state.turns[0] || null;
  if (turn && turn !== state.turn) showTurn(turn);
}

$("turn").addEventListener("change", (e) => showTurn(e.target.value));

async function showTurn(turn) {
  state.turn = turn;
  $("turn").value = turn;
  const id = state.conv.id;
  let answer;
  try {
    answer = await api(`/v1/conversations/${id}/turns/${encodeURIComponent(turn)}/requests`);
  } catch (err) {
    if (state.turn === turn) $("requests").replaceChildren(el("p", { class: "error" }, err.message));
    return;
  }
  if (state.turn !== turn || state.conv.id !== id) return;
  const box = $("requests");
  box.replaceChildren();
  if (!answer.requests.length) {
    box.append(el("p", { class: "meta" }, "No model.requested for this turn: the built-in runner did not run it."));
  }
  for (const r of answer.requests) {
    box.append(el("div", { class: "request", "data-step": r.step, "data-matches": String(r.matches) },
      el("div", { class: "line" },
        el("strong", {}, `step ${r.step}`),
        el("button", { type: "button", title: "The messages the model was sent are these, at this seq",
                       onclick: () => setAt(r.at_seq) }, `at seq ${r.at_seq}`),
        el("span", { class: `matches ${r.matches ? "ok" : "bad"}` },
          r.matches ? "✓ matches the recorded SHA-256" : "✗ does NOT match the recorded SHA-256"),
        el("code", { class: "meta", title: r.request_sha256 }, r.request_sha256.slice(0, 12) + "…")),
      el("pre", { class: "body" }, pretty(r.body))));
  }
}

// -- verify --------------------------------------------------------------------------------------------

async function loadVerify() {
  const badge = $("verify");
  badge.className = "badge";
  badge.textContent = "verifying…";
  const id = state.conv.id;
  try {
    const v = await api(`/v1/conversations/${id}/verify`);
    if (state.conv.id !== id) return;
    badge.dataset.status = v.ok ? "ok" : "broken";
    if (v.ok) {
      badge.classList.add("ok");
      badge.textContent = `✓ chain verified through seq ${v.verified_through_seq}`;
      badge.title = `head hash ${v.head_hash}`;
    } else {
      badge.classList.add("bad");
      badge.textContent = `✗ chain broken at seq ${v.first_bad_seq}: ${v.reason}`;
    }
  } catch (err) {
    if (state.conv.id !== id) return;
    badge.dataset.status = err.status === 404 ? "unavailable" : err.status === 410 ? "erased" : "error";
    badge.textContent = err.status === 404 ? "verify: not available" : err.status === 410 ? "erased" : `verify: ${err.message}`;
  }
}
$("verify").addEventListener("click", () => state.conv && loadVerify());

// -- live ----------------------------------------------------------------------------------------------
// EventSource cannot send headers: a stream token (POST …/stream-token) goes in ?token=. It is checked when a
// stream request starts, so the page renews it before it expires and reconnects with the fresh one (resuming
// with after=, which is exact); an error answer (401 once a token expired, 503) closes an EventSource for good,
// so on that the page gets a new token and opens a new one, after the last seq it has.

function liveStatus(status) {
  const badge = $("live");
  badge.dataset.state = status;
  badge.dataset.tokens = String(state.live.tokens);
  badge.dataset.lastSeq = String(state.lastSeq);
  badge.textContent = { live: "● live", connecting: "connecting…", reconnecting: "reconnecting…", off: "not following" }[status];
}

function stopLive() {
  const live = state.live;
  live.gen += 1;
  if (live.source) live.source.close();
  live.source = null;
  clearTimeout(live.renewTimer);
  clearTimeout(live.retryTimer);
  liveStatus("off");
}

function startLive() {
  stopLive();
  state.live.backoff = 500;
  connect(state.live.gen, "connecting");
}

async function connect(gen, status) {
  const live = state.live;
  if (gen !== live.gen) return;
  liveStatus(status);
  const id = state.conv.id;
  let minted;
  try {
    minted = await api(`/v1/conversations/${id}/stream-token`, { method: "POST" });
  } catch (err) {
    if (gen === live.gen && err.status !== 401) retryLater(gen);
    return;
  }
  if (gen !== live.gen) return;
  live.tokens += 1;
  live.token = minted.token;
  live.expiresAt = Date.parse(minted.expires_at);
  if (live.source) live.source.close();  // a fresh token: reconnect with it, resuming after the last seq
  const url = new URL(`${BASE}/v1/conversations/${id}/stream`, location.origin);
  url.searchParams.set("format", "events");
  url.searchParams.set("compact", "false");
  url.searchParams.set("after", String(state.lastSeq));
  url.searchParams.set("token", minted.token);
  const source = new EventSource(url);
  live.source = source;
  for (const type of TYPES) source.addEventListener(type, (message) => onLiveEvent(gen, message));
  source.onopen = () => { if (gen === live.gen) { live.backoff = 500; liveStatus("live"); } };
  source.onerror = () => {
    if (gen !== live.gen || source !== live.source) return;
    // CONNECTING: the browser reconnects by itself (with Last-Event-ID); CLOSED: it gave up (401, 503 ...)
    if (source.readyState === EventSource.CLOSED) retryLater(gen);
    else liveStatus("reconnecting");
  };
  // renew well before it expires (two thirds of its lifetime)
  clearTimeout(live.renewTimer);
  const lifetime = Math.max(0, live.expiresAt - Date.now());
  live.renewTimer = setTimeout(() => connect(gen, "live"), Math.max(500, (lifetime * 2) / 3));
  liveStatus(source.readyState === EventSource.OPEN ? "live" : status);
}

function retryLater(gen) {
  const live = state.live;
  liveStatus("reconnecting");
  clearTimeout(live.renewTimer);
  clearTimeout(live.retryTimer);
  live.retryTimer = setTimeout(() => connect(gen, "reconnecting"), live.backoff);
  live.backoff = Math.min(live.backoff * 2, 10000);
}

function onLiveEvent(gen, message) {
  if (gen !== state.live.gen) return;
  const event = JSON.parse(message.data);
  if (event.seq <= state.lastSeq) return;  // already shown
  const following = state.at >= state.lastSeq;  // the slider was at the end: it stays there
  addEvent(event, true);
  state.lastSeq = event.seq;
  renderMeta();
  liveStatus("live");
  if (following) setAt(event.seq);
  else {
    $("slider").max = String(state.lastSeq);
    $("seq-label").textContent = `seq ${state.at} of ${state.lastSeq}`;
    const row = $("events").lastElementChild;
    row.classList.add("future");
  }
  if (event.type === "model.requested" && event.data.turn_id === state.turn) showTurn(state.turn);
  // the chain grew: verify again once events stop arriving for a moment
  clearTimeout(state.verifyTimer);
  state.verifyTimer = setTimeout(() => { if (gen === state.live.gen) loadVerify(); }, 1500);
  if (event.type === "turn.started" && !state.turn) chooseTurn();
}

// -- start ---------------------------------------------------------------------------------------------

window.addEventListener("hashchange", () => {
  const wanted = location.hash.slice(1);
  if (state.key && wanted && (!state.conv || state.conv.id !== wanted)) openConversation(wanted);
});

if (state.key) {
  loadConversations(true).then(showApp, (err) => { if (err.status !== 401) signOut(err.message); });
}
