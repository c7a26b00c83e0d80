// Models: the registry's list, and a model's page: its validation metrics (per class, confusion
// matrix, calibration), the validation images it gets most confidently wrong, export / download /
// alias, and "try it" (drop images, see the top-k).
import { api, blobUrl, pathOf } from "../api.js";
import { heatmap, probability } from "../charts.js";
import { bytes, describe, dropzone, h, percent, sleep, when } from "../ui.js";

export async function list(view, { signal }) {
  const { data } = await api("/models?limit=100", { signal });
  const rows = data.map((m) => h("tr", {}, h("td", {}, h("a", { href: `#/models/${m.id}` }, `${m.name}@${m.version}`)),
    h("td", {}, m.aliases.join(", ")), h("td", {}, m.backbone), h("td", { class: "num" }, percent(m.metrics.val_accuracy)),
    h("td", { class: "num" }, m.metrics.macro_f1?.toFixed(3) ?? "—"), h("td", {}, when(m.created_at))));
  view.append(h("h1", {}, "Models"), h("div", { class: "card" }, h("table", { id: "models" }, h("thead", {}, h("tr", {},
    ["Model", "Aliases", "Backbone", "Val accuracy", "Macro F1", "Created"].map((t) => h("th", {}, t)))),
  h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: "6", class: "muted" }, "No models yet: train one."))))));
}

export async function show(view, { id, signal }) {
  const model = await api(`/models/${encodeURIComponent(id)}`, { signal });
  const m = model.metrics;
  const ci = m.val_accuracy_ci95 ? ` (95% interval ${percent(m.val_accuracy_ci95[0])}–${percent(m.val_accuracy_ci95[1])})` : "";
  view.append(h("h1", {}, `${model.name}@${model.version}`),
    h("p", {}, `${model.backbone} · ${model.classes.length} classes · ${bytes(model.size_bytes)} · aliases: ${model.aliases.join(", ") || "none"} · `,
      h("a", { href: `#/jobs/${model.job_id}` }, "its job"), " · ", h("a", { href: `#/datasets/${model.dataset_id}` }, "its dataset")),
    h("section", { class: "card grid", id: "model-summary" },
      stat("Validation accuracy", h("span", { id: "model-accuracy", data: { value: String(m.val_accuracy) } }, percent(m.val_accuracy)), ci),
      stat("Macro F1", m.macro_f1?.toFixed(3)), stat("Validation images", h("span", { id: "model-val-images" }, m.val_images)),
      m.calibration ? stat("Calibration error (ECE)", `${m.calibration.ece_before.toFixed(3)} → ${m.calibration.ece_after.toFixed(3)}`,
        ` after temperature scaling (T = ${m.calibration.temperature.toFixed(2)})`) : null),
    tryIt(model),
    h("section", { class: "card" }, h("h2", {}, "Per class"), perClass(m.per_class)),
    h("section", { class: "card" }, h("h2", {}, "Confusion matrix"), heatmap(m.confusion_matrix, model.classes)));
  const wrong = h("div", { class: "thumbs", id: "confidently-wrong" });
  view.append(h("section", { class: "card" }, h("h2", {}, "Most confidently wrong validation images"), wrong), actions(model));
  const predictions = await api(`/models/${model.id}/validation-predictions?wrong=true&limit=8`, { signal });
  if (!predictions.data.length) wrong.append(h("p", { class: "muted" }, "None: every validation image is right."));
  for (const p of predictions.data) {
    const img = h("img", { alt: `true ${p.label}, predicted ${p.predicted}`, width: "120", height: "120" });
    wrong.append(h("figure", {}, img, h("figcaption", {}, h("strong", {}, p.predicted), ` ${percent(p.confidence, 0)}`,
      h("br"), h("span", { class: "muted" }, `true: ${p.label}`))));
    blobUrl(`/datasets/${predictions.dataset_id}/images/${pathOf(p.path)}?size=240`, signal).then((url) => { img.src = url; },
      () => { img.alt += " (the dataset's image is gone)"; });
  }
}

const stat = (label, value, note) => h("div", {}, h("div", { class: "muted" }, label), h("div", { class: "big" }, value ?? "—"),
  note ? h("div", { class: "muted" }, note) : null);

function perClass(rows) {
  return h("table", { id: "per-class" }, h("thead", {}, h("tr", {}, ["Class", "Precision", "Recall", "F1", "Support"].map((t, i) =>
    h("th", { class: i ? "num" : "" }, t)))), h("tbody", {}, rows.map((r) => h("tr", {}, h("td", {}, r.label),
    [r.precision, r.recall, r.f1].map((x) => h("td", { class: "num" }, x.toFixed(3))), h("td", { class: "num" }, r.support)))));
}

function tryIt(model) {
  const threshold = h("input", { type: "number", id: "predict-threshold", min: "0", max: "1", step: "0.05", value: "0" });
  const topK = h("input", { type: "number", id: "predict-top-k", min: "1", max: String(model.classes.length),
    value: String(Math.min(5, model.classes.length)) });
  const results = h("div", { id: "predictions", "aria-live": "polite" });
  const predict = async (entries) => {
    const images = entries.filter(({ file }) => file.type.startsWith("image/"));
    if (!images.length) {
      results.replaceChildren(h("p", { class: "error" }, "Drop image files (JPEG, PNG, WebP…)."));
      return;
    }
    const form = new FormData();
    for (const { file } of images) form.append("files", file, file.name);
    const params = new URLSearchParams({ top_k: topK.value });
    if (Number(threshold.value) > 0) params.set("threshold", threshold.value);
    results.replaceChildren(h("p", { class: "muted" }, `Predicting ${images.length} image(s)…`));
    try {
      const response = await api(`/models/${model.id}/predict?${params}`, { method: "POST", body: form, raw: true });
      const answer = await response.json();
      const timing = /dur=([\d.]+)/.exec(response.headers.get("Server-Timing") ?? "");
      results.replaceChildren(h("p", { class: "muted", id: "predict-timing" },
        `Server time ${timing ? `${timing[1]} ms` : "—"} for ${images.length} image(s)${Number(threshold.value) > 0 ? `, abstaining under ${threshold.value}` : ""}.`));
      answer.predictions.forEach((p, i) => {
        results.append(h("div", { class: "prediction", data: { top: p.labels?.[0]?.label ?? "" } },
          h("img", { src: URL.createObjectURL(images[i].file), alt: p.filename }),
          h("div", {}, h("strong", {}, p.filename), p.labels
            ? p.labels.map((l) => probability(l.label, l.score))
            : h("p", { class: "abstain" }, `Abstained: no class reaches the threshold ${threshold.value}.`))));
      });
    } catch (error) {
      results.replaceChildren(h("p", { class: "error" }, describe(error)));
    }
  };
  return h("section", { class: "card", id: "try-it" }, h("h2", {}, "Try it"),
    h("div", { class: "row" }, h("div", {}, h("label", { for: "predict-top-k" }, "Top k"), topK),
      h("div", {}, h("label", { for: "predict-threshold" }, "Abstain under (0: never)"), threshold)),
    dropzone({ id: "predict-drop", label: "Drop images here to predict", accept: "image/*", multiple: true, onEntries: predict }),
    results);
}

function actions(model) {
  const status = h("p", { id: "model-action-status", role: "status" });
  // fp32 is kept only if it matches PyTorch exactly; int8 only if it keeps nearly every answer and the accuracy.
  const exportButton = (format, text) => {
    const button = h("button", { type: "button", id: `export-${format}` }, text);
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        let built = await api(`/models/${model.id}/exports`, { method: "POST", json: { format } });
        while (built.status === "processing") {
          status.textContent = `A worker is building and checking the ${format} export…`;
          await sleep(1500);
          built = await api(`/models/${model.id}/exports/${format}`);
        }
        if (built.status === "failed") throw new Error(built.error?.message ?? "The export failed.");
        const file = `${model.name}-${model.version}${format === "onnx-int8" ? ".int8" : ""}.onnx`;
        status.replaceChildren(`${format} ready (${bytes(built.size_bytes)}, top-1 agreement with PyTorch ${percent(built.parity?.top1_agreement)}). `,
          h("button", { type: "button", class: "secondary", onclick: () => save(`/models/${model.id}/exports/${format}/download`, file, status) }, `Download ${file}`));
      } catch (error) {
        status.textContent = describe(error);
      } finally {
        button.disabled = false;
      }
    });
    return button;
  };
  const alias = h("input", { type: "text", id: "alias-name", placeholder: "production", maxlength: "64" });
  const version = h("input", { type: "number", id: "alias-version", min: "1", value: String(model.version) });
  const moveAlias = async (event) => {
    event.preventDefault();
    try {
      const moved = await api(`/models/${encodeURIComponent(model.name)}/aliases/${encodeURIComponent(alias.value.trim())}`,
        { method: "PUT", json: { version: Number(version.value) } });
      status.textContent = `${moved.name}@${moved.alias} now points at version ${moved.version}.`;
    } catch (error) {
      status.textContent = describe(error);
    }
  };
  return h("section", { class: "card", id: "model-actions" }, h("h2", {}, "Export, download, aliases"),
    h("div", { class: "row" }, exportButton("onnx", "Export to ONNX"), exportButton("onnx-int8", "Export to ONNX int8"),
      h("button", { type: "button", class: "secondary", id: "download-model",
        onclick: () => save(`/models/${model.id}/download`, `${model.name}-${model.version}.zip`, status) }, "Download (safetensors + config)")),
    h("form", { class: "row", id: "alias-form", onsubmit: moveAlias },
      h("div", {}, h("label", { for: "alias-name" }, "Alias"), alias),
      h("div", {}, h("label", { for: "alias-version" }, "Version"), version),
      h("button", { type: "submit" }, "Move alias")), status);
}

// A download that needs the key: fetched here, then handed to the browser as a blob: link.
async function save(path, filename, status) {
  try {
    const url = await blobUrl(path);
    const link = h("a", { href: url, download: filename });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  } catch (error) {
    status.textContent = describe(error);
  }
}
