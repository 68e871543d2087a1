"""jobs.hostmem: large tensors reuse freed memory instead of page-faulting fresh pages at every call."""
import os
import subprocess
import sys

import pytest

from jobs import hostmem

# 40 MB tensors, allocated and freed in a thread (as a Serve replica computes): minor faults per tensor once
# the heap has settled (torch's 64-byte-aligned blocks do not fit the freed hole of the same size at once:
# the heap grows for the first ~10 rounds, then serves every block from freed memory)
PROBE = """
import resource, threading, torch
out = []
def run():
    for i in range(25):
        if i == 20:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.ones(10 * 1024 * 1024)
        del x
    out.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 5)
t = threading.Thread(target=run); t.start(); t.join()
print(out[0])
"""


def faults_per_tensor(env: dict) -> float:
    r = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return float(r.stdout.split()[-1])


@pytest.mark.skipif(hostmem._glibc() is None, reason="glibc's malloc only")
def test_the_settings_stop_fresh_page_faults_for_large_tensors_in_threads():
    assert faults_per_tensor({}) > 5000  # ~10,000 pages of 4 KiB touched anew every time
    assert faults_per_tensor(hostmem.ENV) < 100  # none, measured


def test_the_settings_are_opt_in_and_then_only_for_replicas_with_large_maps(monkeypatch):
    from serve.app import resources

    glibc = hostmem._glibc() is not None
    monkeypatch.delenv(hostmem.SWITCH, raising=False)
    assert resources(1, large_maps=True) == {"num_cpus": 1}
    assert resources(1, 1, large_maps=True) == {"num_cpus": 1, "num_gpus": 1}
    monkeypatch.setenv(hostmem.SWITCH, "1")
    assert resources(1, large_maps=True).get("runtime_env", {}).get("env_vars") == (hostmem.ENV if glibc else None)
    assert resources(0.5) == {"num_cpus": 0.5}  # the ingress, an unbatched classifier
    monkeypatch.setenv(hostmem.SWITCH, "force")
    assert ("runtime_env" in resources(1)) == glibc


def test_a_replicas_runtime_env_carries_the_applications_and_survives_a_config_override(monkeypatch):
    """Serve merges the application's runtime_env into a deployment's when a config overrides it (a
    user_config change): that merge must give back the same options, or Serve restarts the replica."""
    import json
    import types

    import ray
    from ray.serve._private.utils import override_runtime_envs_except_env_vars

    from serve.app import with_application_runtime_env

    app = {"working_dir": "gcs://_ray_pkg_x.zip", "env_vars": {"PYTHONPATH": "/srv", "TOKEN": "t"}}
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(runtime_env=app))
    mine = with_application_runtime_env({"env_vars": dict(hostmem.ENV)})
    assert mine == {"working_dir": app["working_dir"], "env_vars": {**app["env_vars"], **hostmem.ENV}}
    assert json.dumps(override_runtime_envs_except_env_vars(app, mine)) == json.dumps(mine)
    for app in ({}, {"env_vars": {"A": "1"}}, {"pip": ["x"]}):
        monkeypatch.setattr(ray, "get_runtime_context", lambda app=app: types.SimpleNamespace(runtime_env=app))
        mine = with_application_runtime_env({"env_vars": dict(hostmem.ENV)})
        assert json.dumps(override_runtime_envs_except_env_vars(app, mine)) == json.dumps(mine), app
