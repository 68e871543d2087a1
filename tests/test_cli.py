"""Entrypoints: --help documents every flag; user mistakes give one line and exit 2."""
import subprocess
import sys

import pytest

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def run(*args, timeout=120):
    # COLUMNS: argparse wraps help at the terminal width, breaking lines after hyphens ("--style-" /
    # "max-replicas"); wide lines keep each help text whole for the checks below
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "RAY_AUTH_MODE": "disabled", "COLUMNS": "1000"})


def test_augment_help_lists_every_flag():
    r = run("jobs.augment", "--help")
    assert r.returncode == 0
    for flag in ("--data", "--aug", "--epochs", "--batch-size", "--lr", "--num-workers", "--use-gpu",
                 "--storage-path", "--name", "--seed"):
        assert flag in r.stdout


@pytest.mark.parametrize("args,message", [
    (["--aug", "flip,blur"], "unknown augmentation"),
    (["--data", "/no/such/dir"], "dataset not found"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--data", "synthetic:64", "--storage-path", "/proc/forbidden"], "not writable"),
    pytest.param(["--data", "synthetic:64", "--num-workers", "64"], "need 64 CPUs",
                 marks=pytest.mark.slow),  # the resource check starts Ray
])
def test_augment_bad_input_is_one_line(args, message, tmp_path):
    r = run("jobs.augment", "--storage-path", str(tmp_path), "--data-root", str(tmp_path), *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_preview_writes_grid(tmp_path):
    from PIL import Image
    img = tmp_path / "img.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(img)
    out = tmp_path / "grid.png"
    r = run("jobs.preview", "--image", str(img), "--aug", "flip,color,crop", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size[0] > Image.open(out).size[1]  # 2 rows x 4 columns
    r = run("jobs.preview", "--image", str(tmp_path / "missing.png"), "--out", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr


@pytest.mark.parametrize("module,config", [("jobs.augment", "jobs.augment:Config"),
                                           ("jobs.finetune", "jobs.finetune:Config"),
                                           pytest.param("jobs.fast_style", "jobs.fast_style:Config",
                                                        marks=pytest.mark.slow),  # ~6 s each: heavier imports
                                           pytest.param("jobs.style", "jobs.style:StyleConfig",
                                                        marks=pytest.mark.slow),
                                           ("serve", "serve.config:ServeConfig")])
def test_help_documents_every_config_field(module, config):
    """Each config field is declared once (jobs/config.py) and becomes a documented flag."""
    import dataclasses
    import importlib

    mod, cls = config.split(":")
    fields = dataclasses.fields(getattr(importlib.import_module(mod), cls))
    r = run(module, "--help")
    assert r.returncode == 0, r.stderr
    flat = " ".join(r.stdout.split())
    for f in fields:
        if not f.metadata.get("cli", True):
            continue
        flag = "--" + (f.metadata.get("flag") or f.name.replace("_", "-"))
        assert flag in flat, f"{module} --help lacks {flag}"
        assert f.metadata.get("help") and " ".join(f.metadata["help"].split()) in flat, f"{flag} has no help text"
