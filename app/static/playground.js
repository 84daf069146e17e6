// diffq playground: submits a job to the public API, follows its server-sent events
// (progress, previews), shows the finished images. Plain JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const TERMINAL = ["succeeded", "failed", "canceled", "deleted"];
let models = [];
let current = null;      // {id, source: EventSource}
let chainedImage = null; // "job:<id>/<n>" picked from a result

function setStatus(text) { $("status").textContent = text; }

function showError(message) {
  $("error").hidden = !message;
  $("error").textContent = message || "";
}

function errorText(body, status) {
  if (!body || typeof body !== "object") return `HTTP ${status}`;
  const fields = (body.fields || []).map((f) => `• ${f.field}: ${f.message}`).join("\n");
  return `${body.code || "error"}: ${body.message || ""}` + (fields ? `\n${fields}` : "");
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models");
    models = (await response.json()).models || [];
  } catch (e) {
    models = [];
  }
  const select = $("model");
  select.innerHTML = "";
  if (!models.length) {
    select.add(new Option("(no live worker)", ""));
    setStatus("No live worker serves a model yet; start one with `diffq worker`.");
    return;
  }
  for (const model of models) select.add(new Option(model.name, model.name));
  applyModel();
}

function applyModel() {
  const model = models.find((m) => m.name === $("model").value);
  if (!model) return;
  $("width").placeholder = model.default_width;
  $("height").placeholder = model.default_height;
  $("width").min = $("height").min = model.min_size;
  $("width").max = $("height").max = model.max_size;
  $("width").step = $("height").step = model.size_multiple;
  $("steps").placeholder = model.default_steps;
  $("steps").max = model.max_steps;
  $("guidance_scale").placeholder = model.default_guidance_scale;
  $("num_images").max = model.max_images;
  const scheduler = $("scheduler");
  scheduler.innerHTML = "";
  scheduler.add(new Option(`default (${model.default_scheduler})`, ""));
  for (const name of model.schedulers) scheduler.add(new Option(name, name));
  for (const option of $("mode").options) {
    option.disabled = option.value !== "" && !model.modes.includes(option.value);
  }
}

function outpaintBorder() {
  const border = {left: +$("op_left").value || 0, top: +$("op_top").value || 0,
                  right: +$("op_right").value || 0, bottom: +$("op_bottom").value || 0};
  return Object.values(border).some((v) => v > 0) ? border : null;
}

// The request: JSON, or multipart/form-data when a file is uploaded.
function buildRequest() {
  const fields = {prompt: $("prompt").value};
  for (const name of ["negative_prompt", "model", "scheduler", "mode"]) {
    if ($(name).value) fields[name] = $(name).value;
  }
  for (const name of ["width", "height", "steps", "seed", "num_images"]) {
    if ($(name).value !== "") fields[name] = parseInt($(name).value, 10);
  }
  if ($("guidance_scale").value !== "") fields.guidance_scale = parseFloat($("guidance_scale").value);
  const image = $("image").files[0];
  const mask = $("mask").files[0];
  const editing = image || chainedImage;
  if (editing && $("use_strength").checked) fields.strength = parseFloat($("strength").value);
  const border = outpaintBorder();
  if (editing && border && fields.mode !== "img2img" && fields.mode !== "inpaint") fields.outpaint = border;
  if (editing && $("mask_alpha").checked) fields.mask = "alpha";
  if (!image && !mask) {
    if (chainedImage) fields.image = chainedImage;
    return {headers: {"content-type": "application/json"}, body: JSON.stringify(fields)};
  }
  const form = new FormData();
  for (const [name, value] of Object.entries(fields)) {
    form.append(name, typeof value === "object" ? JSON.stringify(value) : String(value));
  }
  if (image) form.append("image", image);
  else if (chainedImage) form.append("image", chainedImage);
  if (mask && !$("mask_alpha").checked) form.append("mask", mask);
  return {headers: {}, body: form};
}

async function submit(event) {
  event.preventDefault();
  if (current) return;
  showError("");
  document.body.dataset.state = "working";  // "done" or "failed" once it ends (tests wait on it)
  $("preview-box").hidden = true;  // earlier results stay (to edit them) until this job's replace them
  $("progress").value = 0;
  $("progress-text").textContent = "";
  const request = buildRequest();
  $("generate").disabled = true;
  setStatus("Submitting…");
  let response, body;
  try {
    response = await fetch("/v1/jobs", {method: "POST", headers: request.headers, body: request.body});
    body = await response.json().catch(() => null);
  } catch (e) {
    finish(`Cannot reach the API: ${e}`);
    return;
  }
  if (response.status !== 202) {
    finish(errorText(body, response.status));
    return;
  }
  follow(body);
}

function follow(job) {
  const source = new EventSource(`/v1/jobs/${job.id}/events`); // reconnects with Last-Event-ID by itself
  current = {id: job.id, source};
  document.body.dataset.job = job.id;
  $("cancel").disabled = false;
  setStatus(`Queued (job ${job.id.slice(0, 8)}, seed ${job.request.seed})`);
  if (job.queue_position) $("progress-text").textContent = `${job.queue_position} job(s) ahead`;
  const on = (type, handler) => source.addEventListener(type, (e) => handler(JSON.parse(e.data || "{}")));
  on("queued", () => setStatus(`Queued (job ${job.id.slice(0, 8)})`));
  on("running", (data) => setStatus(`Running${data.attempt > 1 ? ` (attempt ${data.attempt})` : ""}…`));
  on("progress", (data) => {
    setStatus("Running…");
    $("progress").max = data.total;
    $("progress").value = data.step;
    const eta = data.eta_seconds != null ? `, about ${data.eta_seconds.toFixed(1)} s left` : "";
    $("progress-text").textContent = `step ${data.step} of ${data.total}${eta}`;
  });
  on("preview", (data) => {
    $("preview").src = `/v1/jobs/${job.id}/preview.png?step=${data.step}`;
    $("preview-caption").textContent = `preview at step ${data.step} of ${data.total}`;
    $("preview-box").hidden = false;
  });
  for (const type of TERMINAL) on(type, () => ended(job.id));
}

async function ended(jobId) {
  if (!current || current.id !== jobId) return;
  current.source.close();
  let job = null;
  try {
    job = await (await fetch(`/v1/jobs/${jobId}`)).json();
  } catch (e) { /* shown below */ }
  if (!job || !job.status) {
    finish("The job is gone (deleted or expired).");
    return;
  }
  if (job.status === "succeeded") {
    $("progress").value = $("progress").max;
    if (job.progress) $("progress-text").textContent = `${job.progress.total} steps`;
    showResults(job);
    finish(null, `Done: ${job.images.length} image(s), seed ${job.seeds.join(", ")}`);
  } else if (job.status === "canceled") {
    finish(null, "Canceled.");
  } else {
    finish(job.error ? `${job.error.code}: ${job.error.message}` : `Job ${job.status}`);
  }
}

function showResults(job) {
  const results = $("results");
  results.innerHTML = "";
  for (const image of job.images) {
    const box = document.createElement("div");
    box.className = "result";
    const img = document.createElement("img");
    img.src = image.url;
    img.alt = `image ${image.index}, seed ${image.seed}`;
    img.className = "result-image";
    const link = document.createElement("a");
    link.href = image.url;
    link.download = `diffq-${job.id.slice(0, 8)}-${image.index}.png`;
    link.textContent = `download (seed ${image.seed}, ${image.width}×${image.height})`;
    const reuse = document.createElement("button");
    reuse.type = "button";
    reuse.textContent = "edit this image";
    reuse.addEventListener("click", () => chain(`job:${job.id}/${image.index}`));
    box.append(img, link, reuse);
    results.append(box);
  }
}

function chain(reference) {
  chainedImage = reference;
  $("image").value = "";
  $("chained-ref").textContent = reference;
  $("chained").hidden = false;
  if (!$("mode").value) $("mode").value = "img2img";
}

function finish(error, message) {
  if (current) current.source.close();
  current = null;
  delete document.body.dataset.job;
  $("generate").disabled = false;
  $("cancel").disabled = true;
  showError(error);
  setStatus(error ? "Failed." : (message || "Ready."));
  document.body.dataset.state = error ? "failed" : "done";
}

async function cancel() {
  if (!current) return;
  $("cancel").disabled = true;
  setStatus("Canceling…");
  const response = await fetch(`/v1/jobs/${current.id}/cancel`, {method: "POST"});
  if (response.status === 409) {
    const body = await response.json().catch(() => null);
    showError(errorText(body, 409));
  }
  // The `canceled` event ends it; a running job stops within one denoising step.
}

document.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  $("model").addEventListener("change", applyModel);
  $("strength").addEventListener("input", () => {
    $("strength-value").textContent = $("strength").value;
    $("use_strength").checked = true;
  });
  $("image").addEventListener("change", () => { chainedImage = null; $("chained").hidden = true; });
  $("unchain").addEventListener("click", () => { chainedImage = null; $("chained").hidden = true; });
  loadModels();
});
