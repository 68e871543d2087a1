"""Fine-tuning (reference recipe: hot dog, ImageNet ResNet-18, SGD, wd 1e-3, batch 128, 5 epochs,
the new head at 10x the base lr) on any ImageFolder set, data-parallel on Ray Train.

    python -m jobs.finetune                                        # hot dog from ImageNet weights
    python -m jobs.finetune --mode scratch                         # the baseline: same net, random init
    python -m jobs.finetune --data cats-dogs.zip --weights results/augment-cifar10-flip

Images are decoded once into a uint8 cache at the preset's resize size (shorter side resized,
centre-cropped square); RandomResizedCrop + flip (train) and CenterCrop (test) then run batched
on the training device (`Preset.train_batch` / `Preset.eval_batch`), so an epoch decodes no JPEG.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
import torch
from torch import nn

from jobs.cli import UserError, run_cli
from jobs import driver
from jobs.budget import BudgetOptions
from jobs.config import RunOptions, build_parser, option
from jobs import stream
from jobs.data import DOWNLOADS, RankShards, load_image_data
from jobs.sources import FileSource
from jobs.loop import CHECKPOINT_FILE, TrainSetup
from jobs.models import HEADS, build_model
from jobs.presets import Preset, scaled_resize

# default base lr per mode. The references sum the loss over the batch (PyTorch: lr 5e-5 / 5e-4 with
# l.sum()) or normalise by it (MXNet: 0.01 / 0.1); with our mean loss the MXNet numbers are the ones.
DEFAULT_LR = {"finetune": 0.01, "scratch": 0.1}


@dataclass
class Config(BudgetOptions, stream.DataOptions, RunOptions):
    """The fine-tuning job; defaults are the reference recipe (SPEC section 2)."""

    data: str = option("hotdog", f"{', '.join(DOWNLOADS)} (downloads, sha1-checked) or an ImageFolder directory, .zip "
                       "or URI prefix (s3://, gs://, file://) with train/<class>/ and test/<class>/")
    data_root: str = option("data", "where datasets are downloaded and decoded tensors cached")
    weights: str = option("imagenet", "imagenet (torchvision, via the torch hub cache), none (random init), or PATH: "
                          "a state dict, a checkpoint.pt, or a jobs.augment/jobs.finetune run, checkpoint or model/ "
                          "directory")
    mode: str = option("finetune", "finetune: load --weights, new head at --head-lr-mult x lr; scratch: the same "
                       "architecture and preprocessing, random init, one parameter group",
                       choices=("finetune", "scratch"))
    freeze_backbone: bool = option(False, "train the new head only")
    image_size: int | None = option(None, "crop size fed to the model; the resize keeps the 256/224 ratio", min=8,
                                    default_text="224 for ImageNet weights, else the source checkpoint's")
    min_crop_scale: float = option(0.08, "smallest area fraction of RandomResizedCrop", above=0, max=1)
    epochs: int = option(5, "epochs, unless --time-budget is given", min=1)
    batch_size: int = option(128, "global batch size, split over workers", min=1)
    lr: float | None = option(None, "SGD base learning rate", above=0,
                              default_text=f"{DEFAULT_LR['finetune']} finetune, {DEFAULT_LR['scratch']} scratch")
    head_lr_mult: float = option(10.0, "the new head's lr multiplier", above=0)
    weight_decay: float = option(1e-3, "SGD weight decay", min=0)
    momentum: float = option(0.0, "SGD momentum (the reference uses plain SGD)", min=0, max=1)
    name: str = option("", "run name; re-running with the same name resumes it", default_text="finetune-<data>-<mode>")

    def __post_init__(self):
        if self.lr is None:
            self.lr = DEFAULT_LR.get(self.mode, DEFAULT_LR["finetune"])
        if not self.name:
            stem = self.data.rstrip("/").split("/")[-1].removesuffix(".zip")
            self.name = f"finetune-{stem}-{self.mode}"


# ----------------------------------------------------------------------------- weights

@dataclass
class Source:
    """Where the backbone comes from: architecture, weights (None: random init) and preprocessing."""

    arch: str
    state: dict[str, torch.Tensor] | None
    preset: Preset
    origin: str  # for messages: "ImageNet (resnet18-f37072fd.pth)", a path, or "random init"


def imagenet_state_dict() -> dict[str, torch.Tensor]:
    """torchvision's ResNet18_Weights.IMAGENET1K_V1 through the torch hub cache ($TORCH_HOME/hub/checkpoints):
    a pre-seeded cache works offline, a connected machine downloads (and hash-checks) it once."""
    import socket
    from urllib.parse import urlparse

    from torchvision.models import ResNet18_Weights

    weights = ResNet18_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)  # torch.hub's urlopen has no timeout: a silent network must not hang us
    try:
        return weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except OSError as e:  # URLError, refused, timed out
        reason = getattr(e, "reason", None) or e.strerror or e
        raise UserError(f"cannot download the ImageNet weights {weights.url} ({reason}); without internet, put the "
                        f"file at {cached} (or point TORCH_HOME at a directory holding hub/checkpoints/{cached.name})") from None
    except RuntimeError as e:  # a bad hash on download, or a cached file that is not a state dict
        raise UserError(f"cannot load the ImageNet weights from {cached}: {str(e).splitlines()[0]}") from None
    finally:
        socket.setdefaulttimeout(previous)


def resolve_weights_path(path: str) -> Path:
    """The file behind --weights PATH. A file is used as is; a directory resolves, in this order, to
    its checkpoint.pt (a checkpoint dir), its weights.pt (an artifact dir), model/weights.pt (a
    finished run dir), or the newest checkpoint_*/checkpoint.pt (an unfinished run dir)."""
    from jobs.artifact import MANIFEST, WEIGHTS

    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        for candidate in (p / CHECKPOINT_FILE, p / MANIFEST, p / "model" / MANIFEST):
            if candidate.is_file():
                return candidate.with_name(WEIGHTS) if candidate.name == MANIFEST else candidate
        checkpoints = sorted(p.glob(f"checkpoint_*/{CHECKPOINT_FILE}"), key=lambda f: f.stat().st_mtime)
        if checkpoints:
            return checkpoints[-1]
        raise UserError(f"no weights in {path}: expected checkpoint.pt, an artifact (artifact.json + weights.pt), "
                        f"model/, or checkpoint_*/ inside it")
    raise UserError(f"weights not found: {path} (expected imagenet, none, a state-dict file, or a "
                    f"checkpoint, run or artifact directory)")


def load_source(weights: str, image_size: int | None = None, load: bool = True) -> Source:
    """Resolve --weights into a Source; `load=False` reads only architecture and preset (scratch mode).

    The preset comes from the source: ImageNet weights get the reference's 256 -> 224 ImageNet
    preset; a jobs.augment checkpoint or artifact keeps its own (CIFAR: 32 px, no normalisation);
    a bare state dict gets the ImageNet statistics at its architecture's native size.
    `image_size` replaces the crop size, keeping the preset's resize/crop ratio (see `scaled_resize`).
    """
    from jobs.artifact import MANIFEST

    if weights in ("imagenet", "none"):
        state = imagenet_state_dict() if weights == "imagenet" and load else None
        origin = "ImageNet (torchvision ResNet18_Weights.IMAGENET1K_V1)" if weights == "imagenet" else "random init"
        source = Source("resnet18", state, Preset.imagenet(), origin)
    else:
        file = resolve_weights_path(weights)
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
            raise UserError(f"cannot load weights {file}: {str(e).splitlines()[0]}") from None
        manifest = file.with_name(MANIFEST)
        if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("meta"), dict):
            meta = obj["meta"]  # a checkpoint written by jobs.loop (jobs.augment, jobs.finetune)
            if "arch" not in meta or "preset" not in meta:
                raise UserError(f"{file} is a checkpoint of a job without a classifier (no arch/preset in its meta)")
            source = Source(meta["arch"], obj["model"], Preset.from_dict(meta["preset"]), str(file))
        elif manifest.is_file() and file.name == "weights.pt":
            m = json.loads(manifest.read_text())
            source = Source(m["arch"], obj, Preset.from_dict(m["preset"]), str(file))
        elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            state = _strip_prefix(obj, "module.")  # saved from a DDP-wrapped model
            arch = _guess_arch(state, file)
            source = Source(arch, state, Preset.imagenet(224 if arch == "resnet18" else 32), str(file))
        else:
            raise UserError(f"{file} is neither a state dict nor a checkpoint written by jobs.augment/jobs.finetune")
        if not load:
            source.state = None
    if image_size:
        p = source.preset
        source.preset = Preset(scaled_resize(image_size, p.resize / p.crop), image_size, p.mean, p.std)
    return source


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _guess_arch(state: dict[str, torch.Tensor], file: Path) -> str:
    """A bare ResNet-18 state dict: the stem tells which (7x7 ImageNet stem or 3x3 CIFAR stem)."""
    stem = state.get("conv1.weight")
    if stem is not None and tuple(stem.shape) == (64, 3, 7, 7):
        return "resnet18"
    if stem is not None and tuple(stem.shape) == (64, 3, 3, 3):
        return "cifar_resnet18"
    raise UserError(f"{file} is not a ResNet-18 state dict: first bad key conv1.weight "
                    f"({'missing' if stem is None else f'shape {tuple(stem.shape)}'}, expected (64, 3, 7, 7) or (64, 3, 3, 3))")


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor], origin: str, head: str = "fc") -> None:
    """Copy every tensor of `state` into `model` except the head (attribute `head`), which stays new.

    Every non-head tensor must exist on both sides with the same shape; the first one that does
    not is named in the error (a different architecture, or a file of another model).
    """
    mine = {k: v for k, v in model.state_dict().items() if not k.startswith(head + ".")}
    theirs = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    for key, want in mine.items():
        if key not in theirs:
            raise UserError(f"weights {origin} do not fit the model: first bad key {key} (missing)")
        if tuple(theirs[key].shape) != tuple(want.shape):
            raise UserError(f"weights {origin} do not fit the model: first bad key {key} "
                            f"(shape {tuple(theirs[key].shape)}, the model needs {tuple(want.shape)})")
    extra = [k for k in theirs if k not in mine]
    if extra:
        raise UserError(f"weights {origin} do not fit the model: first bad key {extra[0]} (unexpected)")
    missing, _ = model.load_state_dict(theirs, strict=False)
    assert all(k.startswith(head + ".") for k in missing), missing


def build_classifier(cfg: Config, source: Source, num_classes: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model with a new Xavier-uniform head for `num_classes`, and its SGD optimizer.

    finetune: backbone from `source.state` at lr, head at lr * head_lr_mult (two parameter groups);
    with freeze_backbone only the head trains. scratch: random init, one group at lr.
    """
    model = build_model(source.arch, num_classes)  # Xavier-uniform everywhere, the head included
    head = getattr(model, HEADS[source.arch])
    head_ids = {id(p) for p in head.parameters()}
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    if cfg.mode == "scratch":
        groups = [{"params": list(model.parameters()), "lr": cfg.lr, "name": "all"}]
    else:
        if source.state is not None:
            load_backbone(model, source.state, source.origin, HEADS[source.arch])
        groups = [{"params": list(head.parameters()), "lr": cfg.lr * cfg.head_lr_mult, "name": "head"}]
        if cfg.freeze_backbone:
            freeze(model, head_ids)
        else:
            groups.insert(0, {"params": backbone, "lr": cfg.lr, "name": "backbone"})
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return model, optimizer


def freeze(model: nn.Module, keep: set[int]) -> None:
    """Stop training every parameter not in `keep` (ids), and keep BatchNorm statistics fixed too:
    a hook puts each BatchNorm in eval mode before its forward, whatever model.train() said."""
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.register_forward_pre_hook(_stay_in_eval)


def _stay_in_eval(module: nn.Module, args) -> None:
    module.train(False)  # returns None: a pre-hook's non-None return would replace the input


# ----------------------------------------------------------------------------- on each worker

def build_setup(cfg: Config, device: torch.device, rank: int, world: int) -> TrainSetup:
    """uint8 images at the preset's resize size, resident on the device (cached once) or streamed
    through Ray Data (--data-mode); crops and flips batched on the device."""
    source = load_source(cfg.weights, cfg.image_size, load=cfg.mode == "finetune")
    preset = source.preset
    if cfg.data_mode == "stream":
        data = stream.file_index(cfg)
        shards = stream.StreamShards.for_job(cfg, data, rank, world, cfg.batch_size // world, device,
                                             preset.resize, "center")
    else:
        data = load_image_data(cfg.data, cfg.data_root, preset.resize, fit="center")
        shards = RankShards(data, rank, world, cfg.batch_size // world, device, cfg.seed)
    on_gpu = device.type == "cuda"
    scale = (cfg.min_crop_scale, 1.0)

    def prepare(images, train, g):
        x = preset.train_batch(images, g, scale) if train else preset.eval_batch(images)
        return x.contiguous(memory_format=torch.channels_last) if on_gpu else x

    model, optimizer = build_classifier(cfg, source, len(data.classes))
    if rank == 0:
        groups = ", ".join(f"{g['name']} lr {g['lr']:g}" for g in optimizer.param_groups)
        print(f"{source.arch} from {source.origin if cfg.mode == 'finetune' else 'random init'}; {groups}; "
              f"preset {preset.to_dict()}", flush=True)
    return TrainSetup(
        model=model, optimizer=optimizer,
        train_batches=shards.train_batches, test_batches=shards.test_batches, steps_per_epoch=shards.steps_per_epoch,
        prepare=prepare,  # task: classification, the default
        stats=getattr(shards, "stats", None), close=getattr(shards, "close", None),
        meta={"classes": data.classes, "arch": source.arch, "image_size": [preset.crop, preset.crop],
              "preset": preset.to_dict(), "weights": source.origin if cfg.mode == "finetune" else "random init"},
    )


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None) -> argparse.Namespace:
    return build_parser(Config, "python -m jobs.finetune", __doc__).parse_args(argv)


def validate(cfg: Config) -> Source:
    """Fail fast, on the driver, on what the field declarations cannot check: combinations of fields,
    the weights (fetched and matched against the model) and the dataset (decoded and cached here, once)."""
    if cfg.batch_size < cfg.num_workers:
        raise UserError(f"--batch-size {cfg.batch_size} is smaller than --num-workers {cfg.num_workers}")
    if cfg.mode == "finetune" and cfg.weights == "none":
        raise UserError("--weights none leaves nothing to fine-tune: use --mode scratch")
    if cfg.mode == "scratch" and cfg.freeze_backbone:
        raise UserError("--freeze-backbone needs --mode finetune (a random backbone would stay random)")
    source = load_source(cfg.weights, cfg.image_size, load=cfg.mode == "finetune")
    resize = source.preset.resize
    index = stream.file_index(cfg)
    stream.plan(cfg, index, (resize, resize))
    if cfg.data_mode == "resident":
        data = load_image_data(cfg.data, cfg.data_root, resize, fit="center")
        n_train, n_test, classes = len(data.train_x), len(data.test_x), data.classes
    else:
        stream.first_image_size(FileSource(index.location), index)  # not an image: one line now
        n_train, n_test, classes = len(index.train), len(index.test), index.classes
    if n_train < cfg.num_workers or n_test < 1:
        raise UserError(f"dataset {cfg.data} is too small ({n_train} train, {n_test} test images)")
    build_classifier(cfg, source, len(classes))  # a mismatching checkpoint fails here, naming the key
    return source


def main(argv=None) -> int:
    _, summary, out = driver.run_from_cli("jobs.finetune", argv)
    print(f"done: test acc {summary['test_acc']:.3f} after {summary['epochs']} epochs; "
          f"results in {out}/ (result.json, curves.png, model/, checkpoints)")
    return 0


if __name__ == "__main__":
    run_cli(main)
