"""Test-wide settings: no Ray token auth, Ray's worker logs kept out of pytest's output, the `slow` marker.

`slow` marks every test that starts Ray (ray.init, Serve, Train, Tune, the two-node cluster) or
takes more than a few seconds; `pytest -m "not slow"` is the fast unit layer (pyproject.toml).

Why Ray's log lines reached the terminal: a driver started with `log_to_driver=True` (Ray's default)
prints its workers' and actors' output (`(RayTrainWorker pid=...)`, Serve's access logs) from a
background thread, to whatever `sys.stdout`/`sys.stderr` are at that instant. pytest captures per
test phase and restores the real streams between phases, so every line that arrived in one of those
gaps (or at interpreter exit, from a Ray left running by a fixture that failed) went to the
terminal; the rest landed in whichever test happened to be running. So Ray started in this process
does not forward worker output; a failing test shows the tail of the worker logs written while it
ran instead (the section "Ray worker logs"). Subprocesses (job drivers on the test cluster, the CLI
under test) keep Ray's default: their output is read through pipes and files, never printed here.

A test not marked `slow` that starts Ray in this process fails and says so, so that the fast layer
stays fast as tests are added (Ray started in a subprocess is not seen: mark those by hand).
"""
import os
import sys
import time
from pathlib import Path

import pytest

# clients and clusters started here must agree (RAY-2.60.md: a fresh ray.init turns token auth on)
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
# Ray Train's per-run overheads, which every Train/Tune test pays: the controller polls its workers
# every 2 s (so each start, report and finish waits up to 2 s more; 0.5 s here), and each run starts a
# preemption-watcher actor (one more process importing Ray Train on 2 busy cores) for spot-node
# drains that no test machine has. Neither changes what a test checks.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

import ray  # noqa: E402
import ray._private.ray_constants as ray_constants  # noqa: E402

ray_constants.RAY_LOG_TO_DRIVER = False  # the default of ray.init(log_to_driver=...) in this process only

_running = pytest.StashKey[float]()  # when the test began
_current: list[pytest.Item] = []  # the test being run
_ray_init = ray.init


def _init_only_in_slow_tests(*args, **kwargs):
    """ray.init, refused to a test not marked slow: the fast layer stays fast as tests are added."""
    item = _current[-1] if _current else None
    if item is not None and item.get_closest_marker("slow") is None:
        pytest.fail(f"{item.nodeid} starts Ray (ray.init, or Serve/Train/Tune doing it): mark it "
                    f"@pytest.mark.slow", pytrace=False)
    return _ray_init(*args, **kwargs)


ray.init = _init_only_in_slow_tests


@pytest.fixture(autouse=True, scope="module")
def _no_ray_left_running():
    """A module whose Ray fixture failed half-way (or never shut down) must not hand its Ray to the
    next module (`ray.init` twice fails) nor let it print at interpreter exit, after capture ends."""
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item):
    item.stash[_running] = time.time()
    _current.append(item)
    try:
        yield
    finally:
        _current.pop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed:
        logs = _ray_worker_logs(since=item.stash.get(_running, 0.0))
        if logs:
            report.sections.append(("Ray worker logs (written during this test, last lines)", logs))


def _ray_worker_logs(since: float, files: int = 8, lines: int = 40) -> str:
    """The last lines of the Ray workers' stdout/stderr files that changed since `since`, newest first."""
    node = ray._private.worker._global_node  # this process's Ray node, None when Ray is not running
    if node is None:
        return ""
    changed = []
    for path in Path(node.get_logs_dir_path()).glob("worker-*"):
        try:
            mtime, size = path.stat().st_mtime, path.stat().st_size
        except OSError:
            continue
        if mtime >= since and size > 0:
            changed.append((mtime, path))
    parts = []
    for _, path in sorted(changed, reverse=True)[:files]:
        # Ray's own marker lines (":job_id:...", ":task_name:...", ":actor_name:...") say nothing here
        text = [line for line in path.read_text(errors="replace").splitlines() if not line.startswith(":")]
        if text:
            parts.append(f"== {path.name}\n" + "\n".join(text[-lines:]))
    return "\n".join(parts)


_exit_status: list[int] = []


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process without the interpreter's teardown, keeping pytest's exit status.

    This process has run Ray drivers, Serve, Ray Data's executor threads, pyarrow's thread pools
    and torch's intra-op pools, each started and shut down many times. On 2026-12-01 a CI run
    passed all 349 tests, printed its summary and then died of SIGSEGV (exit 139) while the
    interpreter finalised those C extensions; not reproduced locally. Every result has been
    reported by now (pytest's summary, cache and plugins run before this hook, which runs last),
    so nothing is lost by skipping finalisation, and a crash there can no longer turn a green run
    red. faulthandler stays on until then: a crash during the tests still prints its stack.
    Job entrypoints and services do not go through this: their subprocess tests check exit codes.
    """
    if _exit_status and os.environ.get("PYTEST_KEEP_FINALIZATION") != "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[-1])
