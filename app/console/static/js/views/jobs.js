// Jobs: the list, and a job's page that follows it live over its event stream (SSE): status, phase,
// ETA, the training curves as epochs end, the events, and a cancel button.
import { api, events } from "../api.js";
import { Curves } from "../charts.js";
import { badge, describe, h, percent, seconds, sleep, when } from "../ui.js";

const TERMINAL = ["succeeded", "failed", "cancelled"];

export async function list(view, { signal }) {
  const { data } = await api("/jobs?limit=100", { signal });
  const rows = data.map((j) => h("tr", {}, h("td", {}, h("a", { href: `#/jobs/${j.id}` }, j.id)), h("td", {}, badge(j.status)),
    h("td", {}, j.backbone), h("td", {}, j.strategy), h("td", { class: "num" }, percent(j.metrics?.val_accuracy)),
    h("td", {}, when(j.created_at))));
  view.append(h("h1", {}, "Jobs"), h("p", {}, h("a", { href: "#/train" }, "Start a new one →")),
    h("div", { class: "card" }, h("table", { id: "jobs" }, h("thead", {}, h("tr", {},
      ["Job", "Status", "Backbone", "Strategy", "Val accuracy", "Created"].map((t) => h("th", {}, t)))),
    h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: "6", class: "muted" }, "No jobs yet."))))));
}

export async function show(view, { id, signal }) {
  let job = await api(`/jobs/${id}`, { signal });
  const status = h("span", { id: "job-status" });
  const facts = h("dl", { class: "grid", id: "job-facts" });
  const cancel = h("button", { type: "button", class: "danger", id: "cancel-job" }, "Cancel");
  const result = h("p", { id: "job-result" });
  const chart = h("div", { class: "chart", id: "job-curves", role: "img", "aria-label": "Train loss and validation accuracy per epoch" });
  const log = h("ol", { class: "events", id: "job-events" });
  view.append(h("h1", {}, `Job ${job.id} `, status), h("section", { class: "card" }, facts, h("div", { class: "row" }, cancel), result),
    h("section", { class: "card" }, h("h2", {}, "Training curves"), chart),
    h("section", { class: "card" }, h("h2", {}, "Events"), log));
  const curves = new Curves(chart);
  let progress = job.progress;

  const fact = (term, value) => [h("dt", { class: "muted" }, term), h("dd", {}, value)];
  const render = () => {
    status.replaceChildren(badge(job.status));
    const strategy = job.strategy_reason ? `${job.strategy} (${job.strategy_reason})` : job.strategy;
    facts.replaceChildren(h("div", {}, fact("Phase", h("span", { id: "job-phase" }, progress.phase))),
      h("div", {}, fact("Epoch", `${progress.epoch} / ${progress.epochs || "?"}`)),
      h("div", {}, fact("ETA", h("span", { id: "job-eta" }, seconds(progress.eta_seconds)))),
      h("div", {}, fact("Images/s", progress.images_per_second?.toFixed(1) ?? "—")),
      h("div", {}, fact("Backbone", job.backbone)), h("div", {}, fact("Strategy", h("span", { id: "job-strategy" }, strategy))),
      h("div", {}, fact("Dataset", h("a", { href: `#/datasets/${job.dataset_id}` }, job.dataset_id))));
    cancel.hidden = TERMINAL.includes(job.status);
    result.replaceChildren();
    if (job.model_id) result.append("Model: ", h("a", { href: `#/models/${job.model_id}`, id: "job-model" }, job.model_id),
      ` · validation accuracy ${percent(job.metrics.val_accuracy)}`);
    if (job.error) result.append(h("span", { class: "error" }, `${job.error.code}: ${job.error.message}`));
  };
  render();
  cancel.addEventListener("click", async () => {
    if (!confirm("Cancel this job?")) return;
    try {
      job = await api(`/jobs/${id}/cancel`, { method: "POST" });
      render();
    } catch (error) {
      result.replaceChildren(h("span", { class: "error" }, describe(error)));
    }
  });

  // The stream replays the job's events, then follows it; it closes after a while (the server's
  // limit) and is resumed after the last event seen, until its `end` event.
  let lastEventId = null;
  let ended = false;
  while (!ended && !signal.aborted) {
    try {
      for await (const event of events(`/jobs/${id}/events`, { lastEventId, signal })) {
        if (event.id) lastEventId = event.id;
        const data = JSON.parse(event.data);
        if (event.event === "progress") {
          progress = data;
        } else if (event.event === "end") {
          ended = true;
        } else {
          log.append(h("li", {}, h("span", { class: "muted" }, `${new Date(data.created_at).toLocaleTimeString()} ${data.type}: `), data.message));
          if (event.event === "epoch") curves.add(data.data);
        }
        if (event.event === "status" || event.event === "end") {
          job = await api(`/jobs/${id}`, { signal });
          progress = job.progress;
        }
        render();
        if (ended) break;
      }
    } catch (error) {
      if (signal.aborted) return;
      result.replaceChildren(h("span", { class: "error" }, `The event stream broke off (${describe(error)}); retrying…`));
      await sleep(2000, signal);
    }
  }
}
