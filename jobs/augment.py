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

from jobs.transforms import AugmentSpec, alternating_flip, compose, flip_bits, parse_aug_names
from jobs.cli import UserError, run_cli
from jobs import driver, stream
from jobs.budget import BudgetOptions
from jobs.config import RunOptions, build_parser, option
from jobs.data import RankShards, load_image_data
from jobs.sources import FileSource
from jobs.airbench import TTA, Lookahead, Muon, muon_param_groups, sgd_param_groups, warmup_decay
from jobs.loop import Classification, TrainSetup, constant
from jobs.models import MODELS, build_model, init_whitening_
from jobs.precision import PRECISIONS, autocast_dtype
from jobs.presets import Preset

# Fields left None take the recipe's value. "reference" is SPEC section 1; "fast" follows airbench
# (lr for the mean loss: airbench's 11.5 per 1024 examples / (1 + 1 / (1 - momentum)), scaled
# with the batch size; its weight decay 0.0153 per 1024 examples in the same units).
RECIPES = {
    "reference": dict(aug="flip", arch="cifar_resnet18", epochs=10, batch_size=256, optimizer="adam", lr=1e-3,
                      weight_decay=0.0, label_smoothing=0.0, schedule="constant", lookahead=False, tta="none", final_tta="none",
                      whiten=False, whiten_bias=True, normalize=False, channels_last=False, precision="auto"),
    "fast": dict(aug="altflip,translate", arch=None, epochs=10, batch_size=None, optimizer=None,
                 lr=None, weight_decay=0.0153 / 11.5, label_smoothing=0.2, schedule="warmup-decay", lookahead=True,
                 tta="flip", final_tta="flip-translate", whiten=True, whiten_bias=None, normalize=True, channels_last=True,
                 precision="fast"),
}
FAST_LR_PER_1024 = 11.5 / (1 + 1 / (1 - 0.85))  # = 1.5 for the mean loss of a 1024 batch
FAST_CHOICES = ("arch", "batch_size", "optimizer", "whiten_bias")  # the fields fast_arch decides


def fast_arch(precision: str, use_gpu: bool) -> tuple[dict[str, object], str]:
    """The fast recipe's network, global batch size, optimizer and whether the whitening layer's bias
    trains, for where it will train ({field: value} for FAST_CHOICES), and why (printed by `validate`).

    In fp32 on a CPU a 600 s budget buys fast_cifar_net only 1.5-3.4 epochs on 2-core AVX2 machines,
    where the half-width net at batch 512 reached a higher accuracy, and Muon on its filters more
    than SGD in the same time; freezing the whitening bias makes each step ~1.15x faster, which
    bought as much accuracy in 600 s as training it, every run at 85% or above (BENCHMARKS.md,
    "fp32 on AVX2"). On a GPU or with native bf16 the budget covers ~9 epochs of fast_cifar_net at
    batch 1024 with SGD and a trained whitening bias (88.8%; neither Muon nor the frozen bias
    measured there).
    Decided on the driver from its own CPU: a CPU cluster's workers are assumed to be of the
    driver's kind (pass --arch, --batch-size, --optimizer and --[no-]whiten-bias to choose)."""
    if use_gpu:
        return dict(arch="fast_cifar_net", batch_size=1024, optimizer="sgd", whiten_bias=True), "training on GPUs"
    if autocast_dtype(precision, "cpu", "train") is not None:
        return (dict(arch="fast_cifar_net", batch_size=1024, optimizer="sgd", whiten_bias=True),
                f"--precision {precision} trains in bf16 on this CPU")
    return (dict(arch="fast_cifar_net_small", batch_size=512, optimizer="muon", whiten_bias=False),
            f"--precision {precision} trains in fp32 on this CPU (no native bf16): the half-width net's ~3x "
            "throughput buys more epochs, Muon learns more per epoch, and a frozen whitening bias spares the "
            "first conv's input gradient (~1.15x faster steps)")


def fast_choice_default(key: str) -> str:
    """The printed default of a field `fast_arch` decides, read from `fast_arch` itself."""
    gpu, cpu = fast_arch("fast", use_gpu=True)[0][key], fast_arch("fp32", use_gpu=False)[0][key]
    return f"reference: {RECIPES['reference'][key]}; fast: {gpu} on a GPU or in bf16, {cpu} in fp32 on a CPU"


def recipe_default(key: str) -> str:
    """The printed default of a field the recipe decides."""
    return f"reference: {RECIPES['reference'][key]}; fast: {RECIPES['fast'][key]}"


@dataclass
class Config(BudgetOptions, stream.DataOptions, RunOptions):
    """The augmentation job. Defaults are the reference recipe (SPEC section 1); `recipe="fast"`
    changes the defaults of the fields left None (see RECIPES); any field can still be set."""

    recipe: str = option("reference", "defaults for the fields left unset: reference (SPEC) or fast (small net, "
                         "airbench-style recipe)", choices=tuple(RECIPES))
    data: str = option("cifar10", "cifar10 (downloads), synthetic[:N] (generated, offline), or an ImageFolder "
                       "directory/.zip with train/ and test/")
    data_root: str = option("data", "where datasets are downloaded and decoded tensors cached")
    image_size: int | None = option(None, "resize ImageFolder images to this square size", min=1,
                                    default_text="keep; all must match")
    limit_train: int | None = option(None, "train on N images only, drawn at random with a fixed seed (quick runs)",
                                     min=1, default_text="all")
    limit_test: int | None = option(None, "evaluate on N test images only (fixed random draw)", min=1,
                                    default_text="all")
    aug: str | None = option(None, "augmentations, comma-separated: none, flip, vflip, crop, color, translate "
                             "(2-pixel reflect-padded shifts), altflip (each image flipped in alternate epochs)",
                             default_text=recipe_default("aug"))
    arch: str | None = option(None, "model", choices=sorted(MODELS),
                              default_text=fast_choice_default("arch"))
    epochs: int | None = option(None, "epochs, unless --time-budget is given", min=1,
                                default_text=recipe_default("epochs"))
    batch_size: int | None = option(None, "global batch size, split over workers", min=1,
                                    default_text=fast_choice_default("batch_size"))
    optimizer: str | None = option(None, "adam; sgd with Nesterov momentum; or muon: the convolution filters "
                                   "by Muon (orthogonalised updates at --muon-lr), the rest by sgd",
                                   choices=("adam", "sgd", "muon"),
                                   default_text=fast_choice_default("optimizer"))
    lr: float | None = option(None, "learning rate", above=0,
                              default_text=f"reference: 0.001; fast: {FAST_LR_PER_1024:.2f} x batch size / 1024")
    momentum: float = option(0.85, "SGD momentum", min=0, max=1)
    muon_lr: float = option(0.12, "muon: lr of the convolution filters (about the angle a step turns them by; "
                                  "airbench's 0.24 at batch 2000 trained less well at batch 512 here)", above=0)
    muon_momentum: float = option(0.6, "muon: momentum of the convolution filters' updates", min=0, max=1)
    weight_decay: float | None = option(None, "weight decay", min=0, default_text=recipe_default("weight_decay"))
    bn_lr_scale: float = option(64.0, "SGD: lr multiplier of BatchNorm parameters", above=0)
    label_smoothing: float | None = option(None, "label smoothing of the cross-entropy", min=0, max=1,
                                           default_text=recipe_default("label_smoothing"))
    schedule: str | None = option(None, "per-step lr schedule over the planned steps",
                                  choices=("constant", "warmup-decay"), default_text=recipe_default("schedule"))
    warmup: float = option(0.23, "warm-up fraction of warmup-decay", min=0, max=1)
    lookahead: bool | None = option(None, "lookahead weight averaging", default_text=recipe_default("lookahead"))
    tta: str | None = option(None, "test-time augmentation of the per-epoch evaluations", choices=tuple(TTA),
                             default_text=recipe_default("tta"))
    final_tta: str | None = option(None, "test-time augmentation of the last evaluation, whose accuracy the run "
                                   "reports (outside the time budget; flip-translate: 6 forwards per image)",
                                   choices=tuple(TTA), default_text=recipe_default("final_tta"))
    whiten: bool | None = option(None, "initialise the first layer to whiten 2x2 patches (fast_cifar_net only)",
                                 default_text=recipe_default("whiten"))
    whiten_bias: bool | None = option(None, "with --whiten: train the whitening layer's bias (frozen at 0, the "
                                      "first conv needs no input gradient: ~1.15x faster steps of the small net "
                                      "on a CPU)", default_text=fast_choice_default("whiten_bias"))
    normalize: bool | None = option(None, "standardise inputs with the training set's channel mean/std",
                                    default_text=recipe_default("normalize"))
    precision: str | None = option(None, "autocast, resolved on each worker (jobs/precision.py): auto = fp16 with "
                                   "loss scaling on GPU, fp32 on CPU; fast = auto, but bf16 on a CPU with native "
                                   "bfloat16 (AVX-512 BF16/AMX); bf16 | fp16 | fp32 everywhere",
                                   choices=PRECISIONS, default_text=recipe_default("precision"))
    channels_last: bool | None = option(None, "channels_last tensors on CPU too (always on GPU)",
                                        default_text=recipe_default("channels_last"))
    low_res_size: int = option(0, "progressive resizing: train the first --low-res-until of the run on images "
                               "downscaled to this side (px), then at full size; 0 = off", min=0)
    low_res_until: float = option(0.5, "progressive resizing: the fraction of the run's progress trained at "
                                  "--low-res-size (with --time-budget the plan is first made from the faster "
                                  "low-resolution steps, so a larger share of the steps ends up at low resolution)",
                                  min=0, max=1)
    eval_every: int = option(1, "evaluate on the test set every N epochs; 0: only after the last", min=0)
    name: str = option("", "run name; re-running with the same name resumes it",
                       default_text="augment[-fast]-<data>-<aug>")
    arch_reason: str = option("", "why the fast recipe chose its network, batch size, optimizer and whitening "
                                  "bias (those not given)", cli=False)

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise UserError(f"--recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        for key, value in RECIPES[self.recipe].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        chosen = [f for f in FAST_CHOICES if getattr(self, f) is None] if self.recipe == "fast" else []
        if chosen:
            choice, reason = fast_arch(self.precision, self.use_gpu)  # depends on where it trains
            for f in chosen:
                setattr(self, f, choice[f])
            names = [f.replace("_", " ") for f in chosen]
            self.arch_reason = f"{', '.join(names[:-1])}{' and ' if len(names) > 1 else ''}{names[-1]}: {reason}"
        if self.lr is None:  # the fast recipe's SGD lr grows with the batch
            self.lr = FAST_LR_PER_1024 * self.batch_size / 1024
        if not self.name:
            stem = self.data.rstrip("/").split("/")[-1].split(":")[0].removesuffix(".zip")
            prefix = "augment" if self.recipe == "reference" else f"augment-{self.recipe}"
            self.name = f"{prefix}-{stem}-{self.aug.replace(',', '+')}"


def build_setup(cfg: Config, device: torch.device, rank: int, world: int) -> TrainSetup:
    """Data resident as uint8 (on the GPU when there is one) or streamed (--data-mode), batched
    device-side augmentation."""
    batch = cfg.batch_size // world
    if cfg.data_mode == "stream":
        index = stream.file_index(cfg)
        shards = stream.StreamShards.for_job(cfg, index, rank, world, batch, device, cfg.image_size, "stretch")
        head, classes, image_size, n_train = shards.sample(10000), index.classes, shards.shape, len(index.train)
    else:
        data = load_image_data(cfg.data, cfg.data_root, cfg.image_size).subset(cfg.limit_train, cfg.limit_test)
        shards = RankShards(data, rank, world, batch, device, cfg.seed)
        head, classes, image_size, n_train = data.train_x[:10000], data.classes, data.image_size, len(data.train_x)
    on_gpu = device.type == "cuda"
    names = parse_aug_names(cfg.aug)
    augment = compose(names, AugmentSpec())
    bits = flip_bits(n_train, cfg.seed) if "altflip" in names else None

    def train_batches(epoch):
        nonlocal bits
        if bits is None:
            yield from shards.train_batches(epoch)
            return
        for x, y in shards.train_batches(epoch):  # each image flipped on alternate epochs
            bits = bits.to(shards.last_indices.device)  # a no-op after the first batch
            yield alternating_flip(x, bits[shards.last_indices].to(x.device), epoch), y

    # pixels in [0, 1], optionally standardised per channel with the training set's statistics
    mean, std = channel_stats(head) if cfg.normalize else ((0.0,) * 3, (1.0,) * 3)
    shift = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
    scale = 1 / (torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)

    def prepare(images, train, g):
        x = (images.float() - shift) * scale  # (B, 3, H, W)
        if train:
            x = augment(x, g)
        return x.contiguous(memory_format=torch.channels_last if on_gpu or cfg.channels_last else torch.contiguous_format)

    model = build_model(cfg.arch, len(classes))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.whiten:
        if not isinstance(getattr(model, "whiten", None), nn.Conv2d):
            raise UserError(f"--whiten needs a model with a whitening layer (fast_cifar_net*), not {cfg.arch}")
        # the same images on every rank -> the same filters (DDP broadcasts rank 0's weights anyway)
        sample = (head[:5000].float() - shift.cpu()) * scale.cpu()
        init_whitening_(model.whiten, sample)
        model.whiten.weight.requires_grad_(False)  # frozen: it stays a whitening transform
        model.whiten.bias.requires_grad_(cfg.whiten_bias)
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(sgd_param_groups(model, cfg.lr, cfg.weight_decay, cfg.bn_lr_scale),
                                    momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    elif cfg.optimizer == "muon":
        optimizer = Muon(muon_param_groups(model, cfg.lr, cfg.muon_lr, cfg.weight_decay, cfg.bn_lr_scale),
                         cfg.lr, cfg.momentum, cfg.muon_momentum)
    else:
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
    preset = Preset(image_size[0], image_size[0], mean, std) if cfg.normalize else Preset.plain(image_size[0])
    return TrainSetup(
        model=model, optimizer=optimizer,
        train_batches=train_batches, test_batches=shards.test_batches, steps_per_epoch=shards.steps_per_epoch,
        prepare=prepare, task=Classification(cfg.label_smoothing, cfg.tta, cfg.final_tta),
        schedule=(lambda p: warmup_decay(p, cfg.warmup)) if cfg.schedule == "warmup-decay" else constant,
        averager=Lookahead() if cfg.lookahead else None,
        stats=getattr(shards, "stats", None), close=getattr(shards, "close", None),
        train_size=(lambda p: cfg.low_res_size if p < cfg.low_res_until else None) if cfg.low_res_size else None,
        meta={"classes": classes, "arch": cfg.arch, "image_size": list(image_size),
              "preset": preset.to_dict()},
    )


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, C, H, W), in [0, 1] units."""
    x = images.float().div_(255).transpose(0, 1).reshape(images.shape[1], -1)  # (C, N*H*W)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser(Config, "python -m jobs.augment", __doc__).parse_args(argv)


def validate(cfg: Config) -> None:
    """Fail fast, on the driver, on what the field declarations cannot check: combinations of
    fields, and the dataset itself (decoded and cached here, once)."""
    parse_aug_names(cfg.aug)
    if cfg.arch_reason:
        bias = f", whitening bias {'trained' if cfg.whiten_bias else 'frozen'}" if cfg.whiten else ""
        print(f"model: {cfg.arch}, batch {cfg.batch_size}, optimizer {cfg.optimizer}{bias} ({cfg.arch_reason}; "
              "--arch, --batch-size, --optimizer, --[no-]whiten-bias to choose)", flush=True)
    if cfg.whiten and not cfg.arch.startswith("fast_cifar_net"):
        raise UserError(f"--whiten needs a fast_cifar_net* model, not {cfg.arch} (pass --no-whiten)")
    if cfg.batch_size < cfg.num_workers:
        raise UserError(f"--batch-size {cfg.batch_size} is smaller than --num-workers {cfg.num_workers}")
    index = stream.file_index(cfg)
    size = (cfg.image_size, cfg.image_size) if cfg.image_size else None
    if index is not None and size is None:
        size = stream.first_image_size(FileSource(index.location), index)  # not an image: one line now
    stream.plan(cfg, index, size or (32, 32))
    if cfg.data_mode == "resident":
        data = load_image_data(cfg.data, cfg.data_root, cfg.image_size).subset(cfg.limit_train, cfg.limit_test)
        n_train, n_test = len(data.train_x), len(data.test_x)
    else:
        n_train, n_test = len(index.train), len(index.test)
    side = min(data.image_size if cfg.data_mode == "resident" else size or (32, 32))
    if cfg.low_res_size and not 16 <= cfg.low_res_size < side:
        raise UserError(f"--low-res-size {cfg.low_res_size} must be at least 16 and below the training images' "
                        f"side ({side} px)")
    if n_train < cfg.num_workers or n_test < 1:
        raise UserError(f"dataset {cfg.data} is too small ({n_train} train, {n_test} test images)")


def main(argv=None) -> int:
    _, summary, out = driver.run_from_cli("jobs.augment", argv)
    print(f"done: test acc {summary['test_acc']:.3f} after {summary['epochs']} epochs "
          f"({summary['steps']} steps, {summary['train_time_s']:.0f} s of training); "
          f"results in {out}/ (result.json, curves.png, model/, checkpoints)")
    return 0


if __name__ == "__main__":
    run_cli(main)
