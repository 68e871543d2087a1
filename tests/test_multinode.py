"""A real two-node Ray cluster (`ray start --head` + `ray start --address`), the augmentation job
submitted to it with `python -m jobs.submit`, one DDP worker on each node.

On one machine every node sees the same filesystem, so any local storage path works; on a real
cluster --storage-path must be shared storage (NFS/EFS) or s3:// (README, "Running on a cluster").
"""
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from local_cluster import VENV_BIN, LocalCluster
from PIL import Image

from jobs.artifact import load_artifact
from jobs.data import load_image_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    # auth mode set the same everywhere: both nodes, the job drivers, the submitting client
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
           # as cluster.yaml does on the head: jobs wait for worker nodes instead of failing at once
           # (generous: on a loaded 2-core machine a new raylet can take minutes to register)
           "RAYCV_RESOURCE_WAIT_S": "300"}
    env.pop("RAY_ADDRESS", None)
    c = LocalCluster(env=env)
    try:
        c.start_head(num_cpus=1)
        yield c
    finally:
        c.stop()
        assert not c.processes()
        shutil.rmtree(c.root, ignore_errors=True)


def read_until(proc, text: str, timeout: float) -> str:
    """Read proc's stdout until a line contains text (or it exits, or the timeout); return what was read."""
    out, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            out.append(line)
            if text in line:
                break
        elif proc.poll() is not None:
            break
    return "".join(out)


@pytest.mark.slow
def test_augment_job_runs_on_two_nodes(cluster, tmp_path):
    # storage both nodes see, given as a URI: the same code path as s3:// (Ray Train writes the
    # checkpoints there from whichever node holds rank 0; the driver uploads result.json and model/)
    storage = tmp_path / "results"
    cmd = [sys.executable, "-m", "jobs.submit", "--address", cluster.dashboard_url,
           # Ray Train's placement-group cleaner finds its cluster by address; without it, it gives up
           # (noisily) when other Ray instances run on this machine
           "--env", f"RAY_ADDRESS={cluster.address}",
           "jobs.augment", "--data", "synthetic:512", "--image-size", "16", "--epochs", "1", "--batch-size", "64",
           "--num-workers", "2", "--placement-strategy", "SPREAD", "--data-root", str(tmp_path / "data"),
           "--storage-path", f"file://{storage}", "--name", "multinode"]
    submit = subprocess.Popen(cmd, cwd=ROOT, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # the head has 1 CPU, the job needs 2: it asks the autoscaler and waits; a second node joins.
        # The driver's ray.init has been seen to take minutes on a loaded CI machine: wait long for
        # the message, then add the node either way (the wait path's own message is checked by
        # test_submit_reports_a_failed_job; this test is about the run across two nodes)
        log = read_until(submit, "waiting up to", timeout=300)
        assert submit.poll() is None, log + "\n--- the head:\n" + cluster.node_logs("head")
        cluster.add_node(num_cpus=1)
        rest, _ = submit.communicate(timeout=480)  # ~1 min on an idle 2-core machine
    finally:
        if submit.poll() is None:
            submit.kill()
    log += rest
    assert submit.returncode == 0, (log + "\n--- the head:\n" + cluster.node_logs("head")
                                    + "\n--- the added node:\n" + cluster.node_logs("node1"))
    assert "SUCCEEDED" in log and "epoch 1/1" in log

    result = json.loads((storage / "multinode" / "result.json").read_text())
    assert result["epochs"] == 1 and result["config"]["num_workers"] == 2
    assert result["config"]["placement_strategy"] == "SPREAD"
    assert result["train_loss"] > 0

    # the accuracy the two ranks reduced over their test shards is the saved model's accuracy over the
    # whole test set, evaluated here in one process as the service would (fp32: CPU training's default)
    model, classes, preset, _ = load_artifact(storage / "multinode" / "model")
    data = load_image_data("synthetic:512", tmp_path / "data", image_size=16)
    assert classes == data.classes
    to_input = preset.eval_transform()
    with torch.no_grad():
        x = torch.stack([to_input(Image.fromarray(img.permute(1, 2, 0).numpy())) for img in data.test_x])
        correct = (model(x).argmax(1) == data.test_y).sum().item()
    assert result["test_acc"] == pytest.approx(correct / len(data.test_y))

    # the two DDP workers ran on different nodes (the state API keeps finished actors)
    from ray.util.state import list_actors
    workers = list_actors(address=cluster.dashboard_url, filters=[("class_name", "=", "RayTrainWorker")],
                          detail=True, raise_on_missing_output=False)
    assert len(workers) == 2 and len({w.node_id for w in workers}) == 2, workers


@pytest.mark.slow
def test_stream_mode_job_runs_on_two_nodes(cluster, tmp_path):
    """Stream mode across the two nodes (the one test_augment_job_runs_on_two_nodes added): the data on
    a path both nodes see, the workers SPREAD, Ray Data decoding on the nodes' CPUs. Every CPU is held
    by a worker, so the decode tasks reserve none (--decode-cpus 0)."""
    from test_stream import make_folder

    if len(cluster.pgids) < 2:
        pytest.skip("needs the second node that test_augment_job_runs_on_two_nodes adds")
    folder = make_folder(tmp_path / "set", n_train=64, n_test=20, size=16)
    storage = tmp_path / "results"
    cmd = [sys.executable, "-m", "jobs.submit", "--address", cluster.dashboard_url, "--env", f"RAY_ADDRESS={cluster.address}",
           "jobs.augment", "--data", str(folder), "--data-mode", "stream", "--decode-cpus", "0", "--epochs", "1",
           "--batch-size", "16", "--num-workers", "2", "--placement-strategy", "SPREAD",
           "--storage-path", str(storage), "--name", "streamed"]
    r = subprocess.run(cmd, cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    result = json.loads((storage / "streamed" / "result.json").read_text())
    assert result["config"]["data_mode"] == "stream" and result["config"]["placement_strategy"] == "SPREAD"
    # one epoch: streaming epoch after epoch is test_stream's (here: the pipeline across the two nodes)
    assert [h["train_examples"] for h in result["history"]] == [64]
    assert [h["test_examples"] for h in result["history"]] == [20]


@pytest.mark.slow
def test_submit_reports_a_failed_job(cluster, tmp_path):
    """A job that fails on the cluster (here: more workers than the cluster grows to within the
    job's wait for the autoscaler): the client streams its one-line error and exits 1."""
    r = subprocess.run([sys.executable, "-m", "jobs.submit", "--address", cluster.dashboard_url,
                        "--env", "RAYCV_RESOURCE_WAIT_S=3", "jobs.augment", "--data", "synthetic:64",
                        "--num-workers", "4", "--data-root", str(tmp_path), "--storage-path", str(tmp_path)],
                       cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "error: after waiting 3 s: 4 workers x 1 CPU need 4 CPUs" in r.stdout, r.stdout
    assert "FAILED" in r.stderr and "Traceback" not in r.stdout


def test_rayignore_keeps_data_results_and_venvs_out_of_the_upload(tmp_path):
    """The working_dir package a submission uploads, built by Ray's own packager from .rayignore alone."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / ".rayignore", project / ".rayignore")
    files = ["jobs/augment.py", "jobs/data.py", "tests/test_x.py", "README.md", "data/cache/cifar10.pt",
             "results/run/checkpoint_0/checkpoint.pt", ".venv/lib/torch.py", ".git/HEAD", "jobs/__pycache__/a.pyc"]
    for name in files:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("x")
    create_package(str(project), tmp_path / "upload.zip", include_gitignore=True)
    uploaded = set(zipfile.ZipFile(tmp_path / "upload.zip").namelist()) - {".rayignore"}
    assert uploaded == {"jobs/augment.py", "jobs/data.py", "tests/test_x.py", "README.md"}


def test_storage_uri_errors_are_one_line(tmp_path):
    from jobs import driver
    from jobs.augment import Config
    from jobs.cli import UserError

    assert driver.check_storage(Config(storage_path=f"file://{tmp_path}", name="r")) == f"file://{tmp_path}/r"
    assert (tmp_path / "r").is_dir()
    with pytest.raises(UserError, match="not writable: Unrecognized filesystem type"):
        driver.check_storage(Config(storage_path="nosuch://bucket/runs"))


def test_submit_usage_errors_are_one_line(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    for args, message in [(["--address", "http://127.0.0.1:9", "augment"], "cannot connect to the Ray job API"),
                          (["--address", "127.0.0.1:6379", "augment"], "not the job API"),
                          (["nosuch"], "unknown job"),
                          (["--env", "NOEQUALS", "augment"], "--env expects KEY=VALUE")]:
        r = subprocess.run([sys.executable, "-m", "jobs.submit", *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = subprocess.run([sys.executable, "-m", "jobs.submit", "--help"], cwd=ROOT, capture_output=True, text=True)
    for flag in ("--address", "--working-dir", "--env", "--submission-id", "--no-wait", "--timeout", "RAY_ADDRESS"):
        assert flag in r.stdout
