"""Real-time style transfer: the TransformerNet, the content loader, a tiny DDP training run on a
local Ray (random VGG weights, 32 px), then the trained model served by Ray Serve over real HTTP.

One Ray instance for the module: the training run's model is the one the server serves.
"""
import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import ray
import torch
from PIL import Image
from ray import serve

from jobs import fastconv
from jobs import fast_style
from jobs.artifact import save_artifact
from jobs.data import load_content_images
from jobs.models import build_model
from jobs.presets import Preset
from jobs.transformer_net import (MIN_SIDE, StyleModelError, TransformerNet, list_style_models,
                                  load_style_model, save_style_model, stylize_image)

ROOT = Path(__file__).resolve().parents[1]
PORT = 20010
URL = f"http://127.0.0.1:{PORT}"
CHROMIUM = "/usr/bin/chromium"


def image_bytes(size=(40, 30), seed=0, fmt="PNG") -> bytes:
    """A noisy image with a bright square: something with edges to stylize."""
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 120).to(torch.uint8)
    arr[size[1] // 4: size[1] // 2, size[0] // 4: size[0] // 2] = torch.tensor([230, 200, 40], dtype=torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr.numpy()).save(buf, format=fmt)
    return buf.getvalue()


def cpu_flags() -> set[str]:
    """This machine's CPU feature flags as the Linux kernel lists them."""
    text = Path("/proc/cpuinfo").read_text()
    return set(next((line.split(":", 1)[1] for line in text.splitlines() if line.startswith("flags")), "").split())


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize("hw", [(MIN_SIDE, MIN_SIDE), (17, 23), (33, 8), (32, 32)])
def test_forward_keeps_odd_sizes_and_backward_reaches_every_weight(hw):
    torch.manual_seed(0)
    model = TransformerNet()
    x = torch.rand(2, 3, *hw)
    y = model(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_too_small_input_is_a_clear_error():
    with pytest.raises(ValueError, match="too small"):
        TransformerNet()(torch.rand(1, 3, MIN_SIDE - 1, 10))


def test_style_model_artifact_round_trip(tmp_path):
    torch.manual_seed(0)
    model = TransformerNet().eval()
    style = Image.open(io.BytesIO(image_bytes((50, 40))))
    save_style_model(tmp_path / "reg" / "oak", model.state_dict(), "oak", {"epochs": 2}, style)
    (tmp_path / "reg" / "junk").mkdir()  # not a style model: not listed
    assert list(list_style_models(tmp_path / "reg")) == ["oak"]
    loaded, manifest = load_style_model(tmp_path / "reg" / "oak")
    assert manifest["name"] == "oak" and manifest["epochs"] == 2
    img = Image.open(io.BytesIO(image_bytes((21, 13)))).convert("RGB")
    assert stylize_image(loaded, img).size == (21, 13)
    assert list(stylize_image(loaded, img).getdata()) == list(stylize_image(model, img).getdata())
    with pytest.raises(StyleModelError):
        load_style_model(tmp_path / "reg" / "junk")


def pixels(img: Image.Image) -> torch.Tensor:
    return torch.tensor(list(img.getdata()), dtype=torch.float32)


def test_bf16_inference_stays_close_to_fp32_and_auto_follows_the_cpu(monkeypatch):
    torch.manual_seed(0)
    model = TransformerNet().eval()
    img = Image.open(io.BytesIO(image_bytes((48, 40), seed=3))).convert("RGB")
    a, b = (pixels(stylize_image(model, img, precision=p)) for p in ("fp32", "bf16"))
    assert (a - b).abs().mean() < 3 and a.std() > 5  # 0..255 pixels: a small change of a non-flat image
    assert not torch.equal(a, b)  # so the two checks below can tell the precisions apart
    # "auto" on a CPU without native bfloat16 runs fp32, on one with it bf16 (the probe replaced)
    for native, expected in ((False, a), (True, b)):
        monkeypatch.setattr("jobs.precision.native_bf16_cpu", lambda: native)
        assert torch.equal(pixels(stylize_image(model, img, precision="auto")), expected)
    with pytest.raises(ValueError, match="precision"):
        stylize_image(model, img, precision="fp8")


def test_content_loader_flat_zip_is_square_with_a_validation_slice(tmp_path):
    with zipfile.ZipFile(tmp_path / "flat.zip", "w") as zf:
        for i in range(60):
            zf.writestr(f"images/{i:03d}.jpg", image_bytes((40 + i % 3, 30), seed=i, fmt="JPEG"))
    data = load_content_images(str(tmp_path / "flat.zip"), str(tmp_path / "cache"), 24)
    assert data.train_x.shape == (52, 3, 24, 24) and data.test_x.shape == (8, 3, 24, 24)
    assert data.train_x.dtype == torch.uint8
    limited = load_content_images(str(tmp_path / "flat.zip"), str(tmp_path / "cache"), 24, limit_train=10)
    assert len(limited.train_x) == 10
    # an ImageFolder tree keeps its own split: test/ validates
    with zipfile.ZipFile(tmp_path / "folder.zip", "w") as zf:
        for i in range(3):
            zf.writestr(f"train/cls/{i}.png", image_bytes((30, 40), seed=i))
        zf.writestr("test/cls/0.png", image_bytes((50, 20), seed=9))
    data = load_content_images(str(tmp_path / "folder.zip"), str(tmp_path / "cache"), 16)
    assert data.train_x.shape == (3, 3, 16, 16) and data.test_x.shape == (1, 3, 16, 16)


# ----------------------------------------------------------------------------- training on Ray


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=192 * 1024**2)
    yield
    serve.shutdown()
    ray.shutdown()


def train_args(tmp, epochs):
    return ["--style", str(tmp / "style.png"), "--style-name", "tiny", "--data", str(tmp / "content"),
            "--data-root", str(tmp / "cache"), "--image-size", "32", "--style-size", "48", "--weights", "random",
            "--epochs", str(epochs), "--batch-size", "8", "--lr", "2e-3", "--num-workers", "2",
            "--storage-path", str(tmp / "runs"), "--name", "tiny", "--registry", str(tmp / "styles"),
            "--preview-count", "3"]


@pytest.fixture(scope="module")
def trained(local_ray, tmp_path_factory):
    """python -m jobs.fast_style on a flat folder of 36 images: 2 DDP workers, 3 epochs."""
    tmp = tmp_path_factory.mktemp("fast")
    (tmp / "content").mkdir()
    for i in range(36):
        (tmp / "content" / f"{i:02d}.png").write_bytes(image_bytes((36, 33), seed=i))
    (tmp / "style.png").write_bytes(image_bytes((64, 48), seed=99))
    assert fast_style.main(train_args(tmp, 3)) == 0
    return tmp


@pytest.mark.slow
def test_tiny_ddp_training_lowers_the_loss_and_writes_outputs(trained):
    run = trained / "runs" / "tiny"
    result = json.loads((run / "result.json").read_text())
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3] and result["config"]["num_workers"] == 2
    # fp32 on this CPU (training's precision "auto"): NNPACK's kernels where this torch has them
    assert result["meta"]["convolutions"] == ("winograd" if fastconv.available() else "default")
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"], history
    assert history[-1]["test_loss"] < history[0]["test_loss"], history
    for key in ("train_content", "train_style", "train_tv", "test_content", "test_style", "test_tv"):
        assert key in history[-1]
    assert "train_acc" not in history[-1]
    assert (run / "curves.png").stat().st_size > 1000
    sheets = sorted(p.name for p in (run / "previews").iterdir())
    assert sheets == ["epoch-001.png", "epoch-002.png", "epoch-003.png"]
    assert Image.open(run / "previews" / "epoch-003.png").size[1] > 2 * 32  # content row + stylized row
    model, manifest = load_style_model(trained / "styles" / "tiny")
    assert manifest["name"] == "tiny" and manifest["epochs"] == 3 and manifest["weights"] == "random"
    assert (run / "model" / "style_model.json").is_file()


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "jobs.fast_style", *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=ROOT)


@pytest.mark.slow
def test_cli_user_errors_are_one_line(tmp_path, capsys):
    r = run_cli("--style", str(tmp_path / "missing.jpg"), "--data", "synthetic:8")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert "not found" in r.stderr
    # the next in this process, through the same run_cli that python -m wires main into
    from jobs import cli, fast_style

    (tmp_path / "s.png").write_bytes(image_bytes())
    with pytest.raises(SystemExit) as exit_:
        cli.run_cli(fast_style.main, ["--style", str(tmp_path / "s.png"), "--data", str(tmp_path / "nothing-here"),
                                      "--weights", "random"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # after --weights random's warning
    assert exit_.value.code == 2 and len(errors) == 1 and "content images not found" in errors[0], err


# ----------------------------------------------------------------------------- serving


@pytest.fixture(scope="module")
def server(trained):
    torch.manual_seed(0)
    classifier = save_artifact(trained / "classifier", build_model("cifar_resnet18", 2).state_dict(),
                               "cifar_resnet18", ["a", "b"], Preset.plain(16))
    from serve.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    cfg = dict(classifier=str(classifier), classifier_cpus=0.25, style=False, fast_styles=str(trained / "styles"),
               fast_style_cpus=0.5, max_body_mb=1.0, max_pixels=1_000_000)
    serve.run(build_app(cfg), name="raycv", route_prefix="/")
    with httpx.Client(base_url=URL, timeout=60) as client:
        deadline = time.time() + 240
        while True:
            try:
                if client.get("/readyz").status_code == 200:  # every replica warm, not only the ingress (/healthz)
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, f"the app did not start: {serve.status()}"
            time.sleep(0.5)
        yield client
    serve.delete("raycv")


@pytest.mark.slow
def test_served_style_round_trip_equals_local_inference(trained, server):
    styles = server.get("/styles").json()["styles"]
    assert [s["name"] for s in styles] == ["tiny"] and styles[0]["epochs"] == 3
    data = image_bytes((37, 23), seed=5)
    r = server.post("/style/fast?style=tiny", content=data, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.headers["x-style"] == "tiny"
    served = Image.open(io.BytesIO(r.content)).convert("RGB")
    assert served.size == (37, 23)
    model, _ = load_style_model(trained / "styles" / "tiny")
    # the replica's default precision is "auto": bf16 on a CPU with native bfloat16 (read here from the
    # kernel's CPU flags, not from torch's probe that the server uses), else fp32
    local = stylize_image(model, Image.open(io.BytesIO(data)).convert("RGB"),
                          precision="bf16" if cpu_flags() & {"avx512_bf16", "amx_tile"} else "fp32")
    diff = (torch.tensor(list(served.getdata())) - torch.tensor(list(local.getdata()))).abs().max()
    assert diff <= 1, diff
    r = server.post("/style/fast", files={"image": ("x.png", data, "image/png")}, data={"style": "tiny"})
    assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert server.get("/styles/tiny/image").headers["content-type"] == "image/jpeg"


@pytest.mark.slow
def test_unknown_style_is_a_404_json(server):
    for name in ("nope", "..", "../tiny"):
        r = server.post("/style/fast", params={"style": name}, content=image_bytes())
        assert r.status_code == 404 and "unknown style" in r.json()["error"], (name, r.text)
    assert server.get("/styles/nope/image").status_code == 404


@pytest.mark.parametrize("case", ["empty", "garbage", "tiny", "thin", "no-style", "wrong-field"])
@pytest.mark.slow
def test_bad_requests_are_4xx_json_and_the_replica_survives(server, case):
    if case == "empty":
        r, want = server.post("/style/fast?style=tiny", content=b""), 400
    elif case == "garbage":
        r, want = server.post("/style/fast?style=tiny", content=b"not an image"), 422
    elif case == "tiny":
        r, want = server.post("/style/fast?style=tiny", content=image_bytes((3, 40))), 422
    elif case == "thin":  # 5000x5 scaled to the longer side of 1024 first: 1024x1, under MIN_SIDE
        r, want = server.post("/style/fast?style=tiny", content=image_bytes((5000, 5))), 422
    elif case == "no-style":
        r, want = server.post("/style/fast", content=image_bytes()), 422
    else:
        r, want = server.post("/style/fast", files={"file": ("x.png", image_bytes(), "image/png")},
                              data={"style": "tiny"}), 422
    assert r.status_code == want and "error" in r.json(), r.text
    assert server.post("/style/fast?style=tiny", content=image_bytes()).status_code == 200


@pytest.mark.slow
def test_a_newly_published_style_is_served_without_restart(trained, server):
    shutil.copytree(trained / "styles" / "tiny", trained / "styles" / "second")
    assert [s["name"] for s in server.get("/styles").json()["styles"]] == ["second", "tiny"]
    r = server.post("/style/fast?style=second", content=image_bytes((19, 29)))
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (19, 29)


@pytest.mark.slow
def test_a_style_named_in_any_letters_is_served_with_an_encoded_header(trained, server):
    from urllib.parse import unquote

    name = "風景-café"
    shutil.copytree(trained / "styles" / "tiny", trained / "styles" / name)
    try:
        r = server.post("/style/fast", params={"style": name}, content=image_bytes((19, 29)))
        assert r.status_code == 200, r.text
        assert r.headers["x-style"].isascii() and unquote(r.headers["x-style"]) == name
    finally:
        shutil.rmtree(trained / "styles" / name)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} absent (apt-get install chromium)")
@pytest.mark.slow
def test_web_page_offers_the_styles(server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    (tmp_path / "in.png").write_bytes(image_bytes((30, 20), seed=3))
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(URL + "/")
            page.wait_for_function("document.querySelectorAll('#fast-style option').length > 0", timeout=30_000)
            assert "tiny" in page.eval_on_selector_all("#fast-style option", "els => els.map(e => e.value)")
            page.select_option("#fast-style", "tiny")
            page.set_input_files("#fast-file", str(tmp_path / "in.png"))
            page.click("#fast-submit")
            page.wait_for_function("document.getElementById('fast-status').textContent.startsWith('done')",
                                   timeout=60_000)
            assert page.evaluate("document.getElementById('fast-result').naturalWidth") == 30
        finally:
            browser.close()
