// Datasets: upload (an archive, or a folder packed into a tar here) with a progress bar; the list;
// a dataset's page with its processing status, class counts, warnings and a few images per class.
import { api, blobUrl, pathOf, upload } from "../api.js";
import { bars } from "../charts.js";
import { tarBlob } from "../tar.js";
import { badge, bytes, describe, dropzone, h, sleep, when } from "../ui.js";

const ARCHIVE = /\.(zip|tar|tgz|tar\.gz)$/i;

export async function list(view, { signal }) {
  view.append(h("h1", {}, "Datasets"), uploadCard());
  const table = h("table", { id: "datasets" }, h("thead", {}, h("tr", {},
    ["Name", "Status", "Images", "Classes", "Size", "Uploaded"].map((t) => h("th", {}, t)))));
  const body = h("tbody");
  table.append(body);
  view.append(h("h2", {}, "Your datasets"), h("div", { class: "card" }, table));
  const { data } = await api("/datasets?limit=100", { signal });
  if (!data.length) body.append(h("tr", {}, h("td", { colspan: "6", class: "muted" }, "None yet: upload one above.")));
  for (const d of data) {
    body.append(h("tr", {}, h("td", {}, h("a", { href: `#/datasets/${d.id}` }, d.name)), h("td", {}, badge(d.status)),
      h("td", { class: "num" }, d.num_images), h("td", {}, d.classes.map((c) => c.name).join(", ")),
      h("td", { class: "num" }, bytes(d.archive_bytes)), h("td", {}, when(d.created_at))));
  }
}

function uploadCard() {
  const name = h("input", { type: "text", id: "dataset-name", maxlength: "200", placeholder: "(the folder's or archive's name)" });
  const progress = h("progress", { id: "upload-progress", max: "1", value: "0", hidden: true, "aria-label": "Upload progress" });
  const status = h("p", { id: "upload-status", role: "status", class: "muted" });
  const send = async (entries) => {
    status.className = "muted";
    try {
      const [file, filename] = archiveOf(entries);
      const form = new FormData();
      form.append("file", file, filename);
      form.append("name", name.value.trim() || filename.replace(ARCHIVE, ""));
      progress.hidden = false;
      const dataset = await upload("/datasets", form, (loaded, total) => {
        progress.value = total ? loaded / total : 0;
        status.textContent = `Uploading ${bytes(loaded)}${total ? ` of ${bytes(total)}` : ""}…`;
      });
      location.hash = `#/datasets/${dataset.id}`;
    } catch (error) {
      status.textContent = `Not uploaded: ${describe(error)}`;
      status.className = "error";
    }
  };
  return h("section", { class: "card", "aria-labelledby": "upload-title" },
    h("h2", { id: "upload-title" }, "Upload a dataset"),
    h("p", { class: "muted" }, "ImageFolder layout: <class>/<image>, or train/<class>/<image> and val/<class>/<image>."),
    h("label", { for: "dataset-name" }, "Name"), name,
    dropzone({ id: "dataset-drop", label: "Drop an archive or a folder here", accept: ".zip,.tar,.tgz,.tar.gz,application/zip,application/x-tar,application/gzip", folder: true, onEntries: send }),
    progress, status);
}

// An archive goes as it is; a folder (class folders, or train/ and val/ with class folders inside)
// is packed into a tar here.
function archiveOf(entries) {
  if (entries.length === 1 && ARCHIVE.test(entries[0].file.name)) return [entries[0].file, entries[0].file.name];
  const kept = entries.filter(({ path }) => path.includes("/") && !path.split("/").some((part) => part.startsWith(".")));
  if (!kept.length) throw new Error("Drop an archive (.zip, .tar, .tar.gz) or a folder of class folders, not loose files.");
  return [tarBlob(kept), `${kept[0].path.split("/")[0]}.tar`];
}

export async function show(view, { id, signal }) {
  let dataset = await api(`/datasets/${id}`, { signal });
  const header = h("div");
  view.append(header);
  while (dataset.status === "processing" && !signal.aborted) {  // a worker is checking and unpacking it
    header.replaceChildren(h("h1", {}, dataset.name, " ", badge(dataset.status)),
      h("p", { class: "muted" }, "A worker is checking and unpacking the archive…"));
    await sleep(1000, signal);
    dataset = await api(`/datasets/${id}`, { signal });
  }
  header.replaceChildren(h("h1", {}, dataset.name, " ", h("span", { id: "dataset-status" }, badge(dataset.status))));
  if (dataset.status === "failed") {
    view.append(h("p", { class: "error card" }, dataset.error?.message ?? "The dataset was refused."));
    return;
  }
  view.append(h("p", {}, `${dataset.num_images} images in ${dataset.classes.length} classes · `,
    dataset.has_val_split ? "its own val/ split" : "no val/ split: jobs hold out a stratified share",
    " · ", h("a", { href: `#/train?dataset=${dataset.id}` }, "Train a model on it →")));
  if (dataset.warnings.length) {
    view.append(h("section", { class: "card", id: "dataset-warnings" }, h("h2", {}, "Warnings"),
      h("ul", {}, dataset.warnings.map((w) => h("li", {}, w)))));
  }
  const series = dataset.has_val_split ? ["train", "val"] : ["images"];
  view.append(h("section", { class: "card", id: "class-counts" }, h("h2", {}, `Images per class (${series.join(" / ")})`),
    bars(dataset.classes.map((c) => ({ label: c.name, values: dataset.has_val_split ? [c.train, c.val] : [c.train + c.val] })), series)));
  const gallery = h("section", { class: "card", id: "thumbnails" }, h("h2", {}, "Some images of each class"));
  view.append(gallery);
  for (const cls of dataset.classes) {
    const row = h("div", { class: "thumbs" });
    gallery.append(h("h3", {}, cls.name), row);
    const { data } = await api(`/datasets/${id}/images?label=${encodeURIComponent(cls.name)}&limit=4`, { signal });
    for (const image of data) {
      const img = h("img", { alt: `${cls.name}: ${image.path}`, width: "120", height: "120" });
      row.append(h("figure", {}, img, h("figcaption", { class: "muted" }, image.path.split("/").pop())));
      blobUrl(`/datasets/${id}/images/${pathOf(image.path)}?size=240`, signal).then((url) => { img.src = url; }, () => {});
    }
  }
}
