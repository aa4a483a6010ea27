// The page of `espmedsam serve`.
//
// Files go to POST /api/segment one after another (the server runs one forward pass at a time anyway,
// and a queue keeps the list's order meaningful). Each answer carries, per frame, the image as the model
// saw it, the mask and the SPPG patch map as PNG; they are decoded here and drawn on two stacked canvases
// of the image's own pixel size: #image-canvas (the frame) and #overlay-canvas (mask and heat map), which
// CSS scales to fit the window.
//
// For tests and benchmarks: document.body.dataset.state is idle / busy / done / error (of the result
// shown), and window.espmedsamTiming describes the last result drawn.
"use strict";

(() => {
  const MASK_RGB = [255, 64, 32];
  const HEAT_MAX_ALPHA = 0.6; // the patch map tints the image, it never hides it
  const LOW_CONFIDENCE = 0.6; // as espmedsam predict's --min-confidence default
  const MAX_UPSCALE = 8; // small images are enlarged to fit, but not beyond this
  const SLICE_CACHE = 32; // decoded slices kept per result
  const PROMPT_BOX_COLOUR = "#ffd23f";
  const PROMPT_FOREGROUND = "#2ecc71";
  const PROMPT_BACKGROUND = "#3d7bff";
  const STATUS_TEXT = { waiting: "waiting", segmenting: "segmenting", done: "done", error: "error" };
  // viridis at five stops: a heat map colour far from the mask's red, and readable on gray images
  const HEAT_STOPS = [
    [68, 1, 84],
    [59, 82, 139],
    [33, 145, 140],
    [94, 201, 98],
    [253, 231, 37],
  ];
  const HEAT_LUT = heatLut(HEAT_STOPS);
  const numbers = new Intl.NumberFormat("en-US");

  const $ = (id) => document.getElementById(id);
  const el = {
    fileInput: $("file-input"),
    dropZone: $("drop-zone"),
    formatsHint: $("formats-hint"),
    modality: $("modality"),
    results: $("results"),
    resultsEmpty: $("results-empty"),
    error: $("error"),
    stageWrap: $("stage-wrap"),
    stage: $("stage"),
    placeholder: $("placeholder"),
    imageCanvas: $("image-canvas"),
    overlayCanvas: $("overlay-canvas"),
    promptCanvas: $("prompt-canvas"),
    promptControl: $("prompt-control"),
    undoPrompt: $("undo-prompt"),
    resetPrompts: $("reset-prompts"),
    opacity: $("opacity"),
    opacityValue: $("opacity-value"),
    contourOnly: $("contour-only"),
    patchMap: $("patch-map"),
    patchMapControl: $("patch-map-control"),
    slice: $("slice"),
    sliceValue: $("slice-value"),
    sliceControl: $("slice-control"),
    modelInfo: $("model-info"),
    resultName: $("result-name"),
    resultModality: $("result-modality"),
    resultProbability: $("result-probability"),
    resultSize: $("result-size"),
    resultArea: $("result-area"),
    resultQuality: $("result-quality"),
    resultTime: $("result-time"),
    resultWarning: $("result-warning"),
    downloadMask: $("download-mask"),
    downloadOverlay: $("download-overlay"),
  };
  const imageCtx = el.imageCanvas.getContext("2d");
  const overlayCtx = el.overlayCanvas.getContext("2d", { willReadFrequently: true });
  const promptCtx = el.promptCanvas.getContext("2d");

  const state = {
    info: null,
    pageError: null, // a problem of the page itself (no /api/info), shown when no file's error is
    items: [], // one per uploaded file, in upload order
    selected: null, // the item shown
    queue: [], // items waiting for the server
    running: false,
    follow: true, // show each file as it finishes, until the user picks one in the list
    view: null, // what the canvases show: {item, result, index, slice}
    drawToken: 0, // the latest show(); older ones that finish decoding later are dropped
    overlayFrame: 0, // a pending requestAnimationFrame of the overlay
    nextId: 1,
  };
  const decodedSlices = new WeakMap(); // result -> Map(index -> Promise of a decoded slice)

  // ---------------------------------------------------------------- start

  function init() {
    el.fileInput.addEventListener("change", onFilesChosen);
    bindDropZone();
    el.modality.addEventListener("change", onModalityChange);
    el.opacity.addEventListener("input", onOverlayOption);
    el.contourOnly.addEventListener("change", onOverlayOption);
    el.patchMap.addEventListener("change", onOverlayOption);
    el.slice.addEventListener("input", onSliceChange);
    el.downloadMask.addEventListener("click", downloadMask);
    el.downloadOverlay.addEventListener("click", downloadOverlay);
    bindPrompts();
    new ResizeObserver(fitStage).observe(el.stageWrap);
    refresh();
    loadInfo();
  }

  async function loadInfo() {
    try {
      const response = await fetch("/api/info");
      if (!response.ok) throw new Error(await errorText(response));
      state.info = await response.json();
      showInfo(state.info);
    } catch (error) {
      state.pageError = `Cannot read the model's details from the server: ${error.message}`;
      el.modelInfo.textContent = "model details unavailable";
    }
    refresh();
  }

  function showInfo(info) {
    const parameters = (info.total_parameters / 1e6).toFixed(1);
    const parts = [`version ${info.version}`, `checkpoint ${info.checkpoint || "(unnamed)"}`];
    parts.push(`${info.architecture}, ${parameters} M parameters`, info.device);
    el.modelInfo.textContent = parts.join(" · ");
    fillModalities(info);
    const formats = info.formats.map((name) => (name === "nifti" ? "NIfTI" : name.toUpperCase()));
    const megabytes = Math.floor(info.limits.max_bytes / 2 ** 20);
    el.formatsHint.textContent = `${formats.join(", ")} · up to ${megabytes} MB each`;
  }

  function fillModalities(info) {
    const previous = el.modality.value;
    const options = info.classifier ? [["auto", "auto (classifier)"]] : [];
    for (const name of info.modalities) options.push([name, name]);
    el.modality.replaceChildren(...options.map(([value, text]) => new Option(text, value)));
    const values = options.map(([value]) => value);
    el.modality.value = values.includes(previous) ? previous : values[0];
  }

  // ---------------------------------------------------------------- files in

  function onFilesChosen(event) {
    const since = performance.now();
    const files = Array.from(event.target.files || []);
    event.target.value = ""; // so that choosing the same file again is a change too
    addFiles(files, since);
  }

  function bindDropZone() {
    const zone = el.dropZone;
    const over = (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    };
    zone.addEventListener("dragenter", over);
    zone.addEventListener("dragover", over);
    zone.addEventListener("dragleave", (event) => {
      if (!zone.contains(event.relatedTarget)) zone.classList.remove("dragging");
    });
    zone.addEventListener("drop", (event) => {
      const since = performance.now();
      event.preventDefault();
      zone.classList.remove("dragging");
      addFiles(Array.from(event.dataTransfer.files || []), since);
    });
    // a file dropped beside the zone must not make the browser leave the page to open it
    for (const type of ["dragover", "drop"]) window.addEventListener(type, (event) => event.preventDefault());
  }

  function addFiles(files, since) {
    if (!files.length) return;
    const added = files.map((file) => newItem(file, since));
    state.follow = true;
    select(added[0]);
    for (const item of added) {
      if (item.status === "waiting") state.queue.push(item);
    }
    pump();
  }

  function newItem(file, since) {
    const item = {
      id: state.nextId++,
      file,
      name: file.name || "upload",
      modality: el.modality.value || "auto",
      status: "waiting",
      result: null,
      error: null,
      rejected: false, // refused here, before any upload: re-segmenting it is pointless
      since, // performance.now() of the change or drop event, or of the modality change
      generation: 0, // bumped by each new request for the item; late answers to old ones are dropped
      sliceIndex: 0,
      roundTripMs: null,
      original: null, // the prompt-free result; `result` is it, or its correction by `prompts`
      prompts: [], // {kind: "box", box: [x0, y0, x1, y1]} or {kind: "point", x, y, label}, in image pixels
      promptGeneration: 0, // bumped by each correction; late answers to older ones are dropped
      promptError: null,
    };
    const maxBytes = state.info && state.info.limits.max_bytes;
    if (maxBytes && file.size > maxBytes) {
      const size = (file.size / 2 ** 20).toFixed(2);
      item.error = `upload of ${size} MB over this server's limit of ${Math.floor(maxBytes / 2 ** 20)} MB`;
      item.status = "error";
      item.rejected = true;
    }
    state.items.push(item);
    el.results.append(listItem(item));
    return item;
  }

  function listItem(item) {
    const li = document.createElement("li");
    li.className = "result-item";
    li.dataset.id = String(item.id);
    const button = document.createElement("button");
    button.type = "button";
    button.className = "result-button";
    const name = document.createElement("span");
    name.className = "result-file";
    name.textContent = item.name;
    const status = document.createElement("span");
    status.className = "result-status";
    button.append(name, status);
    li.append(button);
    // the whole row is the target, not only the button inside it
    li.addEventListener("click", () => {
      state.follow = false;
      select(item);
    });
    item.li = li;
    return li;
  }

  // ---------------------------------------------------------------- the queue

  async function pump() {
    if (state.running) return;
    state.running = true;
    try {
      while (state.queue.length) await segment(state.queue.shift());
    } finally {
      state.running = false;
    }
  }

  async function segment(item) {
    const generation = item.generation;
    item.status = "segmenting";
    refresh();
    const sent = performance.now();
    const outcome = await request(item);
    if (generation !== item.generation) return; // asked again meanwhile: the queue has it again
    item.roundTripMs = performance.now() - sent;
    if (outcome.error) {
      item.result = null;
      item.error = outcome.error;
      item.status = "error";
    } else {
      const previous = item.result;
      item.result = outcome.result;
      item.original = outcome.result;
      item.prompts = [];
      item.promptGeneration += 1;
      item.promptError = null;
      item.error = null;
      item.status = "done";
      item.sliceIndex = initialSlice(outcome.result, previous, item.sliceIndex);
    }
    let drawn = null;
    if (state.follow && state.selected !== item) {
      drawn = select(item, item.since); // a failure is shown too: it must not pass unseen in a long batch
    } else if (state.selected === item && item.result) {
      drawn = show(item, item.since); // not awaited: the next file is sent while this one is decoded and drawn
    }
    refresh();
    if (item.original && item.original.quality_pending) {
      await drawn; // the score's decoder passes would slow the drawing down
      await scoreLater(item, generation);
    }
  }

  // The quality score the segment request left for later (POST /api/quality); meanwhile the details say
  // "scoring". window.espmedsamQuality times its arrival.
  async function scoreLater(item, generation) {
    const original = item.original;
    let answer;
    try {
      const response = await fetch("/api/quality", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ image_id: original.image_id }),
      });
      answer = response.ok ? await response.json() : null;
    } catch {
      answer = null; // the mask stands; only its score is missing
    }
    if (generation !== item.generation || item.original !== original) return;
    original.quality_pending = false;
    if (answer) {
      original.predicted_dice = answer.predicted_dice;
      original.review = answer.review;
      original.review_below = answer.review_below;
    }
    window.espmedsamQuality = { file: item.name, uploadToQualityMs: performance.now() - item.since };
    refresh();
  }

  async function request(item) {
    const form = new FormData();
    form.append("file", item.file, item.name);
    form.append("modality", item.modality);
    form.append("details", "true");
    // the overlay does not wait for the quality score: it is asked for once the mask is drawn
    form.append("quality_later", "true");
    let response;
    try {
      response = await fetch("/api/segment", { method: "POST", body: form });
    } catch (error) {
      return { error: `the server did not answer (${error.message}); is espmedsam serve still running?` };
    }
    if (!response.ok) return { error: await errorText(response) };
    try {
      return { result: await response.json() };
    } catch (error) {
      return { error: `the server's answer could not be read (${error.message})` };
    }
  }

  // The server's one-line `detail`; FastAPI's own validation errors give a list of {loc, msg}.
  async function errorText(response) {
    let detail = null;
    try {
      detail = (await response.json()).detail;
    } catch {
      // not JSON (a proxy's page, say): the status line says what is known
    }
    if (Array.isArray(detail)) {
      detail = detail
        .map((entry) => {
          const field = Array.isArray(entry.loc) ? entry.loc[entry.loc.length - 1] : null;
          return field ? `${field}: ${entry.msg}` : entry.msg || String(entry);
        })
        .join("; ");
    }
    const words = typeof detail === "string" && detail ? detail : response.statusText || "no details";
    return `${words} (HTTP ${response.status})`;
  }

  // A volume opens on its slice with the most foreground; a re-segmented one stays where it was.
  function initialSlice(result, previous, current) {
    if (previous && previous.frames === result.frames) return Math.min(current, result.frames - 1);
    let best = Math.floor((result.slices.length - 1) / 2);
    let most = 0;
    result.slices.forEach((slice, index) => {
      if (slice.foreground_pixels > most) [best, most] = [index, slice.foreground_pixels];
    });
    return best;
  }

  function onModalityChange() {
    const item = state.selected;
    if (!item || item.rejected) return; // the choice applies to the next files
    item.modality = el.modality.value;
    item.since = performance.now();
    item.generation += 1;
    item.status = "waiting";
    if (!state.queue.includes(item)) state.queue.push(item);
    refresh();
    pump();
  }

  // ---------------------------------------------------------------- showing a file

  // -> the drawing's promise, or null when there is nothing to draw
  function select(item, since = null) {
    state.selected = item;
    el.modality.value = item.modality; // the select tells how the file shown was asked for
    if (el.modality.value !== item.modality) el.modality.selectedIndex = 0;
    const drawn = item.result ? show(item, since) : null;
    refresh();
    return drawn;
  }

  // Decode the item's current slice and draw it; `since` (performance.now() of the upload) asks for the
  // timing of this draw to be published.
  async function show(item, since = null, correctionSince = null) {
    const { result } = item;
    const index = item.sliceIndex;
    const token = ++state.drawToken;
    let slice;
    try {
      slice = await decodedSlice(result, index);
    } catch (error) {
      if (item.result === result) {
        item.error = `the result could not be shown (${error.message})`;
        item.status = "error";
        item.result = null;
      }
      refresh();
      return;
    }
    if (token !== state.drawToken || state.selected !== item || item.result !== result) return;
    state.view = { item, result, index, slice };
    drawFrame(slice);
    drawOverlay();
    drawPrompts();
    if (since !== null) publishTiming(item, result, since);
    if (correctionSince !== null) {
      window.espmedsamCorrection = {
        clickToOverlayMs: performance.now() - correctionSince,
        serverSeconds: result.correctionSeconds ?? 0,
        prompts: item.prompts.length,
      };
    }
    refresh();
  }

  function publishTiming(item, result, since) {
    window.espmedsamTiming = {
      uploadToOverlayMs: performance.now() - since,
      serverSeconds: result.seconds.total,
      roundTripMs: item.roundTripMs,
      file: item.name,
    };
  }

  function onSliceChange() {
    const item = state.selected;
    if (!item || !item.result) return;
    item.sliceIndex = Number(el.slice.value) - 1;
    el.sliceValue.textContent = `${el.slice.value} / ${item.result.frames}`;
    show(item);
    refresh();
  }

  // ---------------------------------------------------------------- decoding

  function decodedSlice(result, index) {
    if (!decodedSlices.has(result)) decodedSlices.set(result, new Map());
    const cache = decodedSlices.get(result);
    if (cache.has(index)) {
      const promise = cache.get(index);
      cache.delete(index); // re-inserted: the Map's order is the order of use
      cache.set(index, promise);
      return promise;
    }
    const promise = decodeSlice(result, index);
    promise.catch(() => cache.delete(index)); // a later look may try again
    cache.set(index, promise);
    // a long volume scrolled through would otherwise keep every slice decoded
    while (cache.size > SLICE_CACHE) cache.delete(cache.keys().next().value);
    return promise;
  }

  async function decodeSlice(result, index) {
    if (result.base) {
      // a correction: only its mask is new; the image and the patch map are the prompt-free result's
      const [base, mask] = await Promise.all([decodedSlice(result.base, index), grayPixels(result.mask_png)]);
      return sliceOf(base.image, mask, base.patch ? { width: mask.width, height: mask.height, values: base.patch } : null);
    }
    const data = result.slices[index];
    const [image, mask, patch] = await Promise.all([
      data.image_png ? imageBitmap(data.image_png) : null,
      grayPixels(data.mask_png),
      data.patch_map_png ? grayPixels(data.patch_map_png) : null,
    ]);
    return sliceOf(image, mask, patch);
  }

  function sliceOf(image, mask, patch) {
    const { width, height } = mask;
    const binary = new Uint8Array(width * height);
    for (let i = 0; i < binary.length; i++) binary[i] = mask.values[i] >= 128 ? 1 : 0;
    return {
      width,
      height,
      image,
      mask: binary,
      contour: contourOf(binary, width, height),
      patch: patch && patch.width === width && patch.height === height ? patch.values : null,
    };
  }

  function bytesOf(base64) {
    if (Uint8Array.fromBase64) return Uint8Array.fromBase64(base64);
    const text = atob(base64);
    const bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    return bytes;
  }

  function imageBitmap(base64) {
    return createImageBitmap(new Blob([bytesOf(base64)], { type: "image/png" }));
  }

  // The first channel of a gray PNG, exactly as stored: no colour management, no premultiplication.
  async function grayPixels(base64) {
    const blob = new Blob([bytesOf(base64)], { type: "image/png" });
    const bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
    const { width, height } = bitmap;
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(bitmap, 0, 0);
    bitmap.close();
    const rgba = ctx.getImageData(0, 0, width, height).data;
    const values = new Uint8Array(width * height);
    for (let i = 0; i < values.length; i++) values[i] = rgba[4 * i];
    return { width, height, values };
  }

  // Mask pixels with a 4-neighbour outside the mask; beyond the image's edge counts as outside, so that a
  // mask touching the edge is closed there.
  function contourOf(mask, width, height) {
    const contour = new Uint8Array(mask.length);
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < width; x++) {
        const i = y * width + x;
        if (!mask[i]) continue;
        const edge = x === 0 || y === 0 || x === width - 1 || y === height - 1;
        if (edge || !mask[i - 1] || !mask[i + 1] || !mask[i - width] || !mask[i + width]) contour[i] = 1;
      }
    }
    return contour;
  }

  // ---------------------------------------------------------------- drawing

  function drawFrame(slice) {
    for (const canvas of [el.imageCanvas, el.overlayCanvas, el.promptCanvas]) {
      if (canvas.width !== slice.width || canvas.height !== slice.height) {
        canvas.width = slice.width;
        canvas.height = slice.height;
      }
    }
    imageCtx.clearRect(0, 0, slice.width, slice.height);
    if (slice.image) imageCtx.drawImage(slice.image, 0, 0, slice.width, slice.height);
    el.stage.hidden = false;
    fitStage();
  }

  function overlayOptions() {
    return {
      opacity: Number(el.opacity.value) / 100,
      contourOnly: el.contourOnly.checked,
      patchMap: el.patchMap.checked, // a slice without a map draws none
    };
  }

  function drawOverlay() {
    if (state.overlayFrame) cancelAnimationFrame(state.overlayFrame);
    state.overlayFrame = 0;
    if (!state.view) return;
    overlayCtx.putImageData(overlayPixels(state.view.slice, overlayOptions()), 0, 0);
  }

  // Slider drags fire faster than a large image redraws: one redraw per frame.
  function requestOverlay() {
    if (!state.overlayFrame) state.overlayFrame = requestAnimationFrame(drawOverlay);
  }

  // The overlay's RGBA: the heat map of the patch probabilities under the mask (filled at `opacity`, or
  // its contour at full opacity), composited here ("source over") so that one canvas holds both.
  function overlayPixels(slice, { opacity, contourOnly, patchMap }) {
    const out = new ImageData(slice.width, slice.height);
    const px = out.data;
    const shape = contourOnly ? slice.contour : slice.mask;
    const maskAlpha = contourOnly ? 1 : opacity;
    const heat = patchMap ? slice.patch : null;
    const [mr, mg, mb] = MASK_RGB;
    for (let i = 0, j = 0; i < shape.length; i++, j += 4) {
      let r = 0;
      let g = 0;
      let b = 0;
      let a = 0;
      if (heat && heat[i]) {
        const k = 3 * heat[i];
        [r, g, b] = [HEAT_LUT[k], HEAT_LUT[k + 1], HEAT_LUT[k + 2]];
        a = (heat[i] / 255) * HEAT_MAX_ALPHA;
      }
      if (shape[i] && maskAlpha > 0) {
        const under = a * (1 - maskAlpha);
        a = maskAlpha + under;
        r = (mr * maskAlpha + r * under) / a;
        g = (mg * maskAlpha + g * under) / a;
        b = (mb * maskAlpha + b * under) / a;
      }
      if (a > 0) {
        px[j] = r;
        px[j + 1] = g;
        px[j + 2] = b;
        px[j + 3] = Math.max(1, Math.round(a * 255));
      }
    }
    return out;
  }

  function heatLut(stops) {
    const lut = new Uint8Array(256 * 3);
    for (let v = 0; v < 256; v++) {
      const t = (v / 255) * (stops.length - 1);
      const low = Math.min(Math.floor(t), stops.length - 2);
      const f = t - low;
      for (let c = 0; c < 3; c++) lut[3 * v + c] = Math.round(stops[low][c] * (1 - f) + stops[low + 1][c] * f);
    }
    return lut;
  }

  // Scale the stage to the largest size that fits its box, keeping the aspect; the canvases keep their
  // pixel size.
  function fitStage() {
    if (!state.view) return;
    const { width, height } = state.view.slice;
    const box = el.stageWrap;
    const style = getComputedStyle(box);
    const padX = parseFloat(style.paddingLeft) + parseFloat(style.paddingRight);
    const padY = parseFloat(style.paddingTop) + parseFloat(style.paddingBottom);
    const availableWidth = Math.max(box.clientWidth - padX, 1);
    const availableHeight = Math.max(box.clientHeight - padY, 1);
    const scale = Math.min(availableWidth / width, availableHeight / height, MAX_UPSCALE);
    el.stage.style.width = `${Math.max(1, Math.floor(width * scale))}px`;
    el.stage.style.height = `${Math.max(1, Math.floor(height * scale))}px`;
    // enlarged: show the pixels as they are; reduced: smooth, so that thin contours do not vanish
    el.stage.classList.toggle("enlarged", scale >= 1);
  }

  function onOverlayOption() {
    el.opacityValue.textContent = `${el.opacity.value} %`;
    refreshControls();
    requestOverlay();
  }

  // ---------------------------------------------------------------- boxes and clicks

  function canPrompt(item) {
    const result = shownResult();
    return Boolean(
      state.info && state.info.prompts && item && item.original && item.original.image_id && result &&
        item.status === "done",
    );
  }

  function promptTool() {
    const checked = el.promptControl.querySelector("input[name=prompt-tool]:checked");
    return checked ? checked.value : "box";
  }

  // A pointer position -> the image pixel under it (canvas pixels are image pixels; CSS scales them).
  function imagePoint(event) {
    const canvas = el.promptCanvas;
    const rect = canvas.getBoundingClientRect();
    const x = ((event.clientX - rect.left) / rect.width) * canvas.width;
    const y = ((event.clientY - rect.top) / rect.height) * canvas.height;
    const clamp = (v, size) => Math.min(Math.max(Math.floor(v), 0), size - 1);
    return { x: clamp(x, canvas.width), y: clamp(y, canvas.height) };
  }

  function bindPrompts() {
    let drag = null;
    el.promptCanvas.addEventListener("pointerdown", (event) => {
      const item = state.selected;
      if (!canPrompt(item) || event.button !== 0) return;
      event.preventDefault();
      const start = imagePoint(event);
      drag = { item, tool: promptTool(), start, end: start };
      el.promptCanvas.setPointerCapture(event.pointerId);
      drawPrompts(drag);
    });
    el.promptCanvas.addEventListener("pointermove", (event) => {
      if (!drag) return;
      drag.end = imagePoint(event);
      drawPrompts(drag);
    });
    const finish = (event) => {
      if (!drag) return;
      const { item, tool, start } = drag;
      const end = imagePoint(event);
      drag = null;
      if (item !== state.selected) return;
      if (tool === "box") {
        const box = [Math.min(start.x, end.x), Math.min(start.y, end.y), Math.max(start.x, end.x), Math.max(start.y, end.y)];
        if (box[2] - box[0] < 2 && box[3] - box[1] < 2) {
          drawPrompts(); // a click with the box tool draws no box
          return;
        }
        item.prompts.push({ kind: "box", box });
      } else {
        item.prompts.push({ kind: "point", x: end.x, y: end.y, label: Number(tool) });
      }
      correct(item, performance.now());
    };
    el.promptCanvas.addEventListener("pointerup", finish);
    el.promptCanvas.addEventListener("pointercancel", () => {
      drag = null;
      drawPrompts();
    });
    el.undoPrompt.addEventListener("click", undoPrompt);
    el.resetPrompts.addEventListener("click", resetPrompts);
    window.addEventListener("keydown", (event) => {
      if (event.key.toLowerCase() === "z" && (event.ctrlKey || event.metaKey) && !event.shiftKey) {
        if (canPrompt(state.selected) && state.selected.prompts.length) {
          event.preventDefault();
          undoPrompt();
        }
      }
    });
  }

  function undoPrompt() {
    const item = state.selected;
    if (!canPrompt(item) || !item.prompts.length) return;
    item.prompts.pop();
    correct(item, performance.now());
  }

  function resetPrompts() {
    const item = state.selected;
    if (!canPrompt(item) || !item.prompts.length) return;
    item.prompts = [];
    correct(item, performance.now());
  }

  // The mask of all the item's prompts so far (the server keeps the image's embedding, so this is a
  // decoder pass); no prompt: the prompt-free mask again.
  async function correct(item, since) {
    const generation = ++item.promptGeneration;
    item.promptError = null;
    if (!item.prompts.length) {
      item.result = item.original;
      await show(item, null, since);
      return;
    }
    const body = {
      image_id: item.original.image_id,
      boxes: item.prompts.filter((p) => p.kind === "box").map((p) => p.box),
      points: item.prompts.filter((p) => p.kind === "point").map((p) => [p.x, p.y]),
      labels: item.prompts.filter((p) => p.kind === "point").map((p) => p.label),
    };
    drawPrompts();
    let answer = null;
    try {
      const response = await fetch("/api/prompt", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      if (!response.ok) throw new Error(await errorText(response));
      answer = await response.json();
    } catch (error) {
      if (generation !== item.promptGeneration) return;
      item.prompts.pop(); // the prompt that failed is not kept: undo has nothing to take back for it
      item.promptError = error.message;
      drawPrompts();
      refresh();
      return;
    }
    if (generation !== item.promptGeneration || state.selected !== item) return;
    item.result = correctedResult(item.original, answer);
    await show(item, null, since);
  }

  function correctedResult(original, answer) {
    return {
      ...original,
      base: original,
      corrected: true,
      correctionSeconds: answer.seconds,
      mask_png: answer.mask_png,
      mask_file: answer.mask_file,
      foreground_pixels: answer.foreground_pixels,
      foreground_fraction: answer.foreground_fraction,
      predicted_iou: answer.predicted_iou,
      review: null,
      slices: [{ ...original.slices[0], mask_png: answer.mask_png, foreground_pixels: answer.foreground_pixels }],
    };
  }

  // The item's boxes and clicks (and a box being drawn) over the mask, in image pixels.
  function drawPrompts(drag = null) {
    const canvas = el.promptCanvas;
    promptCtx.clearRect(0, 0, canvas.width, canvas.height);
    const item = state.selected;
    if (!item || !canPrompt(item)) return;
    const rect = canvas.getBoundingClientRect();
    const pixel = rect.width > 0 ? canvas.width / rect.width : 1; // one screen pixel, in image pixels
    promptCtx.lineWidth = 2 * pixel;
    const boxes = item.prompts.filter((p) => p.kind === "box").map((p) => p.box);
    if (drag && drag.tool === "box") {
      const { start, end } = drag;
      boxes.push([Math.min(start.x, end.x), Math.min(start.y, end.y), Math.max(start.x, end.x), Math.max(start.y, end.y)]);
    }
    promptCtx.strokeStyle = PROMPT_BOX_COLOUR;
    for (const [x0, y0, x1, y1] of boxes) promptCtx.strokeRect(x0, y0, x1 - x0 + 1, y1 - y0 + 1);
    for (const p of item.prompts.filter((q) => q.kind === "point")) {
      promptCtx.beginPath();
      promptCtx.arc(p.x + 0.5, p.y + 0.5, 5 * pixel, 0, 2 * Math.PI);
      promptCtx.fillStyle = p.label === 1 ? PROMPT_FOREGROUND : PROMPT_BACKGROUND;
      promptCtx.fill();
      promptCtx.strokeStyle = "#ffffff";
      promptCtx.stroke();
    }
  }

  // ---------------------------------------------------------------- downloads

  function saveBlob(blob, filename) {
    const url = URL.createObjectURL(blob);
    const link = document.createElement("a");
    link.href = url;
    link.download = filename;
    link.hidden = true;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000); // the browser reads the URL after the click
  }

  function downloadMask() {
    const result = state.selected && state.selected.result;
    if (!result) return;
    const file = result.mask_file;
    saveBlob(new Blob([bytesOf(file.data)], { type: file.media_type }), file.filename);
  }

  // The image with the overlay as drawn now, at the image's own pixel size.
  function downloadOverlay() {
    const view = state.view;
    if (!view || !state.selected || view.result !== state.selected.result) return;
    if (state.overlayFrame) drawOverlay(); // a pending redraw belongs to what is saved
    const canvas = document.createElement("canvas");
    canvas.width = el.imageCanvas.width;
    canvas.height = el.imageCanvas.height;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(el.imageCanvas, 0, 0);
    ctx.drawImage(el.overlayCanvas, 0, 0);
    const stem = view.result.mask_file.filename.replace(/_mask\.(png|tif|nii\.gz|nii)$/, "");
    const slice = view.result.frames > 1 ? `_slice${String(view.index + 1).padStart(3, "0")}` : "";
    canvas.toBlob((blob) => saveBlob(blob, `${stem}${slice}_overlay.png`), "image/png");
  }

  // ---------------------------------------------------------------- text and state

  // Everything that follows from the state, but the canvases: the list, the texts, the controls.
  function refresh() {
    for (const item of state.items) refreshListItem(item);
    el.resultsEmpty.hidden = state.items.length > 0;
    refreshError();
    refreshViewer();
    refreshDetails();
    refreshControls();
    document.body.dataset.state = pageState();
  }

  function refreshListItem(item) {
    const button = item.li.querySelector(".result-button");
    item.li.dataset.status = item.status;
    item.li.classList.toggle("selected", item === state.selected);
    // a mask the quality score doubts is flagged in the list, so a person reviews it first
    const review = item.status === "done" && item.result && item.result.review === true;
    item.li.dataset.review = review ? "yes" : "no";
    item.li.querySelector(".result-status").textContent = review ? "review" : STATUS_TEXT[item.status];
    button.setAttribute("aria-current", item === state.selected ? "true" : "false");
    button.title = item.error || item.name;
  }

  function refreshError() {
    const item = state.selected;
    el.error.replaceChildren();
    if (item && item.error) {
      const title = document.createElement("strong");
      title.textContent = `Could not segment ${item.name}`;
      const text = document.createElement("span");
      text.className = "error-detail";
      text.textContent = item.error;
      el.error.append(title, " ", text); // the space: for the text read out, the layout ignores it
    } else if (item && item.promptError) {
      el.error.textContent = `Could not correct the mask: ${item.promptError}`;
    } else if (state.pageError) {
      el.error.textContent = state.pageError;
    }
    el.error.hidden = !el.error.hasChildNodes();
  }

  function shownResult() {
    const item = state.selected;
    const view = state.view;
    return item && view && view.item === item && view.result === item.result ? view.result : null;
  }

  function refreshViewer() {
    const item = state.selected;
    const result = shownResult();
    el.stage.hidden = !result;
    let text = "";
    if (!item) text = "Choose or drop an image to segment it.";
    else if (item.status === "waiting") text = `Waiting: ${item.name}`;
    else if (item.status === "segmenting") text = `Segmenting ${item.name}…`;
    else if (item.status === "error") text = `No result for ${item.name}.`;
    else if (!result) text = "Drawing…";
    el.placeholder.textContent = text;
    el.placeholder.hidden = !text;
    el.stageWrap.classList.toggle("busy", Boolean(result) && Boolean(text));
  }

  function refreshDetails() {
    const item = state.selected;
    const result = item && item.result;
    el.resultName.textContent = item ? item.name : "—";
    el.resultName.title = item ? item.name : "";
    el.downloadMask.disabled = !result;
    el.downloadOverlay.disabled = !shownResult();
    el.resultWarning.hidden = true;
    if (!result) {
      const facts = [el.resultModality, el.resultSize, el.resultArea, el.resultQuality, el.resultTime];
      for (const node of facts) node.textContent = "—";
      el.resultProbability.textContent = "";
      el.resultProbability.hidden = true;
      return;
    }
    showModality(result);
    el.resultSize.textContent = sizeText(result);
    el.resultArea.textContent = areaText(result);
    showQuality(result);
    el.resultTime.textContent = timeText(result, item.roundTripMs);
    el.resultTime.title = Object.entries(result.seconds)
      .map(([step, seconds]) => `${step} ${seconds.toFixed(3)} s`)
      .join(", ");
  }

  function showModality(result) {
    const byClassifier = result.chosen_by === "classifier";
    el.resultModality.textContent = `${result.modality} (${byClassifier ? "classifier" : "as chosen"})`;
    const probability = byClassifier ? result.probability : null;
    el.resultProbability.hidden = probability === null;
    el.resultProbability.textContent = probability === null ? "" : `p = ${probability.toFixed(2)}`;
    el.resultProbability.title = Object.entries(result.probabilities || {})
      .sort((a, b) => b[1] - a[1])
      .map(([name, p]) => `${name} ${p.toFixed(2)}`)
      .join(", ");
    if (result.known === false) {
      el.resultModality.textContent += " · unknown image";
      el.resultWarning.textContent =
        `This image looks like none of the model's modalities (distance ${result.distance.toFixed(2)} > ` +
        `${result.unknown_threshold.toFixed(2)}): the mask is likely meaningless. ` +
        "Choose the modality above if it is one.";
      el.resultWarning.hidden = false;
    } else if (probability !== null && probability < LOW_CONFIDENCE) {
      el.resultWarning.textContent = "Low classifier confidence: check the modality, or choose it above.";
      el.resultWarning.hidden = false;
    }
  }

  function showQuality(result) {
    if (result.corrected) {
      const iou = Math.min(...result.predicted_iou);
      const count = state.selected ? state.selected.prompts.length : 0;
      el.resultQuality.textContent =
        `corrected with ${count} prompt${count === 1 ? "" : "s"}` + (Number.isFinite(iou) ? ` · predicted IoU ${iou.toFixed(2)}` : "");
      el.resultQuality.title = "the promptable decoder's IoU head";
      return;
    }
    const score = result.predicted_dice;
    if (result.quality_pending) {
      el.resultQuality.textContent = "scoring…";
      el.resultQuality.title = "the quality score follows the mask";
      return;
    }
    el.resultQuality.textContent =
      score === null || score === undefined ? "no score" : `predicted Dice ${score.toFixed(2)}`;
    el.resultQuality.title = "the quality score, calibrated on validation images";
    if (result.review && el.resultWarning.hidden) {
      el.resultWarning.textContent =
        `The quality score doubts this mask (predicted Dice ${score.toFixed(2)} < ` +
        `${result.review_below.toFixed(2)}): check it before using it.`;
      el.resultWarning.hidden = false;
    }
  }

  function sizeText(result) {
    let text = `${result.width} × ${result.height} px`;
    if (result.frames > 1) text += `, ${result.frames} slices`;
    return `${text} · ${result.format === "nifti" ? "NIfTI" : result.format.toUpperCase()}`;
  }

  function areaText(result) {
    const percent = 100 * result.foreground_fraction;
    const digits = percent > 0 && percent < 0.1 ? 3 : 1;
    const whole = result.frames > 1 ? "volume" : "image";
    let text = `${numbers.format(result.foreground_pixels)} px (${percent.toFixed(digits)} % of the ${whole})`;
    if (result.foreground_mm2 !== null && result.foreground_mm2 !== undefined) {
      text += ` = ${numbers.format(Number(result.foreground_mm2.toFixed(1)))} mm²`;
    }
    return text;
  }

  function timeText(result, roundTripMs) {
    let text = `server ${result.seconds.total.toFixed(2)} s`;
    if (roundTripMs !== null) text += ` · round trip ${(roundTripMs / 1000).toFixed(2)} s`;
    return text;
  }

  function refreshControls() {
    const result = shownResult();
    const slice = result ? state.view.slice : null;
    el.opacity.disabled = el.contourOnly.checked; // a contour is always drawn at full opacity
    const modelHasMaps = !state.info || state.info.patch_maps;
    el.patchMapControl.hidden = !modelHasMaps;
    el.patchMap.disabled = !slice || !slice.patch;
    const frames = result ? result.frames : 1;
    el.promptControl.hidden = !(state.info && state.info.prompts);
    const promptable = canPrompt(state.selected);
    for (const input of el.promptControl.querySelectorAll("input")) input.disabled = !promptable;
    const prompted = promptable && state.selected.prompts.length > 0;
    el.undoPrompt.disabled = !prompted;
    el.resetPrompts.disabled = !prompted;
    el.sliceControl.hidden = frames <= 1;
    if (frames > 1) {
      // the slice asked for, which may still be decoding: the slider must not jump back while dragged
      const number = state.selected.sliceIndex + 1;
      el.slice.max = String(frames);
      el.slice.value = String(number);
      el.sliceValue.textContent = `${number} / ${frames}`;
    }
  }

  function pageState() {
    const item = state.selected;
    if (!item) return "idle";
    if (item.status === "error") return "error";
    const view = state.view;
    const drawn = view && view.item === item && view.result === item.result && view.index === item.sliceIndex;
    return item.status === "done" && drawn ? "done" : "busy";
  }

  init();
})();
