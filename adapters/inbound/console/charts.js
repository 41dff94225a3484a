// Hand-drawn SVG charts: a bar chart and a line chart over the last hour's minutes.
const NS = "http://www.w3.org/2000/svg";
const W = 600;
const H = 180;
const PAD = { left: 36, right: 8, top: 10, bottom: 22 };

function el(name, attrs = {}, text = "") {
  const node = document.createElementNS(NS, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text) node.textContent = text;
  return node;
}

function frame(container, title, maxValue, minutes) {
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title, class: "svg-chart" });
  const plotH = H - PAD.top - PAD.bottom;
  for (const fraction of [0, 0.5, 1]) {
    const y = PAD.top + plotH * (1 - fraction);
    svg.append(el("line", { x1: PAD.left, x2: W - PAD.right, y1: y, y2: y, class: "grid" }));
    const label = maxValue * fraction;
    svg.append(el("text", { x: PAD.left - 4, y: y + 4, class: "axis", "text-anchor": "end" },
      Number.isInteger(label) ? String(label) : label.toFixed(label < 1 ? 2 : label < 10 ? 1 : 0)));
  }
  const first = minutes[0];
  const last = minutes[minutes.length - 1];
  if (first !== undefined) {
    svg.append(el("text", { x: PAD.left, y: H - 6, class: "axis" }, clock(first)));
    svg.append(el("text", { x: W - PAD.right, y: H - 6, class: "axis", "text-anchor": "end" }, clock(last)));
  }
  container.replaceChildren(svg);
  return svg;
}

function clock(seconds) {
  const d = new Date(seconds * 1000);
  return `${String(d.getHours()).padStart(2, "0")}:${String(d.getMinutes()).padStart(2, "0")}`;
}

function niceMax(value) {
  if (value <= 0) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (value <= step * power) return step * power;
  return 10 * power;
}

export function barChart(container, title, minutes, values) {
  const max = niceMax(Math.max(0, ...values));
  const svg = frame(container, title, max, minutes);
  const plotW = W - PAD.left - PAD.right;
  const plotH = H - PAD.top - PAD.bottom;
  const step = plotW / Math.max(values.length, 1);
  values.forEach((value, index) => {
    if (!value) return;
    const h = (value / max) * plotH;
    const bar = el("rect", {
      x: PAD.left + index * step + 1, y: PAD.top + plotH - h, width: Math.max(step - 2, 1), height: h, class: "bar",
    });
    bar.append(el("title", {}, `${clock(minutes[index])}: ${value}`));
    svg.append(bar);
  });
}

export function lineChart(container, title, minutes, lines) {
  const all = lines.flatMap((line) => line.values.filter((v) => v !== null));
  const max = niceMax(Math.max(0, ...all));
  const svg = frame(container, title, max, minutes);
  const plotW = W - PAD.left - PAD.right;
  const plotH = H - PAD.top - PAD.bottom;
  const step = plotW / Math.max(minutes.length - 1, 1);
  lines.forEach((line, lineIndex) => {
    let path = "";
    line.values.forEach((value, index) => {
      if (value === null) return;
      const x = PAD.left + index * step;
      const y = PAD.top + plotH - (value / max) * plotH;
      path += `${path && line.values[index - 1] !== null ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`;
      const dot = el("circle", { cx: x, cy: y, r: 2.5, class: `dot s${lineIndex}` });
      dot.append(el("title", {}, `${line.label} ${clock(minutes[index])}: ${value} s`));
      svg.append(dot);
    });
    if (path) svg.prepend(el("path", { d: path, class: `line s${lineIndex}` }));
    svg.append(el("text", { x: W - PAD.right - 4, y: PAD.top + 12 + lineIndex * 14, class: `legend s${lineIndex}`, "text-anchor": "end" }, line.label));
  });
}
