"""Stream mode (jobs.stream, jobs.sources): the same files, labels and pixels as resident mode from a
directory, a .zip and a file:// URI; the mode choice; bad files; and real 2-worker Ray Train runs
that stream (equal steps per rank, every test image evaluated once, resume after a killed worker)."""
import itertools
import json
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jobs import augment, driver, fast_style, finetune, loop
from jobs.cli import UserError
from jobs.data import load_image_data, make_synthetic
from jobs.presets import Preset
from jobs.sources import FileIndex, FileSource, index_content, index_image_folder
from jobs.stream import Pass, StreamShards, choose_mode, decode_rows


def make_folder(root: Path, n_train: int = 60, n_test: int = 21, size: int = 24, num_classes: int = 3,
                seed: int = 3, tint: bool = True) -> Path:
    """A generated ImageFolder tree of PNGs (train/, test/), non-square so that the centre crop matters."""
    d = make_synthetic(n_train=n_train, n_test=n_test, size=size, num_classes=num_classes, seed=seed)
    for split, xs, ys in (("train", d.train_x, d.train_y), ("test", d.test_x, d.test_y)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            if tint:  # a class colour cast: a cue a few steps learn
                x = x.clone()
                x[int(y) % 3] = x[int(y) % 3].clamp(max=190) + 64
            folder = root / split / d.classes[y]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x.permute(1, 2, 0).numpy()).resize((size + 5, size)).save(folder / f"{i:04d}.png")
    return root


def zip_folder(folder: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, f"wrapped/{p.relative_to(folder)}")  # one wrapping folder, as archives often have
    return dest


def by_content(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, H, W) and labels sorted by a content key: an order-free comparison."""
    key = x.reshape(len(x), -1).double() @ torch.linspace(1, 2, x[0].numel(), dtype=torch.double)
    order = key.argsort()
    return x[order], y[order]


# ----------------------------------------------------------------------------- sources and the index (no Ray)

def test_directory_zip_and_uri_index_the_same_files_as_resident_mode(tmp_path):
    folder = make_folder(tmp_path / "set")
    sources = [FileSource(folder), FileSource(zip_folder(folder, tmp_path / "set.zip")), FileSource(folder.as_uri())]
    assert [s.kind for s in sources] == ["dir", "zip", "uri"]
    indexes = [index_image_folder(s) for s in sources]
    resident = load_image_data(str(folder), tmp_path / "cache", 24, fit="center")
    for s, index in zip(sources, indexes):
        assert index.classes == resident.classes == ["hbar", "square", "vbar"]
        assert torch.equal(index.train_labels, resident.train_y) and torch.equal(index.test_labels, resident.test_y)
        assert [n.split("/")[-1] for n in index.test] == [n.split("/")[-1] for n in indexes[0].test]
        assert s.read(index.train[0]) == (folder / indexes[0].train[0]).read_bytes()
    # a URI set can be held resident too (and is cached like a directory)
    from_uri = load_image_data(folder.as_uri(), tmp_path / "cache", 24, fit="center")
    assert torch.equal(from_uri.test_x, resident.test_x)
    # the same random draw for --limit-train / --limit-test as ImageData.subset
    small, idx = indexes[0].subset(10, 5, seed=0), resident.subset(10, 5, seed=0)
    assert torch.equal(small.train_labels, idx.train_y) and len(small.test) == 5


def test_flat_content_images_hold_out_the_same_validation_set(tmp_path):
    for i in range(30):
        Image.new("RGB", (20, 16), (i * 8, 0, 0)).save(tmp_path / f"{i:03d}.jpg")
    index = index_content(FileSource(tmp_path), limit_train=10)
    assert index.layout == "flat" and index.classes == ["image"]
    assert index.test == [f"{i:03d}.jpg" for i in range(22, 30)] and index.train == [f"{i:03d}.jpg" for i in range(10)]


def test_missing_and_wrong_sources_fail_in_one_line(tmp_path):
    with pytest.raises(UserError, match="dataset not found"):
        FileSource(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="neither a directory nor a .zip"):
        FileSource(tmp_path / "file.txt")
    with pytest.raises(UserError, match="no directory at that URI"):
        FileSource((tmp_path / "nope").as_uri())


def test_auto_mode_streams_what_does_not_fit_the_resident_budget(tmp_path):
    cfg = finetune.Config(data="x", resident_max_gb=0.002)
    assert choose_mode(cfg, 100, (64, 64))[0] == "resident"  # 1.2 MB
    mode, reason = choose_mode(cfg, 1000, (64, 64))  # 12 MB
    assert mode == "stream" and "over the resident budget" in reason and "0.01 GB" in reason
    assert choose_mode(finetune.Config(data="x", data_mode="stream"), 1, (8, 8))[0] == "stream"
    assert choose_mode(finetune.Config(data="cifar10"), 0, None, streamable=False)[0] == "resident"
    with pytest.raises(UserError, match="stream reads image files"):
        choose_mode(augment.Config(data="synthetic", data_mode="stream"), 0, None, streamable=False)
    # validate resolves auto on the driver and keeps the reason in the config (so in result.json)
    folder = make_folder(tmp_path / "set", n_train=20, n_test=4)
    cfg = finetune.Config(data=str(folder), weights="none", mode="scratch", image_size=16, resident_max_gb=1e-6,
                          data_root=str(tmp_path / "cache"))
    finetune.validate(cfg)
    assert cfg.data_mode == "stream" and cfg.data_mode_reason.startswith("auto:")
    assert not (tmp_path / "cache").exists()  # nothing decoded on the driver
    cfg = finetune.Config(data=str(folder), weights="none", mode="scratch", image_size=16,
                          data_root=str(tmp_path / "cache"))
    finetune.validate(cfg)
    assert cfg.data_mode == "resident" and "within the resident budget" in cfg.data_mode_reason


def test_a_bad_file_is_filled_in_training_and_flagged_in_evaluation(tmp_path):
    folder = make_folder(tmp_path / "set", n_train=6, n_test=3)
    name = index_image_folder(FileSource(folder)).train[1]
    (folder / name).write_bytes(b"not an image")
    index = index_image_folder(FileSource(folder))
    batch = {"name": np.array(index.train[:4]), "label": np.array([5, 6, 7, 8]), "i": np.arange(4)}
    filled = decode_rows(batch, str(folder), 24, "center", (24, 24), fill=True)
    assert filled["bad"].tolist() == [0, 1, 0, 0]
    assert np.array_equal(filled["image"][1], filled["image"][0]) and filled["label"][1] == 5 and filled["i"][1] == 0
    kept = decode_rows(batch, str(folder), 24, "center", (24, 24), fill=False)
    assert kept["bad"].tolist() == [0, 1, 0, 0] and not kept["image"][1].any() and kept["label"][1] == 6
    # without a resize, an image of another size is a bad file too
    odd = decode_rows(batch, str(folder), None, "stretch", (24, 29), fill=False)
    assert odd["bad"].tolist() == [0, 1, 0, 0]
    assert decode_rows(batch, str(folder), None, "stretch", (20, 20), fill=False)["bad"].tolist() == [1, 1, 1, 1]


def test_a_pass_runs_ahead_and_the_next_one_starts_when_it_is_drained(monkeypatch):
    """The loop's passes in order (train 0, test 0, train 1, ...): each starts before the loop asks
    for it, once the one before has produced its last batch; a guess that missed is replaced."""
    started = []

    def fake_pipeline(self, names, labels, idx, fill):
        started.append(("train" if fill else "test", len(idx)))
        for i in idx:
            yield {"image": torch.zeros(1, 2, 2, 3, dtype=torch.uint8), "label": torch.tensor([0]),
                   "bad": torch.tensor([0]), "i": torch.tensor([i])}

    monkeypatch.setattr(StreamShards, "_pipeline", fake_pipeline)
    index = FileIndex("unused", [f"{i}.png" for i in range(6)], torch.zeros(6, dtype=torch.long),
                      ["t.png"] * 2, torch.zeros(2, dtype=torch.long), ["a"])
    shards = StreamShards(index, 0, 1, 1, torch.device("cpu"), 0, 2, "center", epochs=2, eval_every=1)
    assert (shards.next_pass(("train", 0)), shards.next_pass(("test", 0)), shards.next_pass(("train", 1)),
            shards.next_pass(("test", 1))) == (("test", 0), ("train", 1), ("test", 1), None)
    assert len(list(shards.train_batches(0))) == 6
    deadline = time.monotonic() + 10
    while started != [("train", 6), ("test", 2)] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert started == [("train", 6), ("test", 2)]  # the evaluation started before it was asked for
    assert shards._ahead.key == ("test", 0)
    assert len(list(shards.test_batches())) == 2
    assert sorted(int(b) for _, b in zip(range(3), (y for _, y in shards.train_batches(1)))) == [0, 0, 0]
    # the loop stopped epoch 2 early and asks for the evaluation: the run-ahead guess (none here) or a new pass
    assert len(list(shards.test_batches())) == 2
    shards.close()
    # without --eval-every 1 (fast recipe: eval_every 0) and with a time budget (epochs unknown)
    budgeted = StreamShards(index, 0, 1, 1, torch.device("cpu"), 0, 2, "center", epochs=None, eval_every=0)
    assert budgeted.next_pass(("train", 5)) == ("train", 6) and budgeted.next_pass(("test", 5)) == ("train", 6)


def test_a_pass_hands_its_error_to_the_loop_and_stops_when_closed():
    def failing():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(Pass("k", failing, depth=1))
    produced = []

    def endless():
        for i in itertools.count():
            produced.append(i)
            yield i

    p = Pass("k", endless, depth=2)
    it = iter(p)
    assert next(it) == 0
    it.close()  # the loop left early
    time.sleep(0.5)
    n = len(produced)
    time.sleep(0.3)
    assert len(produced) == n <= 5  # the producer stopped (bounded by the queue, not running on)


# ----------------------------------------------------------------------------- with Ray

@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """One Ray instance with 4 logical CPUs (2 one-CPU workers and room for decode tasks, on 2 cores), the
    dashboard (the fault test finds Train workers through its state API) and the seeded hub cache."""
    from test_finetune import ray_with_seeded_hub

    for _, context in ray_with_seeded_hub(tmp_path_factory, num_cpus=4, include_dashboard=True):
        yield f"http://{context.dashboard_url}"


@pytest.mark.slow
def test_streamed_test_set_is_resident_mode_and_serving_image_for_image(local_ray, tmp_path):
    folder = make_folder(tmp_path / "set", n_train=30, n_test=23)
    preset = Preset.imagenet(20)  # resize 23 (odd), crop 20
    resident = load_image_data(str(folder), tmp_path / "cache", preset.resize, fit="center")
    served = torch.stack([preset.eval_transform()(Image.open(folder / n).convert("RGB"))
                          for n in index_image_folder(FileSource(folder)).test])
    for location in (str(zip_folder(folder, tmp_path / "set.zip")), folder.as_uri()):
        index = index_image_folder(FileSource(location))
        xs, ys = [], []
        for rank in range(2):  # the two ranks' shards together: every test image exactly once
            shards = StreamShards(index, rank, 2, 4, torch.device("cpu"), seed=0, image_size=preset.resize, fit="center")
            got = list(shards.test_batches())
            xs += [x for x, _ in got]
            ys += [y for _, y in got]
            assert sum(len(y) for y in ys[-len(got):]) == len(range(rank, 23, 2))
        x, y = by_content(torch.cat(xs), torch.cat(ys))
        rx, ry = by_content(resident.test_x, resident.test_y)
        assert torch.equal(x, rx) and torch.equal(y, ry)
        # serving parity: the resident pixels (equal to the streamed ones) are the serving transform's
        torch.testing.assert_close(preset.eval_batch(resident.test_x), served, rtol=0, atol=1e-6)
        # training: each rank n // world images an epoch, a new order every epoch, the same steps on every rank
        shards = StreamShards(index, 1, 2, 4, torch.device("cpu"), seed=0, image_size=preset.resize, fit="center")
        epochs = [[b for b in shards.train_batches(e)] for e in range(2)]
        assert [len(e) for e in epochs] == [shards.steps_per_epoch] * 2 == [4, 4]
        assert [sum(len(y) for _, y in e) for e in epochs] == [15, 15]


@pytest.mark.slow
def test_two_worker_finetune_streams_with_a_bad_file(local_ray, tmp_path):
    folder = make_folder(tmp_path / "set", n_train=61, n_test=23)
    (folder / "train" / "square" / "zz-bad.png").write_bytes(b"not an image")  # 62 train files
    cfg = finetune.Config(data=str(folder), data_root=str(tmp_path / "cache"), image_size=16, batch_size=16,
                          epochs=2, storage_path=str(tmp_path), name="s", data_mode="stream")
    finetune.validate(cfg)
    summary = driver.fit("jobs.finetune", cfg)
    result = json.loads((tmp_path / "s" / "result.json").read_text())
    assert result["config"]["data_mode"] == "stream" and result["config"]["data_mode_reason"].startswith(
        "--data-mode stream (85 images decoded at 20x20")
    for epoch in result["history"]:
        # 62 // 2 = 31 images per rank (the bad one replaced by another image): 4 steps of 8; all 23 tested once
        assert epoch["train_examples"] == 62 and epoch["test_examples"] == 23
        assert epoch["bad_train_files"] == 1 and epoch["bad_test_files"] == 0
    assert result["history"][-1]["steps"] == 2 * 4 and result["meta"]["classes"] == ["hbar", "square", "vbar"]

    # the trained weights score the same on the resident test set, image for image
    state = torch.load(Path(summary["checkpoint"]) / loop.CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    source = finetune.load_source("imagenet", 16)
    model, _ = finetune.build_classifier(finetune.Config(), source, 3)
    model.load_state_dict(state["model"])
    model.eval()
    (folder / "train" / "square" / "zz-bad.png").unlink()
    data = load_image_data(str(folder), tmp_path / "cache", source.preset.resize, fit="center")
    with torch.no_grad():
        acc = (model(source.preset.eval_batch(data.test_x)).argmax(1) == data.test_y).float().mean().item()
    assert acc == pytest.approx(summary["test_acc"])


@pytest.mark.slow
def test_augment_streams_a_zip_and_resumes_after_a_killed_worker(local_ray, tmp_path):
    from test_train import kill_a_train_worker_after_first_checkpoint

    folder = make_folder(tmp_path / "set", n_train=64, n_test=16, size=16)
    data = zip_folder(folder, tmp_path / "set.zip")
    shutil.rmtree(folder)
    cfg = augment.Config(data=str(data), data_root=str(tmp_path / "cache"), batch_size=32, epochs=3, lr=2e-3,
                         aug="altflip,crop", arch="fast_cifar_net_small", storage_path=str(tmp_path), name="z",
                         data_mode="stream")
    augment.validate(cfg)
    killed = kill_a_train_worker_after_first_checkpoint(local_ray, tmp_path / "z")
    summary = driver.fit("jobs.augment", cfg)
    assert killed.get("pid"), f"no Train worker was killed: {killed}"
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    assert summary["history"][0] == killed["history"][0]  # epoch 1 came from the checkpoint
    assert all(h["train_examples"] == 64 and h["test_examples"] == 16 for h in summary["history"])
    assert summary["meta"]["image_size"] == [16, 21]


@pytest.mark.slow
def test_fast_style_streams_content_images_from_a_uri(local_ray, tmp_path):
    content = tmp_path / "content"
    content.mkdir()
    for i in range(24):
        Image.new("RGB", (40, 36), (i * 10, 100, 200 - i * 5)).save(content / f"{i:03d}.jpg")
    Image.new("RGB", (32, 32), (200, 50, 50)).save(tmp_path / "style.png")
    cfg = fast_style.Config(style=str(tmp_path / "style.png"), data=content.as_uri(), weights="random",
                            image_size=32, style_size=32, batch_size=4, epochs=1, num_workers=1,
                            storage_path=str(tmp_path), name="fs", data_mode="stream", registry="")
    fast_style.validate(cfg)
    summary = driver.fit("jobs.fast_style", cfg)
    assert summary["train_examples"] == 16 and summary["test_examples"] == 8  # 24 images, 8 held out
    assert (tmp_path / "fs" / "previews").is_dir()


def test_tune_sizes_trials_with_the_decode_cpus_and_the_driver_checks_them(monkeypatch):
    from tune import lr

    assert lr.decode_cpus(augment.Config(data_mode="stream", decode_cpus=2)) == 2
    assert lr.decode_cpus(augment.Config(data_mode="resident")) == 0
    import ray

    from jobs.stream import check_decode_cpus

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(UserError, match="hold 2 of the cluster's 2 CPUs; pass --decode-cpus 0"):
        check_decode_cpus(finetune.Config(data_mode="stream", num_workers=2))
    check_decode_cpus(finetune.Config(data_mode="stream", num_workers=1))
    check_decode_cpus(finetune.Config(data_mode="stream", num_workers=2, decode_cpus=0))
    check_decode_cpus(finetune.Config(data_mode="resident", num_workers=2))
