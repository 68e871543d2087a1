"""Image-augmentation training (reference recipe: CIFAR-10, ResNet-18, Adam 1e-3, batch 256, flips),
and the fast recipe (`--recipe fast`: a small net and an airbench-style recipe built for time to accuracy).

    python -m jobs.augment --data synthetic --epochs 3          # offline demo
    python -m jobs.augment --aug flip,color,crop --num-workers 2 --use-gpu
    python -m jobs.augment --recipe fast --time-budget 600      # train for 10 minutes
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn

from jobs import engine
from jobs.engine import PLACEMENT_STRATEGIES
from jobs.augmentations import AugmentSpec, alternating_flip, compose, flip_bits, parse_aug_names
from jobs.artifact import native_bf16_cpu
from jobs.cli import UserError, run_cli
from jobs.data import RankShards, iterate_batches, load_image_data
from jobs.fast import Lookahead, flip_tta, sgd_param_groups, warmup_decay
from jobs.models import MODELS, build_model, init_whitening_
from jobs.presets import Preset

# Fields left None take the recipe's value. "reference" is SPEC section 1; "fast" follows airbench
# (lr for the mean loss: airbench's 11.5 per 1024 examples / (1 + 1 / (1 - momentum)), scaled
# with the batch size; its weight decay 0.0153 per 1024 examples in the same units).
RECIPES = {
    "reference": dict(aug="flip", arch="cifar_resnet18", epochs=10, batch_size=256, optimizer="adam", lr=1e-3,
                      weight_decay=0.0, label_smoothing=0.0, schedule="constant", lookahead=False, tta="none",
                      whiten=False, normalize=False, channels_last=False, precision="auto"),
    "fast": dict(aug="altflip,translate", arch="fast_cifar_net", epochs=10, batch_size=1024, optimizer="sgd",
                 lr=None, weight_decay=0.0153 / 11.5, label_smoothing=0.2, schedule="warmup-decay", lookahead=True,
                 tta="flip", whiten=True, normalize=True, channels_last=True, precision="fast"),
}
FAST_LR_PER_1024 = 11.5 / (1 + 1 / (1 - 0.85))  # = 1.5 for the mean loss of a 1024 batch


@dataclass
class Config:
    """The augmentation job. Defaults are the reference recipe (SPEC section 1); `recipe="fast"`
    changes the defaults of the fields left None (see RECIPES); any field can still be set."""

    recipe: str = "reference"      # reference | fast
    data: str = "cifar10"          # cifar10 | synthetic[:N] | ImageFolder dir or .zip
    data_root: str = "data"        # downloads and decoded-tensor cache
    image_size: int | None = None  # resize ImageFolder images to this square size
    limit_train: int | None = None  # use only N training images, a fixed random draw (quick runs)
    limit_test: int | None = None
    aug: str | None = None         # comma-separated: none | flip,vflip,crop,color,translate,altflip
    arch: str | None = None
    epochs: int | None = None
    batch_size: int | None = None  # global batch, split evenly over the workers
    optimizer: str | None = None   # adam | sgd (Nesterov)
    lr: float | None = None
    momentum: float = 0.85         # SGD only
    weight_decay: float | None = None
    bn_lr_scale: float = 64.0      # SGD only: lr multiplier for BatchNorm parameters
    label_smoothing: float | None = None
    schedule: str | None = None    # constant | warmup-decay (per step, over the planned steps)
    warmup: float = 0.23           # warm-up fraction of warmup-decay
    lookahead: bool | None = None  # lookahead weight averaging
    tta: str | None = None         # none | flip: test-time augmentation at evaluation
    whiten: bool | None = None     # initialise the first layer to whiten image patches (fast_cifar_net)
    normalize: bool | None = None  # standardise inputs with the training set's per-channel mean/std
    time_budget: float | None = None  # seconds of training; replaces --epochs (see engine.plan_steps)
    eval_every: int = 1            # evaluate every N epochs (0: only after the last)
    # auto: fp16 AMP on GPU, fp32 on CPU; fast: auto, except bf16 autocast on a CPU with native bfloat16
    # (AVX-512 BF16/AMX: ~2x the fp32 step rate of the fast net); bf16 | fp16 | fp32: that one everywhere
    precision: str | None = None
    channels_last: bool | None = None  # channels_last on CPU too (always on GPU): ~1.8x the fast net's CPU speed
    num_workers: int = 2
    cpus_per_worker: int = 1
    use_gpu: bool = False
    placement_strategy: str = "PACK"  # how workers are placed on nodes: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    storage_path: str = "results"
    name: str = ""                 # run name; "" -> augment-<data>-<aug>
    seed: int = 0

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise UserError(f"unknown recipe {self.recipe!r}; choose from {', '.join(RECIPES)}")
        for key, value in RECIPES[self.recipe].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.precision == "fast":  # decided here, so the resolved config printed and saved says which
            self.precision = "bf16" if not self.use_gpu and native_bf16_cpu() else "auto"
        if self.lr is None:  # the fast recipe's SGD lr grows with the batch
            self.lr = FAST_LR_PER_1024 * self.batch_size / 1024
        if not self.name:
            stem = self.data.rstrip("/").split("/")[-1].split(":")[0].removesuffix(".zip")
            prefix = "augment" if self.recipe == "reference" else f"augment-{self.recipe}"
            self.name = f"{prefix}-{stem}-{self.aug.replace(',', '+')}"


def build_setup(cfg: Config, device: torch.device, rank: int, world: int) -> engine.TrainSetup:
    """Data resident as uint8 (on the GPU when there is one), batched device-side augmentation."""
    data = load_image_data(cfg.data, cfg.data_root, cfg.image_size).subset(cfg.limit_train, cfg.limit_test)
    shards = RankShards(data, rank, world, cfg.batch_size // world, device, cfg.seed)
    on_gpu = device.type == "cuda"
    names = parse_aug_names(cfg.aug)
    augment = compose(names, AugmentSpec())
    bits = flip_bits(len(shards.train_x), cfg.seed).to(shards.home) if "altflip" in names else None

    def train_batches(epoch):
        idx = shards.train_indices(epoch)
        batches = iterate_batches(shards.train_x, shards.train_y, idx, shards.batch, device)
        if bits is None:
            return batches
        flips = (bits[i] for i in idx.split(shards.batch))  # the same order as the batches
        return ((alternating_flip(x, b, epoch), y) for (x, y), b in zip(batches, flips))

    # pixels in [0, 1], optionally standardised per channel with the training set's statistics
    mean, std = channel_stats(data.train_x[:10000]) if cfg.normalize else ((0.0,) * 3, (1.0,) * 3)
    shift = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
    scale = 1 / (torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)

    def prepare(images, train, g):
        x = (images.float() - shift) * scale  # (B, 3, H, W)
        if train:
            x = augment(x, g)
        return x.contiguous(memory_format=torch.channels_last if on_gpu or cfg.channels_last else torch.contiguous_format)

    model = build_model(cfg.arch, len(data.classes))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.whiten:
        if not isinstance(getattr(model, "whiten", None), nn.Conv2d):
            raise UserError(f"--whiten needs a model with a whitening layer (fast_cifar_net*), not {cfg.arch}")
        # the same images on every rank -> the same filters (DDP broadcasts rank 0's weights anyway)
        sample = (data.train_x[:5000].float() - shift.cpu()) * scale.cpu()
        init_whitening_(model.whiten, sample)
        model.whiten.weight.requires_grad_(False)  # frozen: it stays a whitening transform
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(sgd_param_groups(model, cfg.lr, cfg.weight_decay, cfg.bn_lr_scale),
                                    momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    else:
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
    preset = Preset(data.image_size[0], data.image_size[0], mean, std) if cfg.normalize else Preset.plain(data.image_size[0])
    return engine.TrainSetup(
        model=model, optimizer=optimizer,
        train_batches=train_batches, test_batches=shards.test_batches, prepare=prepare,
        num_train=shards.num_train, steps_per_epoch=shards.steps_per_epoch,
        loss_fn=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
        schedule=(lambda p: warmup_decay(p, cfg.warmup)) if cfg.schedule == "warmup-decay" else None,
        predict=flip_tta if cfg.tta == "flip" else None,
        averager=Lookahead() if cfg.lookahead else None,
        meta={"classes": data.classes, "arch": cfg.arch, "image_size": list(data.image_size),
              "preset": preset.to_dict()},
    )


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, C, H, W), in [0, 1] units."""
    x = images.float().div_(255).transpose(0, 1).reshape(images.shape[1], -1)  # (C, N*H*W)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.augment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d, ref, fast = Config, RECIPES["reference"], RECIPES["fast"]

    def default(key):
        return f"(default {ref[key]}; fast recipe: {fast[key]})"

    def switch(flag, key, text):
        p.add_argument(f"--{flag}", dest=key, action=argparse.BooleanOptionalAction, help=f"{text} {default(key)}")

    p.add_argument("--config", help="JSON file of config fields (e.g. a sweep's best.json); flags override it")
    p.add_argument("--recipe", choices=sorted(RECIPES), help=f"defaults for the fields below: reference (SPEC) or fast (small net, airbench-style recipe) (default {d.recipe})")
    p.add_argument("--data", help=f"cifar10 (downloads), synthetic[:N] (generated, offline), or an ImageFolder directory/.zip with train/ and test/ (default {d.data})")
    p.add_argument("--data-root", help=f"where datasets are downloaded and decoded tensors cached (default {d.data_root})")
    p.add_argument("--image-size", type=int, help="resize ImageFolder images to this square size (default: keep; all must match)")
    p.add_argument("--limit-train", type=int, help="train on N images only, drawn at random with a fixed seed (quick runs)")
    p.add_argument("--limit-test", type=int, help="evaluate on N test images only (fixed random draw)")
    p.add_argument("--aug", help=f"augmentations, comma-separated: none, flip, vflip, crop, color, translate (2-pixel reflect-padded shifts), altflip (each image flipped in alternate epochs) {default('aug')}")
    p.add_argument("--arch", choices=sorted(MODELS), help=f"model {default('arch')}")
    p.add_argument("--epochs", type=int, help=f"epochs, unless --time-budget is given {default('epochs')}")
    p.add_argument("--time-budget", type=float, help="train for this many seconds instead of --epochs: the schedule is planned to fit (training steps only; evaluation is extra)")
    p.add_argument("--batch-size", type=int, help=f"global batch size, split over workers {default('batch_size')}")
    p.add_argument("--optimizer", choices=["adam", "sgd"], help=f"adam, or sgd with Nesterov momentum {default('optimizer')}")
    p.add_argument("--lr", type=float, help=f"learning rate (default {ref['lr']}; fast recipe: {FAST_LR_PER_1024:.2f} x batch size / 1024)")
    p.add_argument("--momentum", type=float, help=f"SGD momentum (default {d.momentum})")
    p.add_argument("--weight-decay", type=float, help=f"weight decay {default('weight_decay')}")
    p.add_argument("--bn-lr-scale", type=float, help=f"SGD: lr multiplier of BatchNorm parameters (default {d.bn_lr_scale})")
    p.add_argument("--label-smoothing", type=float, help=f"label smoothing of the cross-entropy {default('label_smoothing')}")
    p.add_argument("--schedule", choices=["constant", "warmup-decay"], help=f"per-step lr schedule over the planned steps {default('schedule')}")
    p.add_argument("--warmup", type=float, help=f"warm-up fraction of warmup-decay (default {d.warmup})")
    switch("lookahead", "lookahead", "lookahead weight averaging")
    p.add_argument("--tta", choices=["none", "flip"], help=f"test-time augmentation at evaluation {default('tta')}")
    switch("whiten", "whiten", "initialise the first layer to whiten 2x2 patches (fast_cifar_net only)")
    switch("normalize", "normalize", "standardise inputs with the training set's channel mean/std")
    p.add_argument("--precision", choices=["auto", "fast", "bf16", "fp16", "fp32"], help=f"autocast: auto = fp16 with loss scaling on GPU, fp32 on CPU; fast = auto, but bf16 on a CPU with native bfloat16 (AVX-512 BF16/AMX); bf16 on any device {default('precision')}")
    switch("channels-last", "channels_last", "channels_last tensors on CPU too (always on GPU)")
    p.add_argument("--eval-every", type=int, help=f"evaluate on the test set every N epochs; 0: only after the last (default {d.eval_every})")
    p.add_argument("--num-workers", type=int, help=f"Ray Train workers (DDP ranks) (default {d.num_workers})")
    p.add_argument("--cpus-per-worker", type=int, help=f"CPUs (and torch threads) per worker (default {d.cpus_per_worker})")
    p.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker, AMP and channels_last")
    p.add_argument("--placement-strategy", choices=PLACEMENT_STRATEGIES,
                   help=f"how workers are placed on nodes: PACK fills one node first, SPREAD puts them on different "
                        f"nodes, STRICT_* insist (default {d.placement_strategy})")
    p.add_argument("--storage-path", help=f"where runs are stored: <storage-path>/<name>/ (default {d.storage_path})")
    p.add_argument("--name", help="run name; re-running with the same name resumes it (default augment[-fast]-<data>-<aug>)")
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
    if cfg.time_budget is not None and cfg.time_budget <= 0:
        raise UserError("--time-budget must be positive (seconds)")
    if cfg.eval_every < 0:
        raise UserError("--eval-every must be 0 or more")
    if cfg.arch not in MODELS:
        raise UserError(f"unknown --arch {cfg.arch}; choose from {', '.join(MODELS)}")
    if cfg.whiten and not cfg.arch.startswith("fast_cifar_net"):
        raise UserError(f"--whiten needs a fast_cifar_net* model, not {cfg.arch} (pass --no-whiten)")
    if cfg.batch_size < cfg.num_workers:
        raise UserError(f"--batch-size {cfg.batch_size} is smaller than --num-workers {cfg.num_workers}")
    # load (and cache) the data on the driver: a bad dataset fails here with one line
    data = load_image_data(cfg.data, cfg.data_root, cfg.image_size)
    if len(data.train_x) < cfg.num_workers or len(data.test_x) < 1:
        raise UserError(f"dataset {cfg.data} is too small ({len(data.train_x)} train, {len(data.test_x)} test images)")


def main(argv=None) -> int:
    summary, out = engine.run_job_cli("jobs.augment", Config, parse_args(argv), validate)
    print(f"done: test acc {summary['test_acc']:.3f} after {summary['epochs']} epochs "
          f"({summary['steps']} steps, {summary['train_time_s']:.0f} s of training); "
          f"results in {out}/ (result.json, curves.png, model/, checkpoints)")
    return 0


if __name__ == "__main__":
    run_cli(main)
