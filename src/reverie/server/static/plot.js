// Tiny SVG line plots for the playground: no libraries, a few dozen lines.
// plot(svg, {series: [{name, color, x: [], y: [], line, dots, rings: [{x, y}]}], xLabel, yLabel, logY,
//            xMin, xMax, yMin, yMax, markerX, reverseX})
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";  // a namespace name, never fetched
const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d",
                 "#475569", "#ea580c", "#0d9488", "#9333ea", "#a16207", "#1e3a8a", "#be123c", "#15803d"];

function el(name, attrs, parent) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

function niceTicks(lo, hi, count) {
  const span = hi - lo || 1;
  const step0 = span / count;
  const mag = Math.pow(10, Math.floor(Math.log10(step0)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => span / s <= count) || 10 * mag;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(+v.toPrecision(10));
  return ticks;
}

function fmt(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e4 || a < 1e-3) return v.toExponential(0).replace("e+", "e");
  return String(+v.toPrecision(3));
}

function plot(svg, opts) {
  const W = opts.width || 480, H = opts.height || 240, L = 56, R = 12, T = 12, B = 40;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.replaceChildren();
  const logY = !!opts.logY;
  const ty = (v) => (logY ? Math.log10(Math.max(v, 1e-300)) : v);
  const xs = opts.series.flatMap((s) => s.x), ys = opts.series.flatMap((s) => s.y).filter((v) => !logY || v > 0);
  let x0 = opts.xMin ?? Math.min(...xs), x1 = opts.xMax ?? Math.max(...xs);
  let y0 = opts.yMin ?? Math.min(...ys.map(ty)), y1 = opts.yMax ?? Math.max(...ys.map(ty));
  if (!isFinite(x0) || !isFinite(x1)) { x0 = 0; x1 = 1; }
  if (!isFinite(y0) || !isFinite(y1)) { y0 = 0; y1 = 1; }
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const sx = (v) => (opts.reverseX ? L + (x1 - v) / (x1 - x0) * (W - L - R) : L + (v - x0) / (x1 - x0) * (W - L - R));
  const sy = (v) => T + (1 - (ty(v) - y0) / (y1 - y0)) * (H - T - B);
  const syRaw = (u) => T + (1 - (u - y0) / (y1 - y0)) * (H - T - B);

  const axes = el("g", {class: "axes"}, svg);
  el("rect", {x: L, y: T, width: W - L - R, height: H - T - B, class: "frame"}, axes);
  for (const v of niceTicks(x0, x1, 6)) {
    el("line", {x1: sx(v), x2: sx(v), y1: T, y2: H - B, class: "grid"}, axes);
    el("text", {x: sx(v), y: H - B + 14, "text-anchor": "middle"}, axes).textContent = fmt(v);
  }
  const decades = Math.max(1, Math.ceil((y1 - y0) / 6));  // log axes: a tick every `decades` powers of ten
  const yTicks = logY ? Array.from({length: Math.max(0, Math.floor(y1) - Math.ceil(y0) + 1)}, (_, i) => Math.ceil(y0) + i)
                             .filter((u) => u % decades === 0)
                      : niceTicks(y0, y1, 5);
  for (const u of yTicks) {
    el("line", {x1: L, x2: W - R, y1: syRaw(u), y2: syRaw(u), class: "grid"}, axes);
    el("text", {x: L - 4, y: syRaw(u) + 4, "text-anchor": "end"}, axes).textContent = logY ? fmt(Math.pow(10, u)) : fmt(u);
  }
  el("text", {x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle", class: "label"}, axes).textContent = opts.xLabel || "";
  el("text", {x: 12, y: (T + H - B) / 2, "text-anchor": "middle", class: "label",
              transform: `rotate(-90 12 ${(T + H - B) / 2})`}, axes).textContent = opts.yLabel || "";

  const clip = "clip" + Math.random().toString(36).slice(2);
  const defs = el("defs", {}, svg);
  el("rect", {x: L, y: T, width: W - L - R, height: H - T - B}, el("clipPath", {id: clip}, defs));
  const body = el("g", {"clip-path": `url(#${clip})`}, svg);
  opts.series.forEach((s, k) => {
    const color = s.color || PALETTE[k % PALETTE.length];
    const pts = s.x.map((x, i) => [x, s.y[i]]).filter(([, y]) => !logY || y > 0);
    if (s.line !== false && pts.length) {
      el("polyline", {points: pts.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" "),
                      fill: "none", stroke: color, "stroke-width": 2, class: "series"}, body);
    }
    if (s.dots) for (const [x, y] of pts) el("circle", {cx: sx(x), cy: sy(y), r: 2.5, fill: color}, body);
    for (const p of s.rings || []) {
      if (!logY || p.y > 0) el("circle", {cx: sx(p.x), cy: sy(p.y), r: 4.5, fill: "none", stroke: color}, body);
    }
  });
  if (opts.markerX !== undefined && opts.markerX !== null) {
    el("line", {x1: sx(opts.markerX), x2: sx(opts.markerX), y1: T, y2: H - B, class: "marker"}, svg);
  }
  const legend = el("g", {class: "legend"}, svg);
  opts.series.filter((s) => s.name).forEach((s, k) => {
    const color = s.color || PALETTE[opts.series.indexOf(s) % PALETTE.length];
    const y = T + 12 + k * 13;
    el("line", {x1: W - R - 130, x2: W - R - 116, y1: y - 4, y2: y - 4, stroke: color, "stroke-width": 3}, legend);
    el("text", {x: W - R - 112, y}, legend).textContent = s.name;
  });
}

window.Plot = {plot, PALETTE};
