// Small DOM helpers shared by the views: no framework, no innerHTML (nothing a dataset or class
// name contains is ever parsed as HTML).

export function h(tag, props = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value == null || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name === "class") element.className = value;
    else if (name === "data") Object.assign(element.dataset, value);
    else if (typeof value !== "string" && name in element) element[name] = value;
    else element.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child != null && child !== false) element.append(child instanceof Node ? child : String(child));
  }
  return element;
}

export const sleep = (ms, signal) => new Promise((resolve) => {
  const timer = setTimeout(resolve, ms);
  signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
});

export const percent = (x, digits = 1) => (x == null ? "—" : `${(100 * x).toFixed(digits)}%`);
export const bytes = (n) => (n < 1e6 ? `${(n / 1e3).toFixed(0)} kB` : `${(n / 1e6).toFixed(1)} MB`);
export const seconds = (s) => (s == null ? "—" : s < 90 ? `${Math.round(s)} s` : `${Math.round(s / 60)} min`);
export const when = (iso) => (iso ? new Date(iso).toLocaleString() : "—");
export const badge = (status) => h("span", { class: `badge ${status}`, data: { status } }, status);

const flashElement = () => document.getElementById("flash");
export function flash(message, kind = "error") {
  const element = flashElement();
  element.textContent = message;
  element.className = kind === "error" ? "flash" : "flash info";
  element.hidden = !message;
}
export const clearFlash = () => flash("");

// An API error as one line: its message, status and code, and the request id for the server's logs.
export function describe(error) {
  if (!error?.status && error?.status !== 0) return String(error?.message ?? error);
  const id = error.requestId ? ` (request ${error.requestId})` : "";
  return `${error.message} [${error.status} ${error.code}]${id}`;
}

// A drop target that is also a keyboard-usable file picker (and folder picker with `folder`).
// onEntries gets [{path, file}]: a folder's files keep their paths inside it.
export function dropzone({ id, label, accept, multiple = false, folder = false, onEntries }) {
  const picker = (suffix, text, props) => {
    const input = h("input", { type: "file", id: `${id}-${suffix}`, class: "visually-hidden", tabindex: "-1",
      "aria-hidden": "true", ...props });
    input.addEventListener("change", () => {
      onEntries([...input.files].map((file) => ({ path: file.webkitRelativePath || file.name, file })));
      input.value = "";
    });
    return [h("button", { type: "button", class: "secondary", onclick: () => input.click() }, text), input];
  };
  const controls = picker("files", multiple ? "Choose files…" : "Choose a file…", { accept, multiple });
  if (folder) controls.push(...picker("folder", "Choose a folder…", { webkitdirectory: true, multiple: true }));
  const zone = h("div", { class: "dropzone", id, role: "group", "aria-label": label }, h("p", {}, label),
    h("div", { class: "row" }, controls));
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", async (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    onEntries(await droppedEntries(e.dataTransfer));
  });
  return zone;
}

// What was dropped, folders walked (their entries must be taken during the drop event itself).
async function droppedEntries(transfer) {
  const roots = [...transfer.items].map((item) => item.webkitGetAsEntry?.()).filter(Boolean);
  if (!roots.length) return [...transfer.files].map((file) => ({ path: file.webkitRelativePath || file.name, file }));
  const found = [];
  async function walk(entry) {
    if (entry.isFile) {
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      found.push({ path: entry.fullPath.replace(/^\//, ""), file });
      return;
    }
    const reader = entry.createReader();
    for (;;) {  // readEntries answers in batches until an empty one
      const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
      if (!batch.length) break;
      for (const child of batch) await walk(child);
    }
  }
  for (const root of roots) await walk(root);
  return found;
}
