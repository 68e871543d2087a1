"""Real-time style transfer (Johnson et al. 2016): train a feed-forward TransformerNet for ONE style.

The network learns to minimise, over many content images, the same objective that jobs.style
optimises per image (VGG-19 content + Gram style + TV losses, weights applied in
`jobs.style.weighted_losses`); afterwards a new image is stylized in one forward pass.
DDP on Ray Train through the project's one loop (`jobs.engine`, via `TrainSetup.step_loss`).

    python -m jobs.fast_style --style ../shared/data/autumn-oak.jpg --data ../shared/data/cifar10-jpeg.zip \\
        --image-size 64 --limit-train 2000 --epochs 2 --registry styles      # then: python -m serve --fast-styles styles
    python -m jobs.fast_style --style oak.jpg --data synthetic:64 --weights random --image-size 32   # offline smoke run

--data: an ImageFolder tree (train/ + test/: test/ is the validation set), a flat folder or .zip of
images (COCO's train2014/ in production; a small slice is held out for validation), cifar10 or
synthetic[:N]. Outputs under <storage-path>/<name>/: result.json, curves.png, previews/epoch-NNN.png
(validation images, stylized after each epoch), model/ (the servable style model), checkpoints.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from jobs import engine
from jobs.augmentations import horizontal_flip
from jobs.cli import UserError, config_from_args, init_ray, run_cli
from jobs.data import IMAGE_EXTENSIONS, ImageData, RankShards, _cached, _decode, load_image_data
from jobs.style import (IMAGENET_MEAN, IMAGENET_STD, StyleConfig, Targets, VGGFeatures, check_layers, gram,
                        load_image, load_vgg, weighted_losses)
from jobs.transformer_net import MIN_SIDE, TransformerNet, save_style_model, valid_style_name

RANDOM_WEIGHTS_WARNING = ("WARNING: --weights random: VGG-19 has RANDOM weights; the trained network does NOT "
                          "learn a real style. Use it only for tests and offline demos.")


@dataclass
class Config:
    """One style's training run. Losses, layers and weights default to jobs.style's (SPEC section 3);
    optimiser, batch and image size to Johnson et al. (Adam 1e-3, batch 4 per GPU, 256 px, 2 epochs of COCO)."""

    style: str = ""                # the style image (required)
    style_name: str = ""           # served under this name; "" -> the style file's stem
    data: str = ""                 # ImageFolder / flat folder or .zip of content images | cifar10 | synthetic[:N]
    data_root: str = "data"        # downloads and decoded-tensor cache
    image_size: int = 256          # content images: shorter side resized, then a centre-cropped square
    style_size: int = 256          # the style image's shorter side when its Gram targets are computed
    limit_train: int | None = None  # decode/use only the first N training images (each costs 3*size^2 bytes of RAM)
    limit_test: int | None = None
    content_layers: list[int] = field(default_factory=lambda: [25])
    style_layers: list[int] = field(default_factory=lambda: [0, 5, 10, 19, 28])
    content_weight: float = 1.0
    style_weight: float = 1e3
    tv_weight: float = 10.0
    weights: str = "imagenet"      # VGG-19: imagenet | random (tests only) | PATH
    epochs: int = 2
    batch_size: int = 8            # global, split over the workers
    lr: float = 1e-3               # Adam
    num_workers: int = 2
    cpus_per_worker: int = 1
    use_gpu: bool = False
    storage_path: str = "results"
    name: str = ""                 # run name; "" -> fast-style-<style name>
    seed: int = 0
    preview_count: int = 4         # validation images on each epoch's preview sheet
    registry: str = ""             # also publish the trained model as <registry>/<style name>/ (what serve reads)

    def __post_init__(self):
        self.content_layers = [int(i) for i in self.content_layers]
        self.style_layers = [int(i) for i in self.style_layers]
        if not self.style_name and self.style:
            self.style_name = "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(self.style).stem)
        if not self.name:
            self.name = f"fast-style-{self.style_name or 'style'}"

    def style_config(self) -> StyleConfig:
        """The loss settings as jobs.style's config: one definition of layers and weights."""
        return StyleConfig(content_layers=self.content_layers, style_layers=self.style_layers,
                           content_weight=self.content_weight, style_weight=self.style_weight,
                           tv_weight=self.tv_weight, weights=self.weights, seed=self.seed)


# ----------------------------------------------------------------------------- content images


def load_content_images(source: str, root: str, image_size: int, limit_train: int | None = None) -> ImageData:
    """Content images as uint8 (N, 3, S, S) tensors; `test_x` is the validation set.

    cifar10 and synthetic go through jobs.data as they are; ImageFolder trees too, with the shorter
    side resized to S and a centre crop (Johnson's preprocessing, jobs.data's fit="center"). Any other
    folder or .zip is a flat collection (COCO): every image, resized and cropped the same way, the last 2% (8..500, at most half) held out for validation; decoded once and cached.
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
            tx = np.stack([_decode(read(n), n, image_size, "center") for n in train_names])
            vx = np.stack([_decode(read(n), n, image_size, "center") for n in val_names])
            as_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
            return ImageData(as_t(tx), torch.zeros(len(tx), dtype=torch.long), as_t(vx),
                             torch.zeros(len(vx), dtype=torch.long), ["image"])

        # jobs.data's cache keys on the file, the size and the `fit` string: the flat layout and the
        # training limit go into that string, so these tensors never collide with an ImageFolder cache
        return _cached(path, Path(root), image_size, f"center-flat-{limit_train}", build)
    finally:
        close()


def _list_images(path: Path):
    """(sorted image names, read(name) -> bytes, close()) for a directory or a .zip."""
    if path.is_dir():
        names = sorted(str(p.relative_to(path)).replace(os.sep, "/") for p in path.rglob("*")
                       if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS))
        return names, lambda n: (path / n).read_bytes(), lambda: None
    if zipfile.is_zipfile(path):
        zf = zipfile.ZipFile(path)
        names = sorted(n for n in zf.namelist() if n.lower().endswith(IMAGE_EXTENSIONS) and "__MACOSX/" not in n)
        return names, zf.read, zf.close
    raise UserError(f"{path} is neither a directory nor a .zip archive")


def _is_image_folder(names: list[str]) -> bool:
    """True for an ImageFolder layout: images under .../train/<class>/ and .../test/<class>/."""
    def has(split):
        return any(f"/{split}/" in f"/{n}" and len(n.split(f"{split}/", 1)[1].split("/")) == 2 for n in names)
    return has("train") and has("test")


# ----------------------------------------------------------------------------- losses


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> VGG input: (x - ImageNet mean) / std, per channel."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def style_grams(extractor: VGGFeatures, style_img, size: int, scfg: StyleConfig, device) -> dict[int, torch.Tensor]:
    """The style image (PIL) with its shorter side at `size` -> {layer: Gram (1, C, C)}, no grad."""
    import torchvision.transforms.functional as TF

    img = TF.resize(style_img, size)
    x = normalize(TF.to_tensor(img).unsqueeze(0).to(device))
    layers = sorted(set(scfg.content_layers + scfg.style_layers))  # the same set as training: see VGGFeatures
    with torch.no_grad():
        feats = extractor(x, layers)
    return {i: gram(feats[i].float()) for i in scfg.style_layers}


def perceptual_step(model, extractor: VGGFeatures, grams: dict[int, torch.Tensor], scfg: StyleConfig,
                    x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One batch's loss: y = model(x); total = weighted_losses(VGG(y) vs VGG(x) and the style Grams).

    x (B, 3, H, W) in [0, 1]. Content targets are x's own features (no grad); the weights are applied
    in jobs.style.weighted_losses only. The losses run in fp32 even under fp16 autocast (a Gram's
    sum over H*W products overflows fp16). Returns (total, {"content", "style", "tv": sums over the batch}).
    """
    layers = sorted(set(scfg.content_layers + scfg.style_layers))
    y = model(x)                                          # (B, 3, H, W)
    y_n = normalize(y.float())
    feats_y = extractor(y_n, layers)
    with torch.no_grad():
        feats_x = extractor(normalize(x.float()), layers)
    with torch.autocast(x.device.type, enabled=False):
        feats_y = {i: f.float() for i, f in feats_y.items()}
        targets = Targets({i: feats_x[i].float() for i in scfg.content_layers}, grams)
        losses = weighted_losses(feats_y, y_n, targets, scfg)
    n = x.shape[0]
    return losses["total"], {k: losses[k].detach() * n for k in ("content", "style", "tv")}


# ----------------------------------------------------------------------------- the job


def build_setup(cfg: Config, device: torch.device, rank: int, world: int) -> engine.TrainSetup:
    """Content images resident as uint8; frozen VGG and the style's Gram targets built once per worker."""
    data = load_content_images(cfg.data, cfg.data_root, cfg.image_size, cfg.limit_train).subset(
        cfg.limit_train, cfg.limit_test)
    on_gpu = device.type == "cuda"
    shards = RankShards(data, rank, world, max(1, cfg.batch_size // world), device, cfg.seed)

    scfg = cfg.style_config()
    extractor = VGGFeatures(load_vgg(cfg.weights, cfg.seed), max(scfg.content_layers + scfg.style_layers)).to(device)
    if on_gpu:
        extractor = extractor.to(memory_format=torch.channels_last)
    grams = style_grams(extractor, load_image(cfg.style, name="style image"), cfg.style_size, scfg, device)

    def prepare(images, train, g):
        x = images.float().div_(255)  # (B, 3, S, S) in [0, 1]
        if train:
            x = horizontal_flip(x, g)  # the content target is the flipped image itself: always consistent
        return x.contiguous(memory_format=torch.channels_last) if on_gpu else x

    preview = shards.test_x[:cfg.preview_count].to(device)
    out_dir = engine.run_dir(cfg) / "previews"

    def after_epoch(model, epoch):
        write_preview(model, preview, out_dir / f"epoch-{epoch + 1:03d}.png")

    model = TransformerNet()
    return engine.TrainSetup(
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=cfg.lr),
        train_batches=shards.train_batches, test_batches=shards.test_batches, prepare=prepare,
        num_train=shards.num_train, steps_per_epoch=shards.steps_per_epoch,
        step_loss=lambda m, x, labels: perceptual_step(m, extractor, grams, scfg, x),
        metric_names=("content", "style", "tv"),
        after_epoch=after_epoch,
        meta={"kind": "fast_style", "style_name": cfg.style_name, "style": cfg.style, "image_size": cfg.image_size},
    )


@torch.no_grad()
def write_preview(model: TransformerNet, images: torch.Tensor, path: Path) -> None:
    """Sheet of validation images: top row the content (uint8 (N, 3, S, S)), bottom row stylized."""
    import torchvision

    if len(images) == 0:
        return
    model.eval()
    x = images.float() / 255
    y = model(x).float().clamp(0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(torch.cat([x, y]).cpu(), path, nrow=len(x), padding=2, pad_value=1.0)


def publish(model_dir: Path, registry: str, name: str) -> Path:
    """Copy a style model into `<registry>/<name>/`, replacing an older one by a rename (serve reads whole models)."""
    reg = Path(registry).expanduser()
    reg.mkdir(parents=True, exist_ok=True)
    tmp, dest, old = reg / f".{name}.tmp-{os.getpid()}", reg / name, reg / f".{name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def export_model(cfg: Config, summary: dict) -> Path:
    """The final checkpoint's weights -> <run>/model/ (a servable style model), and the registry if asked."""
    state = torch.load(Path(summary["checkpoint"]) / engine.CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    metrics = {k: v for k, v in summary.items() if k.startswith(("train_", "test_")) and isinstance(v, float)}
    info = {"style_image": os.path.basename(cfg.style), "image_size": cfg.image_size, "style_size": cfg.style_size,
            "weights": cfg.weights, "epochs": summary["epochs"], "metrics": metrics,
            "losses": {k: getattr(cfg, k) for k in ("content_layers", "style_layers", "content_weight",
                                                     "style_weight", "tv_weight")}}
    out = save_style_model(engine.run_dir(cfg) / "model", state["model"], cfg.style_name, info,
                           load_image(cfg.style, name="style image"))
    if cfg.registry:
        publish(out, cfg.registry, cfg.style_name)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.fast_style", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config
    p.add_argument("--config", help="JSON file of config fields; flags override it")
    p.add_argument("--style", help="the style image (required)")
    p.add_argument("--style-name", help="name it is served under (default: the style file's stem)")
    p.add_argument("--data", help="content images: an ImageFolder or flat folder/.zip of images, cifar10, or synthetic[:N] (required)")
    p.add_argument("--data-root", help=f"dataset downloads and decoded-tensor cache (default {d.data_root})")
    p.add_argument("--image-size", type=int, help=f"square training size of the content images (default {d.image_size})")
    p.add_argument("--style-size", type=int, help=f"shorter side of the style image for its Gram targets (default {d.style_size})")
    p.add_argument("--limit-train", type=int, help="use only N content images: the first N of a flat folder/zip, a fixed random N of an ImageFolder tree (RAM: N*3*size^2 bytes)")
    p.add_argument("--limit-test", type=int, help="use only N validation images (fixed random draw)")
    p.add_argument("--content-layers", nargs="+", type=int, help="VGG-19 features indices (default 25)")
    p.add_argument("--style-layers", nargs="+", type=int, help="VGG-19 features indices (default 0 5 10 19 28)")
    p.add_argument("--content-weight", type=float, help=f"content loss weight (default {d.content_weight:g})")
    p.add_argument("--style-weight", type=float, help=f"style loss weight (default {d.style_weight:g})")
    p.add_argument("--tv-weight", type=float, help=f"total-variation loss weight (default {d.tv_weight:g})")
    p.add_argument("--weights", help="VGG-19 weights: imagenet (torch hub cache), random (tests only) or a state-dict PATH (default imagenet)")
    p.add_argument("--epochs", type=int, help=f"epochs (default {d.epochs})")
    p.add_argument("--batch-size", type=int, help=f"global batch size, split over workers (default {d.batch_size})")
    p.add_argument("--lr", type=float, help=f"Adam learning rate (default {d.lr})")
    p.add_argument("--num-workers", type=int, help=f"Ray Train workers (DDP ranks) (default {d.num_workers})")
    p.add_argument("--cpus-per-worker", type=int, help=f"CPUs (and torch threads) per worker (default {d.cpus_per_worker})")
    p.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker, AMP (losses in fp32) and channels_last")
    p.add_argument("--storage-path", help=f"where runs are stored: <storage-path>/<name>/ (default {d.storage_path})")
    p.add_argument("--name", help="run name; re-running with the same name resumes it (default fast-style-<style name>)")
    p.add_argument("--seed", type=int, help=f"seed for init and shuffling (default {d.seed})")
    p.add_argument("--preview-count", type=int, help=f"validation images on each epoch's preview sheet (default {d.preview_count})")
    p.add_argument("--registry", help="also publish the model as REGISTRY/<style name>/, the directory `python -m serve --fast-styles` serves")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    return p.parse_args(argv)


def validate(cfg: Config) -> None:
    """Fail fast, on the driver, on inputs the workers would choke on."""
    if not cfg.style:
        raise UserError("--style IMAGE is required")
    if engine.is_uri(cfg.storage_path) or engine.is_uri(cfg.registry):
        raise UserError("jobs.fast_style needs filesystem paths for --storage-path and --registry (a shared "
                        "filesystem on a multi-node cluster); URIs are not supported yet")
    if not cfg.data:
        raise UserError("--data is required (a folder or .zip of content images, cifar10 or synthetic[:N])")
    load_image(cfg.style, name="style image")
    if not valid_style_name(cfg.style_name):
        raise UserError(f"--style-name {cfg.style_name!r}: use letters, digits, '-', '_' or '.' (at most 64)")
    for f in ("epochs", "batch_size", "num_workers", "cpus_per_worker", "style_size"):
        if getattr(cfg, f) < 1:
            raise UserError(f"--{f.replace('_', '-')} must be at least 1")
    if cfg.image_size < max(MIN_SIDE, 16):
        raise UserError("--image-size must be at least 16")
    if cfg.lr <= 0:
        raise UserError("--lr must be positive")
    if cfg.batch_size < cfg.num_workers:
        raise UserError(f"--batch-size {cfg.batch_size} is smaller than --num-workers {cfg.num_workers}")
    if cfg.preview_count < 0:
        raise UserError("--preview-count must be >= 0")
    check_layers(cfg.content_layers, "content")
    check_layers(cfg.style_layers, "style")
    cfg.style_config().validate()
    load_vgg(cfg.weights, cfg.seed)  # imagenet weights missing offline -> one line now, not on every worker
    # decode (and cache) the content images on the driver: a bad dataset fails here with one line
    data = load_content_images(cfg.data, cfg.data_root, cfg.image_size, cfg.limit_train)
    n = len(data.train_x[:cfg.limit_train])
    if n < cfg.num_workers or len(data.test_x) < 1:
        raise UserError(f"{cfg.data}: too few content images ({n} train, {len(data.test_x)} validation)")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_from_args(Config, args, args.config)
    except TypeError as e:
        raise UserError(f"bad config: {e}") from None
    validate(cfg)
    # the workers write the preview sheets into the run directory and do not run in this directory
    cfg = dataclasses.replace(cfg, storage_path=str(engine.run_dir(cfg).parent))
    engine.check_storage(cfg)
    print("config:", dataclasses.asdict(cfg), flush=True)
    if cfg.weights == "random":
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr, flush=True)
    init_ray(args.address)
    summary = engine.fit("jobs.fast_style", cfg)
    model_dir = export_model(cfg, summary)
    out = engine.run_dir(cfg)
    where = f"; published to {Path(cfg.registry) / cfg.style_name}/" if cfg.registry else ""
    print(f"done: validation loss {summary['test_loss']:.4g} after {summary['epochs']} epochs; results in {out}/ "
          f"(result.json, curves.png, previews/, model/ = {model_dir.name}/){where}")
    return 0


if __name__ == "__main__":
    run_cli(main)
