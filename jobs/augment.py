"""Image-augmentation training (reference recipe: CIFAR-10, ResNet-18, Adam 1e-3, batch 256, flips).

    python -m jobs.augment --data synthetic --epochs 3          # offline demo
    python -m jobs.augment --aug flip,color,crop --num-workers 2 --use-gpu
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import torch

from jobs import engine
from jobs.engine import PLACEMENT_STRATEGIES
from jobs.augmentations import AugmentSpec, compose, parse_aug_names
from jobs.cli import UserError, config_from_args, init_ray, run_cli
from jobs.data import iterate_batches, load_image_data, num_batches, shard_indices
from jobs.models import MODELS, build_model
from jobs.presets import Preset


@dataclass
class Config:
    """The augmentation job; defaults are the reference recipe (SPEC section 1)."""

    data: str = "cifar10"          # cifar10 | synthetic[:N] | ImageFolder dir or .zip
    data_root: str = "data"        # downloads and decoded-tensor cache
    image_size: int | None = None  # resize ImageFolder images to this square size
    limit_train: int | None = None  # use only the first N training images (quick runs)
    limit_test: int | None = None
    aug: str = "flip"              # comma-separated: none | flip,vflip,crop,color
    arch: str = "cifar_resnet18"
    epochs: int = 10
    batch_size: int = 256          # global batch, split evenly over the workers
    lr: float = 1e-3               # Adam
    num_workers: int = 2
    cpus_per_worker: int = 1
    use_gpu: bool = False
    placement_strategy: str = "PACK"  # how workers are placed on nodes: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    storage_path: str = "results"
    name: str = ""                 # run name; "" -> augment-<data>-<aug>
    seed: int = 0

    def __post_init__(self):
        if not self.name:
            stem = self.data.rstrip("/").split("/")[-1].split(":")[0].removesuffix(".zip")
            self.name = f"augment-{stem}-{self.aug.replace(',', '+')}"


def build_setup(cfg: Config, device: torch.device, rank: int, world: int) -> engine.TrainSetup:
    """Data resident as uint8 (on the GPU when there is one), batched device-side augmentation."""
    data = load_image_data(cfg.data, cfg.data_root, cfg.image_size).subset(cfg.limit_train, cfg.limit_test)
    per_rank_batch = cfg.batch_size // world
    on_gpu = device.type == "cuda"
    home = device if on_gpu else torch.device("cpu")
    train_x, train_y = data.train_x.to(home), data.train_y.to(home)
    test_x, test_y = data.test_x.to(home), data.test_y.to(home)
    augment = compose(parse_aug_names(cfg.aug), AugmentSpec())
    n_train = len(train_x) // world * world

    def train_batches(epoch):
        idx = shard_indices(len(train_x), rank, world, epoch, cfg.seed).to(home)
        return iterate_batches(train_x, train_y, idx, per_rank_batch, device)

    def test_batches():
        idx = torch.arange(rank, len(test_x), world, device=home)
        return iterate_batches(test_x, test_y, idx, per_rank_batch, device)

    def prepare(images, train, g):
        x = images.float().div_(255)  # ToTensor: (B, 3, H, W) in [0, 1]
        if train:
            x = augment(x, g)
        return x.contiguous(memory_format=torch.channels_last) if on_gpu else x

    model = build_model(cfg.arch, len(data.classes))
    return engine.TrainSetup(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=cfg.lr),
        train_batches=train_batches, test_batches=test_batches, prepare=prepare,
        num_train=n_train, steps_per_epoch=num_batches(n_train // world, per_rank_batch),
        meta={"classes": data.classes, "arch": cfg.arch, "image_size": list(data.image_size),
              "preset": Preset.plain(data.image_size[0]).to_dict()},
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.augment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config
    p.add_argument("--config", help="JSON file of config fields (e.g. a sweep's best.json); flags override it")
    p.add_argument("--data", help=f"cifar10 (downloads), synthetic[:N] (generated, offline), or an ImageFolder directory/.zip with train/ and test/ (default {d.data})")
    p.add_argument("--data-root", help=f"where datasets are downloaded and decoded tensors cached (default {d.data_root})")
    p.add_argument("--image-size", type=int, help="resize ImageFolder images to this square size (default: keep; all must match)")
    p.add_argument("--limit-train", type=int, help="train on the first N images only (quick runs)")
    p.add_argument("--limit-test", type=int, help="evaluate on the first N test images only")
    p.add_argument("--aug", help=f"augmentations, comma-separated: none, flip, vflip, crop, color (default {d.aug})")
    p.add_argument("--arch", choices=sorted(MODELS), help=f"model (default {d.arch})")
    p.add_argument("--epochs", type=int, help=f"epochs (default {d.epochs})")
    p.add_argument("--batch-size", type=int, help=f"global batch size, split over workers (default {d.batch_size})")
    p.add_argument("--lr", type=float, help=f"Adam learning rate (default {d.lr})")
    p.add_argument("--num-workers", type=int, help=f"Ray Train workers (DDP ranks) (default {d.num_workers})")
    p.add_argument("--cpus-per-worker", type=int, help=f"CPUs (and torch threads) per worker (default {d.cpus_per_worker})")
    p.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker, AMP and channels_last")
    p.add_argument("--placement-strategy", choices=PLACEMENT_STRATEGIES,
                   help=f"how workers are placed on nodes: PACK fills one node first, SPREAD puts them on different "
                        f"nodes, STRICT_* insist (default {d.placement_strategy})")
    p.add_argument("--storage-path", help=f"where runs are stored: <storage-path>/<name>/ (default {d.storage_path})")
    p.add_argument("--name", help="run name; re-running with the same name resumes it (default augment-<data>-<aug>)")
    p.add_argument("--seed", type=int, help=f"seed for init, shuffling and augmentation (default {d.seed})")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    return p.parse_args(argv)


def validate(cfg: Config) -> None:
    """Fail fast, on the driver, on inputs the workers would choke on."""
    parse_aug_names(cfg.aug)
    for field in ("epochs", "batch_size", "num_workers", "cpus_per_worker"):
        if getattr(cfg, field) < 1:
            raise UserError(f"--{field.replace('_', '-')} must be at least 1")
    if cfg.lr <= 0:
        raise UserError("--lr must be positive")
    if cfg.placement_strategy not in PLACEMENT_STRATEGIES:
        raise UserError(f"placement_strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}")
    if cfg.batch_size < cfg.num_workers:
        raise UserError(f"--batch-size {cfg.batch_size} is smaller than --num-workers {cfg.num_workers}")
    # load (and cache) the data on the driver: a bad dataset fails here with one line
    data = load_image_data(cfg.data, cfg.data_root, cfg.image_size)
    if len(data.train_x) < cfg.num_workers or len(data.test_x) < 1:
        raise UserError(f"dataset {cfg.data} is too small ({len(data.train_x)} train, {len(data.test_x)} test images)")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_from_args(Config, args, args.config)
    except TypeError as e:
        raise UserError(f"bad config: {e}") from None
    validate(cfg)
    engine.check_storage(cfg)
    print("config:", dataclasses.asdict(cfg), flush=True)
    init_ray(args.address)
    summary = engine.fit("jobs.augment", cfg)
    out = engine.run_dir(cfg)
    print(f"done: test acc {summary['test_acc']:.3f} after {summary['epochs']} epochs; "
          f"results in {out}/ (result.json, curves.png, model/, checkpoints)")
    return 0


if __name__ == "__main__":
    run_cli(main)
