"""Stream mode: images decoded by Ray Data tasks on the cluster's CPUs while the workers train, so a
worker's memory does not grow with the dataset.

    --data-mode resident   decode the whole set once into uint8 tensors held by every worker (jobs.data)
    --data-mode stream     read and decode each epoch's images in Ray Data, a bounded window at a time
    --data-mode auto       resident when the decoded set fits --resident-max-gb per worker, else stream

What each rank streams: every epoch, the same seeded permutation of the training files that
resident mode uses (`jobs.data.shard_indices`: a full shuffle of the file list, cheap because it
is names, not pixels), strided by rank, so every rank gets exactly n // world images and the same
number of steps (an uneven split would deadlock DDP). The rank turns its slice into a Ray Data
pipeline (`from_items` of names -> `map_batches(decode_rows)`: read the bytes, decode, resize with
the job's preset) and iterates it with `iter_torch_batches`, which prefetches while the model
trains; blocks come back as they finish (Ray Data does not preserve order), so the order within
a window of in-flight blocks is shuffled again. Evaluation streams files rank::world, resident
mode's strided test shard: every test image is evaluated exactly once per evaluation. Each pass
runs in a thread (`Pass`) and the next one (`StreamShards.next_pass`) starts when the current one
has produced its last batch, so a new pipeline's start-up overlaps the end of the one before.

Bad files (corrupt, not an image, a different size where no resize is asked): in training a bad
file's slot is filled with a copy of another image of its block (so ranks keep equal step counts),
in evaluation it is left out; either way it is counted (`bad_train_files`, `bad_test_files` in
every epoch's metrics) and named on the console. Resident mode instead fails at start with a
one-line error naming the file: it decodes everything up front anyway.
"""
from __future__ import annotations

import logging
import math
import queue
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from jobs.cli import UserError
from jobs.config import option
from jobs.sources import FileIndex, FileSource, index_content, index_image_folder

DATA_MODES = ("auto", "resident", "stream")
ROWS_PER_TASK = 32  # images per decode task: ~6 MB of uint8 at 256 px; amortises a task's overhead
ZERO_CPU_TASKS = 2  # decode tasks in flight per rank with --decode-cpus 0


@dataclass
class DataOptions:
    """The data-mode fields of every job that reads an image dataset (augment, finetune, fast_style)."""

    data_mode: str = option("auto", "resident: decode the set once and hold it in every worker's memory; "
                            "stream: decode each epoch's images in Ray Data tasks on the cluster's CPUs "
                            "(memory bounded whatever the set's size; needs a directory, .zip or URI readable "
                            "from every node); auto: resident if the decoded set fits --resident-max-gb",
                            choices=DATA_MODES)
    resident_max_gb: float | None = option(None, "auto mode: the largest decoded set held resident per worker, in GB",
                                           above=0, default_text="half the node's memory / (workers per node + 1)")
    decode_cpus: float = option(1.0, "stream mode: CPUs each Ray Data decode task reserves; 0 lets decoding "
                                "share the training workers' CPUs (a machine whose CPUs the workers all hold)",
                                min=0)
    data_mode_reason: str = option("", "why this data mode was chosen (set on the driver)", cli=False)


# ----------------------------------------------------------------------------- choosing the mode

def file_index(cfg, content: bool = False) -> FileIndex | None:
    """The files of cfg.data (None for the built-in sets, cifar10 and synthetic) with --limit-train /
    --limit-test drawn as resident mode draws them; `content`: style training's content images."""
    from jobs.data import open_content_source, open_source

    if cfg.data in ("cifar10", "synthetic") or cfg.data.startswith("synthetic:"):
        return None
    limit_train, limit_test = getattr(cfg, "limit_train", None), getattr(cfg, "limit_test", None)
    files = open_content_source(cfg.data) if content else open_source(cfg.data, cfg.data_root)
    index = index_content(files, limit_train) if content else index_image_folder(files)
    files.close()
    return index.subset(limit_train, limit_test)


def resident_budget(cfg) -> tuple[float, str]:
    """(bytes a worker may hold resident, how that was derived): --resident-max-gb, else half the
    memory of the node the driver runs on (with `ray job submit`, the head node) split between the
    workers that may share that node and the driver (which also decodes the set once to check it)."""
    if cfg.resident_max_gb:
        return cfg.resident_max_gb * 1e9, f"--resident-max-gb {cfg.resident_max_gb:g}"
    import psutil

    total = psutil.virtual_memory().total
    per_node = 1 if "SPREAD" in cfg.placement_strategy else cfg.num_workers
    budget = total / 2 / (per_node + 1)
    return budget, (f"{budget / 1e9:.1f} GB per worker: half of this node's {total / 1e9:.1f} GB / ({per_node} "
                    f"worker{'s' * (per_node > 1)} per node + the driver); set --resident-max-gb to change it")


def choose_mode(cfg, n_images: int, image_hw: tuple[int, int] | None, streamable: bool = True) -> tuple[str, str]:
    """Resolve cfg.data_mode for a set of `n_images` decoded at `image_hw` -> (mode, reason)."""
    if not streamable:
        if cfg.data_mode == "stream":
            raise UserError(f"--data-mode stream reads image files (an ImageFolder directory, .zip or URI); "
                            f"{cfg.data} is held resident")
        return "resident", f"{cfg.data} is a built-in set, always resident"
    decoded = n_images * 3 * image_hw[0] * image_hw[1] if image_hw else None
    size = f"{n_images} images decoded at {image_hw[0]}x{image_hw[1]} are {decoded / 1e9:.2f} GB" if decoded else ""
    if cfg.data_mode != "auto":
        return cfg.data_mode, f"--data-mode {cfg.data_mode}" + (f" ({size})" if size else "")
    budget, why = resident_budget(cfg)
    if decoded is not None and decoded <= budget:
        return "resident", f"auto: {size}, within the resident budget of {why}"
    return "stream", f"auto: {size}, over the resident budget of {why}"


def plan(cfg, index: FileIndex | None, image_hw: tuple[int, int] | None) -> None:
    """On the driver: resolve cfg.data_mode in place (with its reason, printed and kept in the config)."""
    n = len(index) if index is not None else 0
    cfg.data_mode, cfg.data_mode_reason = choose_mode(cfg, n, image_hw, streamable=index is not None)
    print(f"data mode: {cfg.data_mode} ({cfg.data_mode_reason})", flush=True)


def first_image_size(files: FileSource, index: FileIndex) -> tuple[int, int]:
    """(H, W) of the first training image, read from its header (then `files` is closed); a one-line
    error if it is no image."""
    import io

    from PIL import Image

    name = index.train[0]
    try:
        with Image.open(io.BytesIO(files.read(name))) as im:
            return im.height, im.width
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise UserError(f"cannot read image {name} in {index.location}: {e}") from None
    finally:
        files.close()


def check_decode_cpus(cfg) -> None:
    """Stream mode's decode tasks need CPUs the workers do not hold; fail now rather than wait forever."""
    import ray

    if cfg.data_mode != "stream" or cfg.decode_cpus == 0:
        return
    have = ray.cluster_resources().get("CPU", 0)
    free = have - cfg.num_workers * cfg.cpus_per_worker
    if free < cfg.decode_cpus:
        raise UserError(f"stream mode decodes in Ray Data tasks of --decode-cpus {cfg.decode_cpus:g} CPU, but the "
                        f"{cfg.num_workers} workers x {cfg.cpus_per_worker} CPU hold {have - max(free, 0):g} of the "
                        f"cluster's {have:g} CPUs; pass --decode-cpus 0 (decode on the workers' CPUs), lower "
                        f"--num-workers, or add CPU nodes")


# ----------------------------------------------------------------------------- decoding (in Ray Data tasks)

_SOURCES: dict[str, FileSource] = {}  # per task process: an open zip's directory is read once


def decode_rows(batch: dict[str, np.ndarray], location: str, size: int | None, fit: str,
                shape: tuple[int, int], fill: bool) -> dict[str, np.ndarray]:
    """A Ray Data batch of {"name", "label", "i"} -> {"image": (B, H, W, 3) uint8, "label", "bad", "i"}
    ("i": the image's position in its split, passed through).

    A file that does not decode to `shape` is marked bad=1 and, with `fill`, replaced by a copy of
    another row of the batch (its label and position too) so that the row count stays; else its
    image is zeros."""
    from jobs.images import decode_pixels

    files = _SOURCES.get(location) or _SOURCES.setdefault(location, FileSource(location))
    names, labels, position = batch["name"], batch["label"].copy(), batch["i"].copy()
    images = np.zeros((len(names), *shape, 3), np.uint8)
    bad = np.zeros(len(names), np.int64)
    for i, name in enumerate(names):
        try:
            x = decode_pixels(files.read(str(name)), str(name), size, fit)
            if x.shape[:2] != tuple(shape):
                raise UserError(f"{name} is {x.shape[1]}x{x.shape[0]}, the set's images are {shape[1]}x{shape[0]} "
                                f"(pass --image-size to resize them)")
            images[i] = x
        except (UserError, OSError) as e:
            bad[i] = 1
            print(f"warning: skipping a bad file in {location}: {e}", file=sys.stderr, flush=True)
    good = np.flatnonzero(bad == 0)
    if fill and len(good):
        for j, i in enumerate(np.flatnonzero(bad)):
            k = good[j % len(good)]
            images[i], labels[i], position[i] = images[k], labels[k], position[k]
    return {"image": images, "label": labels, "bad": bad, "i": position}


# ----------------------------------------------------------------------------- one rank's view

class StreamShards:
    """One DDP rank's view of a `FileIndex` streamed through Ray Data: the same interface as
    `jobs.data.RankShards` (train_batches(epoch), test_batches(), steps_per_epoch), plus `stats()`:
    the bad files seen since the last call, `last_indices`: the positions in the split of the batch
    just yielded (per-image state such as alternating flips), and `sample(k)`: the first k images."""

    def __init__(self, index: FileIndex, rank: int, world: int, batch: int, device: torch.device, seed: int,
                 image_size: int | None, fit: str, decode_cpus: float = 1.0, prefetch_batches: int = 2,
                 epochs: int | None = None, eval_every: int = 1):
        self.index, self.rank, self.world, self.batch, self.device, self.seed = index, rank, world, batch, device, seed
        self.size, self.fit, self.decode_cpus, self.prefetch = image_size, fit, decode_cpus, prefetch_batches
        self.shape = (image_size, image_size) if image_size else first_image_size(FileSource(index.location), index)
        self.steps_per_epoch = math.ceil(len(index.train) // world / batch)  # the same on every rank
        self.bad = {"bad_train_files": 0, "bad_test_files": 0}
        self.last_indices = torch.zeros(0, dtype=torch.long)
        self.epochs, self.eval_every, self.epoch = epochs, eval_every, -1  # for next_pass
        self._ahead: Pass | None = None  # the next pass, started ahead
        self._lock = threading.Lock()
        quiet_ray_data()

    @classmethod
    def for_job(cls, cfg, index: FileIndex, rank: int, world: int, batch: int, device: torch.device,
                image_size: int | None, fit: str) -> "StreamShards":
        """A job's shards: seed, --decode-cpus, and the order of its passes (--epochs unless it has a
        --time-budget, --eval-every) from its config."""
        return cls(index, rank, world, batch, device, cfg.seed, image_size, fit, cfg.decode_cpus,
                   epochs=None if getattr(cfg, "time_budget", None) else cfg.epochs,
                   eval_every=getattr(cfg, "eval_every", 1))

    def train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.epoch = epoch
        return self._stream(("train", epoch))

    def test_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._stream(("test", self.epoch))

    def sample(self, k: int, split: str = "train", max_bytes: float = 2e8) -> torch.Tensor:
        """The split's first k images (fewer where k of them would pass `max_bytes`) decoded here, as
        uint8 (k, 3, H, W): the statistics and previews resident mode takes from the set's head."""
        from jobs.images import decode_pixels

        names = getattr(self.index, split)
        k = max(1, min(k, len(names), int(max_bytes // (3 * self.shape[0] * self.shape[1]))))
        files, xs = FileSource(self.index.location), []
        for name in names[:k]:
            try:
                xs.append(decode_pixels(files.read(name), name, self.size, self.fit))
            except (UserError, OSError):
                continue  # counted when the epoch streams it
        files.close()
        xs = [x for x in xs if x.shape[:2] == tuple(self.shape)]
        return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()

    def close(self) -> None:
        """Stop the pass started ahead, if any (the run ended before asking for it)."""
        with self._lock:
            ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.close()

    def stats(self) -> dict[str, float]:
        """Bad files counted since the last call (this rank's; the loop sums them over ranks)."""
        out, self.bad = self.bad, dict.fromkeys(self.bad, 0)
        return out

    # passes: ("train", epoch) or ("test", epoch) (the evaluation after that epoch's training)

    def next_pass(self, key: tuple[str, int]) -> tuple[str, int] | None:
        """The pass the loop asks for after `key` (None: none, or not known): the evaluation after an
        epoch evaluated (every `eval_every`-th and the last), else the next epoch's training."""
        split, epoch = key
        last = self.epochs is not None and epoch + 1 >= self.epochs
        if split == "train" and (last or (self.eval_every and (epoch + 1) % self.eval_every == 0)):
            return "test", epoch
        return None if last else ("train", epoch + 1)

    def _stream(self, key: tuple[str, int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate pass `key` (the one started ahead, if it is that one); once its last batch is
        produced, the next pass starts, so its pipeline's start-up overlaps this pass's last steps."""
        with self._lock:
            current, self._ahead = self._ahead, None
        if current is None or current.key != key:
            if current is not None:
                current.close()  # a guess that missed (e.g. a time budget cut the run short)
            current = self._pass(key)
        current.when_drained(lambda: self._start_ahead(self.next_pass(key)))
        fill, counter = (True, "bad_train_files") if key[0] == "train" else (False, "bad_test_files")
        for b in current:
            bad = b["bad"].bool()
            self.bad[counter] += int(bad.sum())
            images, y, position = b["image"], b["label"], b["i"]
            if not fill and bad.any():
                images, y, position = images[~bad], y[~bad], position[~bad]
                if not len(y):
                    continue
            self.last_indices = position
            # NHWC over the wire -> NCHW uint8 on the device: what RankShards yields
            yield images.permute(0, 3, 1, 2).to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _start_ahead(self, key: tuple[str, int] | None) -> None:
        if key is None:
            return
        ahead = self._pass(key)
        with self._lock:
            old, self._ahead = self._ahead, ahead
        if old is not None:
            old.close()

    def _pass(self, key: tuple[str, int]) -> "Pass":
        from jobs.data import shard_indices

        split, epoch = key
        if split == "train":
            idx = shard_indices(len(self.index.train), self.rank, self.world, epoch, self.seed).tolist()
            names, labels = self.index.train, self.index.train_labels
        else:
            idx = list(range(self.rank, len(self.index.test), self.world))
            names, labels = self.index.test, self.index.test_labels
        return Pass(key, lambda: self._pipeline(names, labels, idx, fill=split == "train"), self.prefetch)

    def _pipeline(self, names: list[str], labels: torch.Tensor, idx: list[int], fill: bool) -> Iterator[dict]:
        """Ray Data batches ({"image", "label", "bad", "i"}, on the CPU) of the files `idx`."""
        import ray.data

        if not idx:
            return
        items = [{"name": names[i], "label": int(labels[i]), "i": i} for i in idx]
        ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / ROWS_PER_TASK)))
        # decode tasks that reserve no CPU are not bounded by the CPUs: cap them (Ray would otherwise
        # start a new worker process for each one in flight); "DEFAULT" scheduling: never inside a
        # placement group that captures child tasks (a Tune trial's), where Ray Data, sizing its work
        # from the cluster's free CPUs, waited forever. Ray 2.60 has no named argument for the
        # scheduling strategy yet, hence ray_remote_args and its deprecation warning silenced.
        pool = ray.data.TaskPoolStrategy(size=ZERO_CPU_TASKS) if self.decode_cpus == 0 else None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated")
            ds = ds.map_batches(decode_rows, batch_size=ROWS_PER_TASK, num_cpus=self.decode_cpus, compute=pool,
                                scheduling_strategy="DEFAULT",
                                fn_kwargs={"location": self.index.location, "size": self.size, "fit": self.fit,
                                           "shape": self.shape, "fill": fill})
        yield from ds.iter_torch_batches(batch_size=self.batch, prefetch_batches=self.prefetch, device="cpu")


class Pass:
    """One pass of a pipeline (a generator of batches) run by a thread into a queue of `depth`
    batches: it starts when made, before anyone iterates it. Iterating yields its batches (an error
    in the pipeline is raised here); leaving the loop early, or `close()`, stops the thread at its
    next batch (and with it the pipeline)."""

    _END = object()

    def __init__(self, key, batches, depth: int):
        self.key, self._queue, self._stop = key, queue.Queue(maxsize=max(1, depth)), threading.Event()
        self._lock, self._drained, self._then = threading.Lock(), False, None
        threading.Thread(target=self._produce, args=(batches,), name=f"stream-pass-{key}", daemon=True).start()

    def when_drained(self, then) -> None:
        """Call `then` once the pipeline has produced its last batch (now, if it has)."""
        with self._lock:
            if not self._drained:
                self._then = then
                return
        then()

    def close(self) -> None:
        self._stop.set()

    def __iter__(self):
        try:
            while True:
                item = self._queue.get()
                if item is Pass._END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def _produce(self, batches) -> None:
        end = Pass._END
        try:
            for b in batches():
                if not self._put(b):
                    return  # closed: leaving the loop closes the pipeline
            with self._lock:
                self._drained, then = True, self._then
            if then is not None:
                then()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            end = e
        self._put(end)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


def quiet_ray_data() -> None:
    """No progress bars or per-dataset INFO lines from each rank's pipelines (the loop prints progress)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
