// The llmup API as the page uses it: the same public routes as any OpenAI client, with the
// key from the settings as a bearer token. Paths are relative, so the page also works
// behind a reverse proxy that serves llmup under a prefix.

export const DROPPED_HEADER = "X-Llmup-Context-Dropped";

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code || null;
  }

  describe() {
    return `${this.status ? `${this.status}: ` : ""}${this.message}${this.code ? ` (${this.code})` : ""}`;
  }
}

async function errorFrom(response) {
  let message = response.statusText || "request failed";
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
    }
  } catch {
    // not JSON: keep the status text
  }
  return new ApiError(response.status, message, code);
}

export class Api {
  constructor(keySource) {
    this.keySource = keySource;
  }

  headers(extra = {}) {
    const key = this.keySource();
    return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
  }

  async request(method, path, body, extraHeaders = {}, signal = undefined) {
    const init = { method, headers: this.headers(extraHeaders), signal, cache: "no-store" };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers["Content-Type"] = "application/json";
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, `the server cannot be reached (${err.message})`, null);
    }
    if (!response.ok) throw await errorFrom(response);
    return response;
  }

  async json(method, path, body) {
    return (await this.request(method, path, body)).json();
  }

  // With the key /health tells the model, plan and backend state; without one (when the
  // server has keys) only its status.
  health() {
    return fetch("health", { headers: this.headers(), cache: "no-store" }).then(async (r) => ({
      ok: r.ok,
      body: await r.json().catch(() => null),
    }));
  }

  plan() { return this.json("GET", "v1/plan"); }
  models() { return this.json("GET", "v1/models"); }
  sessions() { return this.json("GET", "v1/sessions"); }
  session(id) { return this.json("GET", `v1/sessions/${encodeURIComponent(id)}`); }
  deleteSession(id) { return this.json("DELETE", `v1/sessions/${encodeURIComponent(id)}`); }

  // POST a streamed chat completion in session `sessionId`; `onChunk` gets every parsed
  // event. Resolves with the response headers once the stream ended with [DONE].
  async chat(body, sessionId, signal, onChunk) {
    const response = await this.request(
      "POST", "v1/chat/completions", body, { "X-Session-Id": sessionId }, signal,
    );
    const headers = response.headers;
    onChunk({ headers });
    await readEvents(response.body, (data) => {
      if (data.error) throw new ApiError(0, data.error.message || "the stream failed", data.error.code);
      onChunk({ data });
    });
    return headers;
  }
}

// Server-sent events: `data: <json>` lines, blank-line separated, ending with `data: [DONE]`.
async function readEvents(stream, onData) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split(/\r?\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data:")) continue;
        const payload = line.slice(5).trim();
        if (payload === "[DONE]") return;
        onData(JSON.parse(payload));
      }
    }
  } catch (err) {
    reader.cancel().catch(() => {});
    throw err;
  }
  throw new ApiError(0, "the stream ended before the reply was complete", "stream_incomplete");
}
