"""Where a dataset's image files live, and which of them make a train/test split.

A `FileSource` is a tree of files read by name: a local directory, a `.zip` (members read in
place, nothing extracted), or a URI prefix (`s3://`, `gs://`, `file://`, through pyarrow's
filesystems). A `FileIndex` lists a source's images with their labels: an ImageFolder tree
(`train/<class>/*`, `test/<class>/*`; labels from the sorted class folder names) or a flat
collection of content images. Both data modes build from the same index, so the class map and
the order of the images are the same whether a job holds the set resident or streams it.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from jobs.cli import UserError
from jobs.paths import is_uri

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


class FileSource:
    """Read image files by relative name from a directory, a .zip or a URI prefix.

    Picklable (a Ray task rebuilds its handles on first use); `names()` lists the images, sorted,
    leaving out macOS's __MACOSX/ metadata folders.
    """

    def __init__(self, location: str | os.PathLike):
        self.location = str(location)
        self._zip: zipfile.ZipFile | None = None
        self._fs = None
        if is_uri(self.location):
            import pyarrow.fs

            try:
                fs, root = pyarrow.fs.FileSystem.from_uri(self.location)
                kind = fs.get_file_info(root).type
            except (OSError, ValueError) as e:  # unknown scheme, no credentials, unreachable
                raise UserError(f"cannot open {self.location}: {str(e).splitlines()[0]}") from None
            if kind != pyarrow.fs.FileType.Directory:
                raise UserError(f"dataset not found: {self.location} (no directory at that URI)")
            self.kind, self._fs, self._root = "uri", fs, root.rstrip("/")
            return
        path = Path(self.location).expanduser()
        if path.is_dir():
            self.kind, self._root = "dir", str(path)
        elif path.is_file() and zipfile.is_zipfile(path):
            self.kind, self._root = "zip", str(path)
        elif path.exists():
            raise UserError(f"{path} is neither a directory nor a .zip archive")
        else:
            raise UserError(f"dataset not found: {self.location}")

    def __getstate__(self):
        return {"location": self.location, "kind": self.kind, "_root": self._root}

    def __setstate__(self, state):
        self.__dict__.update(state, _zip=None, _fs=None)

    def names(self) -> list[str]:
        """Every image file's name relative to the source's root ('/'-separated), sorted."""
        if self.kind == "dir":
            root = Path(self._root)
            names = [str(p.relative_to(root)).replace(os.sep, "/") for p in root.rglob("*") if p.is_file()]
        elif self.kind == "zip":
            names = self._open_zip().namelist()
        else:
            import pyarrow.fs

            infos = self._filesystem().get_file_info(pyarrow.fs.FileSelector(self._root, recursive=True))
            names = [i.path[len(self._root) + 1:] for i in infos if i.type == pyarrow.fs.FileType.File]
        return sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS) and "/__MACOSX/" not in f"/{n}")

    def read(self, name: str) -> bytes:
        if self.kind == "dir":
            return (Path(self._root) / name).read_bytes()
        if self.kind == "zip":
            return self._open_zip().read(name)
        with self._filesystem().open_input_file(f"{self._root}/{name}") as f:
            return f.read()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def _open_zip(self) -> zipfile.ZipFile:
        if self._zip is None:
            self._zip = zipfile.ZipFile(self._root)
        return self._zip

    def _filesystem(self):
        if self._fs is None:
            import pyarrow.fs

            self._fs, _ = pyarrow.fs.FileSystem.from_uri(self.location)
        return self._fs


@dataclass
class FileIndex:
    """The images of a labelled train/test split, by name: what both data modes build from.

    `train`/`test`: names relative to `location`; `train_labels`/`test_labels`: int64 tensors;
    `classes`: class names by label. ImageFolder order: class by class, names sorted within a class.
    """

    location: str
    train: list[str]
    train_labels: torch.Tensor
    test: list[str]
    test_labels: torch.Tensor
    classes: list[str]
    layout: str = "imagefolder"  # or "flat": content images without classes (index_content)

    def subset(self, train: int | None = None, test: int | None = None, seed: int = 0) -> "FileIndex":
        """The same random draw as `ImageData.subset` (so both modes keep the same images)."""
        def pick(names, labels, n):
            if n is None or n >= len(names):
                return names, labels
            idx = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed))[:max(n, 0)].sort().values
            return [names[i] for i in idx.tolist()], labels[idx]
        tr, trl = pick(self.train, self.train_labels, train)
        te, tel = pick(self.test, self.test_labels, test)
        return replace(self, train=tr, train_labels=trl, test=te, test_labels=tel)

    def __len__(self) -> int:
        return len(self.train) + len(self.test)


def index_image_folder(source: FileSource, names: list[str] | None = None) -> FileIndex:
    """The ImageFolder split of `source` (train/<class>/*, test/<class>/*, one wrapping folder
    allowed): labels from the sorted union of class folder names."""
    names = source.names() if names is None else names
    splits: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for name in names:
        parts = name.split("/")
        for i in range(len(parts) - 2):
            if parts[i] in splits and i + 3 == len(parts):
                splits[parts[i]].setdefault(parts[i + 1], []).append(name)
                break
    for split, by_class in splits.items():
        if not by_class:
            raise UserError(f"{source.location}: no images under {split}/<class>/ (expected ImageFolder layout "
                            f"train/<class>/*.jpg, test/<class>/*.jpg)")
    classes = sorted(set(splits["train"]) | set(splits["test"]))
    out: list = []
    for split in ("train", "test"):
        files, labels = [], []
        for label, cls in enumerate(classes):
            members = splits[split].get(cls, [])
            files += members
            labels += [label] * len(members)
        out += [files, torch.tensor(labels, dtype=torch.long)]
    return FileIndex(source.location, *out, classes)


def is_image_folder(names: list[str]) -> bool:
    """True for an ImageFolder layout: images under .../train/<class>/ and .../test/<class>/."""
    def has(split):
        return any(f"/{split}/" in f"/{n}" and len(n.split(f"{split}/", 1)[1].split("/")) == 2 for n in names)
    return has("train") and has("test")


def index_content(source: FileSource, limit_train: int | None = None) -> FileIndex:
    """Content images for style training: an ImageFolder tree as `index_image_folder`, or any other
    tree as one flat collection (COCO): the last 2% (8..500, at most half) held out for
    validation, the first `limit_train` of the rest kept; one class, "image", label 0."""
    names = source.names()
    if is_image_folder(names):
        return index_image_folder(source, names)
    if not names:
        raise UserError(f"{source.location} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    n_val = min(max(8, len(names) // 50), 500, len(names) // 2)
    train, val = names[:-n_val] or names, names[-n_val:]
    train = train[:limit_train] if limit_train else train
    zeros = lambda n: torch.zeros(n, dtype=torch.long)  # noqa: E731
    return FileIndex(source.location, train, zeros(len(train)), val, zeros(len(val)), ["image"], "flat")
