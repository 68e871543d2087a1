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

import torch

from jobs.cli import UserError
from jobs.images import decode_pixels
from jobs.sources import FileIndex, FileSource, index_content, index_image_folder
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
    """Load `source`: "cifar10", "synthetic[:N]", a name in DOWNLOADS ("hotdog"), or an ImageFolder
    tree (a directory, a .zip or a URI prefix, see `jobs.sources`).

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
    files = open_source(source, root)
    index = index_image_folder(files)
    return _cached(files, index, root, image_size, fit, lambda: decode_index(files, index, image_size, fit))


def open_source(source: str, root: str | os.PathLike = "data") -> FileSource:
    """The files behind a dataset argument: a name in DOWNLOADS (fetched and extracted under `root`),
    a directory, a .zip or a URI prefix; a one-line error when there is nothing there."""
    location = str(fetch_archive(source, root)) if source in DOWNLOADS else source
    try:
        return FileSource(location)
    except UserError as e:
        if "not found" in str(e):
            raise UserError(f"dataset not found: {source} (expected cifar10, synthetic, {', '.join(DOWNLOADS)}, "
                            f"or an ImageFolder directory, .zip or URI)") from None
        raise


def load_content_images(source: str, root: str | os.PathLike, image_size: int,
                        limit_train: int | None = None) -> ImageData:
    """Content images for style training as uint8 (N, 3, S, S) tensors; `test_x` is the validation set.

    cifar10 and synthetic load as in `load_image_data`; any folder, .zip or URI is indexed by
    `jobs.sources.index_content` (an ImageFolder tree, or a flat collection such as COCO with 2%
    held out), every image resized on its shorter side to S and centre-cropped (Johnson's
    preprocessing); decoded once and cached.
    """
    if source in ("cifar10", "synthetic") or source.startswith("synthetic:"):
        return load_image_data(source, root, image_size)
    files = open_content_source(source)
    index = index_content(files, limit_train)
    # the flat layout and the training limit go into the cache key's `fit` string, so these
    # tensors never collide with an ImageFolder cache of the same file
    flat = index.layout == "flat"
    return _cached(files, index, Path(root), image_size, f"center-flat-{limit_train}" if flat else "center",
                   lambda: decode_index(files, index, image_size, "center"))


def open_content_source(source: str) -> FileSource:
    """The files behind style training's --data (a folder, .zip or URI); a one-line error if none."""
    try:
        return FileSource(source)
    except UserError:
        raise UserError(f"content images not found: {source} (a folder, .zip or URI of images, cifar10 or "
                        f"synthetic)") from None


def decode_index(files: FileSource, index: FileIndex, image_size: int | None, fit: str = "stretch") -> ImageData:
    """Decode every image of `index` into uint8 tensors (one size: `image_size`, or the files' own)."""
    out, shape = [], None
    try:
        for names, labels in ((index.train, index.train_labels), (index.test, index.test_labels)):
            xs = None  # (N, 3, H, W) filled image by image: the set is held once, not per image and stacked
            for i, name in enumerate(names):
                x = decode_pixels(files.read(name), name, image_size, fit)
                shape = shape or x.shape
                if x.shape != shape:
                    raise UserError(f"{index.location}: images have different sizes ({name} is {x.shape[1]}x"
                                    f"{x.shape[0]}, others {shape[1]}x{shape[0]}); pass --image-size to resize them")
                if xs is None:
                    xs = torch.empty((len(names), shape[2], shape[0], shape[1]), dtype=torch.uint8)
                xs.numpy()[i] = x.transpose(2, 0, 1)  # HWC -> CHW, written into the set's tensor
            out += [xs if xs is not None else torch.empty((0, 3, *(shape or (0, 0))[:2]), dtype=torch.uint8), labels]
    finally:
        files.close()
    return ImageData(*out, index.classes)


def _cached(files: FileSource, index: FileIndex, root: Path, image_size: int | None, fit: str, build) -> ImageData:
    """Decode once. The key: a local path with its size/mtime (a zip, a directory), or a URI with
    the hash of its file names (a file replaced in place under a URI is not noticed: use a new
    prefix), and the target image size."""
    if files.kind == "uri":
        stamp = hashlib.sha1("\n".join(index.train + index.test).encode()).hexdigest()
        where, stem = files.location, files.location.rstrip("/").split("/")[-1] or "uri"
    else:
        path = Path(files.location).expanduser()
        st = path.stat()
        stamp, where, stem = f"{st.st_size}|{st.st_mtime_ns}", str(path.resolve()), path.name
    fit_key = "" if fit == "stretch" else f"|{fit}"  # stretch keeps the keys of existing caches
    key = hashlib.sha1(f"{where}|{stamp}|{image_size}{fit_key}".encode()).hexdigest()[:16]
    cache = root / "cache" / f"{stem}-{key}.pt"
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
        """This epoch's batches; `last_indices` holds the dataset positions of the batch just yielded."""
        for idx in self.train_indices(epoch).split(self.batch):
            self.last_indices = idx
            yield self.train_x[idx].to(self.device, non_blocking=True), self.train_y[idx].to(self.device, non_blocking=True)

    def test_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.arange(self.rank, len(self.test_x), self.world, device=self.home)
        return iterate_batches(self.test_x, self.test_y, idx, self.batch, self.device)

