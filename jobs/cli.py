"""Shared command-line plumbing: one-line errors and local Ray start-up (config flags: jobs/config.py).

Every entrypoint wraps its `main` with `run_cli`, so that a user mistake
(`UserError`) prints one line and exits 2, Ctrl-C exits 130, and only a real bug
shows a traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit status 2."""


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run `main(argv)`; turn `UserError` into `error: ...` on stderr and exit 2."""
    try:
        rc = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(rc or 0)


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs) -> None:
    """Connect to `address` (or RAY_ADDRESS), else start an embedded local Ray.

    The embedded instance keeps its object store small (the jobs pass tensors, not datasets,
    through it) and runs without the dashboard unless asked, so it starts fast on a laptop.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"cannot connect to the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
        return
    # Ray Train's print patch echoes every worker line twice on a local console
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # the dashboard also serves the state API that Ray Train's placement-group cleaner polls
    kwargs.setdefault("include_dashboard", True)
    kwargs.setdefault("object_store_memory", 512 * 1024**2)
    ray.init(num_cpus=num_cpus, **kwargs)
