// Search page of `onepeace serve`: sends the form to POST /v1/search (multipart) and renders the ranked hits.
// Plain browser JavaScript, no build step and no outside resources.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const form = $("query-form");
  const textInput = $("q-text");
  const imageInput = $("q-image");
  const audioInput = $("q-audio");
  const results = $("results");
  const message = $("message");
  const summary = $("summary");
  const button = $("search-button");
  const previews = { image: $("image-preview"), audio: $("audio-preview") };
  const clearButtons = { image: $("clear-image"), audio: $("clear-audio") };
  const inputs = { image: imageInput, audio: audioInput };
  const labels = { text: "text", image: "image", audio: "sound" };

  function showMessage(text, isError) {
    message.textContent = text;
    message.classList.toggle("error", Boolean(isError));
  }

  function baseName(path) {
    const parts = String(path).split(/[\\/]/);
    return parts[parts.length - 1] || String(path);
  }

  async function loadStatus() {
    try {
      const response = await fetch("/healthz");
      const health = await response.json();
      $("status").textContent = `Model ${health.model} · ${health.index_size} indexed items · ${health.status}`;
    } catch (err) {
      $("status").textContent = "The server does not answer.";
    }
  }

  function updatePreview(kind) {
    const file = inputs[kind].files[0];
    const preview = previews[kind];
    if (preview.dataset.url) {
      URL.revokeObjectURL(preview.dataset.url);
      delete preview.dataset.url;
    }
    if (file) {
      const url = URL.createObjectURL(file);
      preview.dataset.url = url;
      preview.src = url;
      preview.hidden = false;
      clearButtons[kind].hidden = false;
    } else {
      preview.removeAttribute("src");
      preview.hidden = true;
      clearButtons[kind].hidden = true;
    }
  }

  function clearInput(kind) {
    inputs[kind].value = "";
    updatePreview(kind);
    inputs[kind].focus();
  }

  function hitElement(hit) {
    const item = document.createElement("li");
    item.className = `hit hit-${hit.modality}`;
    item.dataset.modality = hit.modality;
    item.dataset.source = hit.source;
    item.dataset.itemId = String(hit.item_id);

    const head = document.createElement("div");
    head.className = "hit-head";
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = labels[hit.modality] || hit.modality;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `score ${hit.score.toFixed(3)}`;
    head.append(badge, score);
    item.append(head);

    const name = hit.modality === "text" ? hit.source : baseName(hit.source);
    if (hit.modality === "image" && hit.url) {
      const img = document.createElement("img");
      img.className = "thumb";
      img.src = hit.url;
      img.alt = `Result ${hit.rank}: image ${name}`;
      img.loading = "lazy";
      item.append(img);
    } else if (hit.modality === "audio" && hit.url) {
      const audio = document.createElement("audio");
      audio.controls = true;
      audio.preload = "none";
      audio.src = hit.url;
      audio.setAttribute("aria-label", `Result ${hit.rank}: sound ${name}`);
      item.append(audio);
    }
    if (hit.modality === "text") {
      const quote = document.createElement("blockquote");
      quote.className = "snippet";
      quote.textContent = hit.source.length > 300 ? `${hit.source.slice(0, 300)}…` : hit.source;
      item.append(quote);
    } else {
      const caption = document.createElement("p");
      caption.className = "source";
      caption.textContent = name;
      caption.title = hit.source;
      item.append(caption);
    }
    return item;
  }

  function render(answer) {
    results.replaceChildren(...answer.hits.map(hitElement));
    const parts = answer.query.map((kind) => labels[kind] || kind).join(" + ");
    const composed = answer.query.length > 1 ? " (composed query)" : "";
    summary.textContent = `${answer.hits.length} results for ${parts}${composed} in ${Math.round(answer.took_ms)} ms`;
  }

  async function search(event) {
    event.preventDefault();
    const data = new FormData();
    const text = textInput.value.trim();
    if (text) data.append("text", text);
    for (const kind of ["image", "audio"]) {
      const file = inputs[kind].files[0];
      if (file) data.append(kind, file, file.name);
    }
    if (!text && !imageInput.files[0] && !audioInput.files[0]) {
      showMessage("Type a text or choose an image or a sound first.", true);
      textInput.focus();
      return;
    }
    data.append("k", $("q-k").value);
    if ($("q-modality").value) data.append("modality", $("q-modality").value);
    button.disabled = true;
    form.setAttribute("aria-busy", "true");
    summary.textContent = "";
    showMessage("Searching…", false);
    try {
      const response = await fetch("/v1/search", { method: "POST", body: data });
      const answer = await response.json().catch(() => ({}));
      if (!response.ok) {
        const reason = answer.error ? answer.error.message : `HTTP ${response.status}`;
        showMessage(`Search failed: ${reason}`, true);
        return;
      }
      render(answer);
      showMessage("", false);
    } catch (err) {
      showMessage(`Search failed: ${err.message}`, true);
    } finally {
      button.disabled = false;
      form.removeAttribute("aria-busy");
    }
  }

  form.addEventListener("submit", search);
  imageInput.addEventListener("change", () => updatePreview("image"));
  audioInput.addEventListener("change", () => updatePreview("audio"));
  clearButtons.image.addEventListener("click", () => clearInput("image"));
  clearButtons.audio.addEventListener("click", () => clearInput("audio"));
  loadStatus();
})();
