"""Shared command-line plumbing: one-line errors, run-flag parsing, local Ray start-up.

Every entrypoint wraps its `main` with `run_cli`, so that a user mistake
(`UserError`) prints one line and exits 2, Ctrl-C exits 130, and only a real bug
shows a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
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


def config_from_args(cls, args: argparse.Namespace, config_file: str | None = None):
    """Build dataclass `cls` from a JSON file (optional) overridden by the flags the user gave.

    Flags left at `None` (argparse default) do not override; dataclass defaults fill the rest.
    The JSON file may be a plain dict of fields or a `best.json`/`result.json` holding `config`.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if config_file:
        try:
            with open(config_file) as f:
                loaded = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read config file {config_file}: {e}") from None
        if isinstance(loaded, dict) and isinstance(loaded.get("config"), dict):
            loaded = loaded["config"]
        if not isinstance(loaded, dict):
            raise UserError(f"config file {config_file} must hold a JSON object")
        unknown = sorted(set(loaded) - names)
        if unknown:
            raise UserError(f"config file {config_file}: unknown field(s) {', '.join(unknown)}")
        values.update(loaded)
    for name, value in vars(args).items():
        if name in names and value is not None:
            values[name] = value
    return cls(**values)


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
