// Sign in with an API key: checked against GET /v1/me before it is kept (sessionStorage only).
import { session } from "../api.js";
import { h } from "../ui.js";

export function form(view, { onSignedIn }) {
  const key = h("input", { type: "password", id: "api-key", name: "api-key", autocomplete: "off", required: true,
    spellcheck: "false", size: "60" });
  const error = h("p", { class: "error", id: "signin-error", role: "alert" });
  const submit = h("button", { type: "submit", id: "sign-in" }, "Sign in");
  const signIn = async (event) => {
    event.preventDefault();
    error.textContent = "";
    submit.disabled = true;
    try {
      // The key goes in the header, never the URL.
      const response = await fetch("/v1/me", { headers: { Authorization: `Bearer ${key.value.trim()}` } });
      if (response.ok) {
        session.signIn(key.value.trim());
        onSignedIn();
        return;
      }
      const body = await response.json().catch(() => null);
      error.textContent = response.status === 401
        ? `That key was not accepted: it is wrong or has been revoked. (${body?.error?.message ?? "401"})`
        : `The server answered ${response.status}: ${body?.error?.message ?? response.statusText}`;
    } catch {
      error.textContent = "The server could not be reached.";
    } finally {
      submit.disabled = false;
    }
  };
  view.append(h("h1", {}, "Sign in"), h("form", { class: "card", id: "signin-form", onsubmit: signIn },
    h("label", { for: "api-key" }, "API key"),
    h("p", { class: "muted" }, "The key `visiontune up` printed, or one made with `visiontune keys`. It is kept in this browser tab only."),
    h("div", { class: "row" }, key, submit), error));
  key.focus();
}
