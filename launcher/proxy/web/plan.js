// The plan behind the served model, from GET /v1/plan (or /health's summary without a key):
// size, quantization, backend, context, memory per device and, when the plan carries them,
// the expected speeds.

import { el } from "./dom.js";

const OFFLOAD = { full: "all layers on the accelerator", partial: "partly offloaded", cpu: "CPU only" };

function mib(value) {
  if (typeof value !== "number") return "";
  return value >= 1024 ? `${(value / 1024).toFixed(1)} GiB` : `${value} MiB`;
}

function parameters(n) {
  if (typeof n !== "number" || n <= 0) return "";
  const [div, unit] = n >= 1e9 ? [1e9, "B"] : n >= 1e6 ? [1e6, "M"] : [1e3, "K"];
  return `${(n / div).toFixed(n / div < 10 ? 1 : 0)} ${unit} parameters`;
}

function bytes(n) {
  return typeof n === "number" && n > 0 ? `${(n / 1e9).toFixed(1)} GB` : "";
}

// Expected speeds: any `*tokens_per_s` number on the plan itself or under `speed`,
// `expected_speed` or `expected`, labelled by what its name says it measures.
export function speedsOf(plan) {
  const found = [];
  const places = [plan, plan?.speed, plan?.expected_speed, plan?.expected];
  for (const place of places) {
    if (!place || typeof place !== "object") continue;
    for (const [key, value] of Object.entries(place)) {
      if (typeof value !== "number" || !/tokens?_per_s/.test(key)) continue;
      const what = /prompt|prefill/.test(key) ? "prompt" : /decode|gen|output/.test(key) ? "decode" : key;
      if (!found.some((f) => f.what === what)) found.push({ what, value });
    }
  }
  return found;
}

function speedText(plan) {
  return speedsOf(plan)
    .map(({ what, value }) => `~${value >= 100 ? Math.round(value) : value.toFixed(1)} tokens/s ${what}`)
    .join(", ");
}

// The plan's warning when it is expected to decode below reading speed, with the flag that
// would serve something faster shown as code: `--min-tokens-per-s 5` in the message.
export function speedWarning(plan) {
  const message = plan?.speed_warning?.message;
  if (typeof message !== "string" || !message) return null;
  return message.split("`").map((part, i) => (i % 2 ? el("code", part) : part));
}

export function showSpeedWarning(node, plan) {
  const parts = speedWarning(plan);
  node.hidden = !parts;
  node.replaceChildren(...(parts || []));
}

// One line for the top bar: "Q4_K_M · llama.cpp · 4096 ctx · CPU only · 3.9 GiB".
export function planLine(plan, context) {
  if (!plan) return context ? `context ${context}` : "";
  const parts = [plan.quant, plan.backend, `context ${plan.context ?? context}`,
    OFFLOAD[plan.placement?.offload ?? plan.offload] ?? "", mib(plan.memory_mib?.total), speedText(plan)];
  return parts.filter(Boolean).join(" · ");
}

function facts(plan, info) {
  const rows = [
    ["Model", [plan.model?.label || plan.model?.id || info.model, parameters(plan.model?.params)].filter(Boolean).join(", ")],
    ["Weights", [plan.format?.toUpperCase(), plan.quant,
      plan.bits_per_weight ? `${plan.bits_per_weight} bits/weight` : ""].filter(Boolean).join(" ")],
    ["Backend", plan.backend],
    ["Context", `${plan.context ?? info.context} tokens${plan.parallel ? `, ${plan.parallel} sequences` : ""}`],
    ["Placement", [OFFLOAD[plan.placement?.offload] ?? "",
      plan.placement?.n_gpu_layers ? `${plan.placement.n_gpu_layers} layers offloaded` : ""].filter(Boolean).join(", ")],
    ["Expected speed", speedText(plan)],
    ["Below reading speed", speedWarning(plan)],
    ["Source", plan.source?.repo_id
      ? `${plan.source.repo_id} (${(plan.source.files || []).join(", ")}) ${bytes(plan.source.download_bytes)}`
      : plan.source?.local_path || ""],
  ];
  const dl = el("dl", ...rows.filter(([, v]) => v).flatMap(([k, v]) => [el("dt", k), el("dd", ...[v].flat())]));
  dl.className = "facts";
  return dl;
}

function deviceName(d) {
  return [d.device, d.name].filter(Boolean).join(" ");
}

function memoryTable(plan) {
  const p = plan.placement || {};
  const table = el("table");
  table.className = "memory";
  table.append(el("caption", "Memory per device"));
  table.append(el("thead", el("tr", el("th", "device"), el("th", "layers"), el("th", "need"), el("th", "budget"))));
  const body = el("tbody");
  for (const d of p.devices || []) {
    body.append(el("tr", el("td", deviceName(d)), el("td", d.layers ?? ""), el("td", mib(d.need_mib)), el("td", mib(d.budget_mib))));
  }
  if (p.ram_need_mib || !(p.devices || []).length) {
    body.append(el("tr", el("td", "RAM"), el("td", ""), el("td", mib(p.ram_need_mib)), el("td", mib(p.ram_budget_mib))));
  }
  table.append(body);
  const m = plan.memory_mib;
  if (m) {
    const split = ["weights", "kv_cache", "compute", "overhead"].filter((k) => m[k] !== undefined)
      .map((k) => `${k.replace("_", " ")} ${mib(m[k])}`).join(", ");
    table.append(el("tfoot", el("tr", el("td", "total"), el("td", ""), el("td", mib(m.total)), el("td", split))));
  }
  return table;
}

// The panel: a heading, the facts, the memory table (or a note when there is no plan).
export function renderPlan(panel, info) {
  const plan = info?.plan;
  const children = [el("h2", info?.model || "Served model")];
  if (plan) {
    children.push(facts(plan, info), memoryTable(plan));
  } else {
    const note = el("p", `No plan: this server was started without one. Context ${info?.context ?? "?"} tokens.`);
    note.className = "muted";
    children.push(note);
  }
  panel.replaceChildren(...children);
}
