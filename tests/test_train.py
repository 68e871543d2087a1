"""Ray Train end to end on CPU (gloo DDP): learning, fault tolerance, resume, resource checks."""
import json
import os

import pytest
import ray

from jobs import engine
from jobs.augment import Config
from jobs.cli import UserError

TINY = dict(data="synthetic:1024", image_size=16, batch_size=64, lr=2e-3, num_workers=2)


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    marker = tmp_path_factory.mktemp("fault") / "failed-once"
    # the workers inherit this: the last rank of run "fault" dies once, in epoch 1 (0-based)
    os.environ["RAYCV_FAIL_ONCE"] = f"fault:1:{marker}"
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2)
    yield marker
    ray.shutdown()
    os.environ.pop("RAYCV_FAIL_ONCE", None)


def test_two_worker_ddp_learns_and_writes_outputs(local_ray, tmp_path):
    cfg = Config(**TINY, epochs=3, storage_path=str(tmp_path), name="learn")
    summary = engine.fit("jobs.augment", cfg)
    out = tmp_path / "learn"
    result = json.loads((out / "result.json").read_text())
    for key in ("train_loss", "train_acc", "test_acc", "examples_per_sec", "epochs", "config"):
        assert key in result
    assert result["epochs"] == 3 and result["config"]["num_workers"] == 2
    assert (out / "curves.png").stat().st_size > 1000
    # 4 balanced classes: chance is 0.25
    assert summary["test_acc"] > 0.6, summary["history"]
    # the servable artifact predicts as the trained model, through the serving preprocessing
    import torch
    from PIL import Image
    from jobs.artifact import load_artifact
    from jobs.data import load_image_data
    model, classes, preset, manifest = load_artifact(out / "model")
    assert classes == ["square", "hbar", "vbar", "cross"] and manifest["metrics"]["test_acc"] == summary["test_acc"]
    data = load_image_data("synthetic:1024", tmp_path, image_size=16)
    pil = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in data.test_x[:64]]
    served = torch.stack([preset.eval_transform()(im) for im in pil])
    torch.testing.assert_close(served, data.test_x[:64].float() / 255)
    with torch.no_grad():
        acc = (model(served).argmax(1) == data.test_y[:64]).float().mean().item()
    assert acc > 0.5
    # the metric is over the whole test set (256 images), not one rank's half
    assert summary["history"][-1]["test_acc"] * 256 == pytest.approx(round(summary["test_acc"] * 256))


def test_worker_failure_resumes_from_checkpoint(local_ray, tmp_path):
    cfg = Config(**TINY, epochs=3, storage_path=str(tmp_path), name="fault")
    summary = engine.fit("jobs.augment", cfg)
    assert local_ray.exists(), "the injected failure did not happen"
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]


def _write_image_folder(root, n_train=256, n_test=64, size=16):
    """A synthetic ImageFolder tree of PNGs: root/{train,test}/<class>/<i>.png."""
    from PIL import Image
    from jobs.data import make_synthetic
    d = make_synthetic(n_train, n_test, size=size)
    for split, xs, ys in (("train", d.train_x, d.train_y), ("test", d.test_x, d.test_y)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            folder = root / split / d.classes[int(y)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")


def test_rerun_with_same_name_resumes_with_relative_paths(local_ray, tmp_path, monkeypatch):
    # relative --data / --data-root / --storage-path, as a user types them: the workers do not
    # run in the driver's directory, so the engine must hand them absolute paths
    monkeypatch.chdir(tmp_path)
    _write_image_folder(tmp_path / "set")
    tiny = {**TINY, "data": "set", "data_root": "cache", "storage_path": "runs", "name": "resume"}
    first = engine.fit("jobs.augment", Config(**tiny, epochs=1))
    second = engine.fit("jobs.augment", Config(**tiny, epochs=2))
    assert len(second["history"]) == 2
    assert second["history"][0] == first["history"][0]  # epoch 1 was not run again
    assert (tmp_path / "runs" / "resume" / "result.json").exists()
    assert list((tmp_path / "cache" / "cache").glob("set-*.pt"))  # the decode cache landed in --data-root


def test_more_workers_than_cpus_fails_fast(local_ray, tmp_path):
    with pytest.raises(UserError, match="need 8 CPUs"):
        engine.fit("jobs.augment", Config(**{**TINY, "num_workers": 8}, epochs=1, storage_path=str(tmp_path)))
    with pytest.raises(UserError, match="GPUs"):
        engine.check_resources(1, 1, use_gpu=True)
