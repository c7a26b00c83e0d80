// Start a training job: a dataset, a backbone (searched in timm's zoo, marked where this server has
// its weights), a strategy ('auto' unless chosen) and the common hyperparameters.
import { api } from "../api.js";
import { describe, h } from "../ui.js";

const STRATEGIES = [
  ["auto", "auto: measure, then choose (recommended)"],
  ["linear_probe", "linear_probe: train only a new head (seconds)"],
  ["partial", "partial: also the last stages"],
  ["full", "full: every layer"],
  ["lp_ft", "lp_ft: probe, then fine-tune everything"],
];

const number = (id, label, props) => [h("label", { for: id }, label), h("input", { type: "number", id, ...props })];

export async function form(view, { query, signal }) {
  const { data } = await api("/datasets?limit=100", { signal });
  const ready = data.filter((d) => d.status === "ready");
  const dataset = h("select", { id: "train-dataset", required: true },
    ready.map((d) => h("option", { value: d.id, selected: d.id === query.get("dataset") }, `${d.name} (${d.num_images} images)`)));
  const strategy = h("select", { id: "train-strategy" }, STRATEGIES.map(([value, text]) => h("option", { value }, text)));
  const search = h("input", { type: "search", id: "backbone-search", placeholder: "e.g. efficientnet", "aria-controls": "backbone-list" });
  const onlyLocal = h("input", { type: "checkbox", id: "backbone-local", checked: true });
  const choices = h("div", { class: "backbones", id: "backbone-list", role: "radiogroup", "aria-label": "Backbone" });
  const error = h("p", { class: "error", id: "train-error", role: "alert" });

  let chosen = null;
  let asked = 0;
  const findBackbones = async () => {
    const mine = ++asked;
    const params = new URLSearchParams({ limit: "50", pretrained_here: String(onlyLocal.checked) });
    if (search.value.trim()) params.set("search", search.value.trim());
    const listing = await api(`/backbones?${params}`, { signal });
    if (mine !== asked) return;  // a later search already answered
    choices.replaceChildren(...listing.data.map((b) => {
      const radio = h("input", { type: "radio", name: "backbone", value: b.name, checked: b.name === chosen,
        onchange: () => { chosen = b.name; } });
      const weights = b.weights_available ? `weights on this server (${b.weights_source})` : "no weights here";
      return h("label", {}, radio, h("span", {}, h("strong", {}, b.name),
        h("span", { class: "muted" }, ` · ${(b.num_params / 1e6).toFixed(1)}M params · ${b.input_size.slice(1).join("×")} · ${weights}`)));
    }), h("p", { class: "muted" }, `${listing.total} found${listing.total > listing.data.length ? `, first ${listing.data.length} shown` : ""}.`));
    if (!chosen && listing.data.length) {
      chosen = listing.data[0].name;
      choices.querySelector("input").checked = true;
    }
  };
  let typing;
  search.addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(findBackbones, 250); });
  onlyLocal.addEventListener("change", findBackbones);

  const fields = {
    epochs: number("hp-epochs", "Epochs (blank: the strategy's default)", { min: "1", max: "1000" }),
    lr: number("hp-lr", "Learning rate (blank: scaled to the batch)", { min: "0", step: "any" }),
    batch_size: number("hp-batch", "Batch size", { min: "1", max: "4096", value: "32" }),
    img_size: number("hp-img", "Image size (blank: the backbone's)", { min: "32", max: "1024" }),
  };
  const modelName = h("input", { type: "text", id: "model-name", maxlength: "100", placeholder: "(<dataset>-<backbone>)" });

  const start = async (event) => {
    event.preventDefault();
    error.textContent = "";
    const hyperparameters = {};
    for (const [name, [, input]] of Object.entries(fields)) if (input.value !== "") hyperparameters[name] = Number(input.value);
    const body = { dataset_id: dataset.value, backbone: chosen, strategy: strategy.value, hyperparameters };
    if (modelName.value.trim()) body.model_name = modelName.value.trim();
    try {
      const job = await api("/jobs", { method: "POST", json: body });
      location.hash = `#/jobs/${job.id}`;
    } catch (e) {
      error.textContent = describe(e);
    }
  };

  view.append(h("h1", {}, "Train a model"), h("form", { class: "card", id: "train-form", onsubmit: start },
    h("div", { class: "grid" }, h("div", {}, h("label", { for: "train-dataset" }, "Dataset"), dataset),
      h("div", {}, h("label", { for: "train-strategy" }, "Strategy"), strategy)),
    ready.length ? null : h("p", { class: "error" }, "No dataset is ready yet: ", h("a", { href: "#/datasets" }, "upload one"), "."),
    h("h2", {}, "Backbone"),
    h("div", { class: "row" }, h("div", {}, h("label", { for: "backbone-search" }, "Search timm's models"), search),
      h("label", { for: "backbone-local" }, onlyLocal, " only those with weights on this server")),
    choices,
    h("h2", {}, "Hyperparameters"),
    h("div", { class: "grid" }, Object.values(fields).map((pair) => h("div", {}, pair)),
      h("div", {}, h("label", { for: "model-name" }, "Model name"), modelName)),
    h("p", {}, h("button", { type: "submit", id: "start-training", disabled: !ready.length }, "Start training")), error));
  await findBackbones();
}
