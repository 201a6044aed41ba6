// The page at /: an image (chosen, dropped, or a URL) goes to POST /predict, and its top
// styles come back as bars, with Grad-CAM's heatmap where the service computes them. A
// service started with --index answers POST /similar instead, the same prediction and the
// index's nearest paintings in one request, shown under it as thumbnails.
// Plain JavaScript, nothing fetched from anywhere else; every text from an answer goes in
// as text (textContent), never as HTML.
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
const similarSection = document.getElementById("similar");
const neighbourList = document.getElementById("neighbours");

// What the service's index holds (GET /similar/index), null for a service without one:
// asked once, as the page loads.
const similarIndex = fetch("/similar/index")
  .then((response) => (response.ok ? response.json() : null))
  .catch(() => null);

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
  similarSection.hidden = true;
  const index = await similarIndex;
  const route = index ? "/similar?heatmap=true" : "/predict?heatmap=true";
  let response;
  try {
    response = await fetch(route, request);
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
  if (index && answer.neighbours) {
    showNeighbours(answer.neighbours, index);
  }
}

function showNeighbours(neighbours, index) {
  const count = index.items.toLocaleString("en");
  document.getElementById("similar-about").textContent = neighbours.length
    ? `The most similar of the ${count} paintings in the index: the same picture first, then the nearest in style, by cosine distance.`
    : `None of the ${count} paintings in the index is near enough.`;
  neighbourList.replaceChildren(...neighbours.map(neighbourItem));
  similarSection.hidden = false;
}

function neighbourItem(neighbour) {
  const item = document.createElement("li");
  item.className = "neighbour";
  item.dataset.id = String(neighbour.id);
  item.title = neighbour.uri || "";
  item.append(thumbnail(neighbour));
  const title = document.createElement("span");
  title.className = "neighbour-title";
  title.textContent = neighbour.title || lastPart(neighbour.uri) || `item ${neighbour.id}`;
  const style = document.createElement("span");
  style.className = "neighbour-style";
  style.textContent = neighbour.style ? styleName(neighbour.style) : "";
  if (neighbour.label && neighbour.label !== neighbour.style) {
    style.textContent += ` (labelled ${styleName(neighbour.label)})`;
  }
  const distance = document.createElement("span");
  distance.className = "neighbour-distance";
  distance.textContent = neighbour.same_picture
    ? "the same picture"
    : `distance ${neighbour.distance.toFixed(3)}`;
  item.append(title, style, distance);
  return item;
}

// A thumbnail is shown once the browser has drawn it; one the service could not make (its
// file gone, its host refused) is a plain box that says so, never a broken image.
function thumbnail(neighbour) {
  const frame = document.createElement("div");
  frame.className = "thumbnail";
  const image = document.createElement("img");
  image.hidden = true;
  image.alt = "";
  image.addEventListener("load", () => {
    image.hidden = false;
  });
  image.addEventListener("error", () => {
    image.remove();
    frame.classList.add("missing");
    frame.textContent = "no picture";
  });
  image.src = neighbour.thumbnail;
  frame.append(image);
  return frame;
}

function lastPart(uri) {
  return uri ? uri.split(/[\\/]/).filter(Boolean).pop() : "";
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
