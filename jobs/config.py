"""One declaration per config field, and everything that comes from it.

A job's config is a dataclass whose fields are declared with `option(default, help, ...)`:

    @dataclass
    class Config(RunOptions):
        epochs: int = option(10, "epochs", min=1)
        lr: float = option(1e-3, "learning rate", above=0)

From those declarations come the command line (`add_options`: `--epochs`, `--lr`, with help, choices
and the default), the validation (`check_options`: types, choices and ranges, one-line errors that
name the flag), `--config FILE.json` (`load_config`: a plain dict of fields, or a `result.json` /
sweep `best.json` holding `config`) and what is printed and saved (`dataclasses.asdict`). Checks that
relate several fields (a batch at least as large as the workers) stay with the job.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from typing import Any, Sequence

from jobs.cli import UserError
from jobs.precision import COMPILE_MODES

_NO_DEFAULT_TEXT = object()


def option(default: Any, help: str, *, choices: Sequence[Any] | None = None, min: float | None = None,
           max: float | None = None, above: float | None = None, default_text: str | None = None,
           flag: str | None = None, metavar: str | None = None, cli: bool = True) -> Any:
    """A dataclass field with its help text and its constraints.

    choices: the allowed values; min/max: inclusive bounds; above: an exclusive lower bound (e.g.
    a learning rate `above=0`). A list value is checked element by element. `default_text` replaces
    the printed default (e.g. "the recipe's"); `flag` the flag name (default: the field name with
    dashes); `cli=False` keeps a field out of the command line (a config file can still set it).
    None always passes the checks (a field left None means "derive it").
    """
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "min": min, "max": max,
            "above": above, "default_text": default_text, "flag": flag, "metavar": metavar, "cli": cli}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class RunOptions:
    """The fields every Ray Train job shares: where its run lives and how it is placed on the cluster."""

    num_workers: int = option(2, "Ray Train workers (DDP ranks)", min=1)
    cpus_per_worker: int = option(1, "CPUs (and torch threads) per worker", min=1)
    use_gpu: bool = option(False, "one GPU per worker (NCCL, AMP, channels_last)")
    placement_strategy: str = option("PACK", "how workers are placed on nodes: PACK fills one node first, SPREAD "
                                     "puts them on different nodes, STRICT_* insist",
                                     choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    storage_path: str = option("results", "where runs are stored, <storage-path>/<name>/: a directory or a URI "
                               "(s3://, gs://, file://)")
    name: str = option("", "run name; re-running with the same name resumes it", default_text="derived from the job")
    seed: int = option(0, "seed for initialisation, shuffling and augmentation", min=0)
    compile: str = option("none", "torch.compile the model (inductor, this mode) on each worker before DDP wraps "
                          "it; none = eager. Compiling takes the first steps (tens of seconds on a CPU) and counts "
                          "against --time-budget; inductor's disk cache makes a re-run compile faster. Off by "
                          "default: on 2-core AVX2 CPUs the fast net's compiled step was 0.9x eager",
                          choices=COMPILE_MODES)


# ----------------------------------------------------------------------------- introspection

def _declared(cls) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type) for each declared field of dataclass `cls`, in order."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _base_type(tp: Any) -> tuple[type, bool]:
    """`int | None` -> (int, False); `list[float]` -> (float, True); `str` -> (str, False)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return (args[0] if args else str), True
    if args and origin is not None and origin not in (list, tuple):  # Optional / Union
        return _base_type(args[0])
    return tp, False


def flag_name(f: dataclasses.Field) -> str:
    """The command-line flag of field `f`, e.g. `--batch-size`."""
    return "--" + (f.metadata.get("flag") or f.name.replace("_", "-"))


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _format(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(_format(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# ----------------------------------------------------------------------------- command line

def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls, skip: Sequence[str] = (),
                only: Sequence[str] | None = None) -> None:
    """One flag per declared field of `cls` (in declaration order; `skip` leaves fields out, `only`
    keeps just those). Every flag defaults to None, so only the flags a user gives override the
    config file and the dataclass defaults."""
    for f, tp in _declared(cls):
        meta = f.metadata
        if f.name in skip or (only is not None and f.name not in only) or not meta or not meta.get("cli", True):
            continue
        base, is_list = _base_type(tp)
        default = meta["default_text"] if meta["default_text"] is not None else _format(_default_of(f))
        text = meta["help"] + (f" (default: {default})" if default not in ("", None) else "")
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": text}
        kwargs["metavar"] = meta["metavar"] or {int: "N", float: "X"}.get(base)
        if kwargs["metavar"] is None or meta["choices"] is not None:
            del kwargs["metavar"]
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = base if base in (int, float) else str
            if is_list:
                kwargs["nargs"] = "+"
            if meta["choices"] is not None:
                kwargs["choices"] = meta["choices"]
        parser.add_argument(flag_name(f), **kwargs)


def build_parser(cls, prog: str, description: str, run_flags: bool = True) -> argparse.ArgumentParser:
    """A job's parser: `--config`, one flag per field of `cls`, and `--address` for Ray jobs."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE.json",
                   help="JSON file of config fields (a dict, or a result.json / sweep best.json holding 'config'); flags override it")
    shared = [f.name for f in dataclasses.fields(RunOptions)] if issubclass(cls, RunOptions) else []
    add_options(p, cls, skip=shared)
    if shared or run_flags:
        g = p.add_argument_group("where and how it runs")
        add_options(g, cls, only=shared)
        if run_flags:
            g.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    return p


def load_config(cls, args: argparse.Namespace | dict[str, Any] | None = None, config_file: str | None = None):
    """Dataclass `cls` from a JSON file (optional) overridden by the flags given, checked field by field.

    `args` is argparse's namespace (flags left None do not override) or a plain dict of fields.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if config_file:
        try:
            with open(config_file) as fh:
                loaded = json.load(fh)
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
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    unknown = sorted(set(given) - names) if not isinstance(args, argparse.Namespace) else []
    if unknown:
        raise UserError(f"unknown field(s) {', '.join(unknown)}")
    values.update({k: v for k, v in given.items() if k in names and v is not None})
    check_types(cls, values)
    try:
        cfg = cls(**values)
    except TypeError as e:
        raise UserError(f"bad config: {e}") from None
    return check_options(cfg)


# ----------------------------------------------------------------------------- validation

def _type_ok(value: Any, base: type) -> bool:
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is str:
        return isinstance(value, str)
    return True


def check_types(cls, values: dict[str, Any], names: str = "flags") -> None:
    """Refuse values of the wrong type (from a config file or a dict) before the dataclass sees them."""
    types = {f.name: (f, tp) for f, tp in _declared(cls)}
    for name, value in values.items():
        f, tp = types[name]
        label = flag_name(f) if names == "flags" else f.name
        base, is_list = _base_type(tp)
        if value is None:
            continue
        items = value if is_list and isinstance(value, (list, tuple)) else [value]
        if is_list and not isinstance(value, (list, tuple)):
            raise UserError(f"{label} must be a list of {base.__name__}, got {value!r}")
        for item in items:
            if not _type_ok(item, base):
                raise UserError(f"{label} must be {base.__name__}, got {item!r}")


def check_options(cfg, names: str = "flags"):
    """Check every declared field's type, choices and range; raise `UserError` naming the flag
    (names="flags", for a command line) or the field (names="fields", for a JSON API); return cfg."""
    check_types(type(cfg), {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, names)
    for f, tp in _declared(type(cfg)):
        meta, value = f.metadata, getattr(cfg, f.name)
        if not meta or value is None:
            continue
        label = flag_name(f) if names == "flags" else f.name
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(item, float) and not math.isfinite(item):
                raise UserError(f"{label} must be a finite number, got {item}")
            if meta["choices"] is not None and item not in meta["choices"]:
                raise UserError(f"{label} must be one of {', '.join(map(str, meta['choices']))}, got {item!r}")
            if meta["min"] is not None and item < meta["min"]:
                raise UserError(f"{label} must be at least {meta['min']:g}, got {item}")
            if meta["max"] is not None and item > meta["max"]:
                raise UserError(f"{label} must be at most {meta['max']:g}, got {item}")
            if meta["above"] is not None and not item > meta["above"]:
                bound = "positive" if meta["above"] == 0 else f"greater than {meta['above']:g}"
                raise UserError(f"{label} must be {bound}, got {item}")
    return cfg
