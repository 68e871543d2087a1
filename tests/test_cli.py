"""Entrypoints: --help documents every flag; user mistakes give one line and exit 2."""
import runpy
import subprocess
import sys
import warnings

import pytest

# The entrypoints run in-process below, imported once at collection
import jobs.augment  # noqa: F401
import jobs.fast_style  # noqa: F401
import jobs.finetune  # noqa: F401
import jobs.style_cli  # noqa: F401
import serve.__main__  # noqa: F401

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def run(*args, timeout=120):
    # COLUMNS: argparse wraps help at the terminal width, breaking lines after hyphens ("--style-" /
    # "max-replicas"); wide lines keep each help text whole for the checks below
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "RAY_AUTH_MODE": "disabled", "COLUMNS": "1000"})


@pytest.fixture
def run_main(capsys, monkeypatch):
    """`python -m MODULE ARGS...` in this process: the same `__main__` code run by runpy, without a new
    interpreter importing torch and Ray again (3-4 s each). Returns (exit status, stdout, stderr)."""
    def run_main(module, *args):
        monkeypatch.setattr(sys, "argv", [module, *args])
        monkeypatch.setenv("COLUMNS", "1000")  # as in run()
        status = 0
        with warnings.catch_warnings():  # "found in sys.modules ... prior to execution": the tests imported it
            warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else int(e.code is not None)
        out, err = capsys.readouterr()
        return status, out, err
    return run_main


def test_augment_help_lists_every_flag():
    r = run("jobs.augment", "--help")  # one real `python -m`; the other checks run the same code in-process
    assert r.returncode == 0
    for flag in ("--data", "--aug", "--epochs", "--batch-size", "--lr", "--num-workers", "--use-gpu",
                 "--storage-path", "--name", "--seed"):
        assert flag in r.stdout


@pytest.mark.parametrize("args,message", [
    (["--aug", "flip,blur"], "unknown augmentation"),
    (["--data", "/no/such/dir"], "dataset not found"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--data", "synthetic:64", "--storage-path", "/proc/forbidden"], "not writable"),
])
def test_augment_bad_input_is_one_line(args, message, tmp_path, run_main):
    status, _, err = run_main("jobs.augment", "--storage-path", str(tmp_path), "--data-root", str(tmp_path), *args)
    assert status == 2, err
    assert message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow  # the resource check starts Ray: in a subprocess of its own
def test_more_workers_than_cpus_is_one_line(tmp_path):
    r = run("jobs.augment", "--storage-path", str(tmp_path), "--data-root", str(tmp_path), "--data", "synthetic:64",
            "--num-workers", "64")
    assert r.returncode == 2, r.stderr
    assert "need 64 CPUs" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_preview_writes_grid(tmp_path, run_main):
    from PIL import Image
    img = tmp_path / "img.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(img)
    out = tmp_path / "grid.png"
    r = run("jobs.preview", "--image", str(img), "--aug", "flip,color,crop", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size[0] > Image.open(out).size[1]  # 2 rows x 4 columns
    status, _, err = run_main("jobs.preview", "--image", str(tmp_path / "missing.png"), "--out", str(out))
    assert status == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("module,config", [("jobs.augment", "jobs.augment:Config"),
                                           ("jobs.finetune", "jobs.finetune:Config"),
                                           ("jobs.fast_style", "jobs.fast_style:Config"),
                                           ("jobs.style", "jobs.style:StyleConfig"),
                                           ("serve", "serve.config:ServeConfig")])
def test_help_documents_every_config_field(module, config, run_main):
    """Each config field is declared once (jobs/config.py) and becomes a documented flag."""
    import dataclasses
    import importlib

    mod, cls = config.split(":")
    fields = dataclasses.fields(getattr(importlib.import_module(mod), cls))
    status, out, err = run_main(module, "--help")
    assert status == 0, err
    flat = " ".join(out.split())
    for f in fields:
        if not f.metadata.get("cli", True):
            continue
        flag = "--" + (f.metadata.get("flag") or f.name.replace("_", "-"))
        assert flag in flat, f"{module} --help lacks {flag}"
        assert f.metadata.get("help") and " ".join(f.metadata["help"].split()) in flat, f"{flag} has no help text"
