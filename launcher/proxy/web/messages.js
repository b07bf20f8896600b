// The conversation's elements: user and assistant messages, the line of figures under a
// reply, and notices (context drops, errors, stopped turns). Replies are rendered as
// Markdown nodes; a user's own text is shown as typed.

import { el, withClass } from "./dom.js";
import { renderMarkdown } from "./markdown.js";

const ROLE_LABEL = { user: "You", assistant: "Assistant", system: "System prompt", tool: "Tool" };

function shell(role) {
  const body = withClass(el("div"), "body");
  const node = withClass(el("article", withClass(el("div", ROLE_LABEL[role] || role), "role"), body), `msg ${role}`);
  node.dataset.role = role;
  return { node, body };
}

export function userMessage(text) {
  const { node, body } = shell("user");
  body.append(text);
  return node;
}

export function systemMessage(text) {
  const { node, body } = shell("system");
  body.append(text);
  return node;
}

export function notice(text, kind = "info") {
  const node = withClass(el("div", text), `notice ${kind}`);
  node.setAttribute("role", kind === "error" ? "alert" : "status");
  return node;
}

// An assistant reply whose text may grow (streaming): rendering is batched so a fast
// stream re-renders at most every 50 ms, and `finish()` renders the final text at once.
export class Reply {
  constructor(text = "") {
    const { node, body } = shell("assistant");
    this.node = node;
    this.body = body;
    this.text = text;
    this.timer = null;
    this.render();
  }

  static stored(text) {
    return new Reply(text).node;
  }

  append(delta) {
    this.text += delta;
    this.node.classList.add("streaming");
    if (this.timer === null) this.timer = setTimeout(() => this.render(), 50);
  }

  render() {
    clearTimeout(this.timer);
    this.timer = null;
    this.body.replaceChildren(renderMarkdown(this.text));
  }

  finish(stats) {
    this.render();
    this.node.classList.remove("streaming");
    if (stats) this.node.append(withClass(el("div", stats), "stats"));
  }

  unsaved(reason) {
    this.node.classList.add("unsaved");
    this.node.append(notice(reason, "warn"));
  }
}

// The figures under a reply: tokens, decode speed after the first token, time to it.
export function statsLine({ tokens, firstMs, totalMs, finish }) {
  const parts = [`${tokens} token${tokens === 1 ? "" : "s"}`];
  const decodeMs = totalMs - firstMs;
  if (tokens > 1 && decodeMs > 0) parts.push(`${((tokens - 1) / (decodeMs / 1000)).toFixed(1)} tokens/s`);
  if (firstMs !== null) parts.push(`first token ${Math.round(firstMs)} ms`);
  if (finish) parts.push(`finish: ${finish}`);
  return parts.join(" · ");
}

// An assistant message's tool calls as text: one `→ name(arguments)` line each.
function callsText(m) {
  return (m.tool_calls || [])
    .map((c) => `→ ${c.function?.name ?? "tool"}(${c.function?.arguments ?? ""})`)
    .join("\n");
}

// A stored conversation, as GET /v1/sessions/{id} returns it (whichever API made it: tool
// calls and their results are shown as text).
export function storedMessages(messages) {
  return messages.map((m) => {
    const content = typeof m.content === "string" ? m.content : m.content == null ? "" : JSON.stringify(m.content);
    const text = m.role === "assistant" ? [content, callsText(m)].filter(Boolean).join("\n\n") : content;
    if (m.role === "assistant") return Reply.stored(text);
    if (m.role === "system") return systemMessage(text);
    if (m.role === "user") return userMessage(text);
    const { node, body } = shell(m.role || "message");
    body.append(text);
    return node;
  });
}
