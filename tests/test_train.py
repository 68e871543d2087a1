"""The training loop and Ray Train end to end on CPU (gloo DDP): learning, a killed worker, resume,
resource checks."""
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import ray
import ray.train
import torch

from faults import kill_when
from jobs import augment, driver, loop
from jobs.augment import Config
from jobs.cli import UserError

pytestmark = pytest.mark.slow  # the whole module starts Ray

# the reference recipe's loop, optimiser and outputs on a small network: these tests are about DDP,
# faults and resuming, and cifar_resnet18's 11 M parameters cost time in every step and checkpoint
TINY = dict(data="synthetic:1024", image_size=16, batch_size=64, lr=2e-3, num_workers=2, arch="fast_cifar_net_small")


@pytest.fixture(scope="module")
def local_ray():
    # the dashboard serves the state API, through which the fault test finds the Train workers
    context = ray.init(num_cpus=2, include_dashboard=True, object_store_memory=256 * 1024**2)
    yield f"http://{context.dashboard_url}"  # named: other Ray instances may run on this machine
    ray.shutdown()


class FakeSession:
    """What the loop needs of `ray.train` / `ray.tune`, in memory: reports kept, checkpoints copied."""

    Checkpoint = ray.train.Checkpoint

    def __init__(self, root, checkpoint=None):
        self.root, self.checkpoint, self.reports = root, checkpoint, []

    def get_checkpoint(self):
        return self.checkpoint

    def report(self, metrics, checkpoint=None):
        self.reports.append(metrics)
        if checkpoint is not None:  # the loop's directory is temporary: keep a copy, as Ray does
            kept = shutil.copytree(checkpoint.path, self.root / f"checkpoint_{len(self.reports):06d}")
            self.checkpoint = ray.train.Checkpoint.from_directory(kept)


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()  # the loop sets its worker's thread count: this process is the worker
    yield
    torch.set_num_threads(threads)


def test_loop_takes_any_session_resolves_precision_on_the_worker_and_resumes(tmp_path, keep_threads, capsys):
    # the fast recipe (lookahead, warm-up schedule, TTA) in one process, bf16 autocast asked for by name
    cfg = Config(recipe="fast", data="synthetic:128", image_size=16, batch_size=64, num_workers=1, epochs=2,
                 precision="bf16", storage_path=str(tmp_path), name="loop")
    session = FakeSession(tmp_path)
    history = loop.train(cfg, augment, session, rank=0, world=1, device=torch.device("cpu"))
    assert [h["epoch"] for h in history] == [1, 2] and session.reports == history
    assert {h["precision"] for h in history} == {"bf16"}
    assert history[-1]["steps"] == 2 * 2  # 128 images / 64 per batch, 2 epochs
    # rank 0 says what it found and chose; the checkpoint's meta (result.json's "meta") records it
    out = capsys.readouterr().out
    assert "loop: cpu: AVX2 yes" in out or "loop: cpu: AVX2 no" in out
    assert "; precision bf16 (--precision bf16 on cpu); compile none; convolutions default" in out
    meta = torch.load(Path(session.checkpoint.path) / loop.CHECKPOINT_FILE, weights_only=True)["meta"]
    assert meta["precision"] == "bf16" and meta["device"] == "cpu" and meta["compile"] == "none"
    assert meta["convolutions"] == "default"  # only the style jobs convert layers (jobs.fastconv)
    assert {"avx2", "avx512", "avx512_bf16", "amx", "native_bf16", "capability"} <= set(meta["cpu"])
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert 0 <= history[-1][key] < 10, key
    # one more epoch in a new process: it starts from the checkpoint, not from scratch
    longer = dataclasses.replace(cfg, epochs=3)
    again = FakeSession(tmp_path / "again", checkpoint=session.checkpoint)
    (tmp_path / "again").mkdir()
    history = loop.train(longer, augment, again, rank=0, world=1, device=torch.device("cpu"))
    assert [h["epoch"] for h in again.reports] == [3]
    assert history[:2] == session.reports and history[-1]["steps"] == 3 * 2


def kill_a_train_worker_after_first_checkpoint(state_api, run):
    """Once Ray Train has registered the run's first checkpoint (its checkpoint manager then lists it
    in checkpoint_manager_snapshot.json in the run directory), SIGKILL one live Train worker process,
    found through Ray's state API beforehand (a state API call takes about as long as an epoch here).
    The returned dict gets the pid and the history the newest registered checkpoint held just before
    the kill: the one a restarted group resumes from."""
    from ray.util.state import list_actors

    workers = []

    def find():
        if not workers:  # the group's pids, looked up before the checkpoint: the state API takes ~1 s
            workers.extend(list_actors(state_api, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]))
            return None
        try:  # the checkpoints Ray Train has registered (a newer directory may be written, not yet registered)
            snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):  # none yet, or being written
            return None
        checkpoint = run / snapshot["checkpoint_results"][-1]["checkpoint_dir_name"] / loop.CHECKPOINT_FILE
        return {"pid": workers[-1].pid, "history": torch.load(checkpoint, weights_only=True)["history"]}

    return kill_when(find)


def train_worker_count(state_api):
    from ray.util.state import list_actors

    return len(list_actors(state_api, filters=[("class_name", "=", "RayTrainWorker")], limit=10_000))


def test_killed_worker_restarts_the_group_from_the_last_checkpoint(local_ray, tmp_path):
    cfg = Config(**TINY, epochs=4, storage_path=str(tmp_path), name="fault")
    before = train_worker_count(local_ray)
    killed = kill_a_train_worker_after_first_checkpoint(local_ray, tmp_path / "fault")
    summary = driver.fit("jobs.augment", cfg)
    assert killed.get("pid"), f"no Train worker was killed: {killed}"
    done = [h["epoch"] for h in killed["history"]]  # epochs take ~1 s: the kill lands after epoch 1, rarely 2
    assert done == list(range(1, len(done) + 1)) and 1 <= len(done) < cfg.epochs, done
    assert train_worker_count(local_ray) - before == 4  # the first group of 2, then the one that replaced it
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3, 4]
    assert summary["history"][:len(done)] == killed["history"]  # those epochs came from the checkpoint, not trained again


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


def test_two_worker_ddp_learns_writes_outputs_and_a_rerun_resumes(local_ray, tmp_path, monkeypatch):
    # relative --data / --data-root / --storage-path, as a user types them: the workers do not
    # run in the driver's directory, so the driver must hand them absolute paths
    monkeypatch.chdir(tmp_path)
    _write_image_folder(tmp_path / "set", n_train=1024, n_test=256)
    tiny = {**TINY, "data": "set", "data_root": "cache", "storage_path": "runs", "name": "learn"}
    summary = driver.fit("jobs.augment", Config(**tiny, epochs=3))
    out = tmp_path / "runs" / "learn"
    result = json.loads((out / "result.json").read_text())
    for key in ("train_loss", "train_acc", "test_acc", "examples_per_sec", "epochs", "config"):
        assert key in result
    assert result["epochs"] == 3 and result["config"]["num_workers"] == 2
    assert result["precision"] == "fp32"  # "auto" trains in fp32 on a CPU, resolved on the workers
    assert (out / "curves.png").stat().st_size > 1000
    assert list((tmp_path / "cache" / "cache").glob("set-*.pt"))  # the decode cache landed in --data-root
    # 4 balanced classes: chance is 0.25
    assert summary["test_acc"] > 0.6, summary["history"]
    # the servable artifact predicts as the trained model, through the serving preprocessing
    from PIL import Image
    from jobs.artifact import load_artifact
    from jobs.data import load_image_data
    model, classes, preset, manifest = load_artifact(out / "model")
    data = load_image_data("set", "cache", image_size=16)
    assert classes == data.classes == sorted(["square", "hbar", "vbar", "cross"])  # ImageFolder: sorted
    assert manifest["metrics"]["test_acc"] == summary["test_acc"]
    pil = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in data.test_x[:64]]
    served = torch.stack([preset.eval_transform()(im) for im in pil])
    torch.testing.assert_close(served, data.test_x[:64].float() / 255)
    with torch.no_grad():
        acc = (model(served).argmax(1) == data.test_y[:64]).float().mean().item()
    assert acc > 0.5
    # the metric is over the whole test set (256 images), not one rank's half
    assert summary["history"][-1]["test_acc"] * 256 == pytest.approx(round(summary["test_acc"] * 256))

    # the same name with one more epoch resumes: the first three epochs are not run again
    second = driver.fit("jobs.augment", Config(**tiny, epochs=4))
    assert [h["epoch"] for h in second["history"]] == [1, 2, 3, 4]
    assert second["history"][:3] == summary["history"]


def test_more_workers_than_cpus_fails_fast(local_ray, tmp_path):
    with pytest.raises(UserError, match="need 8 CPUs"):
        driver.fit("jobs.augment", Config(**{**TINY, "num_workers": 8}, epochs=1, storage_path=str(tmp_path)))
    with pytest.raises(UserError, match="GPUs"):
        driver.check_resources(1, 1, use_gpu=True)


def _evaluate_after_a_ddp_step(rank: int, world: int, store_path: str, out: str) -> None:
    """One DDP training step on rank-specific data, then `loop.broadcast_buffers`: the BatchNorm
    statistics each rank would evaluate with, saved as out.<rank>."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.zeros(2, 3, 6, 6))  # materialise the lazy layer before DDP
    ddp = DistributedDataParallel(model)
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(100 + rank)) * (rank + 1)
    ddp(x).sum().backward()
    before = model[1].running_var.clone()
    loop.broadcast_buffers(model)
    torch.save({"before": before, "after": model[1].running_var.clone()}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_every_rank_evaluates_rank_zeros_batchnorm_statistics(tmp_path):
    """After a DDP step each rank's BatchNorm statistics come from its own last batch; the loop
    broadcasts rank 0's before evaluating, so the test accuracy is the saved (rank 0's) model's."""
    import torch.multiprocessing as mp

    mp.spawn(_evaluate_after_a_ddp_step, args=(2, str(tmp_path / "store"), str(tmp_path / "bn")), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"bn.{r}", weights_only=True) for r in (0, 1))
    assert not torch.allclose(r0["before"], r1["before"])  # what evaluation saw before
    assert torch.equal(r1["after"], r0["before"]) and torch.equal(r0["after"], r0["before"])
