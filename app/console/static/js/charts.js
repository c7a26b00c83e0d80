// The console's pictures: training curves drawn by uPlot (vendored from npm, see app/console/vendor.py),
// and the simple ones (class counts, confusion matrix, probabilities) as plain elements.
import uPlot from "../vendor/uPlot.esm.js";
import { h } from "./ui.js";

// Train loss (left axis) and validation accuracy (right axis) per epoch, growing as epochs end.
export class Curves {
  constructor(container) {
    this.container = container;
    this.data = [[], [], []];  // epoch, train loss, val accuracy
    this.plot = new uPlot({
      width: Math.max(container.clientWidth, 320), height: 260,
      scales: { x: { time: false }, acc: { range: [0, 1] } },
      axes: [
        { label: "epoch" },
        { label: "train loss", scale: "y" },
        { label: "val accuracy", scale: "acc", side: 1, grid: { show: false } },
      ],
      series: [
        { label: "epoch" },
        { label: "train loss", scale: "y", stroke: "#c2410c", width: 2, points: { show: true } },
        { label: "val accuracy", scale: "acc", stroke: "#1a4fb4", width: 2, points: { show: true },
          value: (_, v) => (v == null ? "—" : v.toFixed(3)) },
      ],
    }, this.data, container);
    container.dataset.points = "0";
  }

  add({ epoch, train_loss, val_accuracy }) {
    if (this.data[0].includes(epoch)) return;  // a replayed event after a reconnect
    this.data[0].push(epoch);
    this.data[1].push(train_loss);
    this.data[2].push(val_accuracy);
    this.plot.setData(this.data);
    this.container.dataset.points = String(this.data[0].length);
  }
}

// Horizontal bars, one row per label: [{label, values: [train, val]}], with a legend of `series`.
export function bars(rows, series) {
  const most = Math.max(1, ...rows.flatMap((row) => row.values));
  const legend = h("div", { class: "legend" }, series.map((name, i) => h("span", {}, h("span", { class: `swatch bar${i ? " val" : ""}` }), name)));
  const grid = h("div", { class: "bars", role: "table", "aria-label": `Images per class (${series.join(", ")})` });
  for (const row of rows) {
    const stack = h("div", { class: "stack" });
    row.values.forEach((value, i) => {
      const bar = h("div", { class: i ? "bar val" : "bar", title: `${series[i]}: ${value}` });
      bar.style.width = `${(100 * value) / most}%`;  // CSSOM, which the Content-Security-Policy allows
      stack.append(h("div", { class: "bar-track" }, bar));
    });
    grid.append(h("span", { role: "rowheader" }, row.label), stack,
      h("span", { class: "muted", role: "cell" }, row.values.join(" / ")));
  }
  return h("div", {}, series.length > 1 ? legend : null, grid);
}

// confusion[i][j]: validation images of class i predicted as j, shaded by the share of row i.
export function heatmap(confusion, labels) {
  const table = h("table", { class: "heatmap", id: "confusion-matrix" },
    h("caption", { class: "muted" }, "Rows: true class; columns: predicted class"),
    h("thead", {}, h("tr", {}, h("th", {}, ""), labels.map((label) => h("th", { scope: "col" }, label)))));
  const body = h("tbody");
  confusion.forEach((row, i) => {
    const total = Math.max(1, row.reduce((a, b) => a + b, 0));
    body.append(h("tr", {}, h("th", { scope: "row" }, labels[i]), row.map((count, j) => {
      const share = count / total;
      const cell = h("td", { class: share > 0.55 ? "dark" : "", title: `true ${labels[i]}, predicted ${labels[j]}` }, count);
      const hue = i === j ? "26, 79, 180" : "165, 29, 36";
      cell.style.backgroundColor = `rgba(${hue}, ${0.08 + 0.92 * share})`;
      return cell;
    })));
  });
  table.append(body);
  return table;
}

export function probability(label, score) {
  const bar = h("div", { class: "bar" });
  bar.style.width = `${100 * score}%`;
  return h("div", { class: "prob" }, h("span", {}, label),
    h("div", { class: "bar-track", role: "meter", "aria-valuemin": "0", "aria-valuemax": "1",
      "aria-valuenow": String(score), "aria-label": label }, bar),
    h("span", { class: "num" }, `${(100 * score).toFixed(1)}%`));
}
