// diffq playground: submits a job to the public API, follows its server-sent events
// (progress, previews), shows the finished images. Plain JavaScript, no build step.
//
// When the API needs keys, every /v1 request carries `Authorization: Bearer <key>` (the key the page
// remembers in localStorage). EventSource and <img src> cannot send headers, so events are read with
// fetch (a small text/event-stream reader) and images, when a key is set, are fetched as blobs.
// The key never goes into a URL.
"use strict";

const $ = (id) => document.getElementById(id);
const TERMINAL = ["succeeded", "failed", "canceled", "deleted"];
const KEY_STORAGE = "diffq.playground.apiKey";
let models = [];
let current = null;      // {id, stream: {close()}}
let chainedImage = null; // "job:<id>/<n>" picked from a result
let resultUrls = [];     // object URLs of the shown results, revoked when they are replaced

// ---- API key ---------------------------------------------------------------------------------

function apiKey() { return $("api-key").value.trim(); }

function authHeaders(headers) {
  const key = apiKey();
  return key ? {...(headers || {}), "Authorization": `Bearer ${key}`} : {...(headers || {})};
}

function rememberKey() {
  try {
    if (apiKey()) localStorage.setItem(KEY_STORAGE, apiKey());
    else localStorage.removeItem(KEY_STORAGE);
  } catch (e) { /* storage disabled: the key lasts as long as the page */ }
  $("forget-key").disabled = !apiKey();
}

function forgetKey() {
  $("api-key").value = "";
  rememberKey();
  showKeyMessage("");
  loadModels();
}

function showKeyMessage(message, kind) {
  const box = $("key-message");
  box.textContent = message || "";
  box.hidden = !message;
  box.className = kind === "ok" ? "key-ok" : "error";
}

// The message for a 401, next to the key field: no key, or a key the API refused.
function unauthorized() {
  const message = apiKey()
    ? "The key was refused (unknown, revoked or mistyped); check it, or make one with `diffq keys create`."
    : "This API needs an API key: paste one made with `diffq keys create --name NAME`.";
  showKeyMessage(message);
  return message;
}

// fetch for /v1: adds the key, and says so next to the key field when it is missing or refused.
async function api(path, options) {
  options = options || {};
  const response = await fetch(path, {...options, headers: authHeaders(options.headers)});
  if (response.status === 401) unauthorized();
  else if (response.ok && apiKey()) showKeyMessage("");
  return response;
}

// The JSON error body of a response, as text ("code: message", field problems below).
async function responseError(response) {
  if (response.status === 401) return unauthorized();
  const body = await response.json().catch(() => null);
  return errorText(body, response.status);
}

// ---- server-sent events over fetch -------------------------------------------------------------

// Parses text/event-stream: fed chunks of text, calls onEvent({type, data, id}) for each event.
// Follows the HTML spec's rules: `id:`, `event:`, `data:` (lines joined by \n), `retry:`, comments (`:`).
function sseParser(onEvent, onRetry) {
  let buffer = "", data = [], type = "", lastId = "", endedWithCR = false;
  const parser = {
    get lastId() { return lastId; },
    set lastId(value) { lastId = value; },
    feed(text) {
      if (endedWithCR && text.startsWith("\n")) text = text.slice(1);  // a \r\n split between chunks
      endedWithCR = text.endsWith("\r");
      buffer += text;
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = lines.pop();  // a partial line waits for the rest
      for (const line of lines) parser.line(line);
    },
    line(line) {
      if (line === "") {
        if (data.length) onEvent({type: type || "message", data: data.join("\n"), id: lastId});
        data = [];
        type = "";
        return;
      }
      if (line.startsWith(":")) return;  // a comment (keep-alive ping)
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") data.push(value);
      else if (field === "event") type = value;
      else if (field === "id" && !value.includes("\0")) lastId = value;
      else if (field === "retry" && /^\d+$/.test(value) && onRetry) onRetry(parseInt(value, 10));
    },
    reset() { buffer = ""; data = []; type = ""; endedWithCR = false; },  // a dropped connection discards a half-read event
  };
  return parser;
}

// Like EventSource, with the key: `on(type, handler)`; reconnects after a dropped connection with
// Last-Event-ID, so no event is lost or repeated. `onFail(message)` when the API refuses the stream.
function openEvents(url, onFail) {
  const handlers = {};
  const controller = new AbortController();
  let closed = false, delay = 1000, failures = 0;
  const parser = sseParser((event) => {
    failures = 0;
    for (const handler of handlers[event.type] || []) handler(event);
  }, (ms) => { delay = ms; });

  async function connect() {
    while (!closed) {
      const headers = {"Accept": "text/event-stream"};
      if (parser.lastId) headers["Last-Event-ID"] = parser.lastId;
      let retryAfter = null;
      try {
        const response = await fetch(url, {headers: authHeaders(headers), signal: controller.signal,
                                           cache: "no-store"});
        if (response.status === 401) { fail(unauthorized()); return; }
        if (response.status === 429 || response.status >= 500) {
          retryAfter = parseFloat(response.headers.get("Retry-After"));
          if (response.status === 429 && ++failures > 5) { fail(await responseError(response)); return; }
          await response.body?.cancel();
        } else if (!response.ok || !response.body) {
          fail(await responseError(response));
          return;
        } else {
          const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
          for (;;) {
            const {value, done} = await reader.read();
            if (done) break;
            parser.feed(value);
          }
        }
      } catch (e) {
        if (closed) return;
        if (++failures > 30) { fail(`Lost the event stream: ${e}`); return; }
      }
      parser.reset();
      if (closed) return;
      const wait = Number.isFinite(retryAfter) ? retryAfter * 1000 : delay;
      await new Promise((resolve) => setTimeout(resolve, wait));
    }
  }

  function fail(message) {
    if (closed) return;
    close();
    onFail(message);
  }

  function close() {
    closed = true;
    controller.abort();
  }

  connect();
  return {
    on(type, handler) { (handlers[type] = handlers[type] || []).push(handler); },
    close,
  };
}

// ---- images ------------------------------------------------------------------------------------

// Shows `url` in `img`: a plain src without a key; with one, fetched with the key into an object URL
// (the previous object URL of this image is revoked). Resolves to the URL shown, or null.
async function showImage(img, url) {
  if (!apiKey()) {
    revokeImage(img);
    img.src = url;
    return url;
  }
  const response = await api(url, {cache: "no-store"});
  if (!response.ok) return null;
  const objectUrl = URL.createObjectURL(await response.blob());
  revokeImage(img);
  img.dataset.objectUrl = objectUrl;
  img.src = objectUrl;
  return objectUrl;
}

function revokeImage(img) {
  if (img.dataset.objectUrl) URL.revokeObjectURL(img.dataset.objectUrl);
  delete img.dataset.objectUrl;
}

// The preview: one fetch at a time; previews that arrive meanwhile collapse into the newest.
const preview = {job: null, wanted: null, loading: false};

function showPreview(jobId, data) {
  preview.job = jobId;
  preview.wanted = data;
  if (!preview.loading) loadPreview();
}

async function loadPreview() {
  preview.loading = true;
  try {
    while (preview.wanted) {
      const data = preview.wanted, jobId = preview.job;
      preview.wanted = null;
      let shown = null;
      try {
        shown = await showImage($("preview"), `/v1/jobs/${jobId}/preview.png?step=${data.step}`);
      } catch (e) { /* a missed preview is not an error: the next one replaces it */ }
      if (shown && current && current.id === jobId) {
        $("preview-caption").textContent = `preview at step ${data.step} of ${data.total}`;
        $("preview-box").hidden = false;
      }
    }
  } finally {
    preview.loading = false;
  }
}

// ---- the page ----------------------------------------------------------------------------------

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
  let problem = null;
  try {
    const response = await api("/v1/models");
    if (response.ok) models = (await response.json()).models || [];
    else {
      models = [];
      problem = response.status === 401 ? "API key needed" : await responseError(response);
    }
  } catch (e) {
    models = [];
  }
  const select = $("model");
  select.innerHTML = "";
  if (problem) {
    select.add(new Option(`(${problem === "API key needed" ? problem : "models unavailable"})`, ""));
    setStatus(problem === "API key needed" ? "Enter an API key to list the models." : problem);
    return;
  }
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
    response = await api("/v1/jobs", {method: "POST", headers: request.headers, body: request.body});
    body = await response.json().catch(() => null);
  } catch (e) {
    finish(`Cannot reach the API: ${e}`);
    return;
  }
  if (response.status !== 202) {
    finish(response.status === 401 ? unauthorized() : errorText(body, response.status));
    return;
  }
  follow(body);
}

function follow(job) {
  // Reconnects with Last-Event-ID by itself, as EventSource would (which cannot send the key).
  const source = openEvents(`/v1/jobs/${job.id}/events`, (message) => {
    if (current && current.id === job.id) finish(message);
  });
  current = {id: job.id, source};
  document.body.dataset.job = job.id;
  $("cancel").disabled = false;
  setStatus(`Queued (job ${job.id.slice(0, 8)}, seed ${job.request.seed})`);
  if (job.queue_position) $("progress-text").textContent = `${job.queue_position} job(s) ahead`;
  const on = (type, handler) => source.on(type, (e) => handler(JSON.parse(e.data || "{}")));
  on("queued", () => setStatus(`Queued (job ${job.id.slice(0, 8)})`));
  on("running", (data) => setStatus(`Running${data.attempt > 1 ? ` (attempt ${data.attempt})` : ""}…`));
  on("progress", (data) => {
    setStatus("Running…");
    $("progress").max = data.total;
    $("progress").value = data.step;
    const eta = data.eta_seconds != null ? `, about ${data.eta_seconds.toFixed(1)} s left` : "";
    $("progress-text").textContent = `step ${data.step} of ${data.total}${eta}`;
  });
  on("preview", (data) => showPreview(job.id, data));
  for (const type of TERMINAL) on(type, () => ended(job.id));
}

async function ended(jobId) {
  if (!current || current.id !== jobId) return;
  current.source.close();
  let job = null;
  try {
    const response = await api(`/v1/jobs/${jobId}`);
    if (!response.ok && response.status !== 404) {
      finish(await responseError(response));
      return;
    }
    job = await response.json();
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
  for (const url of resultUrls) URL.revokeObjectURL(url);
  resultUrls = [];
  results.innerHTML = "";
  for (const image of job.images) {
    const box = document.createElement("div");
    box.className = "result";
    const img = document.createElement("img");
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
    if (!apiKey()) {
      img.src = image.url;
      continue;
    }
    // With a key: fetched once into an object URL, which the download link shares.
    api(image.url).then(async (response) => {
      if (!response.ok) throw new Error(await responseError(response));
      const url = URL.createObjectURL(await response.blob());
      if (!box.isConnected) { URL.revokeObjectURL(url); return; }
      resultUrls.push(url);
      img.src = url;
      link.href = url;
    }).catch((e) => { img.alt = `image ${image.index} could not be loaded: ${e.message || e}`; });
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
  const response = await api(`/v1/jobs/${current.id}/cancel`, {method: "POST"});
  if (!response.ok) {
    showError(await responseError(response));
    if (current && response.status !== 409) $("cancel").disabled = false;
  }
  // The `canceled` event ends it; a running job stops within one denoising step.
}

document.addEventListener("DOMContentLoaded", () => {
  try { $("api-key").value = localStorage.getItem(KEY_STORAGE) || ""; } catch (e) { /* storage disabled */ }
  $("forget-key").disabled = !apiKey();
  $("api-key").addEventListener("input", () => { rememberKey(); showKeyMessage(""); });
  $("api-key").addEventListener("change", loadModels);
  $("forget-key").addEventListener("click", forgetKey);
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
