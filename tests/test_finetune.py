"""Fine-tuning: head and parameter groups, weights from the hub cache / an augmentation checkpoint /
a state dict, the mismatch error, the verified download, the batched preset, the CLI, and a
2-worker DDP fine-tune on Ray Train (one Ray instance for the module)."""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import torchvision
from PIL import Image

from jobs import driver, finetune, loop
from jobs.artifact import load_artifact, save_artifact
from jobs.cli import UserError
from jobs.data import fetch_archive, file_sha1, load_image_data, make_synthetic
from jobs.finetune import Config, Source, build_classifier, load_source
from jobs.models import build_model
from jobs.presets import Preset

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_FILE = Path(urlparse(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).path).name  # resnet18-f37072fd.pth


def make_folder(root: Path, n_train: int, n_test: int, size: int, num_classes: int = 2, seed: int = 1,
                tint: bool = False) -> Path:
    """A generated ImageFolder tree (train/ and test/) of PNGs, mixed sizes and aspect ratios (odd and even)."""
    d = make_synthetic(n_train=n_train, n_test=n_test, size=size, num_classes=num_classes, seed=seed)
    if tint:  # a class-dependent colour cast as well: a cue that survives any crop, so a few steps learn it
        for x, y in ((d.train_x, d.train_y), (d.test_x, d.test_y)):
            x[torch.arange(len(y)), y % 3] += 64
    for split, xs, ys in (("train", d.train_x, d.train_y), ("test", d.test_x, d.test_y)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            folder = root / split / d.classes[y]
            folder.mkdir(parents=True, exist_ok=True)
            shape = [(size, size + size // 4), (size + size // 4 + 1, size), (size + 3, size + 8)][i % 3]
            Image.fromarray(x.permute(1, 2, 0).numpy()).resize(shape).save(folder / f"{i:04d}.png")
    return root


def seed_hub_cache(torch_home: Path) -> dict:
    """Random ResNet-18 weights under the name torchvision looks for. torch.hub checks the sha256
    prefix in the file name only when it downloads, so a cached file with other content loads."""
    state = torchvision.models.resnet18().state_dict()
    path = torch_home / "hub" / "checkpoints" / IMAGENET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


# ----------------------------------------------------------------------------- model, head, groups

def test_new_head_and_parameter_groups():
    source_model = torchvision.models.resnet18()
    source = Source("resnet18", source_model.state_dict(), Preset.imagenet(), "test weights")
    cfg = Config(lr=0.003, head_lr_mult=7.0)
    model, opt = build_classifier(cfg, source, num_classes=3)
    assert isinstance(model.fc, torch.nn.Linear) and model.fc.out_features == 3 and model.fc.in_features == 512
    assert torch.count_nonzero(model.fc.bias) == 0
    bound = (6 / (512 + 3)) ** 0.5  # Xavier-uniform
    assert model.fc.weight.abs().max() <= bound and model.fc.weight.std() > bound / 3
    backbone, head = opt.param_groups
    assert backbone["lr"] == 0.003 and head["lr"] == 0.003 * 7.0
    assert {id(p) for p in head["params"]} == {id(p) for p in model.fc.parameters()}
    assert len(backbone["params"]) + len(head["params"]) == len(list(model.parameters()))
    for key, value in source_model.state_dict().items():
        if not key.startswith("fc."):
            torch.testing.assert_close(model.state_dict()[key], value, msg=key)
    assert opt.defaults["weight_decay"] == 1e-3 and opt.defaults["momentum"] == 0.0
    # forward + backward through the new head
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert model.fc.weight.grad is not None and model.conv1.weight.grad is not None

    scratch, opt = build_classifier(Config(mode="scratch"), source, num_classes=3)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == 0.1  # the reference's larger lr
    assert not torch.equal(scratch.conv1.weight, source_model.conv1.weight)


def test_freeze_backbone_trains_the_head_only():
    source = Source("resnet18", torchvision.models.resnet18().state_dict(), Preset.imagenet(64), "test weights")
    model, opt = build_classifier(Config(freeze_backbone=True, lr=0.5), source, num_classes=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert [g["name"] for g in opt.param_groups] == ["head"]
    model.train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}  # BatchNorm running statistics included


# ----------------------------------------------------------------------------- weights

def test_imagenet_weights_from_a_preseeded_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    state = seed_hub_cache(tmp_path / "torch")
    source = load_source("imagenet")  # through ResNet18_Weights.IMAGENET1K_V1.get_state_dict
    assert source.arch == "resnet18" and source.preset == Preset.imagenet(224)
    assert source.preset.resize == 256 and source.preset.mean == (0.485, 0.456, 0.406)
    model, _ = build_classifier(Config(), source, num_classes=2)
    torch.testing.assert_close(model.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert load_source("imagenet", image_size=64).preset == Preset(72, 64, source.preset.mean, source.preset.std)


def test_imagenet_weights_without_cache_or_network_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))

    def offline(url, dst, *args, **kwargs):
        import urllib.error
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)  # never download 45 MB in a test
    with pytest.raises(UserError) as e:
        load_source("imagenet")
    message = str(e.value)
    assert "https://download.pytorch.org/models/" + IMAGENET_FILE in message
    assert str(tmp_path / "empty" / "hub" / "checkpoints" / IMAGENET_FILE) in message and "\n" not in message
    assert load_source("imagenet", load=False).state is None  # scratch mode needs no weights


def augment_style_checkpoint(run: Path, num_classes: int = 4, arch: str = "cifar_resnet18") -> dict:
    """A checkpoint laid out as jobs.loop.report writes it for jobs.augment, in <run>/checkpoint_*/."""
    model = build_model(arch, num_classes)
    meta = {"classes": [f"c{i}" for i in range(num_classes)], "arch": arch, "image_size": [32, 32],
            "preset": Preset.plain(32).to_dict()}
    ckpt = run / "checkpoint_2026-01-01_00-00-00.000000"
    ckpt.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 0, "config": {}, "history": [], "meta": meta},
               ckpt / loop.CHECKPOINT_FILE)
    return model.state_dict()


def test_weights_from_an_augmentation_checkpoint_keep_its_architecture_and_size(tmp_path):
    state = augment_style_checkpoint(tmp_path / "run")
    ckpt_dir = next((tmp_path / "run").glob("checkpoint_*"))
    for path in (tmp_path / "run", ckpt_dir, ckpt_dir / loop.CHECKPOINT_FILE):
        source = load_source(str(path))
        assert source.arch == "cifar_resnet18" and source.preset == Preset.plain(32), path
    model, opt = build_classifier(Config(), source, num_classes=2)
    torch.testing.assert_close(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    assert model.fc.out_features == 2 and len(opt.param_groups) == 2
    # a finished run's model/ artifact takes precedence over its checkpoints; a bare state dict works too
    save_artifact(tmp_path / "run" / "model", state, "cifar_resnet18", ["a", "b", "c", "d"], Preset.plain(24))
    assert load_source(str(tmp_path / "run")).preset == Preset.plain(24)
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "ddp.pt")
    bare = load_source(str(tmp_path / "ddp.pt"), image_size=48)
    assert bare.arch == "cifar_resnet18" and bare.preset.crop == 48 and "conv1.weight" in bare.state


def test_weights_from_a_fast_recipe_checkpoint_replace_its_own_head(tmp_path):
    """`--recipe fast` trains FastCifarNet, whose classifier is `head`, not ResNet's `fc`."""
    state = augment_style_checkpoint(tmp_path / "run", arch="fast_cifar_net")
    source = load_source(str(tmp_path / "run"))
    assert source.arch == "fast_cifar_net"
    model, opt = build_classifier(Config(lr=0.02), source, num_classes=2)
    torch.testing.assert_close(model.whiten.weight, state["whiten.weight"])
    torch.testing.assert_close(model.blocks[2].conv2.weight, state["blocks.2.conv2.weight"])
    assert model.head.out_features == 2
    backbone, head = opt.param_groups
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head.parameters()}
    assert head["lr"] == 0.02 * Config().head_lr_mult
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2)


def test_mismatched_weights_name_the_first_bad_key(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    torch.save(state, tmp_path / "bad.pt")
    source = load_source(str(tmp_path / "bad.pt"))
    with pytest.raises(UserError, match=r"first bad key layer2\.0\.conv1\.weight \(shape \(128, 64, 1, 1\)"):
        build_classifier(Config(), source, 2)
    del state["layer2.0.conv1.weight"]
    with pytest.raises(UserError, match=r"first bad key layer2\.0\.conv1\.weight \(missing\)"):
        build_classifier(Config(), Source("resnet18", state, Preset.imagenet(), "x"), 2)
    state["layer2.0.conv1.weight"] = torchvision.models.resnet18().layer2[0].conv1.weight
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match=r"first bad key extra\.weight \(unexpected\)"):
        build_classifier(Config(), Source("resnet18", state, Preset.imagenet(), "x"), 2)
    # an ImageNet ResNet-18 is not a CIFAR one: the 3x3 stem differs
    cifar = Source("cifar_resnet18", torchvision.models.resnet18().state_dict(), Preset.plain(32), "imagenet file")
    with pytest.raises(UserError, match=r"first bad key conv1\.weight"):
        build_classifier(Config(), cifar, 2)


# ----------------------------------------------------------------------------- data

def test_verified_download_extracts_once_and_rejects_a_bad_sha1(tmp_path):
    folder = make_folder(tmp_path / "src" / "hotdog", n_train=8, n_test=4, size=12)
    archive = tmp_path / "hotdog.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(folder.rglob("*.png")):
            zf.write(f, f.relative_to(tmp_path / "src"))
    url, sha1 = archive.as_uri(), file_sha1(archive)

    with pytest.raises(UserError, match="has sha1 .* expected 0000"):
        fetch_archive("hotdog", tmp_path / "bad", url=url, sha1="0" * 40)
    assert not any((tmp_path / "bad").glob("hotdog*"))  # no bad download kept, nothing extracted

    target = fetch_archive("hotdog", tmp_path / "root", url=url, sha1=sha1)
    assert target == tmp_path / "root" / "hotdog" and (tmp_path / "root" / "hotdog.zip").exists()
    data = load_image_data(str(target), tmp_path / "root", 16, fit="center")
    assert data.train_x.shape == (8, 3, 16, 16) and data.classes == ["hbar", "square"]
    (tmp_path / "root" / "hotdog.zip").unlink()
    assert fetch_archive("hotdog", tmp_path / "root", url="http://127.0.0.1:9/never", sha1=sha1) == target  # once

    # a file put in place by hand is checked too
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "hotdog.zip").write_bytes(b"not the archive")
    with pytest.raises(UserError, match="manual/hotdog.zip has sha1"):
        fetch_archive("hotdog", tmp_path / "manual")


def test_no_network_fails_at_once_naming_the_url_and_the_place(tmp_path):
    with pytest.raises(UserError) as e:
        fetch_archive("hotdog", tmp_path, url="http://127.0.0.1:9/hotdog.zip", timeout=5)
    assert "http://127.0.0.1:9/hotdog.zip" in str(e.value) and str(tmp_path / "hotdog.zip") in str(e.value)
    assert "fba480ffa8aa7e0febbb511d181409f899b9baa5" in str(e.value)


@pytest.mark.parametrize("preset", [Preset.imagenet(32), Preset.imagenet(20), Preset.plain(24)])
def test_batched_preset_matches_the_serving_transform(preset, tmp_path):
    """Training's cached + batched eval path sees exactly the pixels Serve's eval_transform produces."""
    folder = make_folder(tmp_path / "f", n_train=4, n_test=9, size=40)
    data = load_image_data(str(folder), tmp_path, preset.resize, fit="center")
    files = sorted((folder / "test").rglob("*.png"), key=lambda p: (p.parent.name, p.name))
    served = torch.stack([preset.eval_transform()(Image.open(f).convert("RGB")) for f in files])
    torch.testing.assert_close(preset.eval_batch(data.test_x), served, rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    x = preset.train_batch(data.train_x, g)
    assert x.shape == (4, 3, preset.crop, preset.crop) and torch.isfinite(x).all()
    assert x.min() >= (-2.2 if preset.mean else 0) and x.max() <= (2.7 if preset.mean else 1)


# ----------------------------------------------------------------------------- command line

@pytest.mark.slow
def test_help_and_a_bad_input_from_the_shell(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "jobs.finetune", *a], cwd=ROOT, capture_output=True,  # noqa: E731
                                    text=True, timeout=120, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    r = run("--help")
    assert r.returncode == 0
    for flag in ("--data", "--weights", "--mode", "--freeze-backbone", "--image-size", "--lr", "--head-lr-mult",
                 "--epochs", "--batch-size", "--num-workers", "--use-gpu", "--storage-path", "--name"):
        assert flag in r.stdout
    r = run("--data", str(tmp_path / "missing"), "--mode", "scratch", "--data-root", str(tmp_path))
    assert r.returncode == 2 and r.stderr.startswith("error: dataset not found") and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--weights", "/no/such/weights.pt"], "error: weights not found: /no/such/weights.pt"),
    (["--weights", "none"], "use --mode scratch"),
    (["--mode", "scratch", "--freeze-backbone"], "--freeze-backbone needs --mode finetune"),
    (["--weights", "BAD"], "first bad key layer1.1.bn2.running_var (shape (3,)"),
    (["--weights", "STEM"], "first bad key conv1.weight (shape (64, 3, 5, 5)"),
    (["--mode", "scratch", "--lr", "0"], "--lr must be positive"),
    (["--mode", "scratch", "--data", "hotdog"], "hotdog.zip has sha1"),  # a junk archive in the data root
])
def test_bad_input_is_one_line(args, message, tmp_path, capsys):
    """jobs.cli.run_cli in-process: a user mistake is one line on stderr and exit 2, before Ray starts."""
    from jobs.cli import run_cli

    bad = torchvision.models.resnet18().state_dict()
    bad["layer1.1.bn2.running_var"] = torch.ones(3)
    torch.save(bad, tmp_path / "bad.pt")
    torch.save({"conv1.weight": torch.zeros(64, 3, 5, 5)}, tmp_path / "stem.pt")
    (tmp_path / "hotdog.zip").write_bytes(b"junk")  # never downloads 260 MB in a test: checked, rejected
    folder = make_folder(tmp_path / "data", n_train=4, n_test=2, size=12)
    args = [{"BAD": str(tmp_path / "bad.pt"), "STEM": str(tmp_path / "stem.pt")}.get(a, a) for a in args]
    with pytest.raises(SystemExit) as e:
        run_cli(finetune.main, ["--storage-path", str(tmp_path / "runs"), "--data-root", str(tmp_path),
                                "--data", str(folder), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------- Ray Train, 2 workers

def ray_with_seeded_hub(tmp_path_factory, num_cpus: int = 2, include_dashboard: bool = False):
    """A module's Ray instance whose workers inherit a TORCH_HOME pre-seeded with (random) "ImageNet"
    weights; yields (the torch home, Ray's context)."""
    import ray

    torch_home = tmp_path_factory.mktemp("torch")
    seed_hub_cache(torch_home)
    previous = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(torch_home)
    context = ray.init(num_cpus=num_cpus, include_dashboard=include_dashboard, object_store_memory=256 * 1024**2)
    yield torch_home, context
    ray.shutdown()
    if previous is None:
        os.environ.pop("TORCH_HOME", None)
    else:
        os.environ["TORCH_HOME"] = previous


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """One Ray instance for the module, with the seeded hub cache."""
    for torch_home, _ in ray_with_seeded_hub(tmp_path_factory):
        yield torch_home


@pytest.mark.slow
def test_two_worker_finetune_learns_and_serves(local_ray, tmp_path):
    # a generated ImageFolder of 2 shapes in non-square images; ImageNet weights from the hub cache
    folder = make_folder(tmp_path / "data", n_train=192, n_test=64, size=40, num_classes=2, seed=5,
                         tint=True)
    cfg = Config(data=str(folder), data_root=str(tmp_path / "cache"), image_size=32, batch_size=32, epochs=2,
                 storage_path=str(tmp_path), name="target")
    finetune.validate(cfg)
    summary = driver.fit("jobs.finetune", cfg)

    result = json.loads((tmp_path / "target" / "result.json").read_text())
    assert result["epochs"] == 2 and result["config"]["head_lr_mult"] == 10.0
    assert result["meta"]["arch"] == "resnet18" and result["meta"]["image_size"] == [32, 32]
    assert (tmp_path / "target" / "curves.png").exists()
    assert summary["test_acc"] > 0.9, summary["history"]  # 2 balanced classes: chance is 0.5

    # the artifact predicts as the trained model: Serve's PIL path vs the training eval path
    model, classes, preset, manifest = load_artifact(tmp_path / "target" / "model")
    assert classes == ["hbar", "square"] and preset == Preset.imagenet(32)
    assert manifest["metrics"]["test_acc"] == summary["test_acc"]
    state = torch.load(Path(summary["checkpoint"]) / loop.CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    trained = build_model("resnet18", 2)
    trained.load_state_dict(state["model"])
    trained.eval()
    data = load_image_data(str(folder), tmp_path / "cache", preset.resize, fit="center")
    files = sorted((folder / "test").rglob("*.png"), key=lambda p: (classes.index(p.parent.name), p.name))
    served = torch.stack([preset.eval_transform()(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        served_pred = model(served).argmax(1)
        trained_pred = trained(preset.eval_batch(data.test_x)).argmax(1)
    assert torch.equal(served_pred, trained_pred)
    assert (served_pred == data.test_y).float().mean().item() == pytest.approx(summary["test_acc"])
