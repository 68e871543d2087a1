"""A real two-node Ray cluster on this machine, started with the `ray start` CLI, for the cluster tests.

Each node gets its own temp dir, its own free ports and its own process group; teardown kills
exactly those processes (and whatever they spawned), never other Ray instances on the machine
(`ray stop` would stop them all).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalCluster:
    """`ray start --head` plus `ray start --address` worker nodes, each with its own --num-cpus."""

    env: dict[str, str]
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rcv-", dir="/tmp")))  # short: socket paths
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    pgids: list[int] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str], timeout: float = 90) -> None:
        # a new session per node: its daemons inherit the process group we kill at teardown
        log = (self.root / f"{name}.log").open("w")
        proc = subprocess.Popen([str(VENV_BIN / "ray"), "start", *args, "--temp-dir", str(self.root / name),
                                 "--object-store-memory", str(128 * 1024**2), "--disable-usage-stats",
                                 "--dashboard-agent-listen-port", str(free_port())],
                                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pgids.append(proc.pid)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        if rc != 0:
            raise RuntimeError(f"ray start ({name}) failed ({rc}):\n{(self.root / f'{name}.log').read_text()[-3000:]}")

    def start_head(self, num_cpus: int = 1) -> None:
        self._start("head", ["--head", "--port", str(self.gcs_port), "--num-cpus", str(num_cpus),
                             "--dashboard-port", str(self.dashboard_port), "--dashboard-host", "127.0.0.1",
                             "--ray-client-server-port", str(free_port())])

    def node_logs(self, name: str, tail: int = 3000) -> str:
        """The end of a node's `ray start` output, its raylet log and the logs of job drivers it ran:
        why it did not join, or where a job got stuck."""
        parts = []
        logs = sorted((self.root / name).glob("session_*/logs/raylet.out"))
        logs += sorted((self.root / name).glob("session_*/logs/job-driver-*.log"))
        for path in [self.root / f"{name}.log", *logs]:
            if path.is_file():
                parts.append(f"== {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts) or f"(no logs for {name})"

    def add_node(self, num_cpus: int = 1) -> None:
        self._start(f"node{len(self.pgids)}", ["--address", self.address, "--num-cpus", str(num_cpus)])

    def processes(self) -> dict[int, str]:
        """Every live process of this cluster, pid -> start time: our process groups and all their
        descendants (job drivers and workers get process groups of their own, under the raylets)."""
        children: dict[int, list[int]] = {}
        started: dict[int, str] = {}
        ours = set()
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
            fields = _stat(pid)
            if fields is None or fields[0] == "Z":
                continue
            ppid, pgid, started[pid] = int(fields[1]), int(fields[2]), fields[19]
            children.setdefault(ppid, []).append(pid)
            if pgid in self.pgids:
                ours.add(pid)
        stack = list(ours)
        while stack:
            for child in children.get(stack.pop(), []):
                if child not in ours:
                    ours.add(child)
                    stack.append(child)
        return {pid: started[pid] for pid in ours}

    def stop(self) -> None:
        """SIGTERM this cluster's processes, then SIGKILL what is left after a grace period.

        The set is taken before the first signal (a killed raylet's workers are re-parented to init
        and would no longer be found as its descendants); a pid is signalled only while its start
        time still matches, so a recycled pid is never hit."""
        victims = self.processes()
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            victims.update(self.processes())
            for pid in _alive(victims):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while _alive(victims) and time.monotonic() < deadline:
                time.sleep(0.2)
        left = _alive(victims)
        assert not left, f"could not stop processes {sorted(left)}"


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, ...] (starttime is [19])."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def _alive(victims: dict[int, str]) -> list[int]:
    alive = []
    for pid, started in victims.items():
        fields = _stat(pid)
        if fields is not None and fields[0] != "Z" and fields[19] == started:
            alive.append(pid)
    return alive
