"""Neural style transfer (Gatys et al. 2016) over VGG-19 `features`: the core library.

Plain PyTorch, no Ray. The CLI and the Ray batch job live in `jobs/style_cli.py`
(`python -m jobs.style` runs it); a Serve pool or a Tune sweep imports this module:

    extractor = build_extractor(cfg)                 # load VGG once per process
    image, history = stylize(content_img, style_img, cfg, extractor=extractor)
    distances(image, content_img, style_img, extractor, size=cfg.size)   # unweighted, for sweeps

Sections: configuration, input images, VGG features, losses, optimisation. Decoding images with
their limits is `jobs.images`'s job; the precision rule is `jobs.precision`'s (workload "gatys").
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

from jobs.cli import UserError
from jobs import fastconv
from jobs.config import check_options, option
from jobs.images import IMAGENET_MEAN, IMAGENET_STD, MAX_PIXELS, load_image
from jobs.precision import autocast_dtype, dtype_name
from jobs.vgg import VGGFeatures, check_layers, load_vgg

# ----------------------------------------------------------------------------- configuration

@dataclass
class StyleLosses:
    """The perceptual objective (SPEC section 3): which VGG-19 layers, how each loss is weighted, which
    weights. Shared by per-image optimisation (`StyleConfig`) and feed-forward training (jobs.fast_style)."""

    content_layers: list[int] = option([25], "VGG-19 features indices of the content loss (conv4_4)")
    style_layers: list[int] = option([0, 5, 10, 19, 28], "VGG-19 features indices of the style loss (convN_1)")
    content_weight: float = option(1.0, "content loss weight", min=0)
    style_weight: float = option(1e3, "style loss weight", min=0)
    tv_weight: float = option(10.0, "total-variation loss weight", min=0)
    weights: str = option("imagenet", "VGG-19 weights: imagenet (torch hub cache), random (tests and offline demos "
                          "only) or a state-dict PATH")

    def __post_init__(self):
        self.content_layers = [int(i) for i in self.content_layers]
        self.style_layers = [int(i) for i in self.style_layers]


@dataclass
class StyleConfig(StyleLosses):
    """One style-transfer run. Defaults are the reference recipe (SPEC.md section 3)."""

    # not fields (no annotation): limits `validate` applies
    MAX_SCALES = 4  # coarse-to-fine passes
    MAX_LAYERS = 16  # per loss (content, style)
    VGG19_POOLS = (4, 9, 18, 27, 36)  # max-pool indices of VGG-19 `features`

    size: list[int] = option([300, 450], "working size H W of the last scale", min=1, metavar="N")
    scales: list[float] = option([1.0], "coarse-to-fine fractions of --size, e.g. 0.5 1", above=0, max=1)
    steps: int = option(500, "per scale: Adam steps, or L-BFGS loss evaluations (at most)", min=0)
    optimizer: str = option("adam", "adam (+StepLR) or lbfgs", choices=("adam", "lbfgs"))
    lr: float = option(0.3, "Adam learning rate", min=0)
    lr_decay_steps: int = option(50, "StepLR step size (Adam)", min=1)
    lr_gamma: float = option(0.8, "StepLR factor (Adam)", above=0, max=1)
    lbfgs_lr: float = option(1.0, "L-BFGS step scale (it scales its steps by its curvature estimate)", above=0)
    lbfgs_history: int = option(100, "L-BFGS history size", min=1, max=1000)
    init: str = option("content", "start image", choices=("content", "noise"))
    seed: int = option(0, "seed for noise init and random weights", min=0, max=2**63 - 1)
    device: str = option("cpu", "cpu, cuda, cuda:N or auto (single mode)")
    channels_last: bool = option(True, "channels_last VGG (same math, faster convolutions) where --winograd does not run")
    winograd: bool = option(True, "fp32 on a CPU, working sizes from 96x96: the VGG's stride-1 convolutions through "
                            "NNPACK's Winograd/FFT kernels (same math up to float rounding, fewer multiplies; the "
                            "VGG runs NCHW then)")
    precision: str = option("auto", "VGG arithmetic (losses are fp32): auto = bf16 where it is native (a CPU with "
                            "AVX-512 BF16 or AMX, a GPU with bf16), else fp32", choices=("auto", "fp32", "bf16"))
    max_pixels: int = option(MAX_PIXELS, "refuse input images and working sizes with more pixels", min=1)

    def __post_init__(self):
        super().__post_init__()
        self.size = [int(v) for v in self.size]
        self.scales = [float(s) for s in self.scales]

    def validate(self) -> "StyleConfig":
        """Raise `UserError` (one line) for any value a run cannot use; return self. Types and ranges
        come from the field declarations; the rest relate fields to each other."""
        check_options(self, names="fields")
        if len(self.size) != 2:
            raise UserError(f"size must be two positive numbers H W, got {self.size}")
        if self.size[0] * self.size[1] > self.max_pixels:
            raise UserError(f"size {self.size[0]}x{self.size[1]} is over the pixel limit {self.max_pixels}")
        if not self.scales:
            raise UserError(f"scales must be fractions in (0, 1], got {self.scales}")
        if len(self.scales) > self.MAX_SCALES:
            raise UserError(f"scales has {len(self.scales)} entries; at most {self.MAX_SCALES}")
        if len(set(self.scales)) != len(self.scales):
            raise UserError(f"scales must not repeat a value, got {self.scales}")
        for what, layers in (("content", self.content_layers), ("style", self.style_layers)):
            check_layers(layers, what)
            if len(layers) > self.MAX_LAYERS:
                raise UserError(f"{what}_layers has {len(layers)} entries; at most {self.MAX_LAYERS}")
            if len(set(layers)) != len(layers):
                raise UserError(f"{what}_layers must not repeat a layer, got {layers}")
        # each max pool up to the deepest layer halves the image, and the TV loss needs 2 pixels a side
        deepest = max(self.content_layers + self.style_layers)
        min_side = max(2, 2 ** sum(1 for p in self.VGG19_POOLS if p <= deepest))
        for s in self.scales:
            side = min(max(1, round(v * s)) for v in self.size)  # as stylize sizes each scale
            if side < min_side:
                raise UserError(f"size {self.size} at scale {s:g} has a side of {side} pixels; VGG-19 up to layer "
                                f"{deepest} needs at least {min_side}")
        return self


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available else cpu; refuse cuda on a machine without it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r} (use cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name} asked for but CUDA is not available here")
    return dev


# ----------------------------------------------------------------------------- input images


def preprocess(img: Image.Image, size: Sequence[int]) -> torch.Tensor:
    """PIL RGB -> (1, 3, H, W) float tensor: resize to `size`=(H, W), ToTensor, ImageNet normalize."""
    t = torchvision.transforms.Compose([
        torchvision.transforms.Resize(tuple(size)),
        torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    return t(img).unsqueeze(0)


def postprocess(x: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) normalized tensor -> PIL RGB: invert the normalization, clamp to [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    img = (x[0].detach().float().cpu() * std + mean).clamp(0, 1)
    return torchvision.transforms.functional.to_pil_image(img)


# ----------------------------------------------------------------------------- VGG features

# the smallest working scale (H x W pixels) from which the VGG runs Winograd convolutions: they need NCHW,
# and below ~64x64 PyTorch's channels_last kernels were faster (1 thread, per step: 16 px 56 vs 76 ms,
# 32 px 89 vs 97-138 ms, 64 px 224-329 vs 237-280 ms, 96 px 460-470 vs 341-381 ms, 128 px 1.1-1.3 vs 0.6 s)
WINOGRAD_MIN_PIXELS = 96 * 96


def winograd_wanted(cfg: StyleConfig) -> bool:
    """`cfg.winograd`, and a smallest working scale of at least WINOGRAD_MIN_PIXELS."""
    return cfg.winograd and min(cfg.scales) ** 2 * cfg.size[0] * cfg.size[1] >= WINOGRAD_MIN_PIXELS


def build_extractor(cfg: StyleConfig, features: nn.Sequential | None = None) -> VGGFeatures:
    """The extractor for `cfg`'s layers, on `cfg.device`: Winograd convolutions (NCHW) where
    `winograd_wanted(cfg)` and its precision is fp32 on a CPU, else in `cfg`'s memory format. Converted
    layers still run the default kernels for work in another precision or on small maps."""
    features = features if features is not None else load_vgg(cfg.weights, cfg.seed)
    device = resolve_device(cfg.device)
    ext = VGGFeatures(features, max(cfg.content_layers + cfg.style_layers)).to(device)
    if winograd_wanted(cfg) and fastconv.applies(device, autocast_dtype(cfg.precision, device, "gatys")):
        fastconv.winograd_convs(ext)
    elif cfg.channels_last:
        ext = ext.to(memory_format=torch.channels_last)
    return ext


def conv_kernels(extractor: VGGFeatures, precision: str) -> str:
    """The convolutions a run with `precision` gets from `extractor`: "winograd" or "default"."""
    dev = next(extractor.parameters()).device
    return fastconv.describe(extractor, dev, autocast_dtype(precision, dev, "gatys"))


@lru_cache(maxsize=2)
def cached_extractor(weights: str, seed: int, device: str, last_layer: int, channels_last: bool,
                     precision: str = "auto", winograd: bool = True) -> VGGFeatures:
    """One extractor per process and setting: Ray workers reuse it across tasks (pass `winograd_wanted(cfg)`
    as `winograd`: the extractor is built at the default working size)."""
    cfg = StyleConfig(weights=weights, seed=seed, device=device, channels_last=channels_last, precision=precision,
                      winograd=winograd, content_layers=[last_layer], style_layers=[last_layer])
    return build_extractor(cfg)


# ----------------------------------------------------------------------------- losses


def gram(x: torch.Tensor) -> torch.Tensor:
    """Gram matrix of feature maps: x (B, C, H, W) -> G (B, C, C) in fp32, G = X X^T / (C*H*W), X = x as (C, H*W).

    One matrix product each way in x's own dtype and layout (see _Gram); a bf16 x gives a bf16
    product (fp32 accumulation) rounded to bf16 before the fp32 result."""
    return _Gram.apply(x)


class _Gram(torch.autograd.Function):
    """G = F^T F / n with F = x viewed as (B, H*W, C); backward dL/dF = F (dL/dG + dL/dG^T) / n.

    Autograd's own backward of bmm(F^T, F) would compute two products (one per operand) and add
    them; this computes one. F is a view in both memory formats (NCHW: a transposed matrix;
    channels_last: a plain one), so no feature map is copied. Autocast is off inside: the product
    runs in x's dtype, never in fp16 (a sum over H*W squares overflows it)."""

    @staticmethod
    def _rows(x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view for NCHW and channels_last alike

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        f = _Gram._rows(x)
        ctx.save_for_backward(x)
        ctx.n = c * h * w
        with torch.autocast(x.device.type, enabled=False):
            g = torch.bmm(f.transpose(1, 2), f)
        return g.to(torch.promote_types(g.dtype, torch.float32)).div_(ctx.n)  # bf16 -> fp32; fp64 stays

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        b, c, h, w = x.shape
        sym = ((grad + grad.transpose(1, 2)) / ctx.n).to(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            g = torch.bmm(_Gram._rows(x), sym)  # (B, H*W, C)
        return g.view(b, h, w, c).permute(0, 3, 1, 2)  # x's shape; channels_last strides


def content_loss(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error of feature maps, mean((y_hat - y)^2), in fp32 whatever the maps' dtype;
    y (any shape) is a constant."""
    return torch.square(y_hat.float() - y.detach().float()).mean()


def style_loss(y_hat: torch.Tensor, gram_y: torch.Tensor) -> torch.Tensor:
    """Mean squared error of Gram matrices: mean((gram(y_hat) - gram_y)^2), y_hat (B, C, H, W), gram_y (B, C, C)."""
    return torch.square(gram(y_hat) - gram_y.detach()).mean()


def tv_loss(x: torch.Tensor) -> torch.Tensor:
    """Total variation of an image x (B, C, H, W): 0.5 * (mean|x[h+1,w] - x[h,w]| + mean|x[h,w+1] - x[h,w]|)."""
    return 0.5 * ((x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean()
                  + (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean())


@dataclass
class Targets:
    """What the synthesized image is pulled towards, computed once without gradients."""

    content: dict[int, torch.Tensor]  # layer -> content feature map (1, C, H, W)
    style_grams: dict[int, torch.Tensor]  # layer -> style Gram matrix (1, C, C)


def _features(extractor: VGGFeatures, x: torch.Tensor, layers: Sequence[int], precision: str) -> dict[int, torch.Tensor]:
    """Run the extractor; where `precision` resolves to bf16 (jobs.precision, workload "gatys") the VGG
    runs under bf16 autocast and the maps come back in bf16: the losses take them as they are (gram,
    content_loss) and return fp32."""
    dtype = autocast_dtype(precision, x.device, "gatys")
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        return extractor(x, layers)


def run_layers(cfg: StyleConfig) -> list[int]:
    """Every layer a run reads, content and style, sorted: one forward serves both."""
    return sorted(set(cfg.content_layers + cfg.style_layers))


def compute_targets(extractor: VGGFeatures, content_x: torch.Tensor, style_x: torch.Tensor,
                    cfg: StyleConfig) -> Targets:
    """Content maps of `content_x` and style Grams of `style_x` (both (1, 3, H, W)), no grad."""
    layers = run_layers(cfg)  # the same set as the optimisation uses: see VGGFeatures
    with torch.no_grad():
        c = _features(extractor, content_x, layers, cfg.precision)
        s = _features(extractor, style_x, layers, cfg.precision)
        return Targets({i: c[i] for i in cfg.content_layers}, {i: gram(s[i]) for i in cfg.style_layers})


def weighted_losses(feats: dict[int, torch.Tensor], x: torch.Tensor, targets: Targets,
                    cfg: StyleConfig) -> dict[str, torch.Tensor]:
    """The one place the weights are applied: content, style and TV terms and their sum.

    total = cw * sum_l content_loss(F_l(x), F_l(c)) + sw * sum_l style_loss(F_l(x), G_l(s)) + tw * tv_loss(x)
    """
    content = sum(content_loss(feats[i], targets.content[i]) for i in cfg.content_layers) * cfg.content_weight
    style = sum(style_loss(feats[i], targets.style_grams[i]) for i in cfg.style_layers) * cfg.style_weight
    tv = tv_loss(x) * cfg.tv_weight
    return {"content": content, "style": style, "tv": tv, "total": content + style + tv}


def distances(image, content_img, style_img, extractor: VGGFeatures, size: Sequence[int] = (300, 450),
              content_layers: Sequence[int] = (25,), style_layers: Sequence[int] = (0, 5, 10, 19, 28),
              precision: str = "fp32") -> dict[str, float]:
    """UNWEIGHTED content, style and TV distances of a result at fixed layers, for comparing runs.

    Each image (PIL or path) is preprocessed at `size`; returns
    {"content": sum_l content_loss, "style": sum_l style_loss, "tv": tv_loss}, no weights,
    so a sweep over the loss weights can rank its trials on one scale.
    """
    cfg = StyleConfig(content_layers=list(content_layers), style_layers=list(style_layers), size=list(size),
                      content_weight=1.0, style_weight=1.0, tv_weight=1.0, precision=precision)
    dev = next(extractor.parameters()).device
    x, c, s = (preprocess(load_image(im), size).to(dev) for im in (image, content_img, style_img))
    targets = compute_targets(extractor, c, s, cfg)
    with torch.no_grad():
        losses = weighted_losses(_features(extractor, x, run_layers(cfg), precision), x, targets, cfg)
    return {k: float(losses[k]) for k in ("content", "style", "tv")}


# ----------------------------------------------------------------------------- optimisation

ProgressFn = Callable[[dict], None]


def _optimize(x: torch.Tensor, extractor: VGGFeatures, targets: Targets, cfg: StyleConfig,
              progress: ProgressFn | None, history: list[dict], scale_index: int) -> torch.Tensor:
    """Optimise image x (1, 3, H, W) in place; append one record per loss evaluation.

    Adam: `cfg.steps` steps, one evaluation each, StepLR after each. L-BFGS: at most
    `cfg.steps` evaluations, strong-Wolfe line search (without it the first steps diverge).
    """
    x.requires_grad_(True)
    layers = run_layers(cfg)
    t0 = time.perf_counter()

    def evaluate() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        losses = weighted_losses(_features(extractor, x, layers, cfg.precision), x, targets, cfg)
        losses["total"].backward()
        rec = {"scale": scale_index, "size": list(x.shape[-2:]), "step": len(history),
               "lr": opt.param_groups[0]["lr"], "time_s": time.perf_counter() - t0,
               **{k: v.item() for k, v in losses.items()}}
        history.append(rec)
        if not math.isfinite(rec["total"]):
            raise FloatingPointError(f"loss became {rec['total']} at step {rec['step']}: lower lr or weights")
        if progress is not None:
            progress(rec)
        return losses["total"]

    if cfg.optimizer == "adam":
        opt = torch.optim.Adam([x], lr=cfg.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, cfg.lr_decay_steps, cfg.lr_gamma)
        for _ in range(cfg.steps):
            evaluate()
            opt.step()
            sched.step()
    elif cfg.steps > 0:
        opt = torch.optim.LBFGS([x], lr=cfg.lbfgs_lr, max_iter=cfg.steps, max_eval=cfg.steps,
                                history_size=cfg.lbfgs_history, line_search_fn="strong_wolfe")
        opt.step(evaluate)
    return x.detach()


def stylize(content_img, style_img, cfg: StyleConfig | None = None, extractor: VGGFeatures | None = None,
            progress: ProgressFn | None = None) -> tuple[Image.Image, list[dict]]:
    """Paint `content_img` in the style of `style_img`; return (result image, per-step history).

    Images are PIL images, paths or bytes. Pass a pre-built `extractor` (see `build_extractor`)
    to reuse VGG across calls; it must reach max(layers). With several `cfg.scales` the
    result of each scale, upsampled, seeds the next. `progress(record)` is called after every
    step with {"scale", "size", "step", "lr", "time_s", "content", "style", "tv", "total"}
    (weighted losses, evaluated before that step's update; for L-BFGS one record per
    evaluation, line-search trials included).
    """
    cfg = (cfg or StyleConfig()).validate()
    content = load_image(content_img, cfg.max_pixels, "content image")
    style = load_image(style_img, cfg.max_pixels, "style image")
    extractor = extractor if extractor is not None else build_extractor(cfg)
    dev = next(extractor.parameters()).device
    cfg = dataclasses.replace(cfg, precision=dtype_name(autocast_dtype(cfg.precision, dev, "gatys")))
    history: list[dict] = []
    x = None
    for k, s in enumerate(cfg.scales):
        size = [max(1, round(v * s)) for v in cfg.size]
        # the image stays NCHW-contiguous (L-BFGS flattens it); a channels_last VGG converts it
        content_x = preprocess(content, size).to(dev)
        style_x = preprocess(style, size).to(dev)
        targets = compute_targets(extractor, content_x, style_x, cfg)
        if x is not None:  # coarse-to-fine: the upsampled previous result seeds this scale
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        elif cfg.init == "content":
            x = content_x.clone()
        else:  # uniform noise in [0, 1] pixel space, normalized like an image
            g = torch.Generator().manual_seed(cfg.seed)
            noise = torch.rand(content_x.shape, generator=g)
            mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            x = ((noise - mean) / std).to(dev)
        x = _optimize(x, extractor, targets, cfg, progress, history, k)
    return postprocess(x), history


def config_dict(cfg: StyleConfig) -> dict:
    """Plain dict of the config, for JSON results and the Ray boundary."""
    return dataclasses.asdict(cfg)


if __name__ == "__main__":
    from jobs.cli import run_cli
    from jobs.style_cli import main

    run_cli(main)
