// The chat page: conversations are llmup sessions kept on the server (the sidebar is
// GET /v1/sessions; the open one's id is in the address, so a reload continues it), replies
// stream from /v1/chat/completions, and Stop aborts the request, which ends the backend's
// generation and leaves the turn unsaved.

import { Api, ApiError, DROPPED_HEADER } from "./api.js";
import { el, withClass } from "./dom.js";
import { Reply, notice, statsLine, storedMessages, userMessage } from "./messages.js";
import { planLine, renderPlan, showSpeedWarning } from "./plan.js";
import { Settings } from "./settings.js";

const $ = (id) => document.getElementById(id);
const ui = {
  app: $("app"),
  messages: $("messages"),
  prompt: $("prompt"),
  composer: $("composer"),
  send: $("send"),
  stop: $("stop"),
  sessions: $("sessions"),
  sessionsNote: $("sessions-note"),
  banner: $("banner"),
  plan: $("plan"),
  planLine: $("plan-line"),
  speedWarning: $("speed-warning"),
  settings: $("settings"),
  modelName: $("model-name"),
  backendState: $("backend-state"),
  scrim: $("scrim"),
};
const settings = new Settings(ui.settings);
const api = new Api(() => settings.apiKey);
// `view` counts what changed the conversation on screen (opening one, sending), so a slow
// GET of a session never overwrites a turn begun meanwhile.
const state = {
  sessionId: null, model: null, controller: null, known: new Map(), rendered: 0, view: 0, opening: null,
};
const HEALTH_EVERY_MS = 5000;
const STATE_KIND = { ready: "ok", loading: "warn", starting: "warn", restarting: "warn" };

// ----- small helpers

function newSessionId() {
  const bytes = crypto.getRandomValues(new Uint8Array(9));
  return `web-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

function sessionFromHash() {
  const match = location.hash.match(/^#session=([A-Za-z0-9][A-Za-z0-9._:@-]{0,127})$/);
  return match ? match[1] : null;
}

function showBanner(text, kind = "error") {
  ui.banner.replaceChildren(text);
  ui.banner.className = `banner ${kind}`;
  ui.banner.hidden = false;
}

function clearBanner() {
  ui.banner.hidden = true;
}

function scrollDown(force = false) {
  const m = ui.messages;
  if (force || m.scrollHeight - m.scrollTop - m.clientHeight < 120) m.scrollTop = m.scrollHeight;
}

function togglePanel(panel, button, open = panel.hidden) {
  panel.hidden = !open;
  button.setAttribute("aria-expanded", String(open));
}

function toggleSidebar(open = !ui.app.classList.contains("sidebar-open")) {
  ui.app.classList.toggle("sidebar-open", open);
  ui.scrim.hidden = !open;
  $("toggle-sidebar").setAttribute("aria-expanded", String(open));
}

// A 401 means the key is missing or wrong: say so and put the cursor where the key goes.
function reportError(err, what) {
  if (!(err instanceof ApiError)) throw err;
  if (err.status === 401) {
    showBanner(`${err.describe()}: enter this server's API key in Settings.`);
    togglePanel(ui.settings, $("toggle-settings"), true);
    $("api-key").focus();
  } else {
    showBanner(`${what}: ${err.describe()}`);
  }
}

function ago(seconds) {
  const s = Math.max(0, Date.now() / 1000 - seconds);
  if (s < 60) return "just now";
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(seconds * 1000).toLocaleDateString();
}

// ----- the backend's state, the model and its plan

async function pollHealth() {
  let body = null;
  try {
    body = (await api.health()).body;
  } catch {
    body = null;
  }
  const status = body?.status === "ok" ? "ready" : body?.status; // /health without the key
  const backendState = body?.backend?.state ?? status ?? "unreachable";
  ui.backendState.textContent = backendState;
  ui.backendState.className = `state ${STATE_KIND[backendState] || "bad"}`;
  if (body?.model) {
    state.model = body.model;
    ui.modelName.textContent = body.model;
  }
  if (body && !ui.planLine.dataset.full) {
    ui.planLine.textContent = planLine(body.plan, body.context);
    showSpeedWarning(ui.speedWarning, body.plan);
  }
}

async function modelId() {
  if (!state.model) state.model = (await api.models()).data[0].id;
  return state.model;
}

async function loadPlan() {
  try {
    const info = await api.plan();
    renderPlan(ui.plan, info);
    ui.planLine.textContent = planLine(info.plan, info.context);
    showSpeedWarning(ui.speedWarning, info.plan);
    ui.planLine.dataset.full = "1";
    if (info.model) ui.modelName.textContent = info.model;
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    ui.plan.replaceChildren(notice(`The plan needs the API key: ${err.describe()}`, "error"));
  }
}

// ----- the sidebar: the sessions of this key

function sessionItem(info) {
  const title = info.title || "(no messages)";
  const open = withClass(el("button", withClass(el("span", title), "title"),
    withClass(el("span", `${ago(info.updated)} · ${info.turns} turn${info.turns === 1 ? "" : "s"}`), "when")), "open");
  open.type = "button";
  open.addEventListener("click", () => { openSession(info.id); toggleSidebar(false); });
  const remove = withClass(el("button", "\u00d7"), "delete");
  remove.type = "button";
  remove.title = "Delete this conversation";
  remove.setAttribute("aria-label", `Delete conversation: ${title}`);
  remove.addEventListener("click", () => deleteSession(info.id, title));
  const item = el("li", open, remove);
  item.dataset.id = info.id;
  item.classList.toggle("active", info.id === state.sessionId);
  return item;
}

async function refreshSessions() {
  let list;
  try {
    list = (await api.sessions()).data;
  } catch (err) {
    reportError(err, "Cannot list the conversations");
    return;
  }
  state.known = new Map(list.map((s) => [s.id, s]));
  ui.sessions.replaceChildren(...list.map(sessionItem));
  ui.sessionsNote.textContent = list.length ? "" : "No conversations yet.";
}

function markActive() {
  for (const item of ui.sessions.children) item.classList.toggle("active", item.dataset.id === state.sessionId);
}

async function deleteSession(id, title) {
  if (!confirm(`Delete the conversation "${title}"? This cannot be undone.`)) return;
  try {
    await api.deleteSession(id);
  } catch (err) {
    reportError(err, "Cannot delete the conversation");
    return;
  }
  if (id === state.sessionId) newChat();
  await refreshSessions();
}

// ----- opening a conversation

function setSession(id) {
  state.sessionId = id;
  history.replaceState(null, "", `#session=${id}`);
  markActive();
}

function newChat() {
  if (state.controller) return;
  state.view += 1;
  setSession(newSessionId());
  state.rendered = 0;
  ui.messages.replaceChildren();
  ui.prompt.focus();
}

function openSession(id) {
  if (state.controller) return Promise.resolve();
  state.opening = showSession(id);
  return state.opening;
}

async function showSession(id) {
  const view = ++state.view;
  setSession(id);
  ui.messages.replaceChildren();
  let messages = [];
  try {
    messages = (await api.session(id)).messages;
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 404)) reportError(err, "Cannot open the conversation");
  }
  if (view !== state.view) return; // another one was opened, or a turn begun, meanwhile
  ui.messages.replaceChildren(...storedMessages(messages));
  state.rendered = messages.length;
  scrollDown(true);
}

// ----- a turn

function setStreaming(controller) {
  state.controller = controller;
  ui.send.hidden = Boolean(controller);
  ui.stop.hidden = !controller;
  ui.app.classList.toggle("busy", Boolean(controller));
}

function showDropped(headers, before) {
  const dropped = parseInt(headers.get(DROPPED_HEADER) || "0", 10);
  if (dropped > 0) {
    const turns = dropped === 1 ? "1 older turn was" : `${dropped} older turns were`;
    const node = notice(`${turns} left out of the prompt to fit the model's context (still stored here).`, "warn");
    node.classList.add("dropped");
    ui.messages.insertBefore(node, before);
  }
}

function requestBody(text, model) {
  const system = settings.systemPrompt;
  const messages = [...(system ? [{ role: "system", content: system }] : []), { role: "user", content: text }];
  return { ...settings.requestFields(), model, messages, stream: true, stream_options: { include_usage: true } };
}

function failTurn(err, text, userNode, reply, figures) {
  userNode.classList.add("unsaved");
  if (err.name === "AbortError") {
    reply.finish(`${figures()} · stopped`);
    reply.unsaved("Stopped: this turn (your message and the partial reply) was not saved.");
    return;
  }
  if (reply.text) reply.finish(figures());
  else reply.node.remove();
  const what = err instanceof ApiError ? err.describe() : `in the page: ${err.message}`;
  ui.messages.append(notice(`Error${err.status ? " " : ": "}${what}. This turn was not saved.`, "error"));
  if (!ui.prompt.value) ui.prompt.value = text;
  if (err.status === 401) reportError(err, "");
}

async function send() {
  const text = ui.prompt.value;
  if (!text.trim() || state.controller) return;
  const userNode = userMessage(text);
  const reply = new Reply();
  const controller = new AbortController();
  setStreaming(controller);
  await state.opening?.catch(() => {}); // a conversation still loading shows before the turn
  state.view += 1;
  const run = { tokens: 0, firstMs: null, finish: null, usage: null, t0: performance.now() };
  const figures = () => statsLine({
    tokens: run.usage?.completion_tokens ?? run.tokens, firstMs: run.firstMs,
    totalMs: performance.now() - run.t0, finish: run.finish,
  });
  try {
    clearBanner();
    ui.prompt.value = "";
    ui.messages.append(userNode, reply.node);
    scrollDown(true);
    const body = requestBody(text, await modelId());
    await api.chat(body, state.sessionId, controller.signal, ({ headers, data }) => {
      if (headers) return showDropped(headers, userNode);
      const choice = data.choices?.[0];
      const delta = choice?.delta?.content;
      if (delta) {
        if (run.firstMs === null) run.firstMs = performance.now() - run.t0;
        run.tokens += 1;
        reply.append(delta);
        scrollDown();
      }
      if (choice?.finish_reason) run.finish = choice.finish_reason;
      if (data.usage) run.usage = data.usage;
    });
    reply.finish(figures());
  } catch (err) {
    failTurn(err, text, userNode, reply, figures);
  } finally {
    setStreaming(null);
    await refreshSessions();
    markActive();
    state.rendered = state.known.get(state.sessionId)?.message_count ?? state.rendered;
  }
}

function stop() {
  if (state.controller) state.controller.abort();
}

// Another tab or browser may have added turns: reload the open conversation if so.
async function catchUp() {
  await refreshSessions();
  const info = state.known.get(state.sessionId);
  if (info && info.message_count !== state.rendered && !state.controller) await openSession(state.sessionId);
}

// ----- wiring

function onPromptKey(event) {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing && !event.altKey && !event.ctrlKey && !event.metaKey) {
    event.preventDefault();
    send();
  }
}

async function onSaveSettings(event) {
  event.preventDefault();
  const problem = settings.save();
  if (problem) {
    showBanner(problem);
    return;
  }
  clearBanner();
  togglePanel(ui.settings, $("toggle-settings"), false);
  await refreshSessions();
  await openSession(state.sessionId);
  await loadPlan();
}

function wire() {
  ui.composer.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  ui.prompt.addEventListener("keydown", onPromptKey);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") stop(); });
  ui.stop.addEventListener("click", stop);
  ui.settings.addEventListener("submit", onSaveSettings);
  $("new-chat").addEventListener("click", () => { newChat(); toggleSidebar(false); });
  $("toggle-sidebar").addEventListener("click", () => toggleSidebar());
  ui.scrim.addEventListener("click", () => toggleSidebar(false));
  $("toggle-plan").addEventListener("click", () => togglePanel(ui.plan, $("toggle-plan")));
  $("toggle-settings").addEventListener("click", () => togglePanel(ui.settings, $("toggle-settings")));
  window.addEventListener("hashchange", () => {
    const id = sessionFromHash();
    if (id && id !== state.sessionId) openSession(id);
  });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) catchUp(); });
  window.addEventListener("storage", (e) => { if (e.key?.startsWith("llmup.")) { settings.load(); catchUp(); } });
  setInterval(() => { if (!document.hidden) pollHealth(); }, HEALTH_EVERY_MS);
}

async function start() {
  wire();
  await pollHealth();
  const id = sessionFromHash();
  if (id) await openSession(id);
  else newChat();
  await refreshSessions();
  markActive();
  await loadPlan();
  document.body.dataset.ready = "1";
}

start();
