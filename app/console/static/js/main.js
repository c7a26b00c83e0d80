// The console's entry point: a hash router (#/datasets, #/jobs/<id>, ...) over the views in views/.
// Each view renders into <main> and gets an AbortSignal that fires when the user navigates away, so
// its polls and event streams stop with it.
import { api, session, whenUnauthorized } from "./api.js";
import { clearFlash, describe, flash } from "./ui.js";
import * as datasets from "./views/datasets.js";
import * as jobs from "./views/jobs.js";
import * as models from "./views/models.js";
import * as signin from "./views/signin.js";
import * as sweeps from "./views/sweeps.js";
import * as train from "./views/train.js";

const ROUTES = [
  [/^\/datasets$/, datasets.list],
  [/^\/datasets\/([\w-]+)$/, datasets.show],
  [/^\/train$/, train.form],
  [/^\/jobs$/, jobs.list],
  [/^\/jobs\/([\w-]+)$/, jobs.show],
  [/^\/models$/, models.list],
  [/^\/models\/([^/]+)$/, models.show],
  [/^\/sweeps$/, sweeps.list],
  [/^\/sweeps\/([\w-]+)$/, sweeps.show],
];

let current = null;

async function route() {
  current?.abort();
  current = new AbortController();
  const { signal } = current;
  const view = document.getElementById("view");
  view.replaceChildren();
  const signedIn = Boolean(session.key);
  document.getElementById("nav").hidden = !signedIn;
  document.getElementById("sign-out").hidden = !signedIn;
  if (!signedIn) {
    document.getElementById("who").textContent = "";
    signin.form(view, { onSignedIn: () => { clearFlash(); showWho(); location.hash = "#/datasets"; route(); } });
    return;
  }
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const found = ROUTES.map(([pattern, render]) => [path.match(pattern), render]).find(([match]) => match);
  if (!found) {
    location.replace("#/datasets");
    return;
  }
  for (const link of document.querySelectorAll("#nav a")) {
    if (path.startsWith(link.getAttribute("href").slice(1))) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const [match, render] = found;
  try {
    await render(view, { id: match[1] && decodeURIComponent(match[1]), query: new URLSearchParams(query), signal });
  } catch (error) {
    if (!signal.aborted && error.status !== 401) flash(describe(error));
  }
}

async function showWho() {
  try {
    const me = await api("/me");
    document.getElementById("who").textContent = `${me.tenant.name} · key ${me.key.prefix}…`;
  } catch { /* a refused key is handled by whenUnauthorized */ }
}

whenUnauthorized((error) => {
  session.signOut();
  flash(`Signed out: the server refused the key (${error.message}). Sign in again.`);
  route();
});

document.getElementById("sign-out").addEventListener("click", () => {
  session.signOut();
  flash("Signed out.", "info");
  route();
});

window.addEventListener("hashchange", () => { clearFlash(); route(); });
if (session.key) showWho();
route();
