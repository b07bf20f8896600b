// The settings form and the browser's storage: the API key (sent as a bearer token), the
// system prompt, sampling settings and extra request fields. Nothing here leaves the browser
// except in the requests the page makes to this server.
//
// The key lives in this tab's session storage (gone when the tab closes) unless the person
// ticks "remember": then it is also in local storage, for every tab and after a restart.
// Unticking removes it from local storage. The other settings hold no secret: local storage.

const KEY_ITEM = "llmup.apiKey"; // session storage; an older page kept it in local storage
const REMEMBERED_KEY_ITEM = "llmup.rememberedKey"; // local storage, only when ticked
const SETTINGS_ITEM = "llmup.settings";
const FIELDS = {
  systemPrompt: "system-prompt",
  temperature: "temperature",
  topP: "top-p",
  maxTokens: "max-tokens",
  extra: "extra",
};

function readItem(name, storage = "localStorage") {
  try {
    return window[storage].getItem(name);
  } catch {
    return null; // storage disabled: settings last for this page only
  }
}

function writeItem(name, value, storage = "localStorage") {
  try {
    if (value) window[storage].setItem(name, value);
    else window[storage].removeItem(name);
  } catch {
    // storage disabled or full: keep the values in the form
  }
}

// A key an older page left in local storage without being asked: this tab keeps it, the
// browser forgets it (tick "remember" to keep it there).
function forgetUnaskedKey() {
  const old = readItem(KEY_ITEM);
  if (old === null) return;
  if (readItem(KEY_ITEM, "sessionStorage") === null) writeItem(KEY_ITEM, old, "sessionStorage");
  writeItem(KEY_ITEM, null);
}

function storedKey() {
  return readItem(KEY_ITEM, "sessionStorage") ?? readItem(REMEMBERED_KEY_ITEM);
}

export class Settings {
  constructor(form) {
    this.form = form;
    this.keyInput = form.querySelector("#api-key");
    this.rememberInput = form.querySelector("#remember-key");
    this.values = {};
    forgetUnaskedKey();
    this.load();
  }

  get apiKey() {
    return storedKey() ?? this.keyInput.value.trim();
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
    this.keyInput.value = storedKey() ?? "";
    this.rememberInput.checked = readItem(REMEMBERED_KEY_ITEM) !== null;
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
    const key = this.keyInput.value.trim();
    writeItem(KEY_ITEM, key, "sessionStorage");
    writeItem(REMEMBERED_KEY_ITEM, this.rememberInput.checked ? key : null);
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
