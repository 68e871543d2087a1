"""Datasets as uint8 tensors: CIFAR-10, any ImageFolder tree (directory or .zip), `synthetic`, and
unlabelled content images for style training (a flat folder or .zip, e.g. COCO).

Small images are decoded once into `ImageData` (uint8, (N, 3, H, W)) and cached on disk, so an
epoch is tensor indexing, not JPEG decoding. Sharding and per-epoch shuffling for DDP happen here too,
on index tensors, so every rank sees a disjoint slice and the same number of batches.
"""
from __future__ import annotations

import hashlib
import math
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import numpy as np
import torch

from jobs.cli import UserError
from jobs.images import decode_pixels

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
# downloadable ImageFolder archives: name -> (url, sha1); extracted once under the data root
DOWNLOADS = {
    "hotdog": ("http://d2l-data.s3-accelerate.amazonaws.com/hotdog.zip", "fba480ffa8aa7e0febbb511d181409f899b9baa5"),
}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class ImageData:
    """A labelled train/test split held as tensors.

    train_x, test_x: (N, 3, H, W) uint8; train_y, test_y: (N,) int64; classes: names by label.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train_x.shape[-2:])

    def subset(self, train: int | None = None, test: int | None = None, seed: int = 0) -> "ImageData":
        """`train`/`test` examples for quick runs, drawn at random with a fixed seed (the same ones in
        every run and on every rank) and kept in dataset order; None keeps everything. Not simply the
        first N: an ImageFolder is stored class by class, so its first N images are often one class."""
        def pick(x, y, n):
            if n is None or n >= len(y):
                return x, y
            idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:max(n, 0)].sort().values
            return x[idx], y[idx]
        train_x, train_y = pick(self.train_x, self.train_y, train)
        test_x, test_y = pick(self.test_x, self.test_y, test)
        return ImageData(train_x, train_y, test_x, test_y, self.classes)


def load_image_data(source: str, root: str | os.PathLike = "data", image_size: int | None = None,
                    fit: str = "stretch") -> ImageData:
    """Load `source`: "cifar10", "synthetic[:N]", a name in DOWNLOADS ("hotdog"), or a directory /
    .zip in ImageFolder layout.

    ImageFolder trees must hold `train/<class>/*.jpg` and `test/<class>/*.jpg` (one top-level
    folder inside a zip is allowed). With `image_size`, images become image_size x image_size:
    fit="stretch" resizes both sides; fit="center" resizes the shorter side and centre-crops
    (torchvision's Resize + CenterCrop, keeping the aspect ratio). Without it they must all share
    one size. Decoded tensors are cached under `root/cache/`.
    """
    root = Path(root)
    if fit not in ("stretch", "center"):
        raise ValueError(f"fit must be 'stretch' or 'center', not {fit!r}")
    if source == "cifar10":
        return _load_cifar10(root)
    if source == "synthetic" or source.startswith("synthetic:"):
        n = int(source.split(":", 1)[1]) if ":" in source else 2048
        return make_synthetic(n_train=n, n_test=max(n // 4, 64), size=image_size or 32)
    if source in DOWNLOADS:
        path = fetch_archive(source, root)
    else:
        path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"dataset not found: {source} (expected cifar10, synthetic, {', '.join(DOWNLOADS)}, "
                        f"or an ImageFolder directory/.zip)")
    return _cached(path, root, image_size, fit, lambda: _load_image_folder(path, image_size, fit))


def load_content_images(source: str, root: str | os.PathLike, image_size: int,
                        limit_train: int | None = None) -> ImageData:
    """Content images for style training as uint8 (N, 3, S, S) tensors; `test_x` is the validation set.

    cifar10 and synthetic load as in `load_image_data`; ImageFolder trees too, with the shorter side
    resized to S and a centre crop (Johnson's preprocessing, fit="center"). Any other folder or .zip
    is a flat collection (COCO): every image, resized and cropped the same way, the last 2% (8..500,
    at most half) held out for validation, the first `limit_train` of the rest kept; decoded once
    and cached. Labels are all 0 (one class, "image").
    """
    if source in ("cifar10", "synthetic") or source.startswith("synthetic:"):
        return load_image_data(source, root, image_size)
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"content images not found: {source} (a folder or .zip of images, cifar10 or synthetic)")
    names, read, close = _list_images(path)
    try:
        if _is_image_folder(names):
            return load_image_data(str(path), root, image_size, fit="center")
        if not names:
            raise UserError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        n_val = min(max(8, len(names) // 50), 500, len(names) // 2)
        train_names, val_names = names[:-n_val] or names, names[-n_val:]
        train_names = train_names[:limit_train] if limit_train else train_names

        def build() -> ImageData:
            tx, vx = (torch.from_numpy(np.stack([decode_pixels(read(n), n, image_size, "center") for n in split]))
                      .permute(0, 3, 1, 2).contiguous() for split in (train_names, val_names))
            return ImageData(tx, torch.zeros(len(tx), dtype=torch.long), vx, torch.zeros(len(vx), dtype=torch.long),
                             ["image"])

        # the flat layout and the training limit go into the cache key's `fit` string, so these
        # tensors never collide with an ImageFolder cache of the same file
        return _cached(path, Path(root), image_size, f"center-flat-{limit_train}", build)
    finally:
        close()


def _list_images(path: Path):
    """(sorted image names, read(name) -> bytes, close()) for a directory or a .zip; macOS's
    __MACOSX/ metadata folders are left out."""
    if path.is_dir():
        names = [str(p.relative_to(path)).replace(os.sep, "/") for p in path.rglob("*") if p.is_file()]
        read, close = (lambda n: (path / n).read_bytes()), (lambda: None)
    elif zipfile.is_zipfile(path):
        zf = zipfile.ZipFile(path)
        names, read, close = zf.namelist(), zf.read, zf.close
    else:
        raise UserError(f"{path} is neither a directory nor a .zip archive")
    names = sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS) and "/__MACOSX/" not in f"/{n}")
    return names, read, close


def _is_image_folder(names: list[str]) -> bool:
    """True for an ImageFolder layout: images under .../train/<class>/ and .../test/<class>/."""
    def has(split):
        return any(f"/{split}/" in f"/{n}" and len(n.split(f"{split}/", 1)[1].split("/")) == 2 for n in names)
    return has("train") and has("test")


def _cached(path: Path, root: Path, image_size: int | None, fit: str, build) -> ImageData:
    """Decode once: key the cache on the path, its size/mtime and the target image size."""
    st = path.stat()
    fit_key = "" if fit == "stretch" else f"|{fit}"  # stretch keeps the keys of existing caches
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{image_size}{fit_key}".encode()).hexdigest()[:16]
    cache = root / "cache" / f"{path.name}-{key}.pt"
    if cache.exists():
        d = torch.load(cache, weights_only=True)
        return ImageData(d["train_x"], d["train_y"], d["test_x"], d["test_y"], list(d["classes"]))
    data = build()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        torch.save({"train_x": data.train_x, "train_y": data.train_y, "test_x": data.test_x,
                    "test_y": data.test_y, "classes": data.classes}, tmp)
        os.replace(tmp, cache)  # atomic: concurrent workers never read half a file
    except OSError:
        pass  # a read-only data root only costs a re-decode next time
    return data


def _load_cifar10(root: Path) -> ImageData:
    import torchvision

    try:
        train = torchvision.datasets.CIFAR10(str(root), train=True, download=True)
        test = torchvision.datasets.CIFAR10(str(root), train=False, download=True)
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        raise UserError(
            f"cannot download CIFAR-10 into {root}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
            f"without internet, pass --data with the ImageFolder .zip/directory instead") from None

    def as_tensor(ds):  # ds.data: (N, 32, 32, 3) uint8 numpy
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)

    (trx, try_), (tex, tey) = as_tensor(train), as_tensor(test)
    return ImageData(trx, try_, tex, tey, list(train.classes))


def _load_image_folder(path: Path, image_size: int | None, fit: str = "stretch") -> ImageData:
    """Decode every image of an ImageFolder tree (directory or zip) into uint8 tensors."""
    names, read, close = _list_images(path)
    try:
        splits = _split_layout(names, path)
        classes = sorted(set(splits["train"]) | set(splits["test"]))
        out = []
        for split in ("train", "test"):
            xs, ys = [], []
            for label, cls in enumerate(classes):
                for name in splits[split].get(cls, []):
                    xs.append(decode_pixels(read(name), name, image_size, fit))
                    ys.append(label)
            sizes = {x.shape for x in xs}
            if len(sizes) > 1:
                raise UserError(f"{path}: images have different sizes {sorted(sizes)[:3]}...; pass --image-size to resize them")
            out += [torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous(), torch.tensor(ys)]
    finally:
        close()
    return ImageData(*out, classes)


def _split_layout(names: list[str], path: Path) -> dict[str, dict[str, list[str]]]:
    """Group image paths (as `_list_images` lists them) into {"train"|"test": {class: [paths]}};
    accepts one wrapping folder."""
    splits: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for name in names:
        parts = name.split("/")
        for i in range(len(parts) - 2):
            if parts[i] in splits and i + 3 == len(parts):
                splits[parts[i]].setdefault(parts[i + 1], []).append(name)
                break
    for split, by_class in splits.items():
        if not by_class:
            raise UserError(f"{path}: no images under {split}/<class>/ (expected ImageFolder layout train/<class>/*.jpg, test/<class>/*.jpg)")
    return splits


def fetch_archive(name: str, root: str | os.PathLike, url: str | None = None, sha1: str | None = None,
                  timeout: float = 30.0) -> Path:
    """Download archive `name` (DOWNLOADS[name] unless url/sha1 are given) into `root`, verify its
    sha1 and extract it once into `root/<name>/`; return that directory.

    A file lock serialises concurrent processes (Ray workers on one node), and the extraction
    is renamed into place, so nobody sees half a tree. An archive already in `root` (copied there
    by hand on an offline machine) is used if its sha1 matches.
    """
    from filelock import FileLock

    default_url, default_sha1 = DOWNLOADS.get(name, (None, None))
    url, sha1 = url or default_url, sha1 or default_sha1
    root = Path(root).expanduser()
    archive = root / os.path.basename(urlparse(url).path)
    target = root / name
    done = target / ".extracted"
    if done.exists():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"data root {root} is not writable: {e.strerror or e}") from None
    with FileLock(str(root / f".{name}.lock")):
        if done.exists():  # another process finished while we waited
            return target
        if not archive.exists():
            _download(url, archive, sha1, timeout)
        digest = file_sha1(archive)
        if digest != sha1:
            raise UserError(f"{archive} has sha1 {digest}, expected {sha1} (a corrupt or different file): "
                            f"delete it, or replace it with the file from {url}")
        tmp = root / f".{name}.extracting"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)  # zipfile drops absolute paths and '..' components
        except zipfile.BadZipFile as e:
            raise UserError(f"{archive} is not a valid zip archive: {e}") from None
        (tmp / ".extracted").write_text(f"{url} {sha1}\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def _download(url: str, dest: Path, sha1: str, timeout: float) -> None:
    """Stream `url` into `dest` (via a .part file); no network fails at once with where to put it."""
    import urllib.request

    part = dest.with_name(dest.name + ".part")
    print(f"downloading {url} -> {dest}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    except OSError as e:  # URLError, timeouts and refused connections are all OSErrors
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e.strerror or e
        raise UserError(f"cannot download {url} ({reason}); without internet, download it elsewhere and "
                        f"put it at {dest} (sha1 {sha1})") from None
    digest = file_sha1(part)
    if digest != sha1:  # never keep a bad download where the next run would pick it up
        part.unlink(missing_ok=True)
        raise UserError(f"the download of {url} has sha1 {digest}, expected {sha1}; not using it")
    os.replace(part, dest)


def file_sha1(path: str | os.PathLike) -> str:
    """Hex sha1 of a file, read in 1 MiB blocks."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_synthetic(n_train: int = 2048, n_test: int = 512, size: int = 32, num_classes: int = 4, seed: int = 0) -> ImageData:
    """A learnable dataset: one small shape per image at a random position on a noisy background.

    Class = shape (0 square, 1 horizontal bar, 2 vertical bar, 3 cross), drawn in a random colour
    at a random place, so a model must learn translation-invariant shape features; a vertical
    flip keeps every label, which makes flips a label-preserving augmentation here as on CIFAR.
    """
    if not 2 <= num_classes <= 4:
        raise ValueError("synthetic data has 2 to 4 classes")
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    x = torch.randint(0, 96, (n, 3, size, size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, num_classes, (n,), generator=g)
    s = max(size // 4, 3)  # shape extent
    t = max(s // 3, 1)  # bar thickness
    for i in range(n):
        r, c = torch.randint(0, size - s + 1, (2,), generator=g).tolist()
        colour = torch.randint(128, 256, (3, 1, 1), generator=g, dtype=torch.int64).to(torch.uint8)
        m = s // 2 - t // 2
        patch = x[i, :, r:r + s, c:c + s]
        k = int(y[i])
        if k == 0:
            patch[:] = colour
        elif k == 1:
            patch[:, m:m + t, :] = colour
        elif k == 2:
            patch[:, :, m:m + t] = colour
        else:
            patch[:, m:m + t, :] = colour
            patch[:, :, m:m + t] = colour
    names = ["square", "hbar", "vbar", "cross"][:num_classes]
    return ImageData(x[:n_train], y[:n_train], x[n_train:], y[n_train:], names)


def shard_indices(n: int, rank: int, world: int, epoch: int, seed: int) -> torch.Tensor:
    """This rank's example indices for one epoch: a permutation shared by all ranks, strided by rank.

    Every rank gets exactly n // world indices (the remainder is dropped, as DistributedSampler
    with drop_last does), so all ranks run the same number of DDP steps and never deadlock.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    per_rank = n // world
    return order[rank:per_rank * world:world]


def iterate_batches(x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, batch_size: int,
                    device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images uint8 (B, 3, H, W), labels (B,)) on `device`, indexing a resident tensor; the
    last batch may be smaller."""
    for i in range(0, len(indices), batch_size):
        idx = indices[i:i + batch_size]
        yield x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)


class RankShards:
    """One DDP rank's view of an `ImageData` held resident as uint8 (on the GPU when `device` is one,
    else in host memory): a training shard reshuffled every epoch (`shard_indices`) and a fixed,
    strided test shard, both in batches of `batch` moved to `device`."""

    def __init__(self, data: ImageData, rank: int, world: int, batch: int, device: torch.device, seed: int):
        self.rank, self.world, self.batch, self.device, self.seed = rank, world, batch, device, seed
        self.home = device if device.type == "cuda" else torch.device("cpu")
        self.train_x, self.train_y = data.train_x.to(self.home), data.train_y.to(self.home)
        self.test_x, self.test_y = data.test_x.to(self.home), data.test_y.to(self.home)
        self.steps_per_epoch = math.ceil(len(self.train_x) // world / batch)  # the same on every rank

    def train_indices(self, epoch: int) -> torch.Tensor:
        return shard_indices(len(self.train_x), self.rank, self.world, epoch, self.seed).to(self.home)

    def train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iterate_batches(self.train_x, self.train_y, self.train_indices(epoch), self.batch, self.device)

    def test_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.arange(self.rank, len(self.test_x), self.world, device=self.home)
        return iterate_batches(self.test_x, self.test_y, idx, self.batch, self.device)

