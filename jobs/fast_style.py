"""Real-time style transfer (Johnson et al. 2016): train a feed-forward TransformerNet for ONE style.

The network learns to minimise, over many content images, the same objective that jobs.style
optimises per image (VGG-19 content + Gram style + TV losses, weights applied in
`jobs.style.weighted_losses`); afterwards a new image is stylized in one forward pass.
DDP on Ray Train through the project's one loop (`jobs.loop`, with `PerceptualTask` as its task).

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
from dataclasses import dataclass
from pathlib import Path

import torch

from jobs.transforms import horizontal_flip
from jobs.cli import UserError, run_cli
from jobs import driver, fastconv, stream
from jobs.budget import BudgetOptions
from jobs.config import RunOptions, build_parser, option
from jobs.paths import is_uri, storage_dir
from jobs.data import RankShards, load_content_images
from jobs.images import IMAGENET_MEAN, IMAGENET_STD, load_image
from jobs.loop import CHECKPOINT_FILE, TrainSetup
from jobs.style import StyleConfig, StyleLosses, Targets, gram, weighted_losses
from jobs.vgg import RANDOM_WEIGHTS_WARNING, VGGFeatures, load_vgg
from jobs.transformer_net import MIN_SIDE, TransformerNet, save_style_model, valid_style_name

@dataclass
class Config(StyleLosses, BudgetOptions, stream.DataOptions, RunOptions):
    """One style's training run. Losses, layers and weights are jobs.style's (`StyleLosses`, SPEC section 3);
    optimiser, batch and image size follow Johnson et al. (Adam 1e-3, batch 4 per GPU, 256 px, 2 epochs of COCO)."""

    style: str = option("", "the style image (required)", metavar="IMAGE")
    style_name: str = option("", "name it is served under", default_text="the style file's stem")
    data: str = option("", "content images: an ImageFolder or flat folder/.zip of images, cifar10, or synthetic[:N] "
                       "(required)")
    data_root: str = option("data", "dataset downloads and decoded-tensor cache")
    image_size: int = option(256, "square training size of the content images", min=max(MIN_SIDE, 16))
    style_size: int = option(256, "shorter side of the style image for its Gram targets", min=1)
    limit_train: int | None = option(None, "use only N content images: the first N of a flat folder/zip, a fixed "
                                     "random N of an ImageFolder tree (RAM: N*3*size^2 bytes)", min=1,
                                     default_text="all")
    limit_test: int | None = option(None, "use only N validation images (fixed random draw)", min=1,
                                    default_text="all")
    epochs: int = option(2, "epochs, unless --time-budget is given", min=1)
    batch_size: int = option(8, "global batch size, split over workers", min=1)
    lr: float = option(1e-3, "Adam learning rate", above=0)
    winograd: bool = option(True, "fp32 on a CPU: the network's and the VGG's stride-1 convolutions through "
                            "NNPACK's Winograd/FFT kernels (jobs.fastconv; the same math up to float rounding, "
                            "~1.7-2x the training step on a 2-core AVX2 CPU)")
    preview_count: int = option(4, "validation images on each epoch's preview sheet", min=0)
    registry: str = option("", "also publish the model as REGISTRY/<style name>/, the directory "
                           "`python -m serve --fast-styles` serves", default_text="none")
    name: str = option("", "run name; re-running with the same name resumes it",
                       default_text="fast-style-<style name>")

    def __post_init__(self):
        super().__post_init__()
        if not self.style_name and self.style:
            self.style_name = "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(self.style).stem)
        if not self.name:
            self.name = f"fast-style-{self.style_name or 'style'}"

    def style_config(self) -> StyleConfig:
        """The loss settings as jobs.style's config: one definition of layers and weights."""
        losses = {f.name: getattr(self, f.name) for f in dataclasses.fields(StyleLosses)}
        return StyleConfig(**losses, seed=self.seed)


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


class PerceptualTask:
    """The fast-style job's task for the loop: `perceptual_step`'s loss in training and evaluation alike,
    reported as its content/style/tv means; after each epoch (rank 0) a preview sheet of validation
    images, stylized by the epoch's weights, in <run>/previews/epoch-NNN.png."""

    metrics = ("content", "style", "tv")

    def __init__(self, extractor: VGGFeatures, grams: dict[int, torch.Tensor], scfg: StyleConfig,
                 preview: torch.Tensor, preview_dir: Path):
        self.extractor, self.grams, self.scfg = extractor, grams, scfg
        self.preview, self.preview_dir = preview, preview_dir

    def loss(self, model, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x (B, 3, S, S) in [0, 1]; the labels are unused (content images have none)."""
        return perceptual_step(model, self.extractor, self.grams, self.scfg, x)

    def evaluate(self, model, x: torch.Tensor, labels: torch.Tensor, final: bool = False):
        """The training loss, on test images (the same for the last evaluation)."""
        return self.loss(model, x, labels)

    def after_epoch(self, model, epoch: int) -> None:
        write_preview(model, self.preview, self.preview_dir / f"epoch-{epoch + 1:03d}.png")


def build_setup(cfg: Config, device: torch.device, rank: int, world: int) -> TrainSetup:
    """Content images resident as uint8 or streamed (--data-mode); frozen VGG and the style's Gram
    targets built once per worker."""
    batch = max(1, cfg.batch_size // world)
    if cfg.data_mode == "stream":
        shards = stream.StreamShards.for_job(cfg, stream.file_index(cfg, content=True), rank, world, batch, device,
                                             cfg.image_size, "center")
        preview = shards.sample(cfg.preview_count, "test") if cfg.preview_count else torch.zeros(0, 3, 1, 1)
    else:
        data = load_content_images(cfg.data, cfg.data_root, cfg.image_size, cfg.limit_train).subset(
            cfg.limit_train, cfg.limit_test)
        shards = RankShards(data, rank, world, batch, device, cfg.seed)
        preview = shards.test_x[:cfg.preview_count]
    on_gpu = device.type == "cuda"

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

    preview = preview.to(device)
    model = TransformerNet()
    if cfg.winograd and not on_gpu:  # converted layers run PyTorch's kernels under bf16/fp16 autocast
        fastconv.winograd_convs(model)
        fastconv.winograd_convs(extractor)
    return TrainSetup(
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=cfg.lr),
        train_batches=shards.train_batches, test_batches=shards.test_batches, steps_per_epoch=shards.steps_per_epoch,
        prepare=prepare,
        task=PerceptualTask(extractor, grams, scfg, preview, storage_dir(cfg.storage_path, cfg.name) / "previews"),
        stats=getattr(shards, "stats", None), close=getattr(shards, "close", None),
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
    state = torch.load(Path(summary["checkpoint"]) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    metrics = {k: v for k, v in summary.items() if k.startswith(("train_", "test_")) and isinstance(v, float)}
    info = {"style_image": os.path.basename(cfg.style), "image_size": cfg.image_size, "style_size": cfg.style_size,
            "weights": cfg.weights, "epochs": summary["epochs"], "metrics": metrics,
            "losses": {k: getattr(cfg, k) for k in ("content_layers", "style_layers", "content_weight",
                                                     "style_weight", "tv_weight")}}
    out = save_style_model(storage_dir(cfg.storage_path, cfg.name) / "model", state["model"], cfg.style_name, info,
                           load_image(cfg.style, name="style image"))
    if cfg.registry:
        publish(out, cfg.registry, cfg.style_name)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser(Config, "python -m jobs.fast_style", __doc__).parse_args(argv)


def validate(cfg: Config) -> None:
    """Fail fast, on the driver, on what the field declarations cannot check: required inputs, the
    style image, the VGG weights and the content images (decoded and cached here, once)."""
    if not cfg.style:
        raise UserError("--style IMAGE is required")
    if is_uri(cfg.storage_path) or is_uri(cfg.registry):
        raise UserError("jobs.fast_style needs filesystem paths for --storage-path and --registry (a shared "
                        "filesystem on a multi-node cluster); URIs are not supported yet")
    if not cfg.data:
        raise UserError("--data is required (a folder or .zip of content images, cifar10 or synthetic[:N])")
    load_image(cfg.style, name="style image")
    if not valid_style_name(cfg.style_name):
        raise UserError(f"--style-name {cfg.style_name!r}: use letters, digits, '-', '_' or '.' (at most 64)")
    if cfg.batch_size < cfg.num_workers:
        raise UserError(f"--batch-size {cfg.batch_size} is smaller than --num-workers {cfg.num_workers}")
    cfg.style_config().validate()
    load_vgg(cfg.weights, cfg.seed)  # imagenet weights missing offline -> one line now, not on every worker
    if cfg.weights == "random":
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr, flush=True)
    index = stream.file_index(cfg, content=True)
    stream.plan(cfg, index, (cfg.image_size, cfg.image_size))
    if cfg.data_mode == "resident":
        data = load_content_images(cfg.data, cfg.data_root, cfg.image_size, cfg.limit_train).subset(
            cfg.limit_train, cfg.limit_test)
        n, n_val = len(data.train_x), len(data.test_x)
    else:
        n, n_val = len(index.train), len(index.test)
    if n < cfg.num_workers or n_val < 1:
        raise UserError(f"{cfg.data}: too few content images ({n} train, {n_val} validation)")


def main(argv=None) -> int:
    cfg, summary, out = driver.run_from_cli("jobs.fast_style", argv)
    model_dir = export_model(cfg, summary)
    where = f"; published to {Path(cfg.registry) / cfg.style_name}/" if cfg.registry else ""
    print(f"done: validation loss {summary['test_loss']:.4g} after {summary['epochs']} epochs; results in {out}/ "
          f"(result.json, curves.png, previews/, model/ = {model_dir.name}/){where}")
    return 0


if __name__ == "__main__":
    run_cli(main)
