"""From training to serving, at a tiny size, through the same entrypoints a user runs (README,
"End to end"): train (jobs.augment) -> sweep the fine-tuning learning rate (tune.lr) -> fine-tune
from the trained run with the best value (jobs.finetune --config best.json) -> serve the
fine-tuned artifact (python -m serve) -> classify over HTTP.

The training stages share this module's Ray instance (each entrypoint's `main` joins it, as it
joins a cluster); the service is the real `python -m serve` process, joining the same Ray.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import ray
import torch
from PIL import Image

from jobs.artifact import load_artifact
from jobs.data import make_synthetic

pytestmark = pytest.mark.slow  # the whole module starts Ray

ROOT = Path(__file__).resolve().parents[1]
LR_GRID = (0.01, 0.05)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def image_folder(root: Path, n_train: int, n_test: int, size: int) -> Path:
    """A 2-class ImageFolder (PNG files) unlike the pre-training data: the fine-tuning target."""
    d = make_synthetic(n_train=n_train, n_test=n_test, size=size, num_classes=2, seed=11)
    for split, xs, ys in (("train", d.train_x, d.train_y), ("test", d.test_x, d.test_y)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            folder = root / split / d.classes[y]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return root


def serve_port() -> int:
    """A free port in 19000-19099 (this project's range for HTTP tests on the shared machine)."""
    for port in range(19040, 19100):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.fail("no free port in 19040-19099")


def test_train_sweep_finetune_serve_classify(local_ray, tmp_path):
    from jobs import augment, finetune
    from tune import lr

    runs, cache = tmp_path / "results", str(tmp_path / "data")

    # 1. train on the pre-training data (4 synthetic shapes, 16 px), 2 DDP workers
    assert augment.main(["--data", "synthetic:512", "--image-size", "16", "--epochs", "1", "--batch-size", "64",
                         "--lr", "2e-3", "--num-workers", "2", "--data-root", cache, "--storage-path", str(runs),
                         "--name", "pretrain"]) == 0
    pretrained = runs / "pretrain"
    assert (pretrained / "result.json").exists() and (pretrained / "model" / "artifact.json").exists()

    # 2. sweep the fine-tuning learning rate on the target data, starting from the trained run
    folder = image_folder(tmp_path / "target", n_train=128, n_test=32, size=16)
    assert lr.main(["--job", "finetune", "--lr-grid", ",".join(map(str, LR_GRID)), "--num-samples", "1",
                    "--scheduler", "none", "--storage-path", str(runs), "--name", "sweep",
                    "--data", str(folder), "--data-root", cache, "--weights", str(pretrained),
                    "--epochs", "1", "--batch-size", "32", "--num-workers", "1", "--min-crop-scale", "0.5"]) == 0
    best = json.loads((runs / "sweep" / "best.json").read_text())
    assert best["config"]["lr"] in LR_GRID and best["config"]["weights"] == str(pretrained)
    assert (runs / "sweep" / "results.csv").read_text().count("\n") == 1 + len(LR_GRID)

    # 3. fine-tune from the trained run with the sweep's best values
    assert finetune.main(["--config", str(runs / "sweep" / "best.json"), "--epochs", "1",
                          "--storage-path", str(runs), "--name", "finetuned"]) == 0
    result = json.loads((runs / "finetuned" / "result.json").read_text())
    assert result["config"]["lr"] == best["config"]["lr"] and result["config"]["weights"] == str(pretrained)
    assert result["meta"]["arch"] == "cifar_resnet18"  # the pre-trained architecture, with a new 2-class head
    model, classes, preset, _ = load_artifact(runs / "finetuned" / "model")
    assert classes == sorted(p.name for p in (folder / "test").iterdir())

    # 4. serve the fine-tuned artifact: the real CLI, joining this Ray; fp32, so that its answers
    # equal the training run's fp32 evaluation image for image (the default may pick bf16 on this CPU)
    port = serve_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "serve", "--classifier", str(runs / "finetuned" / "model"),
                               "--no-style", "--port", str(port), "--address", local_ray,
                               "--classifier-precision", "fp32"],
                              cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, stdout=log,
                              stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                # readiness, not liveness: /healthz answers as soon as the ingress runs, while the
                # classifier replica may still be loading (then /classify is a 503 at once)
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the service did not come up:\n" + (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)

        # 5. classify over HTTP: the service answers as the artifact does in this process, and its
        # accuracy over the test images is the fine-tuning run's test accuracy
        files = sorted((folder / "test").rglob("*.png"))
        with torch.no_grad():
            expected = model(torch.stack([preset.eval_transform()(Image.open(f).convert("RGB")) for f in files])).argmax(1)
        correct = 0
        for f, want in zip(files, expected.tolist()):
            r = httpx.post(f"{url}/classify", content=f.read_bytes(), timeout=60)
            assert r.status_code == 200, r.text
            answer = r.json()
            assert answer["label"] == classes[want], (f, answer)
            assert sum(answer["probabilities"].values()) == pytest.approx(1, abs=1e-4)
            correct += answer["label"] == f.parent.name
        assert correct / len(files) == pytest.approx(result["test_acc"])
        bad = httpx.post(f"{url}/classify", content=b"not an image", timeout=60)
        assert 400 <= bad.status_code < 500 and "Traceback" not in bad.text
    finally:
        server.send_signal(signal.SIGTERM)  # python -m serve shuts Serve down on SIGTERM, as on Ctrl-C
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
