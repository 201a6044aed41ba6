// The page at /: an image (chosen, dropped, or a URL) goes to POST /predict, and its top
// styles come back as bars, with Grad-CAM's heatmap where the service computes them.
// Plain JavaScript, nothing fetched from anywhere else.
"use strict";

const fileInput = document.getElementById("file-input");
const dropZone = document.getElementById("drop-zone");
const urlForm = document.getElementById("url-form");
const urlInput = document.getElementById("url-input");
const statusLine = document.getElementById("status");
const result = document.getElementById("result");
const preview = document.getElementById("preview");
const previewFigure = document.getElementById("preview-figure");
const heatmapFigure = document.getElementById("heatmap-figure");

function styleName(style) {
  return style.replaceAll("_", " ");
}

function showStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

function showPrediction(answer) {
  document.getElementById("top-style").textContent = styleName(answer.style);
  const bars = document.getElementById("bars");
  bars.replaceChildren(
    ...answer.top_k_styles.map((style, i) => bar(style, answer.top_k_probabilities[i])),
  );
  document.getElementById("model-id").textContent = `model ${answer.model}`;
  heatmapFigure.hidden = !answer.heatmap;
  if (answer.heatmap) {
    document.getElementById("heatmap").src = answer.heatmap;
    document.getElementById("heatmap-style").textContent = styleName(answer.style);
  }
  result.hidden = false;
  showStatus("");
}

function bar(style, probability) {
  const item = document.createElement("li");
  item.className = "bar";
  item.dataset.style = style;
  item.dataset.probability = String(probability);
  const label = document.createElement("span");
  label.textContent = styleName(style);
  const track = document.createElement("span");
  track.className = "bar-track";
  const fill = document.createElement("span");
  fill.className = "bar-fill";
  fill.style.display = "block";
  fill.style.width = `${(100 * probability).toFixed(1)}%`;
  track.append(fill);
  const value = document.createElement("span");
  value.className = "bar-value";
  value.textContent = `${(100 * probability).toFixed(1)}%`;
  item.append(label, track, value);
  return item;
}

// Each request's number: an answer that arrives after a newer image was asked about is
// dropped, so what the page shows is always about the image it shows.
let latestRequest = 0;

async function predict(request) {
  const thisRequest = ++latestRequest;
  showStatus("Looking…");
  result.hidden = true;
  let response;
  try {
    response = await fetch("/predict?heatmap=true", request);
  } catch (error) {
    if (thisRequest === latestRequest) {
      showStatus(`The service did not answer (${error.message}).`, true);
    }
    return;
  }
  const answer = await response.json().catch(() => null);
  if (thisRequest !== latestRequest) {
    return;
  }
  if (!response.ok) {
    const said = answer && answer.error ? answer.error.message : response.statusText;
    showStatus(`Not predicted: ${said}`, true);
    return;
  }
  showPrediction(answer);
}

// The image asked about is shown once the browser has drawn it: one it cannot draw (a
// TIFF, which the service reads) is left out rather than shown as a broken image.
function showPreview(source) {
  if (preview.src.startsWith("blob:")) {
    URL.revokeObjectURL(preview.src);
  }
  previewFigure.hidden = true;
  preview.src = source;
}

preview.addEventListener("load", () => {
  previewFigure.hidden = false;
});

function predictFile(file) {
  if (!file) {
    return;
  }
  showPreview(URL.createObjectURL(file));
  const form = new FormData();
  form.append("file", file);
  predict({ method: "POST", body: form });
}

fileInput.addEventListener("change", () => predictFile(fileInput.files[0]));

dropZone.addEventListener("dragover", (event) => {
  event.preventDefault();
  dropZone.classList.add("dragging");
});
dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dragging"));
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  dropZone.classList.remove("dragging");
  predictFile(event.dataTransfer.files[0]);
});

urlForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const url = urlInput.value.trim();
  showPreview(url);
  predict({
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ url }),
  });
});
