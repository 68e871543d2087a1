"""Ray Tune sweeps end to end on CPU: ASHA learning-rate sweep, resume after a failed trial,
best.json into the job CLI, style-weight sweep with its Pareto front and contact sheet."""
import csv
import json
import os

import pytest
import ray

from faults import kill_when
from jobs import augment
from jobs.cli import UserError
from jobs.config import load_config
from tune import lr
from tune.sweep import pareto_front

# 64 train + 64 test images of 16 px: plumbing, not accuracy
TINY = ["--job", "augment", "--data", "synthetic:64", "--image-size", "16", "--epochs", "2", "--batch-size", "32",
        "--num-workers", "1"]


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2)
    yield {"data_root": str(root / "data")}
    ray.shutdown()


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_asha_sweep_writes_table_best_and_plot(local_ray, tmp_path, capsys):
    rc = lr.main([*TINY, "--data-root", local_ray["data_root"], "--num-samples", "4", "--reduction-factor", "2",
                  "--storage-path", str(tmp_path), "--name", "asha"])
    assert rc == 0
    out = tmp_path / "asha"
    rows = read_rows(out / "results.csv")
    assert len(rows) == 4
    assert {r["status"] for r in rows} <= {"completed", "early-stopped"}
    assert any(r["status"] == "completed" for r in rows)
    for r in rows:  # ASHA stops a trial at its rung (epoch 1: grace 1, factor 2) or lets it finish
        assert int(r["epochs"]) in (1, 2) and (r["status"] == "completed") == (int(r["epochs"]) == 2)
        assert 1e-4 <= float(r["lr"]) <= 1e-2
    accs = [float(r["test_acc"]) for r in rows]
    assert accs == sorted(accs, reverse=True)  # best first
    best = json.loads((out / "best.json").read_text())
    assert best["test_acc"] == pytest.approx(accs[0]) and best["config"]["lr"] == pytest.approx(float(rows[0]["lr"]))
    assert os.path.isdir(best["checkpoint"])
    assert (out / "lr.png").stat().st_size > 5000
    printed = capsys.readouterr().out
    assert "trial_id" in printed and "best: lr=" in printed

    # best.json round-trips into the job CLI: the same config, flags still override it
    args = augment.parse_args(["--config", str(out / "best.json"), "--epochs", "1"])
    cfg = load_config(augment.Config, args, args.config)
    assert cfg.lr == best["config"]["lr"] and cfg.epochs == 1 and cfg.data == "synthetic:64"
    assert cfg.name == "asha-best" and cfg.num_workers == 1
    augment.validate(cfg)

    # the same name again without --resume would mix two sweeps
    with pytest.raises(UserError, match="already exists"):
        lr.main([*TINY, "--storage-path", str(tmp_path), "--name", "asha"])


def progress_epochs(trial_dir):
    with open(trial_dir / "progress.csv") as f:
        return [int(float(r["epoch"])) for r in csv.DictReader(f)]


def kill_trial_after_first_epoch(sweep, trial_suffix):
    """Once trial *_<trial_suffix> of the sweep in `sweep` has reported epoch 1 (a row in its progress.csv,
    written after Tune took that epoch's checkpoint), SIGKILL the trial's process: the pid Tune records
    in every result. The returned dict gets the pid."""
    def find():
        for progress in sweep.glob(f"train_trial_*_{trial_suffix}_*/progress.csv"):
            rows = read_rows(progress)
            if rows and (rows[0].get("pid") or "").isdigit():  # a whole row, not one being written
                return {"pid": int(rows[0]["pid"])}
        return None

    return kill_when(find, poll_s=0.05)


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(local_ray, tmp_path):
    # 512 training images in batches of 32: an epoch of 16 steps, long enough to be killed in
    argv = [*TINY, "--data", "synthetic:512", "--data-root", local_ray["data_root"], "--num-samples", "2",
            "--scheduler", "none", "--max-failures", "0", "--storage-path", str(tmp_path), "--name", "resume"]
    killed = kill_trial_after_first_epoch(tmp_path / "resume", "00001")
    assert lr.main(argv) == 1
    assert killed.get("pid"), f"trial 00001 was not killed: {killed}"
    out = tmp_path / "resume"
    first = {r["trial_id"][-5:]: r for r in read_rows(out / "results.csv")}
    assert first["00001"]["status"] == "error" and first["00001"]["epochs"] == "1"
    assert first["00000"]["status"] == "completed"
    trial_dirs = {p.name.split("_")[3]: p for p in out.glob("train_trial_*")}
    done_before = (trial_dirs["00000"] / "progress.csv").read_text()

    with pytest.raises(UserError, match="no sweep to resume"):
        lr.main(["--storage-path", str(tmp_path), "--name", "nothing-here", "--resume"])
    assert lr.main(["--storage-path", str(tmp_path), "--name", "resume", "--resume"]) == 0
    rows = read_rows(out / "results.csv")
    assert [r["status"] for r in rows] == ["completed"] * 2 and all(r["epochs"] == "2" for r in rows)
    assert (trial_dirs["00000"] / "progress.csv").read_text() == done_before  # the finished trial did not run again
    # the failed trial continued from its epoch-1 checkpoint: every epoch reported exactly once
    assert progress_epochs(trial_dirs["00001"]) == [1, 2]


@pytest.mark.slow
def test_sweep_rejects_bad_input(local_ray, tmp_path):
    with pytest.raises(UserError, match="one trial needs 3 CPUs"):  # 2 workers + 1 CPU for the trial driver > 2
        lr.main([*TINY[:-1], "2", "--storage-path", str(tmp_path), "--name", "big"])
    with pytest.raises(UserError, match="MIN < MAX"):
        lr.main([*TINY, "--lr-range", "1e-2", "1e-3", "--storage-path", str(tmp_path), "--name", "range"])
    with pytest.raises(UserError, match="finetune job only"):
        lr.main([*TINY, "--wd-range", "1e-5", "1e-3", "--storage-path", str(tmp_path), "--name", "wd"])
    with pytest.raises(SystemExit):  # an unknown job flag: argparse's one-line error
        lr.main([*TINY, "--no-such-flag", "--storage-path", str(tmp_path)])


def test_pareto_front():
    pts = [(1.0, 5.0), (2.0, 2.0), (5.0, 1.0), (3.0, 3.0), (2.0, 2.0), (6.0, 6.0)]
    assert pareto_front(pts) == [True, True, True, False, True, False]


@pytest.mark.slow
def test_style_weight_sweep_writes_sheet_and_front(local_ray, tmp_path, capsys):
    from PIL import Image

    from tune import style_weights

    # a striped style and a blocky content image, 32 x 32: enough for VGG's four pools
    Image.new("RGB", (32, 32), (200, 40, 40)).save(tmp_path / "content.png")
    style = Image.new("RGB", (32, 32), "white")
    for x in range(0, 32, 4):
        style.paste((0, 0, 160), (x, 0, x + 2, 32))
    style.save(tmp_path / "style.png")
    rc = style_weights.main(["--content", str(tmp_path / "content.png"), "--style", str(tmp_path / "style.png"),
                             "--weights", "random", "--size", "32", "32", "--steps", "4",
                             "--style-weight-range", "1e2", "1e4", "--tv-weight-range", "10", "10", "--grid-points", "3",
                             "--storage-path", str(tmp_path), "--name", "sw"])
    assert rc == 0
    out = tmp_path / "sw"
    rows = read_rows(out / "results.csv")
    assert sorted(float(r["style_weight"]) for r in rows) == [100.0, 1000.0, 10000.0]
    assert {float(r["tv_weight"]) for r in rows} == {10.0} and {float(r["content_weight"]) for r in rows} == {1.0}
    points = [(float(r["content_distance"]), float(r["style_distance"])) for r in rows]
    front = [r["pareto"] == "True" for r in rows]
    assert any(front) and front == pareto_front(points)
    # more style weight, closer in style (unweighted, same layers for every trial)
    by_weight = sorted(rows, key=lambda r: float(r["style_weight"]))
    assert float(by_weight[-1]["style_distance"]) < float(by_weight[0]["style_distance"])
    for r in rows:
        assert Image.open(out / r["image"]).size == (32, 32)
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width >= 3 * 180 and sheet.height >= 2 * 180  # 2 inputs + 3 results
    assert (out / "pareto.png").stat().st_size > 5000
    assert "Pareto front" in capsys.readouterr().out


@pytest.mark.slow
def test_two_worker_finetune_sweep_samples_lr_head_multiplier_and_weight_decay(local_ray, tmp_path):
    import torch
    import torchvision
    from PIL import Image

    from jobs import finetune
    from jobs.data import make_synthetic

    d = make_synthetic(n_train=32, n_test=16, size=16, num_classes=2)
    for split, xs, ys in (("train", d.train_x, d.train_y), ("test", d.test_x, d.test_y)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            (tmp_path / "folder" / split / d.classes[y]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(x.permute(1, 2, 0).numpy()).save(tmp_path / "folder" / split / d.classes[y] / f"{i}.png")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pt")  # stands in for ImageNet
    rc = lr.main(["--job", "finetune", "--data", str(tmp_path / "folder"), "--weights", str(tmp_path / "resnet18.pt"),
                  "--image-size", "16", "--epochs", "1", "--batch-size", "16", "--data-root", str(tmp_path / "cache"),
                  # two DDP workers: the trial drives a TorchTrainer (its driver takes no CPU of its own here)
                  "--num-workers", "2", "--driver-cpus", "0", "--num-samples", "1", "--wd-range", "1e-4", "1e-3",
                  "--storage-path", str(tmp_path), "--name", "ft"])
    assert rc == 0
    rows = read_rows(tmp_path / "ft" / "results.csv")
    assert len(rows) == 1 and rows[0]["status"] == "completed" and rows[0]["epochs"] == "1"
    for r in rows:
        assert 1e-5 <= float(r["lr"]) <= 1e-1 and 1 <= float(r["head_lr_mult"]) <= 100
        assert 1e-4 <= float(r["weight_decay"]) <= 1e-3
    args = finetune.parse_args(["--config", str(tmp_path / "ft" / "best.json")])
    cfg = load_config(finetune.Config, args, args.config)
    assert cfg.weight_decay == pytest.approx(float(rows[0]["weight_decay"])) and cfg.num_workers == 2
    best = json.loads((tmp_path / "ft" / "best.json").read_text())
    assert best["checkpoint"].startswith(str(tmp_path / "ft" / "trials" / best["trial_id"]))  # the trial's Train run
    assert cfg.weights == str(tmp_path / "resnet18.pt")  # made absolute: trials run in their own directories


def test_trial_status_from_tune_results():
    """completed / early-stopped (ASHA) / unfinished (Ctrl-C: no "done" flag) / error, best first."""
    from types import SimpleNamespace

    import pandas as pd

    def result(trial_id, lr_value, accs, done=True, error=None):
        history = pd.DataFrame({"epoch": range(1, len(accs) + 1), "test_acc": accs, "train_loss": [1.0] * len(accs)})
        return SimpleNamespace(config={"base": {"epochs": 3}, "lr": lr_value}, error=error, path=f"/x/{trial_id}",
                               metrics={"trial_id": trial_id, "done": done}, metrics_dataframe=history)

    rows = lr.trial_rows([result("a", 1e-3, [0.5, 0.6, 0.7]), result("b", 1e-2, [0.3]),
                          result("c", 1e-4, [0.4, 0.5], done=False), result("d", 3e-3, [0.2], error=RuntimeError())],
                         ["lr"])
    assert [(r["trial_id"], r["status"], r["epochs"]) for r in rows] == [
        ("a", "completed", 3), ("c", "unfinished", 2), ("b", "early-stopped", 1), ("d", "error", 1)]


def test_default_workers_fit_the_cluster_and_the_flag_keeps_its_meaning(tmp_path):
    """Laptop defaults: 2 default workers + a driver do not fit 2 CPUs, so trials run as 1 worker (and say
    so); the same with --num-workers 2 given, or a config file that sets it, is left as asked."""
    args, _, base = lr.parse_args(["--job", "augment", "--data", "synthetic"])
    assert base.num_workers == 2 and not args.workers_given
    line = lr.fit_workers_to_cluster(base, 1.0, {"CPU": 2.0}, args.workers_given)
    assert base.num_workers == 1 and "running each trial as 1 worker" in line and "--num-workers" in line
    _, _, roomy = lr.parse_args(["--job", "augment", "--data", "synthetic"])
    assert lr.fit_workers_to_cluster(roomy, 1.0, {"CPU": 3.0}, False) is None and roomy.num_workers == 2
    args, _, base = lr.parse_args(["--job", "augment", "--data", "synthetic", "--num-workers", "2"])
    assert args.workers_given and lr.fit_workers_to_cluster(base, 1.0, {"CPU": 2.0}, True) is None
    assert base.num_workers == 2
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"config": {"num_workers": 2}}))
    args, _, base = lr.parse_args(["--job", "augment", "--data", "synthetic", "--config", str(config)])
    assert args.workers_given


def test_default_lr_range_is_a_decade_either_side_of_the_recipes_lr(capsys):
    """The augment sweep's lr range follows the recipe (Adam 1e-3 for the reference, SGD 0.75 for the
    fast one at batch 512: a range made for Adam would search only uselessly small SGD rates);
    --lr-range and --lr-grid still choose; finetune keeps its fixed ranges."""
    def space(argv):
        args, job, base = lr.parse_args(argv)
        got = lr.search_space(args, args.job, base)
        return {k: (v.lower, v.upper) for k, v in got.items() if hasattr(v, "lower")}, got

    ref, _ = space(["--job", "augment"])
    assert ref["lr"] == pytest.approx((1e-4, 1e-2))
    fast, _ = space(["--job", "augment", "--recipe", "fast", "--batch-size", "512", "--precision", "fp32"])
    assert fast["lr"] == pytest.approx((0.075, 7.5))
    assert "lr range: 0.075 to 7.5, a decade either side of the job's lr 0.75" in capsys.readouterr().out
    given, _ = space(["--job", "augment", "--recipe", "fast", "--lr-range", "0.2", "2"])
    assert given["lr"] == (0.2, 2.0) and "lr range" not in capsys.readouterr().out
    _, grid = space(["--job", "augment", "--recipe", "fast", "--lr-grid", "0.5,1"])
    assert grid["lr"] == {"grid_search": [0.5, 1.0]}
    tuned, _ = space(["--job", "finetune"])
    assert tuned == {"lr": (1e-5, 1e-1), "head_lr_mult": (1.0, 100.0), "weight_decay": (1e-5, 1e-2)}
