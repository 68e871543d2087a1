"""Fault injection from outside the code under test: kill a real process, as a crash would."""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Callable


def kill_when(find: Callable[[], dict[str, Any] | None], timeout_s: float = 600, poll_s: float = 0.1) -> dict[str, Any]:
    """In a background thread, call `find()` every `poll_s` until it returns a dict with a "pid", then
    SIGKILL that process. Returns a dict that then holds what `find` returned (or "error": what went
    wrong in the thread), for the test to assert on."""
    killed: dict[str, Any] = {}

    def watch() -> None:
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                found = find()
                if found:
                    os.kill(found["pid"], signal.SIGKILL)
                    killed.update(found)
                    return
                time.sleep(poll_s)
            killed["error"] = f"nothing to kill within {timeout_s:g} s"
        except Exception as e:  # noqa: BLE001 - reported through the dict
            killed["error"] = repr(e)

    threading.Thread(target=watch, daemon=True).start()
    return killed
