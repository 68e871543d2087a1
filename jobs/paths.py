"""Local paths and remote URIs: telling them apart, and making local ones absolute.

Ray runs Train workers and Tune trials in working directories of their own, so a relative path
given on the driver's command line must travel as an absolute one; URIs (s3://, gs://, file://)
travel as they are.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

# config fields that may name local files or directories (datasets, data roots, weights, images)
PATH_FIELDS = ("data", "data_root", "weights", "style", "content")


def is_uri(path: str | os.PathLike) -> bool:
    """Remote storage (s3://bucket/dir, gs://..., file:///abs/dir) as opposed to a local path."""
    return "://" in str(path)


def absolute(path: str | None) -> str | None:
    """A relative local `path` made absolute against the working directory (~ expanded);
    absolute paths, URIs, None and "" are returned unchanged."""
    if not path or is_uri(path) or os.path.isabs(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def absolute_paths(cfg, fields: tuple[str, ...] = PATH_FIELDS):
    """A copy of the dataclass `cfg` with the relative local paths among `fields` made absolute.

    `data_root` is always a directory; the other fields may also hold names that are not paths
    ("cifar10", "imagenet", a style name), so they change only when the path exists here. On a
    multi-node cluster the path must also exist on every node (shared storage).
    """
    changes = {}
    for name in fields:
        value = getattr(cfg, name, None)
        if isinstance(value, str) and absolute(value) != value and (name == "data_root" or os.path.exists(value)):
            changes[name] = absolute(value)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def storage_dir(storage_path: str, name: str) -> Path | str:
    """`<storage_path>/<name>`: an absolute local Path, or a URI string when storage_path is a URI."""
    if is_uri(storage_path):
        return f"{storage_path.rstrip('/')}/{name}"
    return Path(absolute(storage_path)) / name
