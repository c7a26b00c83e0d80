// Sweeps: one linear probe per backbone on a dataset, ranked by validation accuracy as rows finish;
// promote a row to a full training job.
import { api } from "../api.js";
import { badge, describe, h, percent, seconds, sleep, when } from "../ui.js";

export async function list(view, { signal }) {
  const [datasets, backbones, sweeps] = await Promise.all([api("/datasets?limit=100", { signal }),
    api("/backbones?pretrained_here=true&limit=100", { signal }), api("/sweeps?limit=100", { signal })]);
  const dataset = h("select", { id: "sweep-dataset" },
    datasets.data.filter((d) => d.status === "ready").map((d) => h("option", { value: d.id }, d.name)));
  const picks = backbones.data.map((b) => h("label", {}, h("input", { type: "checkbox", name: "sweep-backbone", value: b.name, checked: true }),
    `${b.name} (${(b.num_params / 1e6).toFixed(1)}M params)`));
  const error = h("p", { class: "error", role: "alert" });
  const start = async (event) => {
    event.preventDefault();
    const chosen = picks.map((label) => label.querySelector("input")).filter((i) => i.checked).map((i) => i.value);
    try {
      const sweep = await api("/sweeps", { method: "POST", json: { dataset_id: dataset.value, backbones: chosen } });
      location.hash = `#/sweeps/${sweep.id}`;
    } catch (e) {
      error.textContent = describe(e);
    }
  };
  view.append(h("h1", {}, "Backbone sweeps"),
    h("form", { class: "card", id: "sweep-form", onsubmit: start }, h("h2", {}, "Compare backbones on a dataset"),
      h("label", { for: "sweep-dataset" }, "Dataset"), dataset,
      h("fieldset", { class: "backbones" }, h("legend", {}, "Backbones with weights on this server"), picks),
      h("p", {}, h("button", { type: "submit", id: "start-sweep" }, "Start sweep")), error),
    h("div", { class: "card" }, h("table", { id: "sweeps" }, h("thead", {}, h("tr", {}, ["Sweep", "Status", "Backbones", "Created"].map((t) => h("th", {}, t)))),
      h("tbody", {}, sweeps.data.map((s) => h("tr", {}, h("td", {}, h("a", { href: `#/sweeps/${s.id}` }, s.id)), h("td", {}, badge(s.status)),
        h("td", {}, s.rows.map((r) => r.backbone).join(", ")), h("td", {}, when(s.created_at))))))));
}

export async function show(view, { id, signal }) {
  const title = h("h1");
  const body = h("tbody");
  const note = h("p", { role: "status" });
  view.append(title, h("div", { class: "card" }, h("table", { id: "sweep-table" }, h("thead", {}, h("tr", {},
    ["Rank", "Backbone", "Status", "Val accuracy", "Seconds", "Params", ""].map((t) => h("th", {}, t)))), body)), note);
  for (;;) {
    const sweep = await api(`/sweeps/${id}`, { signal });
    title.replaceChildren(`Sweep ${sweep.id} `, badge(sweep.status));
    const rows = [...sweep.rows].sort((a, b) => (a.rank ?? 1e9) - (b.rank ?? 1e9));
    body.replaceChildren(...rows.map((r) => h("tr", { data: { status: r.status } }, h("td", { class: "num" }, r.rank ?? "—"), h("td", {}, r.backbone),
      h("td", {}, badge(r.status)), h("td", { class: "num" }, percent(r.val_accuracy)), h("td", { class: "num" }, seconds(r.seconds)),
      h("td", { class: "num" }, `${(r.num_params / 1e6).toFixed(1)}M`),
      h("td", {}, r.rank ? h("button", { type: "button", class: "secondary", onclick: () => promote(sweep.id, r.backbone, note) }, "Train this one") : r.error ?? ""))));
    if (sweep.status === "finished" || signal.aborted) return;
    await sleep(2000, signal);
  }
}

async function promote(sweepId, backbone, note) {
  try {
    const job = await api(`/sweeps/${sweepId}/promote`, { method: "POST", json: { backbone } });
    location.hash = `#/jobs/${job.id}`;
  } catch (error) {
    note.textContent = describe(error);
  }
}
