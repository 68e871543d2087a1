"""The web page served at GET /: classify an upload; stylize a content image with a style image;
stylize an image at once with one of the trained style networks (GET /styles, POST /style/fast).

One static HTML string with plain JavaScript (no build step, no external assets): it calls the
same JSON API as any client (POST /classify, POST /style/jobs, polling GET /style/jobs/{id}).
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>raycv</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  section { border: 1px solid #ddd; border-radius: 8px; padding: 1rem 1.25rem; margin-bottom: 1.5rem; }
  h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 0; }
  label { display: inline-block; margin: 0.25rem 1rem 0.25rem 0; }
  input[type=number] { width: 5rem; }
  .error { color: #b00020; } .muted { color: #666; font-size: 0.9rem; }
  table { border-collapse: collapse; margin-top: 0.5rem; } td { padding: 0.1rem 0.75rem 0.1rem 0; }
  progress { width: 20rem; }
  img { max-width: 100%; image-rendering: auto; margin-top: 0.5rem; }
</style>
</head>
<body>
<h1>raycv</h1>
<p class="muted">A fine-tuned image classifier and a neural style-transfer pool on Ray Serve.
The JSON API is documented at <a href="docs">/docs</a>.</p>

<section>
  <h2>Classify an image</h2>
  <form id="classify-form">
    <input type="file" id="classify-file" name="file" accept="image/*" required>
    <button type="submit" id="classify-submit">Classify</button>
  </form>
  <p id="classify-status" class="muted"></p>
  <p>Label: <strong id="label"></strong> <span id="score" class="muted"></span></p>
  <table id="probabilities"></table>
</section>

<section>
  <h2>Real-time style transfer</h2>
  <p class="muted">Trained style networks: one forward pass per image.</p>
  <form id="fast-form">
    <label>Style <select id="fast-style" required></select></label>
    <label>Image <input type="file" id="fast-file" name="image" accept="image/*" required></label>
    <button type="submit" id="fast-submit">Stylize now</button>
  </form>
  <p id="fast-status" class="muted"></p>
  <img id="fast-style-image" alt="" hidden style="max-height: 8rem">
  <img id="fast-result" alt="" hidden>
</section>

<section>
  <h2>Stylize an image</h2>
  <form id="style-form">
    <label>Content <input type="file" id="content-file" name="content" accept="image/*" required></label>
    <label>Style <input type="file" id="style-file" name="style" accept="image/*" required></label><br>
    <label>Height <input type="number" id="height" value="300" min="8" max="1024"></label>
    <label>Width <input type="number" id="width" value="450" min="8" max="1024"></label>
    <label>Steps <input type="number" id="steps" value="500" min="0" max="10000"></label>
    <button type="submit" id="style-submit">Stylize</button>
    <button type="button" id="style-cancel" disabled>Cancel</button>
  </form>
  <p id="style-status" class="muted"></p>
  <progress id="style-progress" value="0" max="1" hidden></progress>
  <p id="style-losses" class="muted"></p>
  <img id="style-result" alt="" hidden>
</section>

<script>
const $ = (id) => document.getElementById(id);

async function errorText(resp) {
  try { const j = await resp.json(); return j.error || JSON.stringify(j); }
  catch (e) { return resp.status + " " + resp.statusText; }
}

$("classify-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const status = $("classify-status");
  const file = $("classify-file").files[0];
  if (!file) return;
  status.className = "muted"; status.textContent = "classifying...";
  $("label").textContent = ""; $("score").textContent = ""; $("probabilities").innerHTML = "";
  const form = new FormData(); form.append("file", file);
  const resp = await fetch("classify", { method: "POST", body: form });
  if (!resp.ok) { status.className = "error"; status.textContent = await errorText(resp); return; }
  const out = await resp.json();
  status.textContent = "";
  $("label").textContent = out.label;
  $("score").textContent = "(" + (100 * out.score).toFixed(1) + "%)";
  const rows = Object.entries(out.probabilities).sort((a, b) => b[1] - a[1]).slice(0, 5);
  for (const [name, p] of rows) {
    const tr = document.createElement("tr");
    tr.innerHTML = "<td></td><td></td>";
    tr.children[0].textContent = name; tr.children[1].textContent = (100 * p).toFixed(1) + "%";
    $("probabilities").appendChild(tr);
  }
});

async function loadStyles() {
  const select = $("fast-style"), status = $("fast-status");
  const resp = await fetch("styles");
  if (!resp.ok) { status.className = "error"; status.textContent = await errorText(resp); return; }
  const styles = (await resp.json()).styles;
  select.innerHTML = "";
  for (const s of styles) {
    const opt = document.createElement("option");
    opt.value = s.name; opt.textContent = s.name; select.appendChild(opt);
  }
  $("fast-submit").disabled = styles.length === 0;
  if (styles.length === 0) status.textContent = "no trained styles on this server (python -m jobs.fast_style --registry DIR)";
  showStyleImage();
}

function showStyleImage() {
  const name = $("fast-style").value, img = $("fast-style-image");
  if (!name) { img.hidden = true; return; }
  img.src = "styles/" + encodeURIComponent(name) + "/image"; img.alt = "style " + name; img.hidden = false;
}

$("fast-style").addEventListener("change", showStyleImage);

$("fast-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const status = $("fast-status"), file = $("fast-file").files[0];
  if (!file) return;
  status.className = "muted"; status.textContent = "stylizing...";
  const form = new FormData(); form.append("image", file); form.append("style", $("fast-style").value);
  const t0 = performance.now();
  const resp = await fetch("style/fast", { method: "POST", body: form });
  if (!resp.ok) { status.className = "error"; status.textContent = await errorText(resp); return; }
  const blob = await resp.blob();
  const img = $("fast-result");
  img.onload = () => {
    status.textContent = "done: " + img.naturalWidth + "x" + img.naturalHeight + ", model " +
      resp.headers.get("X-Inference-Ms") + " ms, round trip " + Math.round(performance.now() - t0) + " ms";
  };
  img.src = URL.createObjectURL(blob); img.alt = "stylized image"; img.hidden = false;
});

loadStyles();

let currentJob = null;

$("style-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const status = $("style-status");
  const form = new FormData();
  form.append("content", $("content-file").files[0]);
  form.append("style", $("style-file").files[0]);
  form.append("options", JSON.stringify({
    size: [Number($("height").value), Number($("width").value)], steps: Number($("steps").value) }));
  $("style-result").hidden = true; $("style-losses").textContent = "";
  status.className = "muted"; status.textContent = "submitting...";
  const resp = await fetch("style/jobs", { method: "POST", body: form });
  if (!resp.ok) {
    status.className = "error"; status.textContent = await errorText(resp);
    const retry = resp.headers.get("Retry-After");
    if (retry) status.textContent += " (retry in " + retry + " s)";
    return;
  }
  const job = await resp.json();
  currentJob = job.id;
  $("style-cancel").disabled = false;
  poll(job.id);
});

$("style-cancel").addEventListener("click", async () => {
  if (currentJob) await fetch("style/jobs/" + currentJob, { method: "DELETE" });
});

async function poll(id) {
  const status = $("style-status"), bar = $("style-progress");
  while (currentJob === id) {
    const resp = await fetch("style/jobs/" + id);
    if (!resp.ok) { status.className = "error"; status.textContent = await errorText(resp); break; }
    const job = await resp.json();
    const p = job.progress;
    let text = "job " + id + ": " + job.status;
    if (job.attempt > 1) text += " (attempt " + job.attempt + ")";
    if (job.status === "queued" && job.queue_position !== null) text += ", position " + job.queue_position;
    if (p) {
      bar.hidden = false; bar.max = p.steps; bar.value = p.step + 1;
      text += ", step " + (p.step + 1) + " / " + p.steps;
      $("style-losses").textContent = "content " + p.content.toExponential(3) + " · style " +
        p.style.toExponential(3) + " · TV " + p.tv.toExponential(3);
    }
    status.className = job.status === "failed" ? "error" : "muted";
    status.textContent = text + (job.error ? ": " + job.error : "");
    if (job.status === "done") {
      const img = $("style-result");
      img.src = "style/jobs/" + id + "/result"; img.alt = "stylized image"; img.hidden = false;
      bar.value = bar.max;
    }
    if (["done", "failed", "cancelled"].includes(job.status)) break;
    await new Promise((r) => setTimeout(r, 500));
  }
  if (currentJob === id) { currentJob = null; $("style-cancel").disabled = true; }
}
</script>
</body>
</html>
"""
