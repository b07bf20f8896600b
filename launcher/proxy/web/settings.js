// The settings form and local storage: the API key (sent as a bearer token), the system
// prompt, sampling settings and extra request fields. Nothing here leaves the browser except
// in the requests the page makes to this server.

const KEY_ITEM = "llmup.apiKey";
const SETTINGS_ITEM = "llmup.settings";
const FIELDS = {
  systemPrompt: "system-prompt",
  temperature: "temperature",
  topP: "top-p",
  maxTokens: "max-tokens",
  extra: "extra",
};

function readItem(name) {
  try {
    return localStorage.getItem(name);
  } catch {
    return null; // storage disabled: settings last for this page only
  }
}

function writeItem(name, value) {
  try {
    if (value) localStorage.setItem(name, value);
    else localStorage.removeItem(name);
  } catch {
    // storage disabled or full: keep the values in the form
  }
}

export class Settings {
  constructor(form) {
    this.form = form;
    this.keyInput = form.querySelector("#api-key");
    this.values = {};
    this.load();
  }

  get apiKey() {
    return readItem(KEY_ITEM) ?? this.keyInput.value.trim();
  }

  get systemPrompt() {
    return (this.values.systemPrompt || "").trim();
  }

  field(name) {
    return this.form.querySelector(`#${FIELDS[name]}`);
  }

  load() {
    let stored = {};
    try {
      stored = JSON.parse(readItem(SETTINGS_ITEM) || "{}") || {};
    } catch {
      stored = {};
    }
    for (const name of Object.keys(FIELDS)) this.field(name).value = stored[name] ?? "";
    this.keyInput.value = readItem(KEY_ITEM) ?? "";
    this.values = stored;
  }

  // Store the form's values; returns a sentence saying what is wrong, or null.
  save() {
    const values = {};
    for (const name of Object.keys(FIELDS)) values[name] = this.field(name).value;
    const problem = extraFields(values.extra).problem; // numbers: the inputs' own min/max/step
    if (problem) return problem;
    this.values = values;
    writeItem(SETTINGS_ITEM, JSON.stringify(values));
    writeItem(KEY_ITEM, this.keyInput.value.trim());
    return null;
  }


  // The request fields the settings add to every chat completion.
  requestFields() {
    const fields = { ...extraFields(this.values.extra).fields };
    const number = (name) => String(this.values[name] ?? "").trim();
    if (number("temperature")) fields.temperature = Number(number("temperature"));
    if (number("topP")) fields.top_p = Number(number("topP"));
    if (number("maxTokens")) fields.max_tokens = Number(number("maxTokens"));
    return fields;
  }
}

function extraFields(text) {
  if (!text || !text.trim()) return { fields: {}, problem: null };
  try {
    const fields = JSON.parse(text);
    if (fields && typeof fields === "object" && !Array.isArray(fields)) return { fields, problem: null };
  } catch {
    // fall through
  }
  return { fields: {}, problem: 'extra request fields must be a JSON object, e.g. {"seed": 1}' };
}
