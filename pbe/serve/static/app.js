// The page of `pbe serve`: plain JavaScript, no build step, no library. Everything goes through the HTTP API
// (GET /api/options, GET /api/health, POST /api/paint); the controls' defaults, choices and ranges come from
// /api/options, so this file states none of them.
"use strict";

const $ = (id) => document.getElementById(id);

// Which options sit outside the "Advanced" section, and friendlier labels than the field names. Presentation only:
// every value, choice and range still comes from the server's schema.
const MAIN_OPTIONS = ["scheduler", "steps", "guidance"];
const LABELS = {scheduler: "Sampler", steps: "Steps", guidance: "Guidance", eta: "Eta (DDIM)",
                keep_unmasked: "Keep unmasked pixels", mask_blur: "Mask blur (px)", hd_strategy: "Large pictures",
                resolution: "Working resolution", hd_trigger: "Large from (px)", hd_margin: "Crop margin (px)"};
const MASK_TINT = "rgba(255, 64, 96, 1)";  // shown at the overlay canvas' CSS opacity
const MAX_SEED = (1n << 64n) - 1n;

const state = {
  token: new URLSearchParams(location.hash.slice(1)).get("token"),
  schema: null,            // GET /api/options
  picture: null,           // {file, width, height}
  example: null,           // {file}
  pasteTarget: null,       // "picture" | "example" once the user picked a slot; else chosen by what is empty
  tool: "brush",
  ops: [],                 // the mask's history: strokes, clears and inverts, replayed by undo
  stroke: null,            // the stroke being drawn
  controller: null,        // AbortController of the painting in progress
  maskUrl: null,
};

// ---- talking to the server ----------------------------------------------------------------------------------------

function authHeaders(extra = {}) {
  return state.token ? {...extra, Authorization: `Bearer ${state.token}`} : extra;
}

// The error text of a refused request: FastAPI's {"detail": "..."} (or its list of validation errors).
async function errorText(response) {
  let detail = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (typeof body.detail === "string") detail = body.detail;
    else if (Array.isArray(body.detail)) {
      detail = body.detail.map((d) => `${(d.loc || []).slice(-1)[0]}: ${d.msg}`).join("; ");
    }
  } catch (_) { /* not JSON: keep the status line */ }
  if (response.status === 401) detail += " (open the page with #token=<token> at the end of its address)";
  if (response.status === 503 && response.headers.get("Retry-After")) {
    detail += ` (try again in ${response.headers.get("Retry-After")} s)`;
  }
  return detail;
}

function say(text, kind = "info") {
  const line = $("message");
  line.textContent = text;
  line.className = `message ${kind}`;
}

async function loadHealth() {
  try {
    const response = await fetch("/api/health", {headers: authHeaders()});
    if (!response.ok) throw new Error(await errorText(response));
    const health = await response.json();
    const model = health.model || {};
    const queue = health.queue || {};
    const busy = queue.busy ? `painting, ${queue.waiting} waiting` : "idle";
    const parts = [model.checkpoint, model.device, model.dtype, busy, `pbe ${health.version}`];
    $("health").textContent = parts.filter((part) => part !== null && part !== undefined).join(" · ");
    $("health").className = "health ok";
  } catch (err) {
    $("health").textContent = `server unreachable: ${err.message}`;
    $("health").className = "health bad";
  }
}

// ---- the options form, built from the schema ----------------------------------------------------------------------

function labelFor(spec) {
  return LABELS[spec.name] || spec.name.replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase());
}

function buildControl(spec) {
  const field = document.createElement("div");
  field.className = `field field-${spec.type}`;
  field.dataset.name = spec.name;
  field.title = spec.help;
  const id = `opt-${spec.name}`;
  let input;
  if (spec.type === "boolean") {
    const label = document.createElement("label");
    label.className = "check";
    input = document.createElement("input");
    input.type = "checkbox";
    input.checked = Boolean(spec.default);
    label.append(input, ` ${labelFor(spec)}`);
    field.append(label);
  } else {
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = labelFor(spec);
    if (spec.choices) {
      input = document.createElement("select");
      for (const choice of spec.choices) input.add(new Option(choice, choice, false, choice === spec.default));
    } else {
      input = document.createElement("input");
      input.type = "number";
      input.step = spec.type === "integer" ? "1" : "any";
      if (spec.minimum !== null && spec.minimum !== undefined) input.min = spec.minimum;
      input.value = spec.default;
      input.required = true;
    }
    field.append(label, input);
  }
  input.id = id;
  input.name = spec.name;
  return field;
}

function buildOptions(schema) {
  for (const spec of schema.options) {
    const parent = MAIN_OPTIONS.includes(spec.name) ? $("main-options") : $("advanced-options");
    parent.append(buildControl(spec));
  }
  // A field that applies only with another one (mask blur with keep-unmasked) is shown only while that one is on.
  for (const spec of schema.options.filter((s) => s.only_with)) {
    const owner = $(`opt-${spec.only_with}`);
    const sync = () => { document.querySelector(`.field[data-name="${spec.name}"]`).hidden = !owner.checked; };
    owner.addEventListener("change", sync);
    sync();
  }
  // The step count's ceiling is the chosen sampler's.
  const sampler = $("opt-scheduler");
  const steps = $("opt-steps");
  if (sampler && steps) {
    const sync = () => {
      const info = schema.schedulers[sampler.value];
      if (info) steps.max = info.max_steps;
    };
    sampler.addEventListener("change", sync);
    sync();
  }
}

// The options as form fields: every shown field by its name (the server fills in what is missing).
function optionFields(form) {
  for (const spec of state.schema.options) {
    if (spec.only_with && !$(`opt-${spec.only_with}`).checked) continue;
    const input = $(`opt-${spec.name}`);
    if (spec.type === "boolean") form.append(spec.name, input.checked ? "true" : "false");
    else form.append(spec.name, input.value.trim());
  }
}

function checkOptions() {
  for (const spec of state.schema.options) {
    const input = $(`opt-${spec.name}`);
    const hidden = spec.only_with && !$(`opt-${spec.only_with}`).checked;
    if (input.type === "number" && !hidden && !input.checkValidity()) {
      input.focus();
      const v = input.validity;
      const sampler = $("opt-scheduler") ? ` for ${$("opt-scheduler").value}` : "";
      const expected = v.rangeUnderflow ? `at least ${input.min}` : v.rangeOverflow ? `at most ${input.max}${sampler}`
        : v.stepMismatch ? "a whole number" : "a number";
      return `${labelFor(spec)}: expected ${expected}, got "${input.value}"`;
    }
  }
  if (!$("seed-random").checked) {
    const text = $("seed").value.trim();
    if (!/^\d+$/.test(text) || BigInt(text) > MAX_SEED) {
      return `Seed: expected an integer from 0 to ${MAX_SEED}, got "${text}"`;
    }
  }
  return null;
}

// ---- pictures in: file input, drag-and-drop, paste -----------------------------------------------------------------

async function setPicture(file) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch (_) {
    say(`Picture: ${file.name || "the pasted file"} is not a picture this browser can read`, "error");
    return;
  }
  const limit = state.schema && state.schema.limits.max_pixels;
  if (limit && bitmap.width * bitmap.height > limit) {
    say(`Picture: ${bitmap.width}×${bitmap.height} is ${bitmap.width * bitmap.height} pixels, more than this ` +
        `server's limit of ${limit}`, "error");
    bitmap.close();
    return;
  }
  state.picture = {file, width: bitmap.width, height: bitmap.height};
  for (const canvas of [$("picture-canvas"), $("mask-canvas"), maskStore]) {
    canvas.width = state.picture.width;
    canvas.height = state.picture.height;
  }
  $("picture-canvas").getContext("2d").drawImage(bitmap, 0, 0);
  bitmap.close();  // the canvas holds the pixels now
  state.ops = [];
  redrawMask();
  $("picture-empty").hidden = true;
  $("picture-drop").classList.add("loaded");
  $("canvas-box").hidden = false;
  $("picture-note").textContent = `${file.name || "pasted"} · ${state.picture.width}×${state.picture.height}`;
  state.pasteTarget = null;  // the next paste goes to the example while it is empty
  showPasteTarget();
  layoutCanvas();
  updateButtons();
  say("Paint over the part of the picture to replace.");
}

async function setExample(file) {
  try {
    (await createImageBitmap(file)).close();
  } catch (_) {
    say(`Example: ${file.name || "the pasted file"} is not a picture this browser can read`, "error");
    return;
  }
  state.example = {file};
  const preview = $("example-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("example-empty").hidden = true;
  $("example-note").textContent = file.name || "pasted";
  state.pasteTarget = null;
  showPasteTarget();
  updateButtons();
}

const setters = {picture: setPicture, example: setExample};

function imageFile(items) {
  return Array.from(items || []).find((f) => f && f.type && f.type.startsWith("image/")) || null;
}

// Where a pasted picture goes: the slot the user picked (clicked or focused) since the last picture came in, else the
// picture while there is none, else the example. The chosen slot wears a "Ctrl+V pastes here" badge, so where a
// paste goes is never a surprise.
function pasteSlot() {
  if (state.pasteTarget) return state.pasteTarget;
  return state.picture ? "example" : "picture";
}

function showPasteTarget() {
  const target = pasteSlot();
  for (const slot of document.querySelectorAll(".slot")) {
    slot.classList.toggle("paste-target", slot.dataset.slot === target);
  }
}

function wireSlot(name) {
  const slot = $(`${name}-slot`);
  const drop = $(`${name}-drop`);
  $(`${name}-file`).addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) setters[name](file);
    event.target.value = "";  // choosing the same file again still loads it
  });
  // Picking a slot for Ctrl+V: a click on it (not on the mask tools or canvas) or keyboard focus on the slot itself.
  const pick = (event) => {
    if (event.target.closest("#canvas-box, #tools")) return;
    state.pasteTarget = name;
    showPasteTarget();
  };
  slot.addEventListener("pointerdown", pick);
  slot.addEventListener("focus", pick);
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (event) => { event.preventDefault(); drop.classList.add("dragging"); });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("dragging");
    const file = imageFile(event.dataTransfer && event.dataTransfer.files);
    if (file) setters[name](file);
    else say(`${name === "picture" ? "Picture" : "Example"}: drop a picture file`, "error");
  });
}

document.addEventListener("paste", (event) => {
  const items = event.clipboardData ? Array.from(event.clipboardData.items) : [];
  const item = items.find((i) => i.kind === "file" && i.type.startsWith("image/"));
  if (!item) return;  // text pastes into the form's fields as usual
  event.preventDefault();
  const slot = pasteSlot();
  setters[slot](item.getAsFile());
  say(`Pasted into the ${slot}.`);
});

// ---- the mask ---------------------------------------------------------------------------------------------------
// The mask lives in `maskStore`, a canvas of the picture's size whose alpha is the mask (1 = repaint). Strokes are
// kept in image pixels, so the mask does not depend on how large the page shows the picture; undo replays them.

const maskStore = document.createElement("canvas");

function drawSegment(ctx, op, from, to) {
  ctx.globalCompositeOperation = op.erase ? "destination-out" : "source-over";
  ctx.fillStyle = ctx.strokeStyle = "#fff";
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.lineWidth = 2 * op.radius;
  if (from.x === to.x && from.y === to.y) {
    ctx.beginPath();
    ctx.arc(to.x, to.y, op.radius, 0, 2 * Math.PI);
    ctx.fill();
  } else {
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
  }
}

function applyOp(ctx, op) {
  if (op.kind === "clear") {
    ctx.globalCompositeOperation = "source-over";
    ctx.clearRect(0, 0, maskStore.width, maskStore.height);
  } else if (op.kind === "invert") {
    // XOR with an opaque fill: alpha becomes 1 - alpha.
    ctx.globalCompositeOperation = "xor";
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, maskStore.width, maskStore.height);
  } else {
    op.points.forEach((p, i) => drawSegment(ctx, op, op.points[Math.max(0, i - 1)], p));
  }
  ctx.globalCompositeOperation = "source-over";
}

function replayMask() {
  const ctx = maskStore.getContext("2d");
  ctx.clearRect(0, 0, maskStore.width, maskStore.height);
  for (const op of state.ops) applyOp(ctx, op);
  redrawMask();
}

let redrawPending = false;
function redrawMask() {
  if (redrawPending) return;
  redrawPending = true;
  requestAnimationFrame(() => {
    redrawPending = false;
    const ctx = $("mask-canvas").getContext("2d");
    ctx.globalCompositeOperation = "source-over";
    ctx.clearRect(0, 0, maskStore.width, maskStore.height);
    ctx.drawImage(maskStore, 0, 0);
    ctx.globalCompositeOperation = "source-in";  // the mask's shape, in the tint colour
    ctx.fillStyle = MASK_TINT;
    ctx.fillRect(0, 0, maskStore.width, maskStore.height);
    ctx.globalCompositeOperation = "source-over";
  });
  updateButtons();
}

function pushOp(op) {
  state.ops.push(op);
  replayMask();
}

function undo() {
  if (!state.ops.length) return;
  state.ops.pop();
  replayMask();
}

// Screen -> image pixels: the canvas is shown scaled to fit, so one screen pixel is `scale` image pixels.
function toImage(event) {
  const box = $("mask-canvas").getBoundingClientRect();
  const scale = state.picture.width / box.width;
  return {x: (event.clientX - box.left) * scale, y: (event.clientY - box.top) * scale, scale};
}

function brushRadius(scale) {
  return (Number($("brush-size").value) / 2) * scale;
}

function wireCanvas() {
  const canvas = $("mask-canvas");
  const cursor = $("brush-cursor");
  canvas.addEventListener("pointerdown", (event) => {
    if (!state.picture || event.button !== 0) return;
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    const p = toImage(event);
    state.stroke = {kind: "stroke", erase: state.tool === "eraser", radius: brushRadius(p.scale),
                    points: [{x: p.x, y: p.y}]};
    const ctx = maskStore.getContext("2d");
    drawSegment(ctx, state.stroke, state.stroke.points[0], state.stroke.points[0]);
    ctx.globalCompositeOperation = "source-over";
    redrawMask();
  });
  canvas.addEventListener("pointermove", (event) => {
    const box = canvas.getBoundingClientRect();
    cursor.hidden = false;
    const size = Number($("brush-size").value);
    cursor.style.width = cursor.style.height = `${size}px`;
    cursor.style.left = `${event.clientX - box.left - size / 2}px`;
    cursor.style.top = `${event.clientY - box.top - size / 2}px`;
    cursor.classList.toggle("erase", state.tool === "eraser");
    if (!state.stroke) return;
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
    const ctx = maskStore.getContext("2d");
    for (const e of events.length ? events : [event]) {
      const p = toImage(e);
      const last = state.stroke.points[state.stroke.points.length - 1];
      const point = {x: p.x, y: p.y};
      drawSegment(ctx, state.stroke, last, point);
      state.stroke.points.push(point);
    }
    ctx.globalCompositeOperation = "source-over";
    redrawMask();
  });
  const end = () => {
    if (!state.stroke) return;
    state.ops.push(state.stroke);  // already drawn: no replay needed
    state.stroke = null;
    updateButtons();
  };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  canvas.addEventListener("pointerleave", () => { cursor.hidden = true; });
}

// The mask as the API wants it: a PNG of the picture's size, opaque, white = repaint, black = keep. The canvas'
// antialiased edges are cut at one half, so the server gets the same binary mask its pipeline would make.
async function maskPng() {
  const {width, height} = maskStore;
  const out = document.createElement("canvas");
  out.width = width;
  out.height = height;
  const ctx = out.getContext("2d");
  const pixels = maskStore.getContext("2d").getImageData(0, 0, width, height);
  const data = pixels.data;
  let painted = 0;
  for (let i = 0; i < data.length; i += 4) {
    const on = data[i + 3] >= 128 ? 255 : 0;
    painted += on ? 1 : 0;
    data[i] = data[i + 1] = data[i + 2] = on;
    data[i + 3] = 255;
  }
  ctx.putImageData(pixels, 0, 0);
  const blob = await new Promise((resolve) => out.toBlob(resolve, "image/png"));
  return {blob, painted};
}

function layoutCanvas() {
  // The canvases keep the picture's pixels; CSS shows them as large as the panel allows, aspect kept.
  if (!state.picture) return;
  const stage = $("picture-drop");
  const box = $("canvas-box");
  const room = stage.getBoundingClientRect();
  const scale = Math.min((room.width - 2) / state.picture.width, (room.height - 2) / state.picture.height);
  box.style.width = `${Math.max(1, Math.floor(state.picture.width * scale))}px`;
  box.style.height = `${Math.max(1, Math.floor(state.picture.height * scale))}px`;
}

// ---- painting ----------------------------------------------------------------------------------------------------

function updateButtons() {
  const busy = Boolean(state.controller);
  $("paint").disabled = busy || !state.schema || !state.picture || !state.example;
  $("paint").title = !state.picture ? "load a picture first" : !state.example ? "load an example first" : "";
  $("cancel").hidden = !busy;
  $("undo").disabled = !state.ops.length;
  $("clear").disabled = !state.picture;
  $("invert").disabled = !state.picture;
}

function showProgress(text, fraction) {
  $("progress").hidden = false;
  $("progress-text").textContent = text;
  $("progress-fill").style.width = `${Math.round(100 * fraction)}%`;
  $("progress-fill").classList.toggle("waiting", fraction === null);
}

// Server-Sent Events from a fetch body: "event: name\ndata: json\n\n" blocks (EventSource cannot POST).
async function* readEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true}).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      // Seeds go up to 2**64 - 1, beyond a JavaScript number's exact integers: read them as text.
      if (data.length) yield {name, data: JSON.parse(data.join("\n").replace(/"seed":\s*(\d+)/g, '"seed":"$1"'))};
    }
  }
}

async function paint() {
  if (state.controller) return;  // one painting at a time from this page (a double click sends one)
  state.controller = new AbortController();
  updateButtons();
  try {
    await send(state.controller.signal);
  } finally {
    state.controller = null;
    $("progress").hidden = true;
    updateButtons();
    loadHealth();
  }
}

// One painting: checks, the form, then the event stream until done, error or Cancel (`signal`).
async function send(signal) {
  const problem = checkOptions();
  if (problem) { say(problem, "error"); return; }
  const mask = await maskPng();
  if (!mask.painted) {
    say("Nothing to repaint: paint over the part of the picture to replace first (the mask is all black).", "error");
    return;
  }
  const bytes = state.picture.file.size + state.example.file.size + mask.blob.size;
  const maxBytes = state.schema.limits.max_upload_bytes;
  if (bytes > maxBytes) {
    say(`The pictures and the mask are ${(bytes / 2 ** 20).toFixed(1)} MiB together, more than this server's ` +
        `limit of ${(maxBytes / 2 ** 20).toFixed(1)} MiB`, "error");
    return;
  }
  const form = new FormData();
  form.append("image", state.picture.file, state.picture.file.name || "image.png");
  form.append("mask", mask.blob, "mask.png");
  form.append("example", state.example.file, state.example.file.name || "example.png");
  optionFields(form);
  form.append("seed", $("seed-random").checked ? "" : $("seed").value.trim());

  say("Sending…");
  showProgress("Sending the pictures…", null);
  let finished = false;
  try {
    const response = await fetch("/api/paint", {method: "POST", body: form, signal,
                                               headers: authHeaders({Accept: "text/event-stream"})});
    if (!response.ok) throw new Error(await errorText(response));
    for await (const event of readEvents(response)) {
      const d = event.data;
      if (event.name === "queued") {
        const ahead = d.position === 0 ? "next" : `${d.position} ahead`;
        showProgress(`Queued: ${ahead}`, null);
        say(`Queued: ${d.position} ahead.`);
      } else if (event.name === "started") {
        showProgress(`Step 0 of ${d.steps}`, 0);
        say(`Painting with seed ${d.seed}…`);
      } else if (event.name === "progress") {
        const item = d.items > 1 ? ` (part ${d.item} of ${d.items})` : "";
        const fraction = ((d.item - 1) + d.step / d.steps) / d.items;
        showProgress(`Step ${d.step} of ${d.steps}${item}`, fraction);
      } else if (event.name === "done") {
        finished = true;
        showResult(d, mask.blob);
        say(`Done: seed ${d.seed}.`, "success");
      } else if (event.name === "error") {
        finished = true;
        say(`Painting failed (${d.status}): ${d.detail}`, "error");
      }
    }
    if (!finished) say("The server closed the connection before the picture was done.", "error");
  } catch (err) {
    if (err.name === "AbortError") say("Cancelled.", "warn");
    else say(err.message === "Failed to fetch" ? "The server cannot be reached." : err.message, "error");
  }
}

function showResult(done, maskBlob) {
  const img = $("result-img");
  img.src = done.image;
  img.hidden = false;
  $("result-empty").hidden = true;
  $("result-info").hidden = false;
  $("download-result").href = done.image;
  $("download-result").download = `painted-${done.seed}.png`;
  if (state.maskUrl) URL.revokeObjectURL(state.maskUrl);
  state.maskUrl = URL.createObjectURL(maskBlob);
  $("download-mask").href = state.maskUrl;
  $("result-seed").textContent = String(done.seed);
  $("result-size").textContent = `${done.width}×${done.height}`;
  $("command").textContent = done.command;
  // The command reads the three pictures under the page's names: say which of the user's files they are.
  const renames = [];
  if (state.picture.file.name !== "image.png") renames.push(`your picture (${state.picture.file.name}) as image.png`);
  if (state.example.file.name !== "example.png") {
    renames.push(`your example (${state.example.file.name}) as example.png`);
  }
  $("command-files").textContent = "Run it with the mask saved as mask.png" +
    (renames.length ? `, ${renames.join(" and ")}.` : ", beside image.png and example.png.");
}

async function copyCommand() {
  const text = $("command").textContent;
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) {
    // Not a secure context (a remote host over http): select the text for Ctrl+C instead.
    const range = document.createRange();
    range.selectNodeContents($("command"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    say("Selected: press Ctrl+C to copy.");
    return;
  }
  $("copy-command").textContent = "Copied";
  setTimeout(() => { $("copy-command").textContent = "Copy"; }, 1500);
}

// ---- wiring --------------------------------------------------------------------------------------------------------

function setTool(tool) {
  state.tool = tool;
  for (const name of ["brush", "eraser"]) {
    $(`tool-${name}`).classList.toggle("active", name === tool);
    $(`tool-${name}`).setAttribute("aria-pressed", String(name === tool));
  }
}

function typing(event) {
  const t = event.target;
  return t instanceof HTMLElement && (t.isContentEditable || (t.matches("input, select, textarea") &&
    !["checkbox", "range", "radio"].includes(t.type)));
}

async function start() {
  wireSlot("picture");
  wireSlot("example");
  wireCanvas();
  showPasteTarget();
  $("tool-brush").addEventListener("click", () => setTool("brush"));
  $("tool-eraser").addEventListener("click", () => setTool("eraser"));
  $("brush-size").addEventListener("input", () => { $("brush-size-value").textContent = $("brush-size").value; });
  $("undo").addEventListener("click", undo);
  $("clear").addEventListener("click", () => pushOp({kind: "clear"}));
  $("invert").addEventListener("click", () => pushOp({kind: "invert"}));
  $("paint").addEventListener("click", paint);
  $("cancel").addEventListener("click", () => state.controller && state.controller.abort());
  $("copy-command").addEventListener("click", copyCommand);
  $("seed-random").addEventListener("change", () => {
    $("seed").disabled = $("seed-random").checked;
    if (!$("seed-random").checked) $("seed").focus();
  });
  $("reuse-seed").addEventListener("click", () => {
    $("seed-random").checked = false;
    $("seed").disabled = false;
    $("seed").value = $("result-seed").textContent;
  });
  document.addEventListener("keydown", (event) => {
    if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "z" && !typing(event)) {
      event.preventDefault();
      undo();
    } else if (!typing(event) && !event.ctrlKey && !event.metaKey && !event.altKey) {
      const size = $("brush-size");
      if (event.key === "b") setTool("brush");
      else if (event.key === "e") setTool("eraser");
      else if (event.key === "[" || event.key === "]") {
        size.value = Number(size.value) + (event.key === "]" ? 4 : -4);
        size.dispatchEvent(new Event("input"));
      }
    }
  });
  new ResizeObserver(layoutCanvas).observe($("picture-drop"));
  setInterval(() => { if (!document.hidden && !state.controller) loadHealth(); }, 10_000);
  updateButtons();
  loadHealth();
  try {
    const response = await fetch("/api/options", {headers: authHeaders()});
    if (!response.ok) throw new Error(await errorText(response));
    state.schema = await response.json();
    buildOptions(state.schema);
    document.body.dataset.ready = "true";
    say("Load a picture and an example: choose, drop or paste them.");
  } catch (err) {
    say(`Cannot read the painting options from the server: ${err.message}`, "error");
  }
  updateButtons();
}

start();
