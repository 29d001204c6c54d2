// The reverie playground. Every number comes from the server: /playground/* for the forward process, the
// schedules and the sigmas samplers visit (reverie.schedules, reverie.samplers); /v1/jobs for generation (images
// and videos), followed live through its server-sent events. No libraries; plot.js draws the curves.
"use strict";

const $ = (id) => document.getElementById(id);
const BLANK = "data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7";  // a transparent pixel: an empty picture
const state = {
  samplers: [], defaultSampler: "DPM++ 2M", schedules: null, lastImage: null, fwdImage: null, fwdSample: 0,
};

// --- talking to the server ------------------------------------------------------------------------------

class ApiError extends Error {}
class Cancelled extends Error {}

const STATUS_WORDS = {
  400: "The server could not use that request", 401: "This server needs an API key, which this page cannot send",
  404: "Not found", 409: "That cannot be done now",
  413: "That is too large for the server", 422: "Please check the settings", 429: "The server is busy (its queue is full); try again in a moment",
  500: "The server ran into an error", 503: "The server is not ready",
};

// A server error in plain words: FastAPI's {detail: "..."} or {detail: [{loc, msg}, ...]}.
function explain(status, data, text) {
  let detail = data && data.detail !== undefined ? data.detail : (data && (data.error || data.message)) || "";
  if (!data && text && text.length < 300 && !text.trim().startsWith("<")) detail = text.trim();
  if (Array.isArray(detail)) {
    detail = detail.map((d) => {
      const loc = (d.loc || []).filter((p) => p !== "body" && p !== "query" && p !== "path");
      return (loc.length ? loc.join(".") + ": " : "") + String(d.msg || "").replace(/^Value error, /, "");
    }).join("; ");
  } else if (detail && typeof detail === "object") {
    detail = detail.message || JSON.stringify(detail);
  }
  const prefix = STATUS_WORDS[status] || `The server answered with an error (${status})`;
  return detail ? `${prefix}: ${detail}` : `${prefix}.`;
}

async function api(method, path, body) {
  let resp;
  try {
    resp = await fetch(path, {method, headers: body ? {"Content-Type": "application/json"} : {},
                              body: body ? JSON.stringify(body) : undefined});
  } catch (e) {
    throw new ApiError("Could not reach the reverie server. Is `reverie serve` still running?");
  }
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
  if (!resp.ok) {
    const err = new ApiError(explain(resp.status, data, text));
    err.status = resp.status;
    throw err;
  }
  return data;
}

function showError(err) {
  if (err instanceof Cancelled) return;
  const message = err instanceof ApiError ? err.message : `Something went wrong in the page: ${err && err.message || err}`;
  $("error-text").textContent = message;
  $("error").hidden = false;
}

function clearError() { $("error").hidden = true; $("error-text").textContent = ""; }

// Submit a job to the native job API and follow its events. Returns {done: Promise, cancel()}; `done`
// resolves with the "done" event's data, rejects with ApiError ("failed", lost connection) or Cancelled.
function runJob(body, on = {}) {
  let id = null, source = null, wantCancel = false, finished = false, rejectDone = null;
  const close = () => { finished = true; if (source) source.close(); };
  const done = new Promise((resolve, reject) => {
    rejectDone = reject;
    api("POST", "/v1/jobs", body).then((job) => {
      id = job.id;
      document.body.dataset.lastJob = id;  // for people (and tests) who want to look the job up
      if (on.queued) on.queued(job);
      if (wantCancel) { cancelJob(); return; }
      source = new EventSource(`/v1/jobs/${encodeURIComponent(id)}/events`);
      const data = (e) => { try { return JSON.parse(e.data); } catch (err) { return {}; } };
      let errors = 0;
      for (const name of ["queued", "started", "progress"]) {
        source.addEventListener(name, (e) => { errors = 0; if (on[name]) on[name](data(e)); });
      }
      source.addEventListener("done", (e) => { close(); resolve({id, ...data(e)}); });
      source.addEventListener("failed", (e) => {
        close();
        reject(new ApiError(`The generation failed: ${data(e).error || "the server gave no reason"}`));
      });
      source.addEventListener("cancelled", () => { close(); reject(new Cancelled("cancelled")); });
      source.onerror = () => {  // EventSource retries by itself; give up when it cannot or after 3 tries
        if (finished) return;
        errors += 1;
        if (source.readyState === EventSource.CLOSED || errors >= 3) {
          close();
          reject(new ApiError("Lost the connection to the server while following the generation."));
        }
      };
    }).catch((e) => { finished = true; reject(e); });
  });
  async function cancelJob() {
    try {
      await api("DELETE", `/v1/jobs/${encodeURIComponent(id)}`);
    } catch (e) {
      if (!finished && e.status !== 409) showError(e);  // 409: it finished meanwhile; its final event follows
      return;
    }
    // the "cancelled" event normally follows; don't wait on it for ever
    setTimeout(() => { if (!finished) { close(); rejectDone(new Cancelled("cancelled")); } }, 5000);
  }
  return {
    done,
    cancel() {
      if (finished || wantCancel) return;
      wantCancel = true;
      if (id !== null) cancelJob();
    },
  };
}

// --- small helpers --------------------------------------------------------------------------------------

function intValue(id) { return Math.round(Number($(id).value)); }
function numValue(id) { return Number($(id).value); }

function checkForm(form) {
  if (form.reportValidity()) return true;
  const bad = form.querySelector(":invalid");
  const label = bad && bad.closest("label") ? bad.closest("label").firstChild.textContent.trim() : "a field";
  showError(new ApiError(`Please check ${label}: ${bad ? bad.validationMessage : "it is not valid"}`));
  return false;
}

function fillSamplerSelect(select) {
  select.replaceChildren(...state.samplers.map((s) => new Option(s.label, s.label, false, s.label === state.defaultSampler)));
}

function imageToCanvas(src, canvas, background) {
  // Draws an image (URL or data URL) centre-cropped to fill the canvas.
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => {
      const ctx = canvas.getContext("2d");
      const side = Math.min(img.naturalWidth, img.naturalHeight);
      ctx.fillStyle = background || "#fff";
      ctx.fillRect(0, 0, canvas.width, canvas.height);
      ctx.imageSmoothingQuality = "high";
      ctx.drawImage(img, (img.naturalWidth - side) / 2, (img.naturalHeight - side) / 2, side, side,
                    0, 0, canvas.width, canvas.height);
      resolve();
    };
    img.onerror = () => reject(new ApiError("That file is not an image the browser can read (use PNG, JPEG or WebP)."));
    img.src = src;
  });
}

function readFile(input) {
  return new Promise((resolve, reject) => {
    const file = input.files && input.files[0];
    if (!file) { reject(new Cancelled("no file")); return; }
    if (file.size > 8 * 1024 * 1024) { reject(new ApiError("That image is larger than 8 MB; please pick a smaller one.")); return; }
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new ApiError("Could not read that file."));
    reader.readAsDataURL(file);
  });
}

function base64Of(canvas) { return canvas.toDataURL("image/png").split(",")[1]; }

function sampleButtons(container, samples, onPick) {
  container.replaceChildren();
  samples.forEach((s, i) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "sample";
    button.setAttribute("aria-pressed", i === 0 ? "true" : "false");
    button.setAttribute("aria-label", `picture: ${s.caption}`);
    button.title = s.caption;
    const img = document.createElement("img");
    img.src = s.image; img.alt = ""; img.width = 40; img.height = 40;
    button.appendChild(img);
    button.addEventListener("click", () => {
      for (const b of container.querySelectorAll("button")) b.setAttribute("aria-pressed", "false");
      button.setAttribute("aria-pressed", "true");
      onPick(s, i);
    });
    container.appendChild(button);
  });
}

function unpress(container) { for (const b of container.querySelectorAll("button")) b.setAttribute("aria-pressed", "false"); }

// --- tabs -----------------------------------------------------------------------------------------------

function setupTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  const select = (tab) => {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute("aria-selected", on ? "true" : "false");
      t.tabIndex = on ? 0 : -1;
      $(t.getAttribute("aria-controls")).hidden = !on;
    }
  };
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => select(tab));
    tab.addEventListener("keydown", (e) => {
      const k = {ArrowRight: 1, ArrowLeft: -1, Home: -i, End: tabs.length - 1 - i}[e.key];
      if (k === undefined) return;
      e.preventDefault();
      const next = tabs[(i + k + tabs.length) % tabs.length];
      select(next);
      next.focus();
    });
  });
}

// --- 1. the forward process -----------------------------------------------------------------------------

const fwd = {busy: false, pending: false, t: 500};

function sigmaRange() {
  const s = state.schedules.schedules[$("fwd-schedule").value].sigma;
  return [Math.max(Math.min(...s), 1e-3), Math.min(Math.max(...s), 1e5)];  // the server accepts 1e-4 .. 1e5
}

function forwardRequest() {
  const body = {schedule: $("fwd-schedule").value, seed: Math.min(Math.max(intValue("fwd-seed") || 0, 0), 4294967295)};
  if (state.fwdImage) body.image = state.fwdImage; else body.sample = state.fwdSample;
  const v = Number($("fwd-slider").value);
  if (document.querySelector('input[name="fwd-axis"]:checked').value === "t") {
    body.t = v;
    $("fwd-slider-label").textContent = `t = ${v}`;
  } else {
    const [lo, hi] = sigmaRange();
    body.sigma = Math.exp(Math.log(lo) + (Math.log(hi) - Math.log(lo)) * v / 1000);
    $("fwd-slider-label").textContent = `σ = ${body.sigma.toPrecision(3)}`;
  }
  return body;
}

async function updateForward() {
  if (fwd.busy) { fwd.pending = true; return; }  // one request in flight; the latest slider position wins
  fwd.busy = true;
  try {
    do {
      fwd.pending = false;
      const r = await api("POST", "/playground/forward", forwardRequest());
      $("fwd-x0").src = r.x0; $("fwd-xt").src = r.x_t; $("fwd-noise").src = r.noise;
      $("fwd-t").textContent = Number.isInteger(r.t) ? String(r.t) : r.t.toFixed(1);
      $("fwd-sigma").textContent = r.sigma.toPrecision(4);
      $("fwd-alphabar").textContent = r.alphabar.toPrecision(4);
      $("fwd-scales").textContent = `${r.signal_scale.toFixed(3)} : ${r.noise_scale.toFixed(3)}`;
      $("fwd-snr").textContent = `${r.snr.toPrecision(3)} (${r.snr_db.toFixed(1)} dB)`;
      $("fwd-xt").dataset.t = String(r.t);
      fwd.t = r.t;
      drawScheduleCurves();
    } while (fwd.pending);
  } catch (e) {
    showError(e);
  } finally {
    fwd.busy = false;
  }
}

function drawScheduleCurves() {
  const data = state.schedules;
  if (!data) return;
  const names = {linear: "linear", scaled_linear: "scaled linear", cosine: "cosine"};
  const series = (key) => Object.entries(data.schedules).map(([name, s], k) => ({
    name: names[name] + (name === data.model_schedule ? " (model)" : ""), x: data.t, y: s[key],
    color: Plot.PALETTE[k],
  }));
  Plot.plot($("plot-alphabar"), {series: series("alphabar"), xLabel: "t", yLabel: "ᾱ", yMin: 0, yMax: 1, markerX: fwd.t});
  Plot.plot($("plot-snr"), {series: series("snr"), xLabel: "t", yLabel: "SNR", logY: true, markerX: fwd.t});
  const flow = data.flow;  // the served flow model's schedule, or SD3's shift 3 when none is served
  if (flow) {
    const shift = `shift ${+flow.shift.toPrecision(4)}${flow.dynamic ? " (dynamic, at the default size)" : ""}`;
    const own = data.model_kind === "flow" ? ` (${data.model})` : "";
    Plot.plot($("plot-flow"), {series: [{name: `σ, ${shift}${own}`, x: flow.t, y: flow.sigma, color: Plot.PALETTE[0]},
                                        {name: "t (no shift)", x: flow.t, y: flow.t, color: Plot.PALETTE[8]}],
                               xLabel: "t ∈ [0, 1]", yLabel: "σ", yMin: 0, yMax: 1});
  }
}

async function updateSigmaPlot() {
  const steps = intValue("sig-steps");
  if (!(steps >= 1 && steps <= 200)) { showError(new ApiError("Steps for the sampler plot must be between 1 and 200.")); return; }
  const chosen = [...$("sig-samplers").querySelectorAll("input:checked")].map((c) => c.value);
  if (!chosen.length) { $("plot-sigmas").replaceChildren(); return; }
  const query = new URLSearchParams([["steps", String(steps)], ...chosen.map((s) => ["sampler", s])]);
  try {
    const r = await api("GET", `/playground/sigmas?${query}`);
    const flow = r.kind === "flow";  // flow models: flow times t in [0, 1], on a linear axis
    const series = r.samplers.map((s) => {
      const k = state.samplers.findIndex((x) => x.label === s.sampler);
      return {name: s.sampler, x: s.sigmas.map((_, i) => i), y: s.sigmas, dots: true,
              color: Plot.PALETTE[Math.max(k, 0) % Plot.PALETTE.length], rings: evaluationPoints(s, !flow)};
    });
    $("sig-hint").textContent = flow
      ? `On ${r.model}'s flow schedule (shift ${r.shift}${r.dynamic_shift ? ", dynamic" : ""}): σ is the flow time t ∈ [0, 1].`
      : `On ${r.model ? r.model + "'s" : "the shipped model's"} schedule.`;
    Plot.plot($("plot-sigmas"), {series, xLabel: "step", yLabel: flow ? "t" : "σ", logY: !flow, width: 900, height: 280});
  } catch (e) {
    showError(e);
  }
}

// Where each denoiser call falls along the step axis (between the two sigmas it lies between, in log sigma;
// flow times: linearly).
function evaluationPoints(s, log = true) {
  const out = [];
  for (const e of s.evaluations) {
    let i = 0;
    while (i < s.sigmas.length - 2 && s.sigmas[i + 1] >= e) i += 1;
    const a = s.sigmas[i], b = s.sigmas[i + 1];
    const f = !log ? (a > b ? (a - e) / (a - b) : 0)
      : b > 0 && a > b ? (Math.log(a) - Math.log(e)) / (Math.log(a) - Math.log(b)) : 0;
    out.push({x: i + Math.min(Math.max(f, 0), 1), y: e});
  }
  return out;
}

async function setupForward(samples) {
  sampleButtons($("fwd-samples"), samples, (s, i) => {
    state.fwdImage = null; state.fwdSample = i; $("fwd-upload").value = ""; updateForward();
  });
  $("fwd-upload").addEventListener("change", async () => {
    try {
      const url = await readFile($("fwd-upload"));
      const canvas = document.createElement("canvas");
      canvas.width = canvas.height = 64;
      await imageToCanvas(url, canvas);
      state.fwdImage = canvas.toDataURL("image/png");
      unpress($("fwd-samples"));
      updateForward();
    } catch (e) { showError(e); }
  });
  $("fwd-slider").addEventListener("input", updateForward);
  $("fwd-schedule").addEventListener("change", updateForward);
  $("fwd-seed").addEventListener("change", updateForward);
  for (const radio of document.querySelectorAll('input[name="fwd-axis"]')) {
    radio.addEventListener("change", () => {
      const slider = $("fwd-slider");
      if (radio.value === "t") { slider.max = "999"; slider.value = String(Math.round(fwd.t)); }
      else { slider.max = "1000"; slider.value = "500"; }
      slider.setAttribute("aria-label", radio.value === "t" ? "timestep t" : "noise level sigma");
      updateForward();
    });
  }
  state.schedules = await api("GET", "/playground/schedules?points=250");
  drawScheduleCurves();
  await updateForward();

  const defaults = new Set(["Euler", "Heun", "DDIM", "DPM++ 2M Karras", "DPM++ SDE Karras"]);
  state.samplers.forEach((s, k) => {
    const label = document.createElement("label");
    const box = Object.assign(document.createElement("input"), {type: "checkbox", value: s.label, checked: defaults.has(s.label)});
    label.style.setProperty("--swatch", Plot.PALETTE[k % Plot.PALETTE.length]);
    label.append(box, " " + s.label);
    box.addEventListener("change", updateSigmaPlot);
    $("sig-samplers").appendChild(label);
  });
  $("sig-steps").addEventListener("change", updateSigmaPlot);
  await updateSigmaPlot();
}

// --- 2. the reverse process -----------------------------------------------------------------------------

// frames: the progress events that carry previews (the server may send them less often than every step);
// sigmas: every step's noise level.
const rev = {job: null, frames: [], sigmas: [], follow: true};

function jobBody(prefix, extra) {
  const body = {
    prompt: $(`${prefix}-prompt`).value, steps: intValue(`${prefix}-steps`), seed: intValue(`${prefix}-seed`),
    sampler: $(`${prefix}-sampler`) ? $(`${prefix}-sampler`).value : state.defaultSampler,
    guidance_scale: $(`${prefix}-guidance`) ? numValue(`${prefix}-guidance`) : 7.5, n: 1, preview: true,
  };
  const negative = $(`${prefix}-negative`);
  if (negative && negative.value) body.negative_prompt = negative.value;
  return Object.assign(body, extra || {});
}

function showFrame(index) {
  const f = rev.frames[index];
  if (!f) return;
  $("rev-x").src = f.preview_x;
  $("rev-x0").src = f.preview_x0;
  $("rev-x").dataset.step = String(f.step);
  $("rev-scrub-label").textContent = `Step ${f.step} of ${f.steps}, σ = ${Number(f.sigma).toPrecision(3)}`;
  drawReversePlot(f.step);
}

function drawReversePlot(step) {
  Plot.plot($("plot-rev"), {series: [{name: "σ at each step", x: rev.sigmas.map((g) => g.step), y: rev.sigmas.map((g) => g.sigma),
                                      dots: true}], xLabel: "step", yLabel: "σ", logY: true, markerX: step});
}

function setRunning(prefix, running) {
  $(`${prefix}-run`).disabled = running;
  $(`${prefix}-cancel`).disabled = !running;
}

async function generate(event) {
  event.preventDefault();
  clearError();
  if (!checkForm($("rev-form"))) return;
  const scrub = $("rev-scrub");
  rev.frames = []; rev.sigmas = []; rev.follow = true;
  scrub.max = "1"; scrub.value = "1"; scrub.disabled = true;
  $("rev-final").src = BLANK; $("rev-x").src = BLANK; $("rev-x0").src = BLANK;
  $("rev-progress").value = 0;
  $("rev-status").textContent = "Submitting…";
  setRunning("rev", true);
  const started = performance.now();
  const body = jobBody("rev");
  rev.job = runJob(body, {
    queued: (j) => { $("rev-status").textContent = j.position ? `Queued (position ${j.position})…` : "Queued…"; },
    started: () => { $("rev-status").textContent = "Denoising…"; },
    progress: (p) => {
      rev.sigmas.push({step: p.step, sigma: p.sigma});
      $("rev-progress").value = p.steps ? p.step / p.steps : 0;
      $("rev-status").textContent = `Step ${p.step} of ${p.steps}`;
      if (!p.preview_x || !p.preview_x0) { if (rev.follow) drawReversePlot(p.step); return; }
      rev.frames.push(p);
      scrub.max = String(rev.frames.length);
      scrub.disabled = false;
      if (rev.follow) { scrub.value = scrub.max; showFrame(rev.frames.length - 1); }
    },
  });
  try {
    const r = await rev.job.done;
    $("rev-final").src = r.images[0];
    state.lastImage = r.images[0];
    $("edit-use-last").disabled = false;
    $("rev-progress").value = 1;
    const seconds = r.elapsed_s ?? (performance.now() - started) / 1000;
    $("rev-status").textContent = `Done in ${seconds.toFixed(2)} s (seed ${r.seeds ? r.seeds[0] : body.seed}). Drag the slider to replay the steps.`;
  } catch (e) {
    $("rev-status").textContent = e instanceof Cancelled ? "Cancelled." : "Failed.";
    showError(e);
  } finally {
    setRunning("rev", false);
    rev.job = null;
  }
}

function setupReverse() {
  fillSamplerSelect($("rev-sampler"));
  $("rev-form").addEventListener("submit", generate);
  $("rev-cancel").addEventListener("click", () => {
    if (rev.job) { $("rev-status").textContent = "Cancelling…"; rev.job.cancel(); }
  });
  $("rev-scrub").addEventListener("input", () => {
    const i = Number($("rev-scrub").value) - 1;
    rev.follow = i === rev.frames.length - 1;
    showFrame(i);
  });
}

// --- 3. guidance explorer and sampler comparison --------------------------------------------------------

const GUIDANCE_SCALES = [1, 4, 7.5, 12, 20];

function resultCard(container, title) {
  const fig = document.createElement("figure");
  fig.className = "result";
  const img = document.createElement("img");
  img.width = 128; img.height = 128; img.alt = title;
  const cap = document.createElement("figcaption");
  const name = document.createElement("strong");
  name.textContent = title;
  const note = document.createElement("span");
  note.textContent = "waiting";
  cap.append(name, note);
  fig.append(img, cap);
  container.appendChild(fig);
  return {img, note};
}

// Runs one job per variant, one after another (so timings are not shared), filling a card for each.
async function runSeries(prefix, variants) {
  clearError();
  const container = $(`${prefix}-results`);
  container.replaceChildren();
  const cards = variants.map((v) => resultCard(container, v.title));
  const batch = {cancelled: false, job: null};
  $(`${prefix}-cancel`).onclick = () => { batch.cancelled = true; if (batch.job) batch.job.cancel(); };
  setRunning(prefix, true);
  let completed = 0;
  try {
    for (let i = 0; i < variants.length && !batch.cancelled; i++) {
      const card = cards[i];
      let t0 = null;
      card.note.textContent = "queued";
      $(`${prefix}-status`).textContent = `Running ${i + 1} of ${variants.length}…`;
      batch.job = runJob(variants[i].body, {
        started: () => { t0 = performance.now(); card.note.textContent = "running"; },
        progress: (p) => { if (p.preview_x0) card.img.src = p.preview_x0; card.note.textContent = `step ${p.step}/${p.steps}`; },
      });
      const r = await batch.job.done;
      card.img.src = r.images[0];
      state.lastImage = r.images[0];
      $("edit-use-last").disabled = false;
      const seconds = r.elapsed_s ?? (t0 === null ? NaN : (performance.now() - t0) / 1000);
      card.note.textContent = `${seconds.toFixed(2)} s`;
      card.img.dataset.seconds = String(seconds);
      completed += 1;
    }
    $(`${prefix}-status`).textContent = batch.cancelled ? "Cancelled." : `Done: ${completed} images.`;
  } catch (e) {
    $(`${prefix}-status`).textContent = e instanceof Cancelled ? "Cancelled." : "Failed.";
    showError(e);
  } finally {
    for (const card of cards.slice(completed)) if (card.note.textContent !== "failed") card.note.textContent = "not run";
    setRunning(prefix, false);
  }
}

function setupGuidance() {
  fillSamplerSelect($("gui-sampler"));
  $("gui-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if (!checkForm($("gui-form"))) return;
    runSeries("gui", GUIDANCE_SCALES.map((g) => ({title: `guidance ${g}`, body: jobBody("gui", {guidance_scale: g})})));
  });
  const defaults = new Set(["Euler", "Euler a", "Heun", "DDIM", "DPM++ 2M", "DPM++ 2M Karras", "UniPC"]);
  for (const s of state.samplers) {
    const label = document.createElement("label");
    const box = Object.assign(document.createElement("input"), {type: "checkbox", value: s.label, checked: defaults.has(s.label)});
    label.append(box, " " + s.label);
    $("cmp-samplers").appendChild(label);
  }
  $("cmp-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if (!checkForm($("cmp-form"))) return;
    const chosen = [...$("cmp-samplers").querySelectorAll("input:checked")].map((c) => c.value);
    if (!chosen.length) { showError(new ApiError("Pick at least one sampler to compare.")); return; }
    // no previews here: decoding them would add to every sampler's time
    runSeries("cmp", chosen.map((s) => ({title: s, body: jobBody("cmp", {sampler: s, preview: false})})));
  });
}

// --- 4. editing: img2img, inpainting (a painted mask), ControlNet (a drawn control image) ----------------

const edit = {mode: "img2img", job: null, painting: null, erasing: false, cursor: {x: 32, y: 32}, hasImage: false};

function editMode() { return document.querySelector('input[name="edit-mode"]:checked').value; }

function paintCtx() { return $("edit-paint").getContext("2d"); }

// A stroke of the brush from the last point to (x, y); a dab when there is no last point.
function paintAt(x, y, erase, from) {
  const ctx = paintCtx();
  const width = Number($("edit-brush").value);
  ctx.save();
  ctx.globalCompositeOperation = erase ? "destination-out" : "source-over";
  ctx.strokeStyle = ctx.fillStyle = brushColor();
  ctx.lineWidth = width;
  ctx.lineCap = "round";
  ctx.beginPath();
  if (from) {
    ctx.moveTo(from[0], from[1]);
    ctx.lineTo(x, y);
    ctx.stroke();
  } else {
    ctx.arc(x, y, Math.max(width / 2, 0.5), 0, 2 * Math.PI);
    ctx.fill();
  }
  ctx.restore();
}

function brushColor() { return edit.mode === "controlnet" ? $("edit-color").value : "#ff2020"; }  // "#rrggbb"

function rgbOf(hex) { return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16)); }

function clearPaint() { paintCtx().clearRect(0, 0, 64, 64); }

function fillPaint() {
  const ctx = paintCtx();
  ctx.fillStyle = brushColor();
  ctx.fillRect(0, 0, 64, 64);
}

function invertPaint() {
  const ctx = paintCtx();
  const img = ctx.getImageData(0, 0, 64, 64);
  const [r, g, b] = rgbOf(brushColor());
  for (let i = 0; i < img.data.length; i += 4) {
    const on = img.data[i + 3] > 0;
    img.data[i] = r; img.data[i + 1] = g; img.data[i + 2] = b;
    img.data[i + 3] = on ? 0 : 255;
  }
  ctx.putImageData(img, 0, 0);
}

// The painted layer as a PNG on black: in inpainting, the mask (white = repaint); in ControlNet mode, the
// drawing in its colours. Returns the base64 and how many pixels were painted.
function paintedPNG() {
  const src = paintCtx().getImageData(0, 0, 64, 64);
  const out = document.createElement("canvas");
  out.width = out.height = 64;
  const ctx = out.getContext("2d");
  const img = ctx.createImageData(64, 64);
  const mask = edit.mode !== "controlnet";
  let painted = 0;
  for (let i = 0; i < src.data.length; i += 4) {
    const on = src.data[i + 3] >= 128;
    painted += on;
    for (let c = 0; c < 3; c++) img.data[i + c] = on ? (mask ? 255 : src.data[i + c]) : 0;
    img.data[i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
  return {base64: base64Of(out), painted};
}

function setEditMode(mode) {
  edit.mode = mode;
  const paint = mode !== "img2img";
  $("edit-paint-tools").hidden = !paint;
  $("edit-control-box").hidden = mode !== "controlnet";
  $("edit-source-box").hidden = mode === "controlnet";
  $("edit-control-upload-label").hidden = mode !== "controlnet";
  $("edit-color-label").hidden = mode !== "controlnet";
  $("edit-strength-box").hidden = mode === "controlnet";
  $("edit-stack").classList.toggle("control", mode === "controlnet");
  $("edit-paint").style.pointerEvents = paint ? "auto" : "none";
  $("edit-paint").tabIndex = paint ? 0 : -1;
  $("edit-strength").value = mode === "inpaint" ? "1" : "0.6";
  $("edit-strength-label").textContent = `Strength ${Number($("edit-strength").value).toFixed(2)}`;
  clearPaint();
  const titles = {img2img: "Starting image", inpaint: "Paint the area to repaint (red)", controlnet: "Draw the control image (white on black)"};
  $("edit-canvas-title").textContent = titles[mode];
  $("edit-paint-hint").textContent = paint
    ? "Paint with the mouse, or focus the picture and use the arrow keys and Space (Shift+Space erases)." : "";
  if (mode === "controlnet") {
    const ctx = $("edit-image").getContext("2d");
    ctx.fillStyle = "#000"; ctx.fillRect(0, 0, 64, 64);
  } else {
    drawEditSource();
  }
}

async function drawEditSource() {
  if (edit.source) await imageToCanvas(edit.source, $("edit-image"));
}

function pointerPos(e) {
  const c = $("edit-paint");
  const rect = c.getBoundingClientRect();
  return [(e.clientX - rect.left) / rect.width * c.width, (e.clientY - rect.top) / rect.height * c.height];
}

function drawCursor() {
  const c = $("edit-paint");
  const cursor = $("edit-stack").querySelector(".cursor") || $("edit-stack").appendChild(Object.assign(document.createElement("div"), {className: "cursor"}));
  const scale = c.clientWidth / c.width;
  const r = Number($("edit-brush").value) / 2 * scale;
  Object.assign(cursor.style, {left: `${edit.cursor.x * scale - r}px`, top: `${edit.cursor.y * scale - r}px`,
                               width: `${2 * r}px`, height: `${2 * r}px`});
}

function setupPainting() {
  const c = $("edit-paint");
  c.addEventListener("pointerdown", (e) => {
    edit.painting = pointerPos(e);
    edit.erasing = e.button === 2 || e.shiftKey;
    c.setPointerCapture(e.pointerId);
    paintAt(...edit.painting, edit.erasing);
  });
  c.addEventListener("pointermove", (e) => {
    if (!edit.painting) return;
    const p = pointerPos(e);
    paintAt(...p, edit.erasing, edit.painting);
    edit.painting = p;
  });
  const stop = () => { edit.painting = null; };
  c.addEventListener("pointerup", stop);
  c.addEventListener("pointercancel", stop);
  c.addEventListener("contextmenu", (e) => e.preventDefault());
  c.addEventListener("focus", () => { $("edit-stack").classList.add("focused"); drawCursor(); });
  c.addEventListener("blur", () => $("edit-stack").classList.remove("focused"));
  c.addEventListener("keydown", (e) => {
    const step = e.shiftKey ? 8 : 2;
    const moves = {ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step]};
    if (moves[e.key]) {
      edit.cursor.x = Math.min(Math.max(edit.cursor.x + moves[e.key][0], 0), 63);
      edit.cursor.y = Math.min(Math.max(edit.cursor.y + moves[e.key][1], 0), 63);
    } else if (e.key === " " || e.key === "Enter") {
      paintAt(edit.cursor.x, edit.cursor.y, e.shiftKey);
    } else {
      return;
    }
    e.preventDefault();
    drawCursor();
  });
  $("edit-brush").addEventListener("input", drawCursor);
  $("edit-clear").addEventListener("click", clearPaint);
  $("edit-fill").addEventListener("click", fillPaint);
  $("edit-invert").addEventListener("click", invertPaint);
  $("edit-center").addEventListener("click", () => {
    const ctx = paintCtx();
    ctx.fillStyle = brushColor();
    ctx.fillRect(16, 16, 32, 32);
  });
}

async function runEdit(event) {
  event.preventDefault();
  clearError();
  if (!checkForm($("edit-form"))) return;
  const mode = editMode();
  const extra = {};
  if (mode !== "controlnet") {
    if (!edit.source) { showError(new ApiError("Pick a starting image first (a built-in picture, an upload or the last generated image).")); return; }
    extra.image = base64Of($("edit-image"));
    extra.strength = numValue("edit-strength");
  }
  if (mode === "inpaint") {
    const mask = paintedPNG();
    if (!mask.painted) { showError(new ApiError("Paint the area to repaint on the picture first.")); return; }
    extra.mask = mask.base64;
  }
  if (mode === "controlnet") {
    if (!edit.controlTypes.length) {
      showError(new ApiError("This server holds no ControlNet. Start it with `reverie serve --controlnet NAME=FOLDER` to use this mode."));
      return;
    }
    const control = paintedPNG();
    if (!control.painted && !edit.controlUploaded) { showError(new ApiError("Draw or upload a control image first.")); return; }
    extra.control_image = edit.controlUploaded ? base64Of(edit.controlUploaded) : control.base64;
    extra.control_type = $("edit-control-type").value;
    extra.controlnet_scale = numValue("edit-control-scale");
  }
  $("edit-result").src = BLANK; $("edit-x0").src = BLANK;
  $("edit-progress").value = 0;
  $("edit-status").textContent = "Submitting…";
  setRunning("edit", true);
  edit.job = runJob(jobBody("edit", extra), {
    started: () => { $("edit-status").textContent = "Denoising…"; },
    progress: (p) => {
      if (p.preview_x0) $("edit-x0").src = p.preview_x0;
      $("edit-progress").value = p.steps ? p.step / p.steps : 0;
      $("edit-status").textContent = `Step ${p.step} of ${p.steps}`;
    },
  });
  try {
    const r = await edit.job.done;
    $("edit-result").src = r.images[0];
    state.lastImage = r.images[0];
    $("edit-use-last").disabled = false;
    $("edit-progress").value = 1;
    $("edit-status").textContent = `Done${r.elapsed_s !== undefined ? ` in ${r.elapsed_s.toFixed(2)} s` : ""}.`;
  } catch (e) {
    $("edit-status").textContent = e instanceof Cancelled ? "Cancelled." : "Failed.";
    showError(e);
  } finally {
    setRunning("edit", false);
    edit.job = null;
  }
}

function setupEdit(samples, controlTypes) {
  fillSamplerSelect($("edit-sampler"));
  edit.controlTypes = controlTypes;
  $("edit-control-type").replaceChildren(...(controlTypes.length ? controlTypes.map((t) => new Option(t, t))
                                                                 : [new Option("none on this server", "")]));
  const pick = async (src) => { edit.source = src; edit.hasImage = true; await drawEditSource(); };
  sampleButtons($("edit-samples"), samples, (s) => pick(s.image).catch(showError));
  if (samples.length) pick(samples[0].image).catch(showError);
  $("edit-upload").addEventListener("change", async () => {
    try { await pick(await readFile($("edit-upload"))); unpress($("edit-samples")); } catch (e) { showError(e); }
  });
  $("edit-use-last").addEventListener("click", () => {
    if (state.lastImage) { pick(state.lastImage).catch(showError); unpress($("edit-samples")); }
  });
  $("edit-control-upload").addEventListener("change", async () => {
    try {
      const url = await readFile($("edit-control-upload"));
      const canvas = document.createElement("canvas");
      canvas.width = canvas.height = 64;
      await imageToCanvas(url, canvas, "#000");
      edit.controlUploaded = canvas;
      clearPaint();
      await imageToCanvas(url, $("edit-image"), "#000");
    } catch (e) { showError(e); }
  });
  for (const radio of document.querySelectorAll('input[name="edit-mode"]')) {
    radio.addEventListener("change", () => { edit.controlUploaded = null; setEditMode(radio.value); });
  }
  $("edit-strength").addEventListener("input", () => {
    $("edit-strength-label").textContent = `Strength ${numValue("edit-strength").toFixed(2)}`;
  });
  $("edit-control-scale").addEventListener("input", () => {
    $("edit-control-scale-label").textContent = `Control strength ${numValue("edit-control-scale").toFixed(2)}`;
  });
  setupPainting();
  setEditMode("img2img");
  $("edit-form").addEventListener("submit", runEdit);
  $("edit-cancel").addEventListener("click", () => { if (edit.job) { $("edit-status").textContent = "Cancelling…"; edit.job.cancel(); } });
}

// --- 5. video: a video model's job, its clip, and its middle frame at every denoising step ---------------

// frames: the progress events that carry previews (the middle latent frame, decoded).
const vid = {job: null, frames: [], follow: true};

function showVideoFrame(index) {
  const f = vid.frames[index];
  if (!f) return;
  $("vid-x").src = f.preview_x;
  $("vid-x0").src = f.preview_x0;
  $("vid-x0").dataset.step = String(f.step);
  $("vid-scrub-label").textContent = `Step ${f.step} of ${f.steps}, σ = ${Number(f.sigma).toPrecision(3)}`;
}

// The clip: MP4 plays in the <video> element; a GIF (a server without PyAV) shows as a picture.
function showClip(url) {
  const gif = url.endsWith(".gif");
  $("vid-player").hidden = gif;
  $("vid-gif").hidden = !gif;
  if (gif) { $("vid-gif").src = url; return; }
  $("vid-player").src = url;
  $("vid-player").play().catch(() => {});  // autoplay may be refused; the controls remain
}

async function generateVideo(event) {
  event.preventDefault();
  clearError();
  if (!checkForm($("vid-form"))) return;
  const scrub = $("vid-scrub");
  vid.frames = []; vid.follow = true;
  scrub.max = "1"; scrub.value = "1"; scrub.disabled = true;
  $("vid-x").src = BLANK; $("vid-x0").src = BLANK;
  $("vid-player").removeAttribute("src"); $("vid-gif").hidden = true; $("vid-player").hidden = false;
  $("vid-progress").value = 0;
  $("vid-status").textContent = "Submitting…";
  setRunning("vid", true);
  const body = {
    model: $("vid-model").value, prompt: $("vid-prompt").value, steps: intValue("vid-steps"),
    guidance_scale: numValue("vid-guidance"), seed: intValue("vid-seed"), num_frames: intValue("vid-frames"),
    fps: numValue("vid-fps"), width: intValue("vid-width"), height: intValue("vid-height"), n: 1, preview: true,
  };
  if ($("vid-negative").value) body.negative_prompt = $("vid-negative").value;
  vid.job = runJob(body, {
    queued: (j) => { $("vid-status").textContent = j.position ? `Queued (position ${j.position})…` : "Queued…"; },
    started: () => { $("vid-status").textContent = "Denoising…"; },
    progress: (p) => {
      $("vid-progress").value = p.steps ? p.step / p.steps : 0;
      $("vid-status").textContent = `Step ${p.step} of ${p.steps}`;
      if (!p.preview_x || !p.preview_x0) return;
      vid.frames.push(p);
      scrub.max = String(vid.frames.length);
      scrub.disabled = false;
      if (vid.follow) { scrub.value = scrub.max; showVideoFrame(vid.frames.length - 1); }
    },
  });
  try {
    const r = await vid.job.done;
    showClip(r.videos[0]);
    $("vid-progress").value = 1;
    const seconds = r.elapsed_s !== undefined ? ` in ${r.elapsed_s.toFixed(2)} s` : "";
    $("vid-status").textContent = `Done${seconds}: ${body.num_frames} frames at ${body.fps} fps. Drag the slider to replay the steps.`;
  } catch (e) {
    $("vid-status").textContent = e instanceof Cancelled ? "Cancelled." : "Failed.";
    showError(e);
  } finally {
    setRunning("vid", false);
    $("vid-run").disabled = !$("vid-model").value;
    vid.job = null;
  }
}

// models: GET /v1/models; the tab offers the video models (describe: video true) with their defaults.
function setupVideo(models) {
  const videos = models.filter((m) => m && m.video);
  $("vid-model").replaceChildren(...(videos.length ? videos.map((m) => new Option(m.id, m.id))
                                                    : [new Option("no video model on this server", "")]));
  $("vid-run").disabled = !videos.length;
  if (!videos.length) {
    $("vid-hint").textContent = "This server holds no video model: serve a Wan 2.1 text-to-video folder to use this tab.";
  }
  const useDefaults = () => {
    const m = videos.find((v) => v.id === $("vid-model").value);
    if (!m) return;
    $("vid-steps").value = String(m.defaults.steps);
    $("vid-guidance").value = String(m.defaults.guidance_scale);
    $("vid-fps").value = String(m.defaults.fps);
    for (const id of ["vid-width", "vid-height"]) $(id).step = String(m.size_multiple);
  };
  $("vid-model").addEventListener("change", useDefaults);
  useDefaults();
  $("vid-form").addEventListener("submit", generateVideo);
  $("vid-cancel").addEventListener("click", () => {
    if (vid.job) { $("vid-status").textContent = "Cancelling…"; vid.job.cancel(); }
  });
  $("vid-scrub").addEventListener("input", () => {
    const i = Number($("vid-scrub").value) - 1;
    vid.follow = i === vid.frames.length - 1;
    showVideoFrame(i);
  });
}

// --- start ----------------------------------------------------------------------------------------------

// What the server says it can do: its models (GET /v1/models) and their ControlNets, if the job API is there.
async function checkServer() {
  try {
    const models = await api("GET", "/v1/models");
    const list = Array.isArray(models) ? models : (models && (models.data || models.models)) || [];
    const names = list.map((m) => (typeof m === "string" ? m : m.id || m.name)).filter(Boolean);
    const controls = [];
    for (const m of list) {
      for (const c of (m && (m.controlnets || m.control_types)) || []) controls.push(typeof c === "string" ? c : c.id || c.name);
    }
    for (const c of (models && (models.controlnets || models.control_types)) || []) controls.push(typeof c === "string" ? c : c.id || c.name);
    $("server-status").textContent = `Connected. Model: ${names.join(", ") || "unknown"}.`;
    return {controls: controls.filter(Boolean), models: list};
  } catch (e) {
    $("server-status").textContent = e.status === 404
      ? "This server has no job API: the forward-process views work, generation does not."
      : `Generation may not work: ${e.message}`;
    return {controls: [], models: []};
  }
}

async function main() {
  setupTabs();
  $("error-close").addEventListener("click", clearError);
  try {
    const [samplers, samples, server] = await Promise.all([
      api("GET", "/playground/samplers"), api("GET", "/playground/samples?size=64"), checkServer(),
    ]);
    state.samplers = samplers.samplers;
    state.defaultSampler = samplers.default;
    setupReverse();
    setupGuidance();
    setupVideo(server.models);
    setupEdit(samples.samples, [...new Set(server.controls)]);
    await setupForward(samples.samples);
    document.body.dataset.ready = "true";
  } catch (e) {
    showError(e);
  }
}

main();
