// The console's only way to the server: ordinary /v1 calls with the signed-in user's key in the
// Authorization header. The key lives in sessionStorage (gone with the tab), never in a URL or
// localStorage; images that need the key are fetched here and shown as blob: URLs.

const KEY = "visiontune.apiKey";

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  signIn(key) { sessionStorage.setItem(KEY, key); },
  signOut() { sessionStorage.removeItem(KEY); },
};

export class ApiError extends Error {
  constructor(status, code, message, requestId) {
    super(message);
    this.status = status;
    this.code = code;
    this.requestId = requestId;
  }
}

let onUnauthorized = () => {};
export function whenUnauthorized(handler) { onUnauthorized = handler; }

function authorization(headers = {}) {
  return { Authorization: `Bearer ${session.key}`, ...headers };
}

async function errorOf(response) {
  let body = null;
  try { body = (await response.json()).error; } catch { /* not the API's JSON envelope (a proxy's page) */ }
  const error = new ApiError(response.status, body?.code ?? "http_error",
    body?.message ?? `${response.status} ${response.statusText}`, response.headers.get("X-Request-ID"));
  if (response.status === 401) onUnauthorized(error);
  return error;
}

export async function api(path, { method = "GET", json, body, headers, signal, raw = false } = {}) {
  const sent = authorization(headers);
  if (json !== undefined) {
    sent["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const response = await fetch(`/v1${path}`, { method, headers: sent, body, signal });
  if (!response.ok) throw await errorOf(response);
  if (raw) return response;
  return response.status === 204 ? null : response.json();
}

// A path segment per part: dataset image paths keep their slashes ("val/bees/1.jpg").
export function pathOf(relative) {
  return relative.split("/").map(encodeURIComponent).join("/");
}

export async function blobUrl(path, signal) {
  const response = await api(path, { signal, raw: true });
  return URL.createObjectURL(await response.blob());
}

// fetch() cannot report upload progress; XMLHttpRequest can.
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", `/v1${path}`);
    request.setRequestHeader("Authorization", `Bearer ${session.key}`);
    request.upload.addEventListener("progress", (e) => onProgress(e.loaded, e.lengthComputable ? e.total : null));
    request.addEventListener("load", () => {
      let body = null;
      try { body = JSON.parse(request.responseText); } catch { /* handled below */ }
      if (request.status >= 200 && request.status < 300) return resolve(body);
      const error = new ApiError(request.status, body?.error?.code ?? "http_error",
        body?.error?.message ?? `${request.status} ${request.statusText}`, request.getResponseHeader("X-Request-ID"));
      if (request.status === 401) onUnauthorized(error);
      reject(error);
    });
    request.addEventListener("error", () => reject(new ApiError(0, "network", "The upload broke off: is the server reachable?")));
    request.send(form);
  });
}

// Server-Sent Events over fetch (EventSource cannot send an Authorization header): yields
// {event, data, id} per event, until the server closes the stream.
export async function* events(path, { lastEventId, signal } = {}) {
  const headers = authorization({ Accept: "text/event-stream" });
  if (lastEventId) headers["Last-Event-ID"] = lastEventId;
  const response = await fetch(`/v1${path}`, { headers, signal });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { event: "message", data: [], id: null };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    // A line ends at \r\n, \n or \r; a \r last in the buffer may be half of a \r\n still to come.
    while ((end = /\r\n|\n|\r(?!$)/.exec(buffer))) {
      const line = buffer.slice(0, end.index);
      buffer = buffer.slice(end.index + end[0].length);
      if (line === "") {
        if (event.data.length) yield { event: event.event, data: event.data.join("\n"), id: event.id };
        event = { event: "message", data: [], id: null };
      } else if (!line.startsWith(":")) {  // ":" starts a keep-alive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") event.data.push(text);
        else if (field === "event") event.event = text;
        else if (field === "id") event.id = text;
      }
    }
  }
}
